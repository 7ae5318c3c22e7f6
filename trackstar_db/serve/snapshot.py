"""One consistent version of a database for a long-lived reader, and noticing the next one.

`Snapshot` is a `Database` pinned for its whole life to one read view (store/read_view.py, taken
by `read_view.take` as every reader's is: the committed version of every table, the manifest,
the R files' sha256, the committed BM25 folder; damage refused with one line). Every read of a
table opens the Lance version of that view (and keeps the opened dataset), so a request sees the
same rows from start to end, whatever another process commits meanwhile.

`Tracker` holds the current snapshot. Before a request it compares a cheap fingerprint of the
directory (stat of versions.json, manifest.json, each table's _versions folder and the BM25
index's meta.json) with the one its snapshot was made from; when it changed and no writer holds
the database's lock (a shared flock on DB/.writer.lock, taken without waiting), it takes a new
view under that shared lock (the manifest then is the committed one). While a writer works, the
old snapshot keeps answering and `pending` says a newer version is on its way. `follow=False`
serves the first snapshot for the server's whole life.

The warm models move to the new snapshot when the model and featurizer recorded in the
manifest are unchanged: the new snapshot's model cache adopts its predecessor's entries that
its manifest still describes (models/cache.py), instead of loading them again. So do the opened
Lance datasets of tables whose version is the same (`previous`): a commit that touched two tables
opens two. A snapshot opens its committed BM25 index once (`held_bm25`), not once per request, and computes
its evaluation table once per `by` (`evaluate`).

Not in the view (a reader of these sees the newest committed state): an ANN index (its
provenance check against the snapshot's manifest refuses an index rebuilt since).

A database on object storage (s3://bucket/db) is tracked by serve/remote.py: the same view, of
its local copy of the small files (versions.json among them), with the tables read in place,
renewed when one LIST request shows them changed.
"""

from __future__ import annotations

import datetime as _dt
import fcntl
import os
import threading
import time
from pathlib import Path

from trackstar_db.api import Database
from trackstar_db.distributed.objectstore import is_uri
from trackstar_db.store import lock as _lock
from trackstar_db.store import manifest as _manifest
from trackstar_db.store import committed as _committed
from trackstar_db.store.bm25 import BM25Index


class Snapshot(Database):
    """A database handle pinned to the read view taken when it was made (store/read_view.py)."""

    def __init__(self, path: str | Path, tables_at: str | None = None, location: str | None = None,
                 previous: "Snapshot | None" = None):
        self._tables_at = tables_at  # before the store opens: an object-store database's tables are not local
        super().__init__(path)
        self.location = location or str(self.path)  # what it serves: the directory, or s3://bucket/db
        self._opened: dict[str, object] = {}
        self._guard = threading.Lock()
        self.pin()
        self._bm25_index = None  # the committed BM25 index, opened by the first request that asks (held_bm25)
        self._evaluations: dict[str, object] = {}  # evaluate(by) of this view, computed once (a view never changes)
        if previous is not None and previous.path == self.path:
            for name, dataset in previous._reusable().items():  # a Lance dataset at a fixed version never changes
                if self.view.tables.get(name) == dataset.version:
                    self._opened[name] = dataset
            if previous.view.bm25 == self.view.bm25:
                self._bm25_index = previous._bm25_index
        self.made_at = _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")

    @property
    def versions(self) -> dict[str, int]:
        """{table: the Lance version this snapshot reads}."""
        return dict(self.view.tables)

    @property
    def version_id(self) -> str:
        """A short name of this version (ReadView.version_id)."""
        return self.view.version_id

    def unpin(self) -> None:
        """A snapshot keeps its view for its life (requests on several threads read it)."""

    def _reusable(self) -> dict:
        """{table: opened dataset}: what a next snapshot keeps where its view has the same version
        (a commit that touches few tables opens only those)."""
        with self._guard:
            return dict(self._opened)

    def held_bm25(self):
        """The committed BM25 index this snapshot reads (store/bm25.py), opened once: a Tantivy
        reader per request would open the index's files and start its watcher threads every time."""
        if not self.view.bm25:
            return None
        with self._guard:
            if self._bm25_index is None:
                self._bm25_index = BM25Index.committed(self)
            return self._bm25_index

    def evaluate(self, by: str = "method"):
        """The method-by-metric table of this view, computed by the first request that asks for
        each `by` and kept for the snapshot's life: the view's rows never change, and the
        computation (a DuckDB instance over every retrieval) is most of a request's time."""
        with self._guard:
            held = self._evaluations.get(by)
        if held is None:
            held = super().evaluate(by)
            with self._guard:
                held = self._evaluations.setdefault(by, held)
        return held

    def _open_dataset(self, name: str):
        with self._guard:
            if name not in self._opened:  # only tables of the view exist (table_names): opened at their version
                self._opened[name] = super()._open_dataset(name)
            return self._opened[name]


