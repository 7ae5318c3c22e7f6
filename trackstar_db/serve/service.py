"""What the server does, without HTTP: answer queries, token contributions, SQL, the stored runs
and evaluation, against the tracker's current snapshot (snapshot.py).

One model, one worker: everything that runs the model (query, token contributions) is queued to
a single worker thread (`ModelWorker`, a one-thread executor), so requests from many clients
run one after another in arrival order and the featurizers are only ever used by that thread.
Requests that never touch the model (SQL, evaluation, runs, examples, version) run on the ASGI
server's thread pool beside it, each on its own DuckDB connection or Lance read of the snapshot.
At most `max_queued` model requests wait; the next one is refused at once (HTTP 503).
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import threading
import time

import pyarrow as pa

from trackstar_db import __version__
from trackstar_db.errors import TrackstarError

from . import payload
from .snapshot import Snapshot, Tracker, writer_active

MAX_K = 1000
MAX_TEXT = 2000       # characters of a prompt or a target
MAX_SQL_ROWS = 10000  # rows one SQL answer carries (the rest is cut, flagged `truncated`)


class Busy(TrackstarError):
    """The model's queue is full."""


class ModelWorker:
    """One thread that runs every model request, in arrival order."""

    def __init__(self, max_queued: int = 64):
        self._executor = concurrent.futures.ThreadPoolExecutor(max_workers=1, thread_name_prefix="trackstar-model")
        self.max_queued = max_queued
        self._waiting = 0
        self._count = threading.Lock()

    @property
    def queued(self) -> int:
        return self._waiting

    async def run(self, fn, *args):
        with self._count:
            if self._waiting >= self.max_queued:
                raise Busy(f"busy: {self._waiting} model requests queued (at most {self.max_queued}); retry later")
            self._waiting += 1
        try:
            return await asyncio.wrap_future(self._executor.submit(fn, *args))
        finally:
            with self._count:
                self._waiting -= 1

    def close(self) -> None:
        self._executor.shutdown(wait=False, cancel_futures=True)


def servable_methods(db: Snapshot) -> list[dict]:
    """[{name, kind, available, reason, ann}] for every method a one-prompt query may name, in the
    ladder's display order (baselines, then the gradient rungs)."""
    from trackstar_db.ladder import ALL_METHODS, CHECKPOINT_METHODS, METHODS
    from trackstar_db.retrieval import embedding

    fitted = db.manifest.get("preconditioners", {})
    has_examples = db.count("examples") > 0
    indexed = db.manifest.get("ann", {})  # methods with an ANN index (trackstar-db index)
    out = []
    for name in ALL_METHODS:
        if name in CHECKPOINT_METHODS:  # their sums need stored query gradients at every checkpoint
            continue
        reason = None if has_examples else "no examples"
        if name in METHODS:
            spec = METHODS[name]
            table = db.gradient_table("train", corrected=spec.table == "corrected")
            if not table.exists():
                reason = f"no {table.name} table (ingest gradients)"
            elif spec.preconditioner and table.preconditioner_key(spec.preconditioner) not in fitted:
                reason = f"no {spec.preconditioner!r} R fitted (trackstar-db fit)"
        elif name == "embedding" and not embedding.available():
            reason = "pip install 'trackstar-db[embedding]'"
        elif name == "lm-embedding" and not db.manifest.get("model"):
            reason = "no model recorded"
        out.append({"name": name, "kind": "gradient" if name in METHODS else "baseline",
                    "available": reason is None, "reason": reason, "ann": name in indexed})
    return out


