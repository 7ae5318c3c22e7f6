"""`trackstar-db check DB`: find damage instead of answering from it.

check(db) reads everything once and returns an Arrow table of problems (table, problem,
repair), one row each, empty when the database is whole:

- every table opens and reads fully (all columns, all rows; the row count matches the scan);
  the tables the manifest records exist;
- gradient vectors are finite;
- ids agree: examples = grads_train_* = BM25 documents (no missing, extra or duplicate ids);
  queries = grads_queries_*; ground_truth's facts and examples exist; retrievals name stored
  examples;
- the journal of an interrupted command is readable and names versions that exist; no table is
  missing or behind the version its last writer committed; the manifest's featurizer settings
  and dims agree with those the stored vectors were written with (store/committed.py);
- preconditioner files are present, readable, match the sha256 recorded at fit and are not
  stale (their table_version is the training table's version);
- the recorded model directory and optimizer state are there, and the weights are the ones
  recorded (fingerprint).

Id agreement runs in DuckDB over the id columns only (read into Arrow; vectors are never held).

What is judged is the committed state (store/read_view.py, taken without refusing damage): each
table at the version its last writer committed, the committed BM25 folder beside the live index.
A newer version no writer committed (left by a killed one) changes nothing here; a table behind
its committed version (damage) or never committed is read at its newest version.
"""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path
from types import MappingProxyType

import pyarrow as pa

from trackstar_db import defaults
from trackstar_db.content import file_sha256
from trackstar_db.errors import TrackstarError, first_line
from trackstar_db.models.directory import fingerprint as model_fingerprint
from trackstar_db.store import committed as _committed, journal, read_view, schema as _schema
from trackstar_db.store.gradient_table import is_gradient_table, parse_table_name
from trackstar_db.store.vectors import to_torch

_SCAN_ROWS = defaults.STREAM_BATCH_ROWS

# what rebuilds a table from its inputs
_REBUILD = {
    "examples": "trackstar-db ingest corpus {db} FILE... (into a new database if the table stays unreadable)",
    "facts": "trackstar-db ingest facts {db} FILE...",
    "queries": "trackstar-db ingest facts {db} FILE...",
    "ground_truth": "trackstar-db ingest facts {db} FILE... (rebuilds ground_truth)",
    "retrievals": "trackstar-db retrieve {db} --method M --replace",
    "runs": "trackstar-db retrieve {db} --method M --replace",
    "tail_patch": "trackstar-db tail-patch {db} --run NAME",
    "predictions": "trackstar-db train {db} --out DIR (or re-record the model's predictions)",
}


def _first_line(exc: BaseException) -> str:
    return first_line(exc)[:300]


def _split(name: str) -> str:
    return "train" if name.startswith("grads_train") else "queries"


def _rebuild(db, name: str) -> str:
    parsed = parse_table_name(name)
    if parsed:  # an attached checkpoint's table is written again with its --checkpoint
        checkpoint = parsed[2]
        return (f"delete {db.path / 'tables' / (name + '.lance')} and run 'trackstar-db ingest gradients {db.path} "
                f"--split {_split(name)}{f' --checkpoint {checkpoint}' if checkpoint else ''}', "
                f"then 'trackstar-db fit {db.path}'")
    return _REBUILD.get(name, "restore DB/tables/{name}.lance from a backup").format(db=db.path, name=name)


