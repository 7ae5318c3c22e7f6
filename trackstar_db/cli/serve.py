"""`trackstar-db serve DB`: the warm attribution server and live explorer (trackstar_db/serve)."""

from __future__ import annotations

import logging
import os
import time

import click

from trackstar_db.devices import resolve_device
from trackstar_db.distributed.objectstore import object_uri
from trackstar_db.errors import TrackstarError
from trackstar_db.serve.allocator import keep_mmap_threshold

from . import main
from .common import DB_ARG
from .types import DEVICE

LOOPBACK = ("127.0.0.1", "localhost", "::1")
TOKEN_ENV = "TRACKSTAR_SERVE_TOKEN"


def check_bind(host: str, public: bool) -> list[str] | None:
    """The Host names to accept on a loopback bind (None: any, on an explicit --public bind);
    refuses a non-loopback host without --public."""
    if host in LOOPBACK:
        return ["127.0.0.1", "localhost", "[::1]", "::1"]
    if not public:
        raise TrackstarError(f"--host {host}: binding beyond this machine needs --public (and, better, --token)")
    return None


def _log_handler() -> logging.Handler:
    """One line on stderr per refused request (and per bug), with the time."""
    handler = logging.StreamHandler()
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(message)s"))
    return handler


@main.command()
@DB_ARG
@click.option("--host", default="127.0.0.1", show_default=True, help="Address to bind; beyond loopback needs --public.")
@click.option("--port", type=click.IntRange(0, 65535), default=8000, show_default=True)
@click.option("--public", is_flag=True, help="Allow a --host other than loopback (prints a warning).")
@click.option("--token", default=None, envvar=TOKEN_ENV, show_envvar=True,
              help="Every request must carry this token ('Authorization: Bearer ...' or ?token= once).")
@click.option("--device", type=DEVICE, default="auto", show_default=True, help="auto (a GPU when present), cpu, cuda or cuda:N.")
@click.option("--fixed", is_flag=True, help="Serve the database version found at start; never move to a newer one.")
@click.option("--max-queued", type=click.IntRange(1, 100000), default=64, show_default=True,
              help="Model requests waiting at most; more are refused with 503.")
@click.option("--no-warm", is_flag=True, help="Load the model on the first query instead of at start.")
@click.option("--max-batch", type=click.IntRange(1, 256), default=16, show_default=True,
              help="Queries answered by one model pass at most (those waiting while the model is busy); "
                   "1: one at a time.")
@click.option("--batch-wait-ms", type=click.FloatRange(0, 1000), default=50.0, show_default=True,
              help="Milliseconds the model waits at most for more queries to join a batch (only while fewer have "
                   "joined than in the recent batches: a lone client never waits).")
@click.option("--timeout", type=click.FloatRange(0.1, 86400), default=120.0, show_default=True,
              help="Seconds a model request may wait and run; later: 504.")
def serve(db, host, port, public, token, device, fixed, max_queued, no_warm, max_batch, batch_wait_ms, timeout):
    """Serve DB (a directory or s3://bucket/db) over HTTP: JSON API and a live explorer page at /,
    the model kept warm; queries waiting together share one model pass."""
    try:
        import uvicorn  # heavy: uvicorn
    except ImportError:
        raise TrackstarError("trackstar-db serve needs FastAPI and uvicorn: pip install 'trackstar-db[serve]'") from None

    from trackstar_db.serve.routes import build  # heavy: duckdb
    from trackstar_db.serve.service import Service  # heavy: duckdb

    allowed_hosts = check_bind(host, public)
    if allowed_hosts is None:
        click.secho(f"warning: serving {db} on {host}:{port}, reachable beyond this machine"
                    f"{'' if token else ' with no token: anyone who reaches it can query and read the database'}",
                    fg="red", err=True)
    if token is not None and not token.strip():
        raise TrackstarError(f"--token / {TOKEN_ENV} is empty")
    started = time.perf_counter()
    keep_mmap_threshold()  # a long-lived process: freed scan buffers go back to the kernel (serve/allocator.py)

    db = object_uri(db) or db
    log = logging.getLogger("trackstar_db.serve")
    if not log.handlers:
        log.addHandler(_log_handler())
    service = Service(db, device=resolve_device(device), follow=not fixed, max_queued=max_queued,
                      max_batch=max_batch, batch_wait=batch_wait_ms / 1000, timeout=timeout)
    if not no_warm:
        try:
            method = service.warm_up()
            click.echo(f"warm ({method}) in {time.perf_counter() - started:.1f} s", err=True)
        except TrackstarError as exc:
            click.echo(f"not warmed up ({exc}); the first query loads what it needs", err=True)
    version = "a fixed version" if fixed else "the newest committed version"
    click.echo(f"serving {db} ({version}, {service.device}) at http://{host if ':' not in host else f'[{host}]'}:{port}/"
               f"{'  (token required)' if token else ''}", err=True)
    os.environ.pop(TOKEN_ENV, None)  # not inherited by anything the server starts
    uvicorn.run(build(service, token, allowed_hosts), host=host, port=port, log_level="warning")
