"""Snapshots of a database on object storage (`serve s3://bucket/db`), for serve/snapshot.py's Tracker.

The rule is the local one (one consistent version per request, renewed when a writer has
committed a newer one), with the object store's commit point: a writer's upload ends with the
manifest (distributed/objectstore.py), after versions.json, the record of the table versions it
committed. So a snapshot pins the tables at the versions of that record (the tables themselves
are read in place at s3://bucket/db/tables), and the small files (manifest, BM25 index, R) are
read from a local copy made for that snapshot alone: each renewal hard-links the previous copy
into a fresh directory and downloads what changed (by ETag), so a request still answering from
the old snapshot never sees a file of the new one. A renewal that finds the record and the
manifest of two different commits (a writer's upload half-way) keeps the old snapshot and says
`pending`. What changed is seen with one LIST request of the small files (`changed`).
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

from trackstar_db.distributed import objectstore
from trackstar_db.errors import TrackstarError
from trackstar_db.store import manifest as _manifest
from trackstar_db.store import committed as _committed

from .snapshot import Snapshot


class RemoteSource:
    """Consistent snapshots of the database at `uri`, each on its own local copy of the small files."""

    def __init__(self, uri: str):
        self.uri = objectstore.normal_uri(uri).rstrip("/")
        self.client = objectstore._client()
        cache = objectstore.cache_dir(self.uri)
        self.root = cache.with_name(cache.name + ".serve")
        self.generation = 0
        self.marks: dict[str, str] = {}

    def changed(self) -> bool:
        """Do the bucket's small files (manifest, versions.json, BM25, R) differ from the snapshot's?"""
        return objectstore.remote_files(self.client, self.uri) != self.marks

    def snapshot(self, first: bool = False) -> Snapshot | None:
        """A snapshot of the newest committed version, or None while a writer's upload is half-way
        (never on the first: a database whose record and manifest disagree is served as it is)."""
        previous = self.root / str(self.generation)
        fresh = self.root / str(self.generation + 1)
        shutil.rmtree(fresh, ignore_errors=True)
        if previous.is_dir():
            shutil.copytree(previous, fresh, copy_function=os.link)  # pull replaces files, never edits them
        _, marks = objectstore.pull(self.uri, self.client, cache=fresh)
        if objectstore.MANIFEST not in marks:
            shutil.rmtree(fresh, ignore_errors=True)
            raise TrackstarError(f"{self.uri}: no trackstar-db database here (no {objectstore.MANIFEST})")
        record = _committed.read(fresh)
        manifest = json.loads((fresh / _manifest.FILENAME).read_text(encoding="utf-8"))
        if not first and record is not None and record.get("manifest") != manifest:
            shutil.rmtree(fresh, ignore_errors=True)
            return None
        snapshot = Snapshot(fresh, tables_at=objectstore.tables_home(self.client, self.uri, manifest),
                            location=self.uri)  # the view of the versions its last writer committed
        # two copies kept: a request may still be answering from the old snapshot
        shutil.rmtree(self.root / str(self.generation - 1), ignore_errors=True)
        self.generation += 1
        self.marks = marks
        return snapshot
