"""What the server does, without HTTP: answer queries, token contributions, SQL, the stored runs
and evaluation, against the tracker's current snapshot (snapshot.py).

One model, one worker: everything that runs the model (query, token contributions) is queued to
a single worker thread (`ModelWorker`), so the featurizers are only ever used by that thread.
Queries that wait while it is busy are taken together, up to `max_batch` (waiting `batch_wait`
seconds for more once it takes the first), and answered by one model pass (`query_batch`:
PromptAttributor.attribute_many, one featurize call and one scan per method for all of them),
each with its own answer, the one it gets alone. Requests that never touch the model (SQL,
evaluation, runs, examples, version) run on the ASGI server's thread pool beside it, each on its
own DuckDB connection or Lance read of the snapshot. At most `max_queued` model requests wait;
the next one is refused at once (HTTP 503); one not answered within `timeout` seconds gets a 504.
"""

from __future__ import annotations

import asyncio
import collections
import concurrent.futures
import threading
import time
from dataclasses import dataclass

import pyarrow as pa
import pyarrow.compute as pc

from trackstar_db import __version__
from trackstar_db.devices import resolve_device
from trackstar_db.errors import TrackstarError
from trackstar_db.ladder import METHODS, REGISTRY
from trackstar_db.progress import quiet_transformers

from . import payload
from .snapshot import Snapshot, Tracker, writer_active

MAX_SQL_ROWS = 10000  # rows one SQL answer carries (the rest is cut, flagged `truncated`)


RECENT = 8  # batches whose largest size is the number of queries the model thread waits for


class Busy(TrackstarError):
    """The model's queue is full."""


class TimedOut(TrackstarError):
    """A model request was not answered within the server's timeout."""


class _Job:
    """One model request: fn(*args), or with `batch` a query that may share a model pass with
    others of the same `batch` function (called as batch(items) -> one result per item)."""

    def __init__(self, fn, args, batch=None):
        self.fn, self.args, self.batch = fn, args, batch
        self.future: concurrent.futures.Future = concurrent.futures.Future()
        self.queued_at = time.monotonic()


