"""One consistent version of a database for a long-lived reader, and noticing the next one.

`Snapshot` is a `Database` whose manifest and table versions are fixed when it is made: every
read of a table opens the Lance version recorded then (and keeps the opened dataset), so a
request sees the same rows from start to end, whatever another process commits meanwhile.

`Tracker` holds the current snapshot. Before a request it compares a cheap fingerprint of the
directory (stat of manifest.json, of each table's _versions folder and of the BM25 index's
meta.json) with the one its snapshot was made from; when it changed and no writer holds the
database's lock (a shared flock on DB/.writer.lock, taken without waiting), it makes a new
snapshot under that shared lock, so no writer can commit half-way through it. While a writer
works, the old snapshot keeps answering and `pending` says a newer version is on its way.
`follow=False` serves the first snapshot for the server's whole life.

The warm state moves to the new snapshot when the model and featurizer recorded in the
manifest are unchanged: the loaded checkpoints (PromptAttributor's featurizers) are handed
over instead of loaded again. So do the opened Lance datasets of tables whose version is the
same (`previous`): a commit that touched two tables opens two. A snapshot opens its committed
BM25 index once (`held_bm25`), not once per request.

BM25 reads the committed folder of the index the record names (store/bm25.py). Not pinned (a
reader of these sees the newest committed state): an ANN index (its provenance check against the
snapshot's manifest refuses an index rebuilt since), and preconditioner files (a refit replaces
them; the snapshot's recorded sha256 refuses the new file until the next snapshot).

A database on object storage (s3://bucket/db) is tracked by serve/remote.py: snapshots pinned to
the versions its last writer committed (`committed=True`), each on its own local copy of the
small files, renewed when one LIST request shows them changed.
"""

from __future__ import annotations

import datetime as _dt
import fcntl
import hashlib
import os
import threading
import time
from pathlib import Path

from trackstar_db.api import Database
from trackstar_db.store import lock as _lock
from trackstar_db.store import manifest as _manifest
from trackstar_db.store import snapshot as _committed


class Snapshot(Database):
    """A database handle pinned to the manifest and table versions present when it was made
    (committed: to the versions its last writer committed, DB/versions.json, where recorded)."""

    def __init__(self, path: str | Path, tables_at: str | None = None, committed: bool = False,
                 location: str | None = None, previous: "Snapshot | None" = None):
        super().__init__(path)
        self._tables_at = tables_at
        self.location = location or str(self.path)  # what it serves: the directory, or s3://bucket/db
        self._pinned: dict[str, int] = {}
        self._opened: dict[str, object] = {}
        self._guard = threading.Lock()
        self._bm25 = _committed.committed_bm25(self.path)  # the committed BM25 folder (store/bm25.py)
        record = _committed.read(self.path) if committed else None
        if record is not None:
            self._pinned = dict(record["tables"])
        self._bm25_index = None  # the committed BM25 index, opened by the first request that asks (held_bm25)
        kept = previous._reusable(self.path) if previous is not None else {}
        for name in list(self._pinned) or super().table_names():
            dataset = kept.get(name)
            if dataset is None or dataset.version != self._pinned.get(name, dataset.latest_version):
                dataset = super()._open_dataset(name)
            self._opened[name] = dataset
            self._pinned[name] = dataset.version
        if previous is not None and previous._bm25 == self._bm25 and previous.path == self.path:
            self._bm25_index = previous._bm25_index
        self.made_at = _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")

    @property
    def versions(self) -> dict[str, int]:
        """{table: the Lance version this snapshot reads}."""
        return dict(self._pinned)

    @property
    def version_id(self) -> str:
        """A short name of this version: a hash of the manifest and the table versions."""
        text = repr((sorted(self._pinned.items()), sorted(_flat(self.manifest))))
        return hashlib.sha256(text.encode()).hexdigest()[:12]

    def table_names(self) -> list[str]:
        return sorted(self._pinned)

    def _reusable(self, path: Path) -> dict:
        """{table: opened dataset} a next snapshot of `path` may keep where its version is the same
        (a Lance dataset at a fixed version never changes): a commit that touches few tables opens only those."""
        if path != self.path:
            return {}
        with self._guard:
            return dict(self._opened)

    def held_bm25(self):
        """The committed BM25 index this snapshot reads (store/bm25.py), opened once: a Tantivy
        reader per request would open the index's files and start its watcher threads every time."""
        if not self._bm25:
            return None
        with self._guard:
            if self._bm25_index is None:
                from trackstar_db.store.bm25 import BM25Index

                self._bm25_index = BM25Index.committed(self)
            return self._bm25_index

    def _open_dataset(self, name: str):
        with self._guard:
            if name not in self._opened:  # only tables pinned exist (table_names): opened at their version
                self._opened[name] = super()._open_dataset(name)
            return self._opened[name]


def _flat(value, prefix: str = "") -> list[tuple[str, str]]:
    if isinstance(value, dict):
        return [item for key, v in value.items() for item in _flat(v, f"{prefix}/{key}")]
    return [(prefix, repr(value))]


def fingerprint(path: Path) -> tuple:
    """What changes whenever a writer commits: stat of the manifest, every table's version
    folder and the BM25 index's meta.json (microseconds; no table is opened)."""
    marks = []
    for item in [path / _manifest.FILENAME, path / "bm25" / "meta.json",
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

    def __init__(self, path: str | Path, follow: bool = True, device: str = "cpu", interval: float = 0.5,
                 wait: float = 10.0):
        from trackstar_db.distributed.objectstore import is_uri

        self.follow, self.device, self.interval = follow, device, interval
        self._lock = threading.Lock()
        self._checked = 0.0
        self.pending = False
        self.renewals = 0
        self.remote = None
        if is_uri(path):  # s3://bucket/db: snapshots of its committed versions (serve/remote.py)
            from .remote import RemoteSource

            self.remote = RemoteSource(str(path))
            self.interval = max(interval, REMOTE_INTERVAL)
            self.snapshot = self.remote.snapshot(first=True)
            self.path = self.snapshot.path
            return
        self.path = Path(path)
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
        """Serve `fresh` from now on, the loaded model handed over when it is the same."""
        old = self.snapshot
        if old._attributor is not None and _warm_state(old.manifest) == _warm_state(fresh.manifest):
            attributor = fresh._attributor_for(old._attributor.device)
            attributor._featurizers = old._attributor._featurizers
        self.snapshot, self.pending = fresh, False
        self.path = fresh.path
        self.renewals += 1


def _warm_state(manifest: dict) -> tuple:
    """What the loaded featurizers depend on: the model and the featurizer settings."""
    return repr(manifest.get("model")), repr(manifest.get("featurizer"))