class Service:
    """The server's state: the tracker (current snapshot), the model worker, the device."""

    def __init__(self, path, device: str = "cpu", follow: bool = True, max_queued: int = 64):
        self.tracker = Tracker(path, follow=follow, device=device)
        self.worker = ModelWorker(max_queued)
        self.device = device
        self.started = time.time()
        self.requests = 0

    @property
    def db(self) -> Snapshot:
        return self.tracker.current()

    # -- model requests (run on the worker thread) --------------------------------------------
    def query(self, db: Snapshot, prompt: str, target: str, methods: list[str], k: int, ann=None,
              verify: bool = False, tokens: int = 0, control_target: str | None = None) -> dict:
        """Each method's proponents and opponents with their evidence (verify: each proponent's
        tail-patch measured now); the top `tokens` proponents of gradient methods carry their
        token contributions (the page's shading)."""
        from trackstar_db.ladder import METHODS
        from trackstar_db.retrieval.tokens import TokenAttributor

        stored = payload.stored_query(db, prompt, target)
        truth = stored.pop("truth") if stored else None
        refs = [prompt, target]
        contributions = None
        results = []
        for method in methods:
            started = time.perf_counter()
            try:
                rows = db.query(prompt, target, k=k, method=method, device=self.device, ann=ann, verify=verify,
                                control_target=control_target)
            except TrackstarError as exc:
                raise TrackstarError(f"method {method}: {exc}") from None
            seconds = time.perf_counter() - started
            hits = {"proponent": [], "opponent": []}
            for hit in rows.to_pylist():
                shade = None
                if hit["kind"] == "proponent" and method in METHODS and len(hits["proponent"]) < tokens \
                        and control_target is None:  # token shares are of one target
                    contributions = contributions or TokenAttributor(db, db._attributor_for(self.device), self.device)
                    shade = contributions(prompt, target, hit["example_id"], method, hit["text"])
                hits.setdefault(hit["kind"], []).append(payload.hit_json(hit, refs, shade, truth))
            results.append({"method": method, "seconds": seconds, "proponents": hits["proponent"],
                            "opponents": hits["opponent"]})
        return {"prompt": prompt, "target": target, "k": k, "version": db.version_id, "stored_query": stored,
                "results": results}

    def tokens(self, db: Snapshot, prompt: str, target: str, example_id: str, method: str | None) -> pa.Table:
        return db.token_contributions(prompt, target, example_id, method=method, device=self.device)

    def warm_up(self, method: str | None = None) -> str:
        """Load the model, featurizer and R now (one query of the best method), so the first
        request is not the one that pays; returns the method used."""
        from trackstar_db.retrieval.adhoc import best_method

        db = self.db
        method = method or best_method(db)
        db.query("warm up", "warm up", k=1, method=method, device=self.device)
        return method

    # -- reads (run on the ASGI thread pool) -----------------------------------------------------
    @staticmethod
    def sql(db: Snapshot, text: str, limit: int) -> dict:
        return payload.table_json(db.sql(text), limit)

    @staticmethod
    def evaluation(db: Snapshot, by: str) -> dict:
        if not db.count("retrievals"):
            return payload.table_json(pa.table({}))
        return payload.table_json(db.evaluate(by))

    @staticmethod
    def runs(db: Snapshot) -> dict:
        return payload.table_json(db.table("runs") if db.count("runs") else pa.table({}))

    @staticmethod
    def example(db: Snapshot, example_id: str) -> dict:
        import pyarrow.compute as pc

        rows = db.table("examples", filter=pc.field("example_id") == example_id).to_pylist()
        if not rows:
            raise LookupError(f"no example {example_id!r} in table examples")
        return rows[0]

    @staticmethod
    def suggestions(db: Snapshot, limit: int) -> dict:
        """The first `limit` stored queries (prompt, target), for the page's picker."""
        if not db.count("queries"):
            return payload.table_json(pa.table({}))
        return Service.sql(db, f"SELECT query_id, prompt, target FROM queries ORDER BY query_id LIMIT {int(limit)}",
                           limit)

    def version(self) -> dict:
        db = self.db
        return {"trackstar_db": __version__, "database": str(db.path), "version": db.version_id,
                "snapshot_made_at": db.made_at, "tables": db.versions, "follow": self.tracker.follow,
                "pending": self.tracker.pending, "renewals": self.tracker.renewals,
                "writer_active": writer_active(db.path)}

    def health(self) -> dict:
        db = self.db
        attributor = db._attributor
        return {"status": "ok", "uptime_s": round(time.time() - self.started, 1), "device": self.device,
                "model_loaded": bool(attributor and attributor._featurizers), "queued": self.worker.queued,
                "version": db.version_id, "examples": db.count("examples")}
