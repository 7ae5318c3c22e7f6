"""The HTTP face of the service (service.py): a FastAPI application with JSON endpoints, the
explorer page and its assets, one-line errors, an optional token and a request size limit.

    GET  /                       the live explorer (live_page: static/live.html in report/page.py's shell)
    GET  /api/health             status, model loaded, requests queued
    GET  /api/version            trackstar-db version, the snapshot served, pending changes
    GET  /api/methods            every method a query may name, and whether this database serves it
    POST /api/query              proponents and opponents of one prompt and target, per method
    POST /api/query/batch        many queries: JSON lines in (one /api/query body a line), JSON lines out
    POST /api/tokens             each token's part of one example's score
    POST /api/sql                one read-only SQL statement (the guard of `trackstar-db sql`)
    GET  /api/runs               the stored retrieval and tail-patch runs
    GET  /api/evaluation?by=     the method-by-metric table (`trackstar-db eval`)
    GET  /api/examples/{id}      one example's text and metadata
    GET  /api/queries?limit=     stored queries (the page's picker)
    GET  /openapi.json           the OpenAPI description (no /docs page: it would load from a CDN)

Errors are JSON {"error": "<one line>"}: 400 bad input the library refuses, 401 without the
token, 404 unknown example or path, 413 a body over MAX_BODY, 422 a field out of range, 503 the
model's queue full, 504 no answer within the server's timeout. Each refused request is one
warning line in the log (`refused POST /api/query: 503 busy: ...`). A 500 is a bug (its
traceback goes to the server's log). k and the prompt's length have the library's bounds
(option_checks.K, TEXT: the models' Fields are built from them).

Queries that wait while the model thread is busy are answered together (service.ModelWorker:
one featurize call, one scan per method); each answer is the one it gets alone.
"""

from __future__ import annotations

import asyncio
import logging
import secrets
from importlib import resources
from typing import Optional

from fastapi import Body, FastAPI, Query, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import HTMLResponse, JSONResponse, Response, StreamingResponse
from fastapi.staticfiles import StaticFiles
from pydantic import BaseModel, ConfigDict, Field, ValidationError
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.middleware.trustedhost import TrustedHostMiddleware

from trackstar_db import __version__
from trackstar_db.errors import TrackstarError
from trackstar_db.ladder import ALL_METHODS
from trackstar_db.report.page import STYLESHEET, document
from trackstar_db.option_checks import COUNT, K, TEXT, field_bounds, length_bounds

from . import payload
from .service import MAX_SQL_ROWS, Busy, QueryItem, Service, TimedOut, servable_methods

MAX_BODY = 1 << 20  # bytes of a request body
MAX_BATCH_LINES = 1000  # queries of one /api/query/batch request
TOKEN_COOKIE = "trackstar_token"
LIVE_HEAD = ('<link rel="icon" href="data:,"><link rel="stylesheet" href="static/app.css">'
             '<script src="static/app.js" defer></script>')  # relative: the page works under a path prefix
PAGE_POLICY = ("default-src 'self'; style-src 'self' 'unsafe-inline'; img-src 'self' data:; object-src 'none'; "
               "base-uri 'none'")  # the page's Content-Security-Policy: nothing from the network
log = logging.getLogger("trackstar_db.serve")


class JSON(JSONResponse):
    """JSON with NaN as null and timestamps as text (payload.dumps)."""

    def render(self, content) -> bytes:
        return payload.dumps(content)


def _line(message) -> str:
    return " ".join(str(message).split()) or "error"


def _refused(request: Request, status: int, message) -> None:
    """One warning line in the log for a refused request (any 4xx, 503 or 504)."""
    log.warning("refused %s %s: %d %s", request.method, request.url.path, status, _line(message))


def _error(status: int, message: str, request: Request | None = None) -> JSON:
    """The JSON error of a refused request (logged when `request` is given)."""
    if request is not None and status != 500:
        _refused(request, status, message)
    return JSON({"error": _line(message)}, status_code=status)