class ModelWorker:
    """One thread that runs every model request in arrival order; queries that wait while it is
    busy are taken together (at most `max_batch`) and answered by one call of their batch
    function. Once it takes a query it waits up to `batch_wait` seconds for more, but only until
    as many have joined as the largest of the last RECENT batches held (two, when the query
    itself waited for the model): with one client at work it never waits."""

    def __init__(self, max_queued: int = 64, max_batch: int = 16, batch_wait: float = 0.05):
        self.max_queued, self.max_batch, self.batch_wait = max_queued, max(1, max_batch), max(0.0, batch_wait)
        self._jobs: collections.deque[_Job] = collections.deque()
        self._ready = threading.Condition()
        self._waiting = 0  # submitted and not finished
        self._closed = False
        self.batches = collections.Counter()  # batch size -> how many model passes had it
        self._recent: collections.deque[int] = collections.deque(maxlen=RECENT)  # the last batches' sizes
        self._free_since = 0.0  # when the model thread finished its last job
        self._thread = threading.Thread(target=self._loop, name="trackstar-model", daemon=True)
        self._thread.start()

    @property
    def queued(self) -> int:
        return self._waiting

    async def run(self, fn, *args, timeout: float | None = None):
        """fn(*args) on the model thread, alone."""
        return await self._submit(_Job(fn, args), timeout)

    async def query(self, batch, item, timeout: float | None = None):
        """batch([item, ...])[its place] on the model thread, with the items of other queries
        waiting then (batch: a function answering a list, an exception in the place of a refused one)."""
        return await self._submit(_Job(None, (item,), batch), timeout)

    async def _submit(self, job: _Job, timeout: float | None):
        with self._ready:
            if self._closed:
                raise Busy("the server is shutting down")
            if self._waiting >= self.max_queued:
                raise Busy(f"busy: {self._waiting} model requests queued (at most {self.max_queued}); retry later")
            self._waiting += 1
            self._jobs.append(job)
            self._ready.notify()
        try:
            return await asyncio.wait_for(asyncio.wrap_future(job.future), timeout)
        except asyncio.TimeoutError:
            job.future.cancel()  # skipped by the model thread if it has not started it
            raise TimedOut(f"timed out: no answer within {timeout:g} s (the server's timeout)") from None

    def _take(self) -> list[_Job]:
        """The next job, and with a batchable one the others of its kind that wait (or arrive within batch_wait)."""
        with self._ready:
            while not self._jobs and not self._closed:
                self._ready.wait()
            if self._closed:
                return []
            first = self._jobs.popleft()
            if first.batch is None or self.max_batch == 1:
                return [first]
            # wait for as many as the recent batches held (the clients at work now), at least two when
            # this query waited for the model (another client is at work), at most batch_wait: a lone
            # client never waits, and clients answered together and asking again at once are not
            # split into alternating batches by a few milliseconds of network and formatting
            expected = max(self._recent, default=1)
            if first.queued_at < self._free_since:
                expected = max(expected, 2)
            expected = min(self.max_batch, expected)
            group, deadline = [first], time.monotonic() + self.batch_wait
            while True:
                same = [job for job in self._jobs if job.batch == first.batch][: self.max_batch - len(group)]
                for job in same:
                    self._jobs.remove(job)
                group += same
                left = deadline - time.monotonic()
                if len(group) >= expected or left <= 0:
                    break
                self._ready.wait(left)
            self._recent.append(len(group))
            return group

    def _loop(self) -> None:
        while True:
            jobs = self._take()
            if not jobs:
                return
            live = [job for job in jobs if job.future.set_running_or_notify_cancel()]
            try:
                if live and live[0].batch is not None:
                    self.batches[len(live)] += 1
                    results = live[0].batch([job.args[0] for job in live])
                    for job, result in zip(live, results):
                        if isinstance(result, BaseException):
                            job.future.set_exception(result)
                        else:
                            job.future.set_result(result)
                elif live:
                    live[0].future.set_result(live[0].fn(*live[0].args))
            except BaseException as exc:  # noqa: BLE001 (a bug: every caller of the pass hears it)
                for job in live:
                    if not job.future.done():
                        job.future.set_exception(exc)
            finally:
                with self._ready:
                    self._waiting -= len(jobs)
                    self._free_since = time.monotonic()

    def close(self) -> None:
        with self._ready:
            self._closed = True
            for job in self._jobs:
                job.future.cancel()
            self._waiting -= len(self._jobs)
            self._jobs.clear()
            self._ready.notify_all()


@dataclass(frozen=True)
class QueryItem:
    """One /api/query request, as the model thread answers it (Service.query's arguments)."""

    db: Snapshot
    prompt: str
    target: str
    methods: tuple[str, ...]
    k: int
    ann: object | None = None
    verify: bool = False
    tokens: int = 0
    control_target: str | None = None


def servable_methods(db: Snapshot) -> list[dict]:
    """[{name, kind, available, reason, ann}] for every method a one-prompt query may name, in the
    registry's display order, with the registry's reason when it cannot answer now (runners.status)."""
    from trackstar_db.retrieval.runners import status  # heavy: torch

    indexed = db.manifest.get("ann", {})  # methods with an ANN index (trackstar-db index)
    out = []
    for entry in REGISTRY.values():
        if not entry.serves_prompt:  # TracIn-CP: its sums need stored query gradients at every checkpoint
            continue
        reason = status(db, entry)
        out.append({"name": entry.name, "kind": "gradient" if entry.runner == "gradient" else "baseline",
                    "available": reason is None, "reason": reason, "ann": entry.name in indexed})
    return out


