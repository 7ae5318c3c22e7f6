"""The database directory: manifest, LanceDB tables and the BM25 index, behind one handle.

    DB/
      manifest.json     format version, model fingerprint, featurizer settings (manifest.py)
      tables/           LanceDB tables (schemas in schema/*.json)
      bm25/             Tantivy index over examples.text (bm25.py)
      preconditioners/  R factors as safetensors

`Store` is the storage half of the one handle users get, trackstar_db.Database (api.py:
`trackstar_db.connect(path)` opens an existing database, `Database.create(path)` makes one),
which adds the verbs; the stages below the API take either.

Writing: one writer at a time (`with db.writer("ingest corpus"):`, store/lock.py, DB/.writer.lock);
multi-table writes under a write-ahead journal (store/journal.py, DB/journal.json) that the next
writer rolls back (or, for a write-then-swap whose new rows are complete, forward); manifest
changes through `update_manifest(fn)`, which re-reads the manifest under the lock.

Reading: one read view (store/read_view.py) per read, the committed state taken by
`read_view.take`: `with db.reading():` (every read verb of the handle), `db.pin()`; a database
written before DB/versions.json existed gets one at its first open.
"""

from __future__ import annotations

import contextlib
import copy
from pathlib import Path

import pyarrow as pa

from trackstar_db.errors import TrackstarError, first_line
from trackstar_db.models import directory as _model_dir

from . import journal as _journal
from . import lock as _lock
from . import manifest as _manifest
from . import read_view as _read_view
from . import schema as _schema
from . import committed as _committed
from .gradient_table import GradientTable, is_gradient_table
from .swap import SwapWriter