def _status(exc: BaseException) -> int:
    return 503 if isinstance(exc, Busy) else 504 if isinstance(exc, TimedOut) else 400


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class QueryRequest(_Strict):
    prompt: str = Field(**length_bounds(TEXT), description="The context, e.g. 'The capital of France is'.")
    target: str = Field(**length_bounds(TEXT), description="The continuation to attribute.")
    methods: list[str] = Field(default_factory=list, max_length=16,
                               description="Methods side by side; empty: the best one the database serves.")
    k: int = Field(10, **field_bounds(K), description="Proponents (and opponents) per method.")
    tokens: int = Field(0, ge=0, le=10, description="Shade the top N proponents of each gradient method by token.")
    ann: bool = Field(False, description="Approximate top-k from the method's ANN index (trackstar-db index).")
    nprobes: Optional[int] = Field(None, **field_bounds(COUNT))
    refine_factor: Optional[int] = Field(None, **field_bounds(COUNT))
    ef: Optional[int] = Field(None, **field_bounds(COUNT))
    verify: bool = Field(False, description="Ask Database.query to verify (where this version offers it).")
    control_target: Optional[str] = Field(None, **length_bounds(TEXT),
                                          description="Contrast: attribute loss(target) - loss(control_target).")


class TokensRequest(_Strict):
    prompt: str = Field(**length_bounds(TEXT))
    target: str = Field(**length_bounds(TEXT))
    example_id: str = Field(min_length=1, max_length=1000)
    method: Optional[str] = Field(None, description="A gradient method; default: the best one served.")


class SQLRequest(_Strict):
    sql: str = Field(min_length=1, max_length=100_000, description="One read-only statement (DuckDB).")
    limit: int = Field(1000, ge=1, le=MAX_SQL_ROWS, description="Rows returned at most.")


def _validation_line(exc, skip: int = 1) -> str:
    """'field: problem' of a validation error (skip: the leading 'body' of FastAPI's locations)."""
    first = exc.errors()[0] if exc.errors() else {}
    where = ".".join(str(p) for p in first.get("loc", ())[skip:]) or "request"
    return f"{where}: {first.get('msg', 'invalid')}"


def _known_methods(names: list[str]) -> None:
    for name in names:
        if name not in ALL_METHODS:
            raise TrackstarError(f"unknown method {name!r}; methods: {', '.join(ALL_METHODS)}")


def _query_item(service: Service, request: QueryRequest) -> QueryItem:
    """The model thread's work for one query request, after the checks that need no model."""
    from trackstar_db.retrieval.runners import best_method  # heavy: torch

    if not request.prompt.strip() or not request.target.strip():
        raise TrackstarError("prompt and target must hold more than white space")
    _known_methods(request.methods)
    db = service.db
    names = tuple(dict.fromkeys(request.methods)) or (best_method(db),)
    ann = None
    if request.ann:
        from trackstar_db.retrieval.ann import AnnOptions  # heavy: torch

        ann = AnnOptions(request.nprobes, request.refine_factor, request.ef)
    elif request.nprobes or request.refine_factor or request.ef:
        raise TrackstarError("nprobes, refine_factor and ef need ann")
    return QueryItem(db, request.prompt, request.target, names, request.k, ann, request.verify, request.tokens,
                     request.control_target)


