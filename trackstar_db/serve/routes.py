"""The HTTP face of the service (service.py): a FastAPI application with JSON endpoints, the
explorer page and its assets, one-line errors, an optional token and a request size limit.

    GET  /                       the live explorer (static/index.html)
    GET  /api/health             status, model loaded, requests queued
    GET  /api/version            trackstar-db version, the snapshot served, pending changes
    GET  /api/methods            every method a query may name, and whether this database serves it
    POST /api/query              proponents and opponents of one prompt and target, per method
    POST /api/tokens             each token's part of one example's score
    POST /api/sql                one read-only SQL statement (the guard of `trackstar-db sql`)
    GET  /api/runs               the stored retrieval and tail-patch runs
    GET  /api/evaluation?by=     the method-by-metric table (`trackstar-db eval`)
    GET  /api/examples/{id}      one example's text and metadata
    GET  /api/queries?limit=     stored queries (the page's picker)
    GET  /openapi.json           the OpenAPI description (no /docs page: it would load from a CDN)

Errors are JSON {"error": "<one line>"}: 400 bad input the library refuses, 401 without the
token, 404 unknown example or path, 413 a body over MAX_BODY, 422 a field out of range, 503 the
model's queue full. A 500 is a bug (its traceback goes to the server's log).
"""

from __future__ import annotations

import logging
import secrets
from importlib import resources
from typing import Optional

from fastapi import Body, FastAPI, Query, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import FileResponse, JSONResponse, Response
from fastapi.staticfiles import StaticFiles
from pydantic import BaseModel, ConfigDict, Field
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException as StarletteHTTPException

from trackstar_db import __version__
from trackstar_db.errors import TrackstarError

from . import payload
from .service import MAX_K, MAX_SQL_ROWS, MAX_TEXT, Busy, Service

MAX_BODY = 1 << 20  # bytes of a request body
TOKEN_COOKIE = "trackstar_token"
log = logging.getLogger("trackstar_db.serve")


class JSON(JSONResponse):
    """JSON with NaN as null and timestamps as text (payload.dumps)."""

    def render(self, content) -> bytes:
        return payload.dumps(content)


def _error(status: int, message: str) -> JSON:
    return JSON({"error": " ".join(str(message).split()) or "error"}, status_code=status)


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class QueryRequest(_Strict):
    prompt: str = Field(min_length=1, max_length=MAX_TEXT, description="The context, e.g. 'The capital of France is'.")
    target: str = Field(min_length=1, max_length=MAX_TEXT, description="The continuation to attribute.")
    methods: list[str] = Field(default_factory=list, max_length=16,
                               description="Methods side by side; empty: the best one the database serves.")
    k: int = Field(10, ge=1, le=MAX_K, description="Proponents (and opponents) per method.")
    tokens: int = Field(0, ge=0, le=10, description="Shade the top N proponents of each gradient method by token.")
    ann: bool = Field(False, description="Approximate top-k from the method's ANN index (trackstar-db index).")
    nprobes: Optional[int] = Field(None, ge=1)
    refine_factor: Optional[int] = Field(None, ge=1)
    ef: Optional[int] = Field(None, ge=1)
    verify: bool = Field(False, description="Ask Database.query to verify (where this version offers it).")
    control_target: Optional[str] = Field(None, min_length=1, max_length=MAX_TEXT,
                                          description="Contrast: attribute loss(target) - loss(control_target).")


class TokensRequest(_Strict):
    prompt: str = Field(min_length=1, max_length=MAX_TEXT)
    target: str = Field(min_length=1, max_length=MAX_TEXT)
    example_id: str = Field(min_length=1, max_length=1000)
    method: Optional[str] = Field(None, description="A gradient method; default: the best one served.")


class SQLRequest(_Strict):
    sql: str = Field(min_length=1, max_length=100_000, description="One read-only statement (DuckDB).")
    limit: int = Field(1000, ge=1, le=MAX_SQL_ROWS, description="Rows returned at most.")


def _validation_line(exc: RequestValidationError) -> str:
    first = exc.errors()[0] if exc.errors() else {}
    where = ".".join(str(p) for p in first.get("loc", ())[1:]) or "request"
    return f"{where}: {first.get('msg', 'invalid')}"


def _known_methods(names: list[str]) -> None:
    from trackstar_db.ladder import ALL_METHODS

    for name in names:
        if name not in ALL_METHODS:
            raise TrackstarError(f"unknown method {name!r}; methods: {', '.join(ALL_METHODS)}")