def fingerprint(path: Path) -> tuple:
    """What changes whenever a writer commits: stat of versions.json, the manifest, every
    table's version folder and the BM25 index's meta.json (microseconds; no table is opened)."""
    marks = []
    for item in [path / _committed.FILENAME, path / _manifest.FILENAME, path / "bm25" / "meta.json",
                 *sorted((path / "tables").glob("*.lance/_versions"))]:
        try:
            stat = item.stat()
            marks.append((str(item), stat.st_mtime_ns, stat.st_size, stat.st_ino))
        except OSError:
            marks.append((str(item), None))
    return tuple(marks)


class _NoWriter:
    """Context: a shared flock on DB/.writer.lock if no writer holds it (entered is True), else
    nothing (entered is False). Writers wait for a shared holder as for another writer."""

    def __init__(self, path: Path):
        self.path, self.fd, self.entered = Path(path) / _lock.FILENAME, None, False

    def __enter__(self) -> "_NoWriter":
        try:
            self.fd = os.open(self.path, os.O_RDONLY)
        except FileNotFoundError:
            self.entered = True  # no writer has ever run here
            return self
        try:
            fcntl.flock(self.fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
            self.entered = True
        except BlockingIOError:
            pass
        return self

    def __exit__(self, *exc) -> None:
        if self.fd is not None:
            if self.entered:
                fcntl.flock(self.fd, fcntl.LOCK_UN)
            os.close(self.fd)


def writer_active(path: Path) -> bool:
    """Does another process hold the database's writer lock now?"""
    with _NoWriter(path) as probe:
        return not probe.entered


REMOTE_INTERVAL = 2.0  # seconds between two looks at an object-store database (one LIST request)


class Tracker:
    """The snapshot requests read, renewed when the database changed and no writer is at work."""

    def __init__(self, path: str | Path, follow: bool = True, interval: float = 0.5, wait: float = 10.0):
        self.follow, self.interval = follow, interval
        self._lock = threading.Lock()
        self._checked = 0.0
        self.pending = False
        self.renewals = 0
        self.remote = None
        if is_uri(path):  # s3://bucket/db: snapshots of its committed versions (serve/remote.py)
            from .remote import RemoteSource  # cycle: trackstar_db.serve.remote

            self.remote = RemoteSource(str(path))
            self.interval = max(interval, REMOTE_INTERVAL)
            self.snapshot = self.remote.snapshot(first=True)
            self.path = self.snapshot.path
            return
        self.path = Path(path)
        Database.open(self.path)  # its first open records a database older than versions.json (read_view.py)
        deadline = time.monotonic() + wait
        while True:  # the first snapshot: wait a while for a writer at work, then read what is committed
            with _NoWriter(self.path) as probe:
                if probe.entered or time.monotonic() >= deadline:
                    self._mark, self.snapshot = fingerprint(self.path), Snapshot(self.path)
                    break
            time.sleep(0.1)

    def current(self) -> Snapshot:
        """The snapshot to answer a request with (renewed first when due)."""
        if not self.follow or time.monotonic() - self._checked < self.interval:
            return self.snapshot
        with self._lock:
            if time.monotonic() - self._checked >= self.interval:
                self._renew()
                self._checked = time.monotonic()
            return self.snapshot

    def _renew(self) -> None:
        if self.remote is not None:
            fresh = self.remote.snapshot() if self.remote.changed() else self.snapshot
            self.pending = fresh is None
            if fresh is not None and fresh is not self.snapshot:
                self._move_to(fresh)
            return
        mark = fingerprint(self.path)
        if mark == self._mark:
            self.pending = False
            return
        with _NoWriter(self.path) as probe:
            if not probe.entered:
                self.pending = True
                return
            mark, fresh = fingerprint(self.path), Snapshot(self.path, previous=self.snapshot)
        self._mark = mark
        self._move_to(fresh)

    def _move_to(self, fresh: Snapshot) -> None:
        """Serve `fresh` from now on, the loaded models handed over where they are the same."""
        fresh.models.adopt(self.snapshot.models, fresh.manifest)
        self.snapshot, self.pending = fresh, False
        self.path = fresh.path
        self.renewals += 1

