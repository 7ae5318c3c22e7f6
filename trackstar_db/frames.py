"""Results as dataframes, on request: every table the API returns is a pyarrow.Table.

    import trackstar_db
    from trackstar_db.frames import to_pandas, to_polars

    hits = db.query("The capital of France is", "Paris")   # pyarrow.Table
    hits.to_pandas()                                        # Arrow's own method (needs pandas)
    to_polars(hits)                                         # zero-copy where polars can (needs polars)

Neither pandas nor polars is a dependency of trackstar-db; a missing one is a one-line error
saying what to install. `to_pandas` is here for symmetry (it calls Arrow's method).
"""

from __future__ import annotations

import importlib.util

import pyarrow as pa

from trackstar_db.errors import TrackstarError


def _need(module: str) -> None:
    if importlib.util.find_spec(module) is None:
        raise TrackstarError(f"{module} is not installed; pip install {module} (trackstar-db returns Arrow tables)")


def _check(table) -> pa.Table:
    if isinstance(table, pa.RecordBatch):
        table = pa.Table.from_batches([table])
    if not isinstance(table, pa.Table):
        raise TrackstarError(f"expected a pyarrow.Table, got {type(table).__name__}")
    return table


def to_polars(table: pa.Table):
    """`table` (a pyarrow Table or RecordBatch) as a polars.DataFrame."""
    table = _check(table)
    _need("polars")
    import polars  # heavy: polars

    return polars.from_arrow(table)


def to_pandas(table: pa.Table):
    """`table` as a pandas.DataFrame (pyarrow's Table.to_pandas, with a clear error without pandas)."""
    table = _check(table)
    _need("pandas")
    return table.to_pandas()


__all__ = ["to_pandas", "to_polars"]