class Checker:
    """Collects problems; each check_* method adds rows."""

    def __init__(self, db, newest: dict[str, int] | None = None):
        self.db = db
        self.newest = newest if newest is not None else {}  # {table: newest version on disk}
        self.rows: list[dict] = []
        self.readable: set[str] = set()
        self.rows_read = 0

    def add(self, table: str, problem: str, repair: str) -> None:
        self.rows.append({"table": table, "problem": problem, "repair": repair})

    # -- tables read fully, vectors finite ------------------------------------------------
    def check_tables(self) -> None:
        db = self.db
        try:
            names = db.table_names()
        except Exception as exc:  # the tables directory itself is unreadable
            self.add("tables", f"cannot list tables: {_first_line(exc)}", f"restore {db.path / 'tables'} from a backup")
            return
        for name in _schema.table_names():
            if name not in names:
                self.add(name, "table is missing", _rebuild(db, name))
        for name in db.manifest.get("gradient_tables", {}):
            if name not in names:
                self.add(name, "recorded in the manifest but the table is missing", _rebuild(db, name))
        for name in names:
            self._read(name)

    def _read(self, name: str) -> None:
        db = self.db
        entry = db.manifest.get("gradient_tables", {}).get(name)
        try:
            dataset = db.dataset(name)
            expected = dataset.count_rows()
            seen, bad, first_bad = 0, 0, None
            for batch in dataset.to_batches(batch_size=_SCAN_ROWS):
                if entry is not None and batch.num_rows:
                    import torch  # heavy: torch

                    x = to_torch(batch.column("vector"), entry["dtype"])  # [rows, d] float32
                    # a row sum is finite unless the row holds a NaN or inf (or overflows: rechecked
                    # exactly); far cheaper than isfinite over every element on a CPU
                    suspect = (~torch.isfinite(x.sum(dim=1))).nonzero().flatten()
                    if len(suspect):
                        rows = suspect[~torch.isfinite(x[suspect]).all(dim=1)]
                        bad += len(rows)
                        if len(rows) and first_bad is None:
                            first_bad = batch.column("id")[int(rows[0])].as_py()
                seen += batch.num_rows
        except Exception as exc:  # Lance raises OSError / RuntimeError / ValueError from its Rust side
            self.add(name, f"unreadable: {_first_line(exc)}", _rebuild(db, name))
            return
        self.rows_read += seen
        hint, newest = self._version_hint(name), self.newest.get(name, dataset.version)
        if hint is not None and hint > newest:
            self.add(name, f"latest version {hint} is missing (the table opens at version {newest}); "
                           "its newest rows are not visible", _rebuild(db, name))
            return
        if seen != expected:
            self.add(name, f"reads {seen:,} rows but counts {expected:,}", _rebuild(db, name))
            return
        if bad:
            self.add(name, f"{bad:,} vectors are not finite (first: id {first_bad!r})", _rebuild(db, name))
        if is_gradient_table(name) and entry is None:
            self.add(name, "gradient table not recorded in the manifest (left by a killed run?)", _rebuild(db, name))
            return
        self.readable.add(name)

    def _version_hint(self, name: str) -> int | None:
        """The latest version Lance recorded for a table (_versions/latest_version_hint.json), if any."""
        path = self.db.path / "tables" / f"{name}.lance" / "_versions" / "latest_version_hint.json"
        try:
            return int(json.loads(path.read_text())["version"])
        except (OSError, ValueError, KeyError, TypeError):
            return None

    def _imported_facts(self, con) -> str:
        """SQL (' UNION ...') of the fact ids imported results files name (their marks, and the
        queries of imported runs): the database knows those facts by id only, which is no damage."""
        db, parts = self.db, []
        if db.has_table("ground_truth_imported"):
            con.register("gt_imported", db.dataset("ground_truth_imported").to_table(columns=["fact_id"]))
            parts.append(" UNION SELECT fact_id FROM gt_imported")
        if "queries" in self.readable and db.has_table("runs") and db.has_table("retrievals"):
            con.register("imported_runs", db.dataset("runs").to_table(columns=["run_id", "parameters"]))
            con.register("imported_hits", db.dataset("retrievals").to_table(columns=["run_id", "query_id"]))
            parts.append(" UNION SELECT q.fact_id FROM queries q WHERE q.query_id IN (SELECT h.query_id FROM "
                         "imported_hits h JOIN imported_runs r USING (run_id) WHERE r.parameters LIKE "
                         "'%\"imported_from\"%')")
        return "".join(parts)

    # -- ids agree across tables ------------------------------------------------------------
    def check_ids(self) -> None:
        import duckdb  # heavy: duckdb

        db = self.db
        ids = {"examples": "example_id", "queries": "query_id", "facts": "fact_id"}
        pairs = []  # (source, its id column, gradient table)
        for name in db.manifest.get("gradient_tables", {}):
            source = "examples" if _split(name) == "train" else "queries"
            pairs.append((source, ids[source], name))
        columns = {"examples": ["example_id"], "facts": ["fact_id"], "queries": ["query_id", "fact_id"],
                   "ground_truth": ["fact_id", "example_id"], "retrievals": ["example_id"]}
        columns.update({grads: ["id"] for _, _, grads in pairs})
        with duckdb.connect() as con:
            for name, wanted in columns.items():  # id columns only (DuckDB reads no float16 vectors)
                if name in self.readable:
                    con.register(name, db.dataset(name).to_table(columns=wanted))

            def scalar(sql: str):
                table = con.sql(sql).to_arrow_table()
                return [table.column(i)[0].as_py() for i in range(table.num_columns)]

            for name, column in [(n, c) for n, c in ids.items()] + [(g, "id") for _, _, g in pairs]:
                if name not in self.readable:
                    continue
                n, first = scalar(f'SELECT count(*), min("{column}") FROM (SELECT "{column}" FROM "{name}" '
                                  f'GROUP BY "{column}" HAVING count(*) > 1)')
                if n:
                    self.add(name, f"{n:,} duplicate ids (first: {first!r})", _rebuild(db, name))
            for source, column, grads in pairs:
                if source not in self.readable or grads not in self.readable:
                    continue
                missing, first = scalar(f'SELECT count(*), min(s."{column}") FROM "{source}" s '
                                        f'WHERE s."{column}" NOT IN (SELECT id FROM "{grads}")')
                if missing:
                    self.add(grads, f"{missing:,} {source} ids have no gradient (first: {first!r})",
                             f"trackstar-db ingest gradients {db.path} --split {_split(grads)} (resumes), "
                             f"then 'trackstar-db fit {db.path}'")
                extra, first = scalar(f'SELECT count(*), min(g.id) FROM "{grads}" g '
                                      f'WHERE g.id NOT IN (SELECT "{column}" FROM "{source}")')
                if extra:
                    self.add(grads, f"{extra:,} gradient ids are not in {source} (first: {first!r})", _rebuild(db, grads))
            refs = [("ground_truth", "fact_id", "facts", "fact_id"), ("ground_truth", "example_id", "examples", "example_id"),
                    ("retrievals", "example_id", "examples", "example_id"), ("queries", "fact_id", "facts", "fact_id")]
            known = {("facts", "fact_id"): self._imported_facts(con)}  # facts an imported file names by id only
            for table, column, target, key in refs:
                if table not in self.readable or target not in self.readable:
                    continue
                among = f'SELECT "{key}" FROM "{target}"' + known.get((target, key), "")
                n, first = scalar(f'SELECT count(*), min(t."{column}") FROM "{table}" t '
                                  f'WHERE t."{column}" IS NOT NULL AND t."{column}" NOT IN ({among})')
                if n:
                    self.add(table, f"{n:,} rows name a {column} not in {target} (first: {first!r})", _rebuild(db, table))

    def check_bm25(self) -> None:
        from trackstar_db.store.bm25 import BM25Index  # heavy: tantivy

        db = self.db
        if "examples" not in self.readable:
            return
        n_examples = db.count("examples")
        path = db.path / "bm25"
        repair = f"trackstar-db rebuild-bm25 {db.path}"
        if not (path / "meta.json").is_file():
            if n_examples:
                self.add("bm25", f"{path} is missing ({n_examples:,} examples are not searchable)", repair)
            return
        try:
            BM25Index(db.path, must_exist=True).count()  # the live index opens (writers add to it)
            n_docs = BM25Index.reader(db, must_exist=True).count()  # the committed one: its examples' documents
        except Exception as exc:  # a damaged Tantivy index
            self.add("bm25", f"unreadable: {_first_line(exc)}", f"delete {path}, then {repair}")
            return
        if n_docs != n_examples:
            self.add("bm25", f"holds {n_docs:,} documents for {n_examples:,} examples", repair)

    # -- preconditioners --------------------------------------------------------------------
    def check_preconditioners(self) -> None:
        db = self.db
        repair = f"trackstar-db fit {db.path}"
        for key, params in db.manifest.get("preconditioners", {}).items():
            path = db.path / "preconditioners" / params.get("file", f"{key}.safetensors")
            label = f"preconditioners/{path.name}"
            if not path.is_file():
                self.add(label, "file is missing", repair)
                continue
            try:
                digest = file_sha256(path)
                from trackstar_db.featurizer.preconditioner import Preconditioner  # heavy: torch, transformers

                Preconditioner.load(path)
            except Exception as exc:
                self.add(label, f"unreadable: {_first_line(exc)}", repair)
                continue
            if "sha256" not in params:
                self.add(label, "no sha256 recorded at fit (fitted by an older trackstar-db): cannot verify", repair)
            elif digest != params["sha256"]:
                self.add(label, "sha256 differs from the one recorded at fit (replaced or damaged)", repair)
            table = key.rsplit(".", 1)[0]
            if table not in self.readable:
                continue
            version = db.version(table)
            if params.get("table_version") != version:
                self.add(label, f"stale: fitted on version {params.get('table_version')} of {table}, "
                                f"which is now at version {version}", repair)

    # -- the journal and the committed versions (store/journal.py, store/committed.py) -----------
    def check_committed(self) -> None:
        db = self.db
        try:
            entry = journal.pending(db.path)
        except TrackstarError as exc:
            self.add("journal.json", _first_line(exc).split(": ", 1)[-1].split("; repair:")[0],
                     f"move {journal.path_of(db)} away, then run 'trackstar-db check {db.path}' again to see what "
                     "the interrupted command left")
            entry = None
        if entry is not None:
            latest = _committed.latest_versions(db)
            for name, version in sorted(entry["tables"].items()):
                if version is not None and name in latest and not self._has_version(name, int(version)):
                    self.add("journal.json", f"names version {version} of {name}, which no longer exists",
                             f"move {journal.path_of(db)} away to keep {name} as it is, then run "
                             f"'trackstar-db check {db.path}'")
        try:
            reported = {row["table"] for row in self.rows}
            for name, problem, repair in _committed.damage(db):
                if name not in reported:  # a table check_tables found damaged already says how to rebuild it
                    self.add(name, problem, repair)
        except TrackstarError as exc:
            self.add(_committed.FILENAME, _first_line(exc), f"delete {db.path / _committed.FILENAME}")

    def _has_version(self, name: str, version: int) -> bool:
        try:
            return any(v["version"] == version for v in self.db._open_dataset(name).versions())
        except Exception:
            return False

    # -- the model ----------------------------------------------------------------------------
    def check_model(self) -> None:
        db = self.db
        model = db.manifest.get("model")
        if not model:
            return
        repair = f"put the checkpoint back at {model['path']}, or 'trackstar-db init {db.path} --model DIR' with it"
        if not Path(model["path"]).is_dir():
            self.add("model", f"{model['path']} is missing", repair)
            return
        try:
            if model_fingerprint(model["path"]) != model["fingerprint"]:
                self.add("model", f"{model['path']}: weights changed since they were recorded (fingerprint)", repair)
        except (TrackstarError, OSError) as exc:
            self.add("model", _first_line(exc), repair)
        state = model.get("optimizer_state")
        if state and not Path(state).is_file():
            self.add("model", f"optimizer state {state} is missing",
                     f"put it back, or 'trackstar-db init {db.path} --model DIR --optimizer-state FILE'")


def check(db) -> pa.Table:
    """Problems of a database as an Arrow table (table, problem, repair); empty when it is whole."""
    view, newest = _view(db)
    checker = Checker(db, newest)
    with db.reading(view):
        checker.check_tables()
        checker.check_committed()
        checker.check_ids()
        checker.check_bm25()
        checker.check_preconditioners()
        checker.check_model()
    schema = pa.schema([("table", pa.string()), ("problem", pa.string()), ("repair", pa.string())])
    table = pa.Table.from_pylist(checker.rows, schema=schema)
    return table.replace_schema_metadata({"rows_read": str(checker.rows_read)})


def _view(db):
    """(the read view check judges, {table: newest version on disk}): each table at its committed
    version, at its newest where it is behind that (damage, named by check_committed) or was never
    committed; the newest versions wholly when the record itself is unreadable (named too)."""
    newest = _committed.latest_versions(db)
    try:
        view = read_view.take(db, refuse=False)
    except TrackstarError:  # an unreadable versions.json: check_committed names it
        return read_view.newest(db), newest
    committed = view.tables
    tables = {name: (committed[name] if name in committed and committed[name] <= latest else latest)
              for name, latest in newest.items()}
    return replace(view, tables=MappingProxyType(tables)), newest
