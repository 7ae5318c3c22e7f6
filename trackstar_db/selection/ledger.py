"""The contribution ledger (`trackstar-db eval --by COLUMN`, `Database.contribution`): how much of
each run's proponents, their scores and their tail-patch effects come from each value of one
metadata column of the examples, with bootstrap confidence intervals over the queries.

The cells come from queries/contribution_by_source.sql (read-only DuckDB, like every query of
queries/); the intervals from `bootstrap_means`: percentile intervals of the mean over queries,
n_boot resamples of the run's queries drawn with replacement by numpy's default generator seeded
with `seed` (default 0), the same resamples for every group of a run (paired), so a run's shares
stay comparable. A group's interval narrows as 1/sqrt(queries).

A column is a column of the examples table (source, abstract_uri, ...) or a key of its
`metadata` JSON (the source records' other fields: domain, licence, shard, ...).
"""

from __future__ import annotations

import json

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from trackstar_db import resources
from trackstar_db.errors import ParameterError, TrackstarError
from trackstar_db.store import schema as _schema

NOT_GROUPS = ("example_id", "text", "content_hash", "fact_triples", "metadata", "n_tokens")
MAX_GROUPS = 500
METRICS = (("proponent_share", "share"), ("score_sum", "score"), ("tailpatch_pp", "tailpatch"))


def example_groups(db, by: str) -> pa.Table:
    """example_id, group_value (string; null where the example has none) of the column `by`."""
    columns = [c for c in db.dataset("examples").schema.names if c not in NOT_GROUPS]
    if by in columns:
        rows = db.table("examples", columns=["example_id", by])
        return pa.table({"example_id": rows.column("example_id"), "group_value": pc.cast(rows.column(by), pa.string())})
    rows = db.table("examples", columns=["example_id", "metadata"])
    keys, values = set(), []
    for text in rows.column("metadata").to_pylist():
        record = json.loads(text) if text else {}
        keys.update(record)
        value = record.get(by)
        values.append(None if value is None else value if isinstance(value, str) else json.dumps(value))
    if by not in keys:
        where = f"neither a column ({', '.join(columns)}) nor a metadata key ({', '.join(sorted(keys))})" if keys \
            else f"not a column ({', '.join(columns)})"
        raise ParameterError("by", f"{by!r} is {where} of the examples")
    return pa.table({"example_id": rows.column("example_id"), "group_value": pa.array(values, pa.string())})


def cells(db, by: str, groups: pa.Table | None = None) -> pa.Table:
    """The per-(run, group, query) rows of queries/contribution_by_source.sql over the database."""
    if db.count("retrievals") == 0:
        raise TrackstarError(f"{db.path}: no retrieval runs to group; run 'trackstar-db retrieve' first")
    groups = example_groups(db, by) if groups is None else groups
    n_groups = len(pc.unique(groups.column("group_value")))
    if n_groups > MAX_GROUPS:
        raise ParameterError("by", f"{by}: {n_groups:,} distinct values; the ledger groups at most {MAX_GROUPS}")
    tail_patch = db.dataset("tail_patch") if db.count("tail_patch") else _schema.arrow_schema("tail_patch").empty_table()
    return run_cells(db.dataset("retrievals"), tail_patch, groups)


def run_cells(retrievals, tail_patch, groups: pa.Table) -> pa.Table:
    """queries/contribution_by_source.sql over these tables, on the read-only connection every
    query of queries/ runs on (evaluation/sql.py)."""
    from trackstar_db.evaluation.sql import ReadOnlySQL  # heavy: duckdb

    with ReadOnlySQL({"retrievals": retrievals, "tail_patch": tail_patch, "example_groups": groups}) as sql:
        return sql.run(resources.read_text("queries", "contribution_by_source.sql"))


def bootstrap_means(values: np.ndarray, n_boot: int = 1000, seed: int = 0, level: float = 0.95):
    """(mean, low, high) per row of values [groups, queries]: the percentile bootstrap interval of
    the mean over queries, the same n_boot resamples of the queries for every row."""
    values = np.asarray(values, np.float64)
    n = values.shape[1]
    if n == 0:
        nan = np.full(values.shape[0], np.nan)
        return nan, nan, nan
    counts = np.random.default_rng(seed).multinomial(n, np.full(n, 1.0 / n), size=n_boot)  # [B, n]
    means = values @ counts.T / n  # [groups, B]
    alpha = (1 - level) / 2
    low, high = np.quantile(means, [alpha, 1 - alpha], axis=1)
    return values.mean(axis=1), low, high


def ledger(db, by: str = "source", n_boot: int = 1000, seed: int = 0, level: float = 0.95,
           table: pa.Table | None = None) -> pa.Table:
    """One row per (run, group): n_queries, and for share, score and tail-patch the mean over the
    run's queries with its bootstrap interval (<metric>, <metric>_low, <metric>_high);
    n_patched_queries counts the queries tail-patch means are over. `table`: cells() already run."""
    if not 0 < level < 1:
        raise TrackstarError(f"confidence level must be in (0, 1), not {level}")
    if n_boot < 1:
        raise TrackstarError(f"bootstrap resamples must be >= 1, not {n_boot}")
    table = cells(db, by) if table is None else table
    out: dict[str, list] = {"run_id": [], "method": [], by: [], "n_queries": [], "n_patched_queries": []}
    for column, name in METRICS:
        out.update({name: [], f"{name}_low": [], f"{name}_high": []})
    for run_id in sorted(set(table.column("run_id").to_pylist())):
        rows = table.filter(pc.field("run_id") == run_id)
        groups = sorted(set(rows.column("group_value").to_pylist()))
        queries = sorted(set(rows.column("query_id").to_pylist()))
        g_index = {g: i for i, g in enumerate(groups)}
        q_index = {q: i for i, q in enumerate(queries)}
        gi = np.array([g_index[g] for g in rows.column("group_value").to_pylist()])
        qi = np.array([q_index[q] for q in rows.column("query_id").to_pylist()])
        patched = np.zeros(len(queries), bool)
        tail = rows.column("tailpatch_pp").to_numpy(zero_copy_only=False).astype(np.float64)
        patched[qi[~np.isnan(tail)]] = True
        out["run_id"] += [run_id] * len(groups)
        out["method"] += [rows.column("method")[0].as_py()] * len(groups)
        out[by] += groups
        out["n_queries"] += [len(queries)] * len(groups)
        out["n_patched_queries"] += [int(patched.sum())] * len(groups)
        for column, name in METRICS:
            matrix = np.zeros((len(groups), len(queries)))
            matrix[gi, qi] = np.nan_to_num(rows.column(column).to_numpy(zero_copy_only=False).astype(np.float64))
            if column == "tailpatch_pp":
                matrix = matrix[:, patched]
            mean, low, high = bootstrap_means(matrix, n_boot, seed, level)
            out[name] += mean.tolist()
            out[f"{name}_low"] += low.tolist()
            out[f"{name}_high"] += high.tolist()
    return pa.table(out).sort_by([("run_id", "ascending"), ("share", "descending")])
