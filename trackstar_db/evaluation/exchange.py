"""Moving retrieval runs in and out of a database in the authors' viewer format (viewer_format.py)."""

from __future__ import annotations

from pathlib import Path

import pyarrow as pa
import pyarrow.compute as pc

from trackstar_db import faults
from trackstar_db.errors import ParameterError, TrackstarError
from trackstar_db.store.bm25 import BM25Index
from trackstar_db.sources.facts import rebuild_ground_truth
from trackstar_db.store.schema import arrow_schema


def import_run(db, path: Path, method: str, run_id: str) -> int:
    """Load a viewer-format results file as a run; unknown queries and examples are added too.
    All or nothing, kill -9 included: the tables and the BM25 documents are under one journal."""
    from trackstar_db.store import journal

    from .viewer_format import import_viewer

    imported = import_viewer(path, method, run_id)  # the whole file is read and checked first
    tables = ("queries", "examples", "retrievals", "runs", "ground_truth_imported", "ground_truth")
    with journal.transaction(db, f"import {path.name}", list(tables), bm25=True):
        if run_id in db.ids("runs", "run_id"):
            raise ParameterError("run_id", f"{run_id!r}: that run exists; name another run")
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


def export_run(db, run_id: str, path: Path) -> Path:
    """Write one run as viewer JSON lines (proponents, opponents, texts, proponent_correct)."""
    from .viewer_format import export_viewer

    if run_id not in db.ids("runs", "run_id"):
        raise TrackstarError(f"no run {run_id!r}; runs: {', '.join(sorted(db.ids('runs', 'run_id'))) or 'none'}")
    return export_viewer(db.table("retrievals", filter=pc.field("run_id") == run_id), db.dataset("queries"),
                         db.dataset("examples"), db.dataset("facts"), db.dataset("ground_truth"), path)
