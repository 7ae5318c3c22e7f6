"""The LDS table: queries/lds.sql per (retrieval run, validation), with a bootstrap interval.

The interval resamples the queries (with replacement, `bootstrap` times, seeded) and takes the
2.5th and 97.5th percentiles of the mean per-query LDS (queries/lds_per_query.sql); it says how
much the figure depends on which queries were asked, not on which subsets were drawn.
"""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

TABLES = ("retrievals", "runs", "validate_runs", "validate_losses", "validate_predictions")


def _tables(db) -> dict:
    return {name: db.dataset(name) if db.has_table(name) else None for name in TABLES}


def lds_per_query(db_or_tables) -> pa.Table:
    """queries/lds_per_query.sql over a database (or a dict of its tables)."""
    from trackstar_db.evaluation.metrics_sql import run_sql_file  # heavy: duckdb

    tables = db_or_tables if isinstance(db_or_tables, dict) else _tables(db_or_tables)
    return run_sql_file("lds_per_query.sql", tables)


def bootstrap_interval(values: np.ndarray, draws: int = 1000, seed: int = 0, level: float = 0.95) -> tuple[float, float]:
    """(low, high): percentiles of the mean of `values` resampled with replacement `draws` times."""
    if len(values) == 0 or draws < 1:
        return float("nan"), float("nan")
    rng = np.random.default_rng(seed)
    means = values[rng.integers(0, len(values), size=(draws, len(values)))].mean(axis=1)
    tail = (1 - level) / 2 * 100
    low, high = np.percentile(means, [tail, 100 - tail])
    return float(low), float(high)


def lds_table(db_or_tables, validation: str | None = None, bootstrap: int = 1000, seed: int = 0) -> pa.Table:
    """One row per (run, validation): run_id, method, validation, n_queries, n_undefined,
    n_subsets, lds, lds_low, lds_high (queries/lds.sql, bootstrap over queries)."""
    from trackstar_db.evaluation.metrics_sql import run_sql_file  # heavy: duckdb

    tables = db_or_tables if isinstance(db_or_tables, dict) else _tables(db_or_tables)
    summary = run_sql_file("lds.sql", tables)
    per_query = run_sql_file("lds_per_query.sql", tables)
    if validation is not None:  # no row when no retrieval run covers the validation's queries
        summary = summary.filter(pc.equal(summary.column("validation"), validation))
    groups: dict[tuple[str, str], list[float]] = {}
    for run, name, value in zip(*(per_query.column(c).to_pylist() for c in ("run_id", "validation", "lds"))):
        groups.setdefault((run, name), []).append(value)
    lows, highs = [], []
    for run, name in zip(summary.column("run_id").to_pylist(), summary.column("validation").to_pylist()):
        low, high = bootstrap_interval(np.asarray(groups[(run, name)], dtype=float), bootstrap, seed)
        lows.append(low)
        highs.append(high)
    summary = summary.drop_columns(["position"])
    return summary.append_column("lds_low", pa.array(lows, pa.float64())).append_column(
        "lds_high", pa.array(highs, pa.float64()))
