"""Analyses over a database: the method-by-metric tables (queries/*.sql) and the HTML report."""

from __future__ import annotations

from pathlib import Path

import pyarrow as pa
import pyarrow.compute as pc

from trackstar_db.errors import TrackstarError


def evaluation(db, by: str = "method") -> pa.Table:
    """The method-by-metric table from queries/*.sql; by='bucket' or 'correct' splits each method's row."""
    from .metrics_sql import run_sql_file

    splits = {"bucket": ("frequency_bucket", pa.int32()), "correct": ("model_correct", pa.bool_())}
    if by != "method" and by not in splits:
        raise TrackstarError(f"--by must be one of method, {', '.join(splits)}, not {by!r}")
    tables = {name: db.dataset(name) for name in ("retrievals", "ground_truth", "facts", "tail_patch", "runs")}
    tables["model_correct"] = db.dataset("predictions")
    # Evaluate the queries some run retrieved for (e.g. the prompt0 ones), not every template.
    retrieved = pa.array(sorted(set(db.table("retrievals", columns=["query_id"]).column("query_id").to_pylist())),
                         pa.string())
    queries = db.table("queries")
    tables["queries"] = queries.filter(pc.is_in(queries.column("query_id"), retrieved))
    if by == "method":
        return run_sql_file("summary.sql", tables)
    column, kind = splits[by]
    rows = run_sql_file("summary_by_split.sql", tables)
    rows = rows.filter(pc.and_(pc.equal(rows.column("split"), column), pc.not_equal(rows.column("split_value"), "unknown")))
    values = rows.column("split_value")
    values = pc.equal(values, "true") if kind == pa.bool_() else values.cast(kind)
    index = rows.column_names.index("split")
    return rows.drop_columns(["split", "split_value"]).add_column(index, column, values)


def write_db_report(db, out_dir: Path, compare: tuple[str, str] | None = None, n_samples: int = 8) -> Path:
    """The static HTML report of a database: summary, per-bucket plots, two runs side by side."""
    from .report import build_samples, write_report

    runs = db.ids("runs", "run_id")
    if not runs:
        raise TrackstarError(f"{db.path}: no retrieval runs to report; run 'trackstar-db retrieve' first")
    if compare is None:
        preferred = [r for r in ("trackstar", "bm25", "grad-dot") if r in runs]
        compare = tuple((preferred + sorted(runs - set(preferred)))[:2])
    missing = [r for r in compare if r not in runs]
    if missing:
        raise TrackstarError(f"no run {missing[0]!r}; runs: {', '.join(sorted(runs))}")
    samples = build_samples(db.dataset("retrievals"), db.dataset("queries"), db.dataset("examples"),
                            db.dataset("ground_truth"), list(compare), n=n_samples)
    return write_report(out_dir, evaluation(db), samples, by_bucket=evaluation(db, "bucket"))
