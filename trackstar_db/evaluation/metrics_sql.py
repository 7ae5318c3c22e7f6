"""Run the metric SQL files of queries/ (MRR, recall@k, tail-patch, the summary) with DuckDB.

Each queries/*.sql file is one SELECT over views named after the tables (retrievals,
ground_truth, queries, facts, tail_patch, runs, model_correct, validate_runs,
validate_losses, validate_predictions). A header line
`-- uses: attribution_per_query, ...` names other files of queries/ whose results the file
reads as views; they are run first. Tables not given are empty views with their schema
(e.g. no tail_patch rows yet: the tail-patch columns come out NULL).
"""

from __future__ import annotations

import re
from typing import Mapping

import pyarrow as pa

from trackstar_db import resources
from trackstar_db.errors import TrackstarError
from trackstar_db.ladder import method_order
from trackstar_db.store import schema as _schema

from .sql import ReadOnlySQL

TABLES = ("retrievals", "ground_truth", "queries", "facts", "tail_patch", "runs", "model_correct", "method_order",
          "validate_runs", "validate_losses", "validate_predictions")
MODEL_CORRECT = pa.schema([pa.field("query_id", pa.string(), nullable=False),
                           pa.field("correct", pa.bool_(), nullable=False)])


def method_order_table() -> pa.Table:
    """(method, position) from the one method list (trackstar_db/ladder.py), for summaries' order."""
    rows = method_order()
    return pa.table({"method": [m for m, _ in rows], "position": pa.array([p for _, p in rows], pa.int32())})
_USES = re.compile(r"^--\s*uses:\s*(.+)$", re.MULTILINE)


def _empty(name: str) -> pa.Table:
    if name == "method_order":
        return method_order_table()
    schema = MODEL_CORRECT if name == "model_correct" else _schema.arrow_schema(name)
    return schema.empty_table()


def _with_defaults(tables: Mapping[str, object]) -> dict[str, object]:
    unknown = sorted(set(tables) - set(TABLES))
    if unknown:
        raise TrackstarError(f"metrics SQL: unknown table(s) {', '.join(unknown)}; tables: {', '.join(TABLES)}")
    return {name: tables[name] if tables.get(name) is not None else _empty(name) for name in TABLES}


def _sql_text(name: str) -> str:
    return resources.read_text("queries", name if name.endswith(".sql") else f"{name}.sql")


def _run(name: str, tables: dict[str, object], params, seen: tuple[str, ...]) -> pa.Table:
    stem = name.removesuffix(".sql")
    if stem in seen:
        raise TrackstarError(f"queries/{stem}.sql: circular '-- uses:' ({' -> '.join(seen + (stem,))})")
    text = _sql_text(stem)
    views = dict(tables)
    for line in _USES.findall(text):
        for dependency in (part.strip() for part in line.split(",")):
            if dependency and dependency not in views:
                views[dependency] = _run(dependency, tables, None, seen + (stem,))
    with ReadOnlySQL(views) as sql:
        return sql.run(text, params)


def run_sql_file(name: str, tables: Mapping[str, object], params: list | dict | None = None) -> pa.Table:
    """Result of queries/`name` (e.g. 'mrr.sql') over `tables`: name -> Arrow table, Arrow dataset or
    Lance dataset. `params` fills the file's $name / ? placeholders, if it has any."""
    return _run(name, _with_defaults(tables), params, ())


def summary(tables: Mapping[str, object]) -> pa.Table:
    """The method-by-metric table (queries/summary.sql): one row per retrieval run."""
    return run_sql_file("summary.sql", tables)