class Service:
    """The server's state: the tracker (current snapshot), the model worker, the device."""

    def __init__(self, path, device: str = "cpu", follow: bool = True, max_queued: int = 64, max_batch: int = 16,
                 batch_wait: float = 0.05, timeout: float | None = 120.0):
        self.tracker = Tracker(path, follow=follow)
        self.worker = ModelWorker(max_queued, max_batch, batch_wait)
        self.timeout = timeout
        self.device = resolve_device(device)  # as the model cache's keys name it (health's model_loaded)
        self.started = time.time()
        self.requests = 0

    @property
    def db(self) -> Snapshot:
        return self.tracker.current()

    # -- model requests (run on the worker thread) --------------------------------------------
    def query_batch(self, items: list[QueryItem]) -> list:
        """Service.query of each item, the model and the stored vectors visited once for all the
        items of one snapshot (PromptAttributor.attribute_many); a refused item gets its error."""
        from trackstar_db.retrieval.adhoc import Ask  # heavy: torch

        out: list = [None] * len(items)
        by_snapshot: dict[int, list[int]] = {}
        for i, item in enumerate(items):
            by_snapshot.setdefault(id(item.db), []).append(i)
        for members in by_snapshot.values():
            db = items[members[0]].db
            asks = [(i, method, Ask(items[i].prompt, items[i].target, method, items[i].k, items[i].ann,
                                    items[i].verify, items[i].control_target))
                    for i in members for method in items[i].methods]
            started = time.perf_counter()
            with quiet_transformers(), db.reading():
                answers = db.prompt_attributor(self.device).attribute_many([ask for _, _, ask in asks])
            seconds = time.perf_counter() - started
            answered: dict[int, dict] = {}
            for (i, method, _), answer in zip(asks, answers):
                answered.setdefault(i, {})[method] = (answer, seconds)
            for i in members:
                item = items[i]
                try:
                    out[i] = self.query(db, item.prompt, item.target, list(item.methods), item.k, item.ann,
                                        item.verify, item.tokens, item.control_target, answered=answered[i],
                                        batch=len(members))
                except TrackstarError as exc:
                    out[i] = exc
        return out

    def query(self, db: Snapshot, prompt: str, target: str, methods: list[str], k: int, ann=None,
              verify: bool = False, tokens: int = 0, control_target: str | None = None,
              answered: dict | None = None, batch: int = 1) -> dict:
        """Each method's proponents and opponents with their evidence (verify: each proponent's
        tail-patch measured now); the top `tokens` proponents of gradient methods carry their
        token contributions (the page's shading). answered: {method: (rows or its error, seconds)}
        already computed for this query in a batch of `batch` queries (query_batch)."""
        from trackstar_db.retrieval.tokens import TokenAttributor  # heavy: torch

        stored = payload.stored_query(db, prompt, target)
        truth = stored.pop("truth") if stored else None
        refs = [prompt, target]
        contributions = None
        results = []
        for method in methods:
            started = time.perf_counter()
            try:
                if answered is not None:
                    rows, seconds = answered[method]
                    if isinstance(rows, BaseException):
                        raise rows
                else:
                    rows = db.query(prompt, target, k=k, method=method, device=self.device, ann=ann, verify=verify,
                                    control_target=control_target)
                    seconds = time.perf_counter() - started
            except TrackstarError as exc:
                raise TrackstarError(f"method {method}: {exc}") from None
            hits = {"proponent": [], "opponent": []}
            for hit in rows.to_pylist():
                shade = None
                if hit["kind"] == "proponent" and method in METHODS and len(hits["proponent"]) < tokens \
                        and control_target is None:  # token shares are of one target
                    contributions = contributions or TokenAttributor(db, self.device)
                    shade = contributions(prompt, target, hit["example_id"], method, hit["text"])
                hits.setdefault(hit["kind"], []).append(payload.hit_json(hit, refs, shade, truth))
            results.append({"method": method, "seconds": seconds, "proponents": hits["proponent"],
                            "opponents": hits["opponent"]})
        return {"prompt": prompt, "target": target, "k": k, "version": db.version_id, "stored_query": stored,
                "batch": batch, "results": results}

    def tokens(self, db: Snapshot, prompt: str, target: str, example_id: str, method: str | None) -> pa.Table:
        return db.token_contributions(prompt, target, example_id, method=method, device=self.device)

    def warm_up(self, method: str | None = None) -> str:
        """Load the model, featurizer and R now (one query of the best method), so the first
        request is not the one that pays; returns the method used."""
        from trackstar_db.retrieval.runners import best_method  # heavy: torch

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
        return {"trackstar_db": __version__, "database": db.location, "version": db.version_id,
                "snapshot_made_at": db.made_at, "tables": db.versions, "follow": self.tracker.follow,
                "pending": self.tracker.pending, "renewals": self.tracker.renewals,
                "writer_active": writer_active(db.path)}

    def health(self) -> dict:
        db = self.db
        return {"status": "ok", "uptime_s": round(time.time() - self.started, 1), "device": self.device,
                "model_loaded": db.models.find(db.manifest, self.device) is not None, "queued": self.worker.queued,
                "max_batch": self.worker.max_batch, "batches": dict(sorted(self.worker.batches.items())),
                "version": db.version_id, "examples": db.count("examples")}
