"""Moving retrieval runs into a database from the authors' viewer format (export: viewer_format)."""

from __future__ import annotations

from pathlib import Path

import pyarrow as pa

from .errors import TrackstarError


def import_run(db, path: Path, method: str, run_id: str) -> int:
    """Load a viewer-format results file as a run; unknown queries and examples are added too."""
    from .viewer_format import import_viewer

    if run_id in db.ids("runs", "run_id"):
        raise TrackstarError(f"run {run_id!r} exists; pick another --run name")
    imported = import_viewer(path, method, run_id)
    for name, key, rows in (("queries", "query_id", imported.queries), ("examples", "example_id", imported.examples)):
        have = db.ids(name, key)
        fresh = [i for i, value in enumerate(rows.column(key).to_pylist()) if value not in have]
        db.append(name, rows.take(pa.array(fresh, pa.int64())))
    db.append("retrievals", imported.retrievals)
    db.record_run(run_id, method, {"imported_from": str(path)})
    return imported.retrievals.num_rows