def build(service: Service, token: str | None = None, allowed_hosts: list[str] | None = None) -> FastAPI:
    """The FastAPI application over `service`."""
    app = FastAPI(title="trackstar-db", version=__version__, default_response_class=JSON,
                  docs_url=None, redoc_url=None,
                  description="Training-data attribution over one trackstar-db database: queries, token "
                              "contributions, read-only SQL, stored runs and evaluation.")
    app.state.service = service
    static = resources.files("trackstar_db.serve") / "static"

    @app.exception_handler(TrackstarError)
    async def _bad_input(request, exc):
        return _error(503 if isinstance(exc, Busy) else 400, exc)

    @app.exception_handler(LookupError)
    async def _missing(request, exc):
        return _error(404, exc.args[0] if exc.args else "not found")

    @app.exception_handler(RequestValidationError)
    async def _invalid(request, exc):
        return _error(422, _validation_line(exc))

    @app.exception_handler(StarletteHTTPException)
    async def _http(request, exc):
        return _error(exc.status_code, exc.detail if exc.status_code != 404 else f"not found: {request.url.path}")

    @app.exception_handler(Exception)
    async def _bug(request, exc):
        log.exception("bug answering %s", request.url.path)
        return _error(500, f"internal error ({type(exc).__name__}); see the server's log")

    @app.middleware("http")
    async def _guard(request: Request, call_next):
        size = request.headers.get("content-length")
        if size is not None and (not size.isdigit() or int(size) > MAX_BODY):
            return _error(413, f"request body over {MAX_BODY:,} bytes")
        if token is not None:
            given = (request.headers.get("authorization", "").removeprefix("Bearer ").strip()
                     or request.headers.get("x-trackstar-token") or request.cookies.get(TOKEN_COOKIE)
                     or request.query_params.get("token") or "")
            if not secrets.compare_digest(given.encode(), token.encode()):
                return _error(401, "this server needs its token: ?token=..., or the header 'Authorization: Bearer ...'")
        response = await call_next(request)
        if token is not None and request.query_params.get("token"):
            response.set_cookie(TOKEN_COOKIE, token, httponly=True, samesite="strict")
        response.headers.setdefault("X-Content-Type-Options", "nosniff")
        return response

    @app.get("/", include_in_schema=False)
    async def index():
        return FileResponse(str(static / "index.html"), media_type="text/html",
                            headers={"Content-Security-Policy": "default-src 'self'; style-src 'self' 'unsafe-inline'; "
                                                                "img-src 'self' data:; object-src 'none'; base-uri 'none'"})

    @app.get("/static/explorer.css", include_in_schema=False)
    async def explorer_css():
        from trackstar_db.evaluation.explorer import CSS

        return Response(CSS, media_type="text/css")

    app.mount("/static", StaticFiles(directory=str(static)), name="static")

    @app.get("/api/health", summary="Status, model loaded, model requests queued")
    async def health():
        return service.health()

    @app.get("/api/version", summary="trackstar-db version and the database version served")
    async def version():
        return await run_in_threadpool(service.version)

    @app.get("/api/methods", summary="Methods a query may name, and whether this database serves each")
    async def methods():
        from .service import servable_methods

        return {"methods": await run_in_threadpool(servable_methods, service.db)}

    @app.post("/api/query", summary="Proponents and opponents of one prompt and target, per method")
    async def query(request: QueryRequest = Body(...)):
        from trackstar_db.retrieval.adhoc import best_method

        if not request.prompt.strip() or not request.target.strip():
            raise TrackstarError("prompt and target must hold more than white space")
        _known_methods(request.methods)
        db = service.db
        names = list(dict.fromkeys(request.methods)) or [best_method(db)]
        ann = None
        if request.ann:
            from trackstar_db.retrieval.ann import AnnOptions

            ann = AnnOptions(request.nprobes, request.refine_factor, request.ef)
        elif request.nprobes or request.refine_factor or request.ef:
            raise TrackstarError("nprobes, refine_factor and ef need ann")
        return await service.worker.run(service.query, db, request.prompt, request.target, names, request.k, ann,
                                        request.verify, request.tokens, request.control_target)

    @app.post("/api/tokens", summary="Each token's part of one example's score (gradient methods)")
    async def tokens(request: TokensRequest = Body(...)):
        if request.method is not None:
            _known_methods([request.method])
        db = service.db
        service.example(db, request.example_id)  # 404 before the model runs
        table = await service.worker.run(service.tokens, db, request.prompt, request.target, request.example_id,
                                         request.method)
        return payload.table_json(table)

    @app.post("/api/sql", summary="One read-only SQL statement over the tables (DuckDB)")
    async def sql(request: SQLRequest = Body(...)):
        return await run_in_threadpool(service.sql, service.db, request.sql, request.limit)

    @app.get("/api/runs", summary="The stored runs")
    async def runs():
        return await run_in_threadpool(service.runs, service.db)

    @app.get("/api/evaluation", summary="The method-by-metric table (queries/summary*.sql)")
    async def evaluation(by: str = Query("method", max_length=100)):
        return await run_in_threadpool(service.evaluation, service.db, by)

    @app.get("/api/examples/{example_id}", summary="One example's text and metadata")
    async def example(example_id: str):
        return await run_in_threadpool(service.example, service.db, example_id)

    @app.get("/api/queries", summary="Stored queries (prompt, target), the first `limit` by id")
    async def queries(limit: int = Query(200, ge=1, le=MAX_SQL_ROWS)):
        return await run_in_threadpool(service.suggestions, service.db, limit)

    if allowed_hosts:
        from starlette.middleware.trustedhost import TrustedHostMiddleware

        app.add_middleware(TrustedHostMiddleware, allowed_hosts=allowed_hosts)
    return app
