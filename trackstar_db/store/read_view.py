"""The read view: one committed state of a database, taken the same way by every reader.

A `ReadView` records what a reader sees for as long as it holds it:

    tables          {table: the Lance version its last writer committed} (DB/versions.json)
    manifest        the manifest read when the view was taken (a hand-moved model is seen); its
                    featurizer settings and dims were compared with the committed ones first
    preconditioners {manifest key: sha256 of the R file, recorded at fit}: the R files this
                    view reads (fit names them by content and never overwrites one)
    bm25            the committed folder of the BM25 index, DB/bm25_versions/<name> (store/bm25.py)

`take(db)` is the one function that makes it. Every reader goes through it: the handle's read
verbs (`with db.reading():`, store/database.py; the CLI has no list of read commands, each verb
takes its view), the server's snapshots (serve/snapshot.py: a `Database` pinned to one view for
its life, a fresh view taken between requests when a writer has committed) and `check` (which
judges the committed versions, `refuse=False`: it names damage instead of stopping at it).

A database written before versions.json existed gets its record at its first open, under the
writer lock taken without waiting (`record_missing`); while another writer holds the lock the open
writes nothing and its views read the newest versions on disk until a writer commits.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path
from types import MappingProxyType
from typing import Mapping

from trackstar_db.errors import TrackstarError

from . import journal as _journal
from . import lock as _lock
from . import manifest as _manifest
from . import committed as _committed


@dataclass(frozen=True)
class ReadView:
    """One committed state of a database (see the module docstring); never changed once taken."""

    tables: Mapping[str, int]
    manifest: dict  # a copy of its own, read once: readers never write it
    preconditioners: Mapping[str, str]
    bm25: str | None = None
    committed: bool = True  # False: no record yet (a database older than versions.json): newest versions

    @property
    def version_id(self) -> str:
        """A short name of this state: a hash of the table versions, the manifest and the BM25 folder."""
        text = repr((sorted(self.tables.items()), sorted(_flat(self.manifest)), self.bm25))
        return hashlib.sha256(text.encode()).hexdigest()[:12]


def take(db, refuse: bool = True) -> ReadView:
    """The committed state of `db` now. refuse: stop with one line and its repair at damage (a
    table behind its committed version, a manifest whose featurizer or dims differ from the
    stored vectors', an unreadable journal); check takes its view with refuse=False."""
    path = Path(db.path)
    if refuse and (path / _journal.FILENAME).exists():
        _journal.pending(path)  # an unreadable journal: one line, its repair
    record = _committed.read(path)
    if record is None:  # written before versions.json, and a writer held the lock at its first open
        tables, bm25 = _committed.latest_versions(db), None
    else:
        if refuse:
            _committed.refuse_damage(db, record)
        tables, bm25 = dict(record["tables"]), record.get("bm25")
    manifest = _manifest.read(path)
    return ReadView(MappingProxyType(tables), manifest, MappingProxyType(_recorded_sha256(manifest)), bm25,
                    record is not None)


def newest(db) -> ReadView:
    """The newest versions on disk as a view, no record consulted (check's view when the record
    itself is unreadable: check names the record as the problem)."""
    manifest = _manifest.read(Path(db.path))
    return ReadView(MappingProxyType(_committed.latest_versions(db)), manifest,
                    MappingProxyType(_recorded_sha256(manifest)), None, False)


def record_missing(db) -> bool:
    """Record the committed state of a database written before versions.json existed, at its
    open: under the writer lock taken without waiting, the tables as they are now. Nothing is
    written (False) when the record exists, this process or another holds the lock (a writer at
    work: its rows are not committed by a reader), the tables are not on this machine (an
    object-store database: its writers record it) or the directory cannot be written."""
    path = Path(db.path)
    if (path / _committed.FILENAME).exists() or _lock.held(path):
        return False
    local = db._local_tables()
    if local is None or not local.is_dir():
        return False
    try:
        with _lock.WriterLock(path, "record committed versions", timeout=0):
            if (path / _committed.FILENAME).exists() or (path / _journal.FILENAME).exists():
                return False  # recorded meanwhile, or a killed writer's journal the next writer recovers
            _committed.write(db, _manifest.read(path))
    except (TrackstarError, OSError):
        return False
    return True


def _recorded_sha256(manifest: dict) -> dict[str, str]:
    return {key: entry["sha256"] for key, entry in sorted((manifest.get("preconditioners") or {}).items())
            if isinstance(entry, dict) and entry.get("sha256")}


def _flat(value, prefix: str = "") -> list[tuple[str, str]]:
    if isinstance(value, dict):
        return [item for key, v in value.items() for item in _flat(v, f"{prefix}/{key}")]
    return [(prefix, repr(value))]
