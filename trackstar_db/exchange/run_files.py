"""Moving retrieval runs in and out of a database in the authors' viewer format (viewer_format.py)."""

from __future__ import annotations

from pathlib import Path

import pyarrow as pa
import pyarrow.compute as pc

from trackstar_db import faults
from trackstar_db.errors import ParameterError, RecordError, TrackstarError
from trackstar_db.option_checks import name as valid_name, outside_database
from trackstar_db.store.bm25 import BM25Index
from trackstar_db.sources.facts import rebuild_ground_truth
from trackstar_db.store import journal
from trackstar_db.store.schema import arrow_schema


def import_run(db, path: Path, method: str, run_id: str) -> int:
    """Load a viewer-format results file as a run; unknown queries and examples are added too.
    All or nothing, kill -9 included: the tables and the BM25 documents are under one journal.
    A query, example or fact the database holds with other content (prompt, target, fact, text,
    relation) is refused, naming the line: nothing is stored; so is a file without records. Facts
    the file names but the database does not hold are known by id only (queries.fact_id and
    ground_truth_imported; `check` counts them as known)."""
    from .viewer_format import import_viewer  # heavy: pandas

    valid_name("run_id", run_id)
    valid_name("method", method)
    imported = import_viewer(path, method, run_id)  # the whole file is read and checked first
    if not imported.retrievals.num_rows:
        raise TrackstarError(f"{path}: no results to import (the file holds no records); nothing was stored")
    tables = ("queries", "examples", "retrievals", "runs", "ground_truth_imported", "ground_truth")
    with journal.transaction(db, f"import {path.name}", list(tables), bm25=True):
        if run_id in db.ids("runs", "run_id"):
            raise ParameterError("run_id", f"{run_id!r}: that run exists; name another run")
        _refuse_conflicts(db, path, imported)
        fresh = {}
        for name, key, rows in (("queries", "query_id", imported.queries),
                                ("examples", "example_id", imported.examples)):
            have = db.ids(name, key)
            keep = [i for i, value in enumerate(rows.column(key).to_pylist()) if value not in have]
            fresh[name] = rows.take(pa.array(keep, pa.int64()))
            db.append(name, fresh[name])
            faults.point(f"import.after_{name}")
        db.append("retrievals", imported.retrievals)
        faults.point("import.after_retrievals")
        db.record_run(run_id, method, {"imported_from": str(path)})
        faults.point("import.after_runs")
        if not db.has_table("ground_truth_imported"):
            db.create_table("ground_truth_imported", arrow_schema("ground_truth_imported"))
        db.append("ground_truth_imported", imported.ground_truth)
        faults.point("import.after_ground_truth_imported")
        examples = fresh["examples"]
        if examples.num_rows:  # new texts join the BM25 index like ingested ones
            BM25Index(db.path).add(examples.column("example_id").to_pylist(), examples.column("text").to_pylist())
        faults.point("import.after_bm25")
        rebuild_ground_truth(db)
        faults.point("import.after_ground_truth")
    return imported.retrievals.num_rows


def _refuse_conflicts(db, path: Path, imported) -> None:
    """RecordError at the first query, example or fact the file gives other content than the stored one
    (a field the file leaves out, such as a query's fact_id, is not compared)."""
    from .viewer_format import _rows_by  # heavy: pandas

    checks = (("queries", "query_id", ("prompt", "target", "fact_id"), imported.queries, "query"),
              ("examples", "example_id", ("text",), imported.examples, "example"))
    for table, key, fields, rows, what in checks:
        if not rows.num_rows:
            continue
        stored = _rows_by(db.dataset(table), key, rows.column(key).to_pylist(), [key, *fields])
        for row in rows.select([key, *fields]).to_pylist():
            old = stored.get(row[key])
            for field in fields if old is not None else ():
                if row[field] is not None and row[field] != old[field]:
                    raise RecordError(path, imported.lines.get((what, row[key]), 0),
                                      f"{what} {row[key]!r}: {field} {_short(row[field])} differs from the stored "
                                      f"{_short(old[field])}; fix the file or import into another database")
    relations = _rows_by(db.dataset("facts"), "fact_id", list(imported.relations), ["fact_id", "relation"])
    for fact_id, relation in imported.relations.items():
        if fact_id in relations and relations[fact_id]["relation"] != relation:
            raise RecordError(path, imported.lines.get(("fact", fact_id), 0),
                              f"fact {fact_id!r}: relation {_short(relation)} differs from the stored "
                              f"{_short(relations[fact_id]['relation'])}; fix the file or import into another database")


def _short(value, limit: int = 60) -> str:
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def export_run(db, run_id: str, path: Path) -> Path:
    """Write one run as viewer JSON lines (proponents, opponents, texts, proponent_correct)."""
    from .viewer_format import export_viewer  # heavy: pandas

    outside_database("--out", path)
    if run_id not in db.ids("runs", "run_id"):
        raise TrackstarError(f"no run {run_id!r}; runs: {', '.join(sorted(db.ids('runs', 'run_id'))) or 'none'}")
    return export_viewer(db.table("retrievals", filter=pc.field("run_id") == run_id), db.dataset("queries"),
                         db.dataset("examples"), db.dataset("facts"), db.dataset("ground_truth"), path)
