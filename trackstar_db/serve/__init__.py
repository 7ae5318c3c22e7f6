"""A warm attribution server and a live explorer over one database (`trackstar-db serve`).

    from trackstar_db.serve import app
    asgi = app("demo-db")                     # or app(trackstar_db.connect("demo-db"))
    my_app.mount("/attribution", asgi)        # inside a user's own Starlette / FastAPI app

The app opens the database once and keeps the model, featurizer and R warm between requests.
Its parts: snapshot.py (the consistent version each request reads), service.py (the work, one
model worker thread), allocator.py (the process's malloc setting `serve` makes at start),
payload.py (answers as JSON), routes.py (HTTP, errors, token, and the
explorer page: static/live.html's body in report/page.py's one page shell, made at start-up),
static/ (the page's body, its own CSS and JavaScript, shipped in the wheel; nothing from the
network). Needs the `serve` extra: pip install 'trackstar-db[serve]'.
"""

from __future__ import annotations

from pathlib import Path

from trackstar_db.distributed.objectstore import is_uri
from trackstar_db.errors import TrackstarError


def app(db, *, token: str | None = None, device: str = "cpu", follow: bool = True,
        allowed_hosts: list[str] | None = None, max_queued: int = 64, max_batch: int = 16,
        batch_wait: float = 0.05, timeout: float = 120.0):
    """The ASGI application serving `db` (a path or an open Database).

    token: every request must carry it (header 'Authorization: Bearer ...', or ?token= once, which
    sets a cookie); follow: move to a newer database version when a writer has committed one (False:
    serve the version found at start); allowed_hosts: refuse other Host headers (the CLI passes
    the loopback names when bound to localhost); max_queued: model requests waiting at most (more:
    503); max_batch: queries answered by one model pass at most (1: one at a time); batch_wait:
    seconds the model thread waits for more queries to join a batch; timeout: seconds a model
    request may wait and run before it is answered 504. `db` may be s3://bucket/db."""
    try:
        import fastapi  # noqa: F401  # heavy: fastapi
    except ImportError:
        raise TrackstarError("trackstar-db serve needs FastAPI and uvicorn: pip install 'trackstar-db[serve]'") from None
    from .routes import build  # heavy: duckdb
    from .service import Service  # heavy: duckdb

    remote = getattr(db, "remote", None)
    path = remote.uri if remote is not None else getattr(db, "path", db)
    if not is_uri(path):
        path = Path(path)
        if not (path / "manifest.json").is_file():
            raise TrackstarError(f"{path}: not a trackstar-db database (no manifest.json)")
    service = Service(path, device=device, follow=follow, max_queued=max_queued, max_batch=max_batch,
                      batch_wait=batch_wait, timeout=timeout)
    return build(service, token, allowed_hosts)


__all__ = ["app"]