class Store(SwapWriter):
    """An open trackstar-db directory's storage: tables (as Arrow), manifest, writer lock."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        self.manifest = _manifest.read(self.path)
        self._connection = None  # the LanceDB connection, made by the first write (reads open Lance directly)
        self.view: _read_view.ReadView | None = None  # the committed state a read holds (pin(), reading())
        if (self.path / _journal.FILENAME).exists() and not _lock.held(self.path):
            self._recover_abandoned()
        elif _read_view.record_missing(self):  # written before versions.json: recorded at its first open
            self.manifest = _manifest.read(self.path)

    @property
    def _lance(self):
        """The LanceDB connection (writes, and every access to tables at an object-store URI)."""
        if self._connection is None:
            import lancedb  # heavy: lancedb

            self._connection = lancedb.connect(self.tables_uri)
        return self._connection

    def _local_tables(self) -> Path | None:
        """DB/tables when the tables are on this machine: read with Lance alone, so a read-only
        command (query, info, sql) never imports LanceDB (seconds of a cold start)."""
        uri = self.tables_uri
        return None if "://" in uri else Path(uri)

    _tables_at: str | None = None  # where the database's home keeps them (objectstore.py: s3://bucket/db/tables)

    @property
    def tables_uri(self) -> str:
        """Where the LanceDB tables live: beside the database's home (DB/tables, or uri/tables for a
        database opened at an object-store URI) when tables are there, so a directory copied or
        uploaded whole opens where it lands; else the object-store URI given at init (s3://...;
        endpoint and credentials from the AWS_* environment, as Lance reads them)."""
        if self._tables_at is not None:
            return self._tables_at
        local = self.path / "tables"
        recorded = self.manifest.get("tables_uri")
        if recorded and not (local.is_dir() and any(p.name.endswith(".lance") for p in local.iterdir())):
            return recorded
        return str(local)

    def _recover_abandoned(self) -> None:
        """A journal with no writer holding the lock was left by a killed command: finish it now."""
        try:
            with _lock.WriterLock(self.path, "recover", timeout=0):
                _journal.recover(self)
                _committed.write(self, _manifest.read(self.path))
        except (TrackstarError, OSError):
            return  # a writer is at work (its journal is live), the directory is read-only, or the journal is damaged
        self.manifest = _manifest.read(self.path)

    # -- writing: lock, journal, manifest --------------------------------------------------
    @contextlib.contextmanager
    def writer(self, command: str, timeout: float | None = None):
        """Hold the database's writer lock for `command`; the first holder of this process
        recovers a journal left by a killed writer before anything else."""
        with _lock.WriterLock(self.path, command, timeout) as held:
            if held.first:
                if (self.path / _journal.FILENAME).exists():
                    _journal.recover(self)
                _committed.refuse_damage(self)
            yield self
            if held.first:  # the command finished cleanly: its state is the one readers pin from now on
                _committed.write(self, _manifest.read(self.path))

    # -- reading: one committed version for a whole command ------------------------------------
    def pin(self, view: "_read_view.ReadView | None" = None) -> "Store":
        """Read one committed state from now on, until unpin(): `view`, else the one taken now
        (store/read_view.py: every table at the version its last writer committed, the committed
        BM25 folder, the manifest as it is now). A damaged database (a table behind its committed
        version, a manifest whose featurizer or dims differ from the stored vectors', an
        unreadable journal) is refused with one line and its repair."""
        self.view = view if view is not None else _read_view.take(self)
        self.manifest = copy.deepcopy(self.view.manifest)  # the handle's copy: the view's never changes
        return self

    def unpin(self) -> None:
        self.view = None
        self.manifest = _manifest.read(self.path)

    @contextlib.contextmanager
    def reading(self, view: "_read_view.ReadView | None" = None):
        """Hold one read view for the block (`view`, else one taken now; nothing changes when a
        view is held already): every read verb of the handle takes its view so."""
        if self.view is not None:
            yield self
            return
        self.pin(view)
        try:
            yield self
        finally:
            self.unpin()

    def update_manifest(self, change) -> dict:
        """Apply `change(manifest)` to the manifest as stored now (re-read under the writer lock)
        and write it atomically, so a concurrent command's entry is never lost."""
        with self.writer("update manifest"):
            manifest = _manifest.read(self.path)
            change(manifest)
            _manifest.write(self.path, manifest)
            self.manifest = manifest
        return manifest

    # -- opening and creation -------------------------------------------------------------
    @classmethod
    def open(cls, path: str | Path) -> "Store":
        """Open an existing database directory (trackstar_db.connect opens the full handle so)."""
        path = Path(path)
        if not path.exists():
            raise TrackstarError(f"{path}: no such database directory")
        return cls(path)

    @classmethod
    def create(cls, path: str | Path, model_dir: str | Path | None = None,
               optimizer_state: str | Path | None = None, exist_ok: bool = False,
               tables_uri: str | None = None) -> "Store":
        path = Path(path)
        if model_dir is not None:  # a bad model directory is refused before anything is made
            _model_dir.validate(model_dir)
        if (path / _manifest.FILENAME).exists():
            if not exist_ok:
                raise TrackstarError(f"{path}: a database already exists here")
            db = cls(path)
        else:
            # tables first, the manifest last: a database exists once its manifest does, and an
            # init killed half-way (only tables/ left) is simply run again
            if path.exists() and any(p.name != "tables" for p in path.iterdir()):
                raise TrackstarError(f"{path}: directory is not empty and holds no database")
            (path / "tables").mkdir(parents=True, exist_ok=True)
            import lancedb  # heavy: lancedb

            lance = lancedb.connect(tables_uri or str(path / "tables"))
            for name in _schema.table_names():
                lance.create_table(name, schema=_schema.arrow_schema(name), exist_ok=True)
            _manifest.write(path, dict(_manifest.new_manifest(), **({"tables_uri": tables_uri} if tables_uri else {})))
            db = cls(path)
        if model_dir is not None:
            db.set_model(model_dir, optimizer_state)
        return db

    # -- manifest -----------------------------------------------------------------------
    def save_manifest(self) -> None:
        """Write this handle's manifest as a whole (under the lock); prefer update_manifest."""
        with self.writer("save manifest"):
            _manifest.write(self.path, self.manifest)

    def set_model(self, model_dir: str | Path, optimizer_state: str | Path | None = None) -> None:
        """Record the checkpoint this database attributes. Changing it once gradients exist is refused."""
        model_dir = _model_dir.validate(model_dir)
        fingerprint = _model_dir.fingerprint(model_dir)
        current = self.manifest.get("model")
        if current and current["fingerprint"] != fingerprint and self.manifest["gradient_tables"]:
            raise TrackstarError(
                f"{model_dir}: model fingerprint {fingerprint} differs from {current['fingerprint']}, "
                "whose gradients this database holds"
            )
        from trackstar_db.featurizer import optimizer_state as _optimizer_state  # heavy: torch

        if optimizer_state is None:  # optimizer.safetensors, else a Trainer checkpoint's optimizer.pt
            optimizer_state = _optimizer_state.find(model_dir)
        if optimizer_state is not None and not Path(optimizer_state).is_file():
            raise TrackstarError(f"{optimizer_state}: no such optimizer state file")
        self.manifest["model"] = {
            "path": str(model_dir),
            "fingerprint": fingerprint,
            "tokenizer": str(model_dir),
            "optimizer_state": str(Path(optimizer_state).resolve()) if optimizer_state else None,
            **(_optimizer_state.describe(optimizer_state) if optimizer_state else {"optimizer": None}),
        }
        self.save_manifest()

    def model_info(self) -> dict:
        model = self.manifest.get("model")
        if not model:
            raise TrackstarError(f"{self.path}: no model recorded; run 'trackstar-db init DB --model DIR' or 'trackstar-db train'")
        if not Path(model["path"]).is_dir():
            raise TrackstarError(f"{model['path']}: model directory recorded in the manifest is missing")
        return model

    # -- tables -------------------------------------------------------------------------
    def gradient_table(self, split: str, corrected: bool = True) -> GradientTable:
        """The gradient table of `split` ('train' | 'queries'), with or without the optimizer correction."""
        return GradientTable(self, split, "corrected" if corrected else "uncorrected")

    def table_names(self) -> list[str]:
        if self.view is not None:  # a table created since the commit is not there yet
            return sorted(self.view.tables)
        local = self._local_tables()
        if local is None:
            return sorted(self._lance.list_tables().tables)
        if not local.is_dir():
            return []
        return sorted(p.name[: -len(".lance")] for p in local.iterdir()
                      if p.name.endswith(".lance") and (p / "_versions").is_dir())

    def has_table(self, name: str) -> bool:
        return name in self.table_names()

    def lance_table(self, name: str):
        if not self.has_table(name):
            raise TrackstarError(f"no table {name!r}; tables: {', '.join(self.table_names())}")
        return self._lance.open_table(name)

    def dataset(self, name: str):
        """The Lance dataset behind a table (a pyarrow Dataset: scannable by DuckDB and in batches),
        at its latest version."""
        if not self.has_table(name):
            raise TrackstarError(f"no table {name!r}; tables: {', '.join(self.table_names())}")
        return self._open_dataset(name)

    def _open_dataset(self, name: str):
        """dataset(name) of a table known to exist."""
        local = self._local_tables()
        version = None if self.view is None else self.view.tables.get(name)
        if local is None:
            dataset = self._lance.open_table(name).to_lance()
            return dataset if version is None else dataset.checkout_version(version)
        import lance  # heavy: lance

        try:
            return lance.dataset(str(local / f"{name}.lance"), version=version)
        except (OSError, ValueError) as exc:
            if version is None:
                raise
            raise TrackstarError(f"{local / (name + '.lance')}: committed version {version} cannot be read "
                                 f"({first_line(exc)}); repair: restore the table from a backup, then run "
                                 f"'trackstar-db check {self.path}'") from None

    def table(self, name: str, columns: list[str] | None = None, filter=None) -> pa.Table:
        """A whole table (or some columns / rows) as Arrow; `filter` is a pyarrow.compute
        expression, e.g. pc.field("template") == "prompt0" (never a string built from input)."""
        return self.dataset(name).to_table(columns=columns, filter=filter)

    def count(self, name: str) -> int:
        return self._open_dataset(name).count_rows() if self.has_table(name) else 0

    def create_table(self, name: str, schema: pa.Schema):
        return self._lance.create_table(name, schema=schema, exist_ok=True)

    def append(self, name: str, rows: pa.Table) -> None:
        """Append rows (one Lance commit), cast to the table's schema."""
        table = self.lance_table(name)
        if rows.num_rows:
            table.add(_schema.conform(rows, table.schema))

    def replace(self, name: str, rows: pa.Table) -> None:
        """Overwrite a derived table (one commit; readers see the old or the new rows)."""
        schema = self.lance_table(name).schema
        self._lance.create_table(name, data=_schema.conform(rows, schema), schema=schema, mode="overwrite")

    def ids(self, name: str, column: str) -> set[str]:
        """The set of values of an id column (for idempotent, resumable writes)."""
        if not self.has_table(name) or self.count(name) == 0:
            return set()
        return set(self.table(name, columns=[column]).column(column).to_pylist())

    def delete_rows(self, name: str, column: str, value: str) -> None:
        """Delete the rows whose `column` equals `value` (e.g. one run's retrievals).

        Lance's delete takes only a SQL predicate: the one place a literal is quoted."""
        escaped = value.replace("'", "''")
        self.lance_table(name).delete(f"{column} = '{escaped}'")

    def drop_table(self, name: str) -> None:
        self._lance.drop_table(name)

    def version(self, name: str) -> int:
        return self.dataset(name).version

    def restore(self, name: str, version: int) -> None:
        """Roll a table back to an earlier version (used when an ingest fails half-way)."""
        table = self.lance_table(name)
        if table.version != version:
            table.restore(version)

    # -- analysis -----------------------------------------------------------------------
    def views(self, vectors: bool = False) -> dict:
        """Every table as something DuckDB can scan; gradient tables lose their vectors unless asked."""
        views = {}
        for name in self.table_names():
            dataset = self.dataset(name)
            if is_gradient_table(name) and not vectors:
                columns = [f for f in dataset.schema.names if f != "vector"]
                views[name] = dataset.to_table(columns=columns)
            else:
                views[name] = dataset
        views["model_correct"] = views["predictions"]
        return views

    def __repr__(self) -> str:
        return f"trackstar_db.Database({str(self.path)!r})"