def live_page(static) -> str:
    """The live explorer page: its body (static/live.html) in the one page shell (report/page.py),
    the one stylesheet linked from static/explorer.css, then the page's own layout and script."""
    body = (static / "live.html").read_text(encoding="utf-8")
    return document("trackstar-db explorer", body, stylesheet_href="static/explorer.css", head=LIVE_HEAD)


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
        return _error(_status(exc), exc, request)

    @app.exception_handler(LookupError)
    async def _missing(request, exc):
        return _error(404, exc.args[0] if exc.args else "not found", request)

    @app.exception_handler(RequestValidationError)
    async def _invalid(request, exc):
        return _error(422, _validation_line(exc), request)

    @app.exception_handler(StarletteHTTPException)
    async def _http(request, exc):
        return _error(exc.status_code, exc.detail if exc.status_code != 404 else f"not found: {request.url.path}",
                      request)

    @app.exception_handler(Exception)
    async def _bug(request, exc):
        log.exception("bug answering %s", request.url.path)
        return _error(500, f"internal error ({type(exc).__name__}); see the server's log")

    @app.middleware("http")
    async def _guard(request: Request, call_next):
        size = request.headers.get("content-length")
        if size is not None and (not size.isdigit() or int(size) > MAX_BODY):
            return _error(413, f"request body over {MAX_BODY:,} bytes", request)
        if token is not None:
            given = (request.headers.get("authorization", "").removeprefix("Bearer ").strip()
                     or request.headers.get("x-trackstar-token") or request.cookies.get(TOKEN_COOKIE)
                     or request.query_params.get("token") or "")
            if not secrets.compare_digest(given.encode(), token.encode()):
                return _error(401, "this server needs its token: ?token=..., or the header 'Authorization: Bearer ...'",
                              request)
        response = await call_next(request)
        if token is not None and request.query_params.get("token"):
            response.set_cookie(TOKEN_COOKIE, token, httponly=True, samesite="strict")
        response.headers.setdefault("X-Content-Type-Options", "nosniff")
        return response

    page = live_page(static)

    @app.get("/", include_in_schema=False)
    async def index():
        return HTMLResponse(page, headers={"Content-Security-Policy": PAGE_POLICY})

    @app.get("/static/explorer.css", include_in_schema=False)
    async def explorer_css():
        return Response(STYLESHEET, media_type="text/css")  # the one stylesheet of every page

    app.mount("/static", StaticFiles(directory=str(static)), name="static")

    @app.get("/api/health", summary="Status, model loaded, model requests queued")
    async def health():
        return service.health()

    @app.get("/api/version", summary="trackstar-db version and the database version served")
    async def version():
        return await run_in_threadpool(service.version)

    @app.get("/api/methods", summary="Methods a query may name, and whether this database serves each")
    async def methods():
        return {"methods": await run_in_threadpool(servable_methods, service.db)}

    @app.post("/api/query", summary="Proponents and opponents of one prompt and target, per method")
    async def query(request: QueryRequest = Body(...)):
        return await service.worker.query(service.query_batch, _query_item(service, request), service.timeout)

    @app.post("/api/query/batch", summary="Many queries: JSON lines in (an /api/query body each), JSON lines out",
              openapi_extra={"requestBody": {"content": {"application/x-ndjson": {"schema": {"type": "string"}}},
                                             "required": True}})
    async def query_batch(request: Request):
        """One answer line per request line, in order: the /api/query answer, or {"line": n,
        "status": code, "error": "..."} with the status the single query would get. The lines go
        to the model queue at most max_batch at a time, so one batch never fills the queue."""
        lines = [(n, text) for n, text in enumerate((await request.body()).decode("utf-8", "replace").splitlines(), 1)
                 if text.strip()]
        if not lines:
            raise TrackstarError("the body holds no JSON lines (one /api/query body a line)")
        if len(lines) > MAX_BATCH_LINES:
            raise TrackstarError(f"{len(lines):,} lines; at most {MAX_BATCH_LINES:,} a request")

        async def answer(n: int, text: str) -> dict:
            try:
                item = _query_item(service, QueryRequest.model_validate_json(text))
                return await service.worker.query(service.query_batch, item, service.timeout)
            except ValidationError as exc:
                status, message = 422, _validation_line(exc, skip=0)
            except TrackstarError as exc:
                status, message = _status(exc), exc
            except Exception as exc:  # noqa: BLE001 (a bug: its traceback to the log, the other lines answered)
                log.exception("bug answering line %d of %s", n, request.url.path)
                return {"line": n, "status": 500,
                        "error": f"internal error ({type(exc).__name__}); see the server's log"}
            _refused(request, status, f"line {n}: {message}")
            return {"line": n, "status": status, "error": _line(message)}

        async def stream():
            window = max(1, service.worker.max_batch)
            for start in range(0, len(lines), window):
                tasks = [asyncio.ensure_future(answer(n, text)) for n, text in lines[start: start + window]]
                for task in tasks:
                    yield payload.dumps(await task) + b"\n"

        return StreamingResponse(stream(), media_type="application/x-ndjson")

    @app.post("/api/tokens", summary="Each token's part of one example's score (gradient methods)")
    async def tokens(request: TokensRequest = Body(...)):
        if request.method is not None:
            _known_methods([request.method])
        db = service.db
        service.example(db, request.example_id)  # 404 before the model runs
        table = await service.worker.run(service.tokens, db, request.prompt, request.target, request.example_id,
                                         request.method, timeout=service.timeout)
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
        app.add_middleware(TrustedHostMiddleware, allowed_hosts=allowed_hosts)
    return app
