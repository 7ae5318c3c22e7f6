"""Analyses over a database: the method-by-metric tables (queries/*.sql) and the HTML report."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Sequence

import pyarrow as pa
import pyarrow.compute as pc

from trackstar_db.errors import TrackstarError
from trackstar_db.evaluation.metrics_sql import run_sql_file
from trackstar_db.ladder import METHODS
from trackstar_db.selection.ledger import ledger
from trackstar_db.validate.lds import lds_table

from .curation import sections
from .explorer import add_tokens, build_pages, choose_queries
from .summary import write_report


def evaluation(db, by: str = "method") -> pa.Table:
    """The method-by-metric table from queries/*.sql; by='bucket' or 'correct' splits each method's row;
    any other `by` names a metadata column of the examples: the contribution ledger (selection/ledger.py)."""
    splits = {"bucket": ("frequency_bucket", pa.int32()), "correct": ("model_correct", pa.bool_())}
    if by != "method" and by not in splits:
        return ledger(db, by)
    tables = {name: db.dataset(name) for name in ("retrievals", "ground_truth", "facts", "tail_patch", "runs")}
    for name in ("validate_runs", "validate_losses", "validate_predictions"):  # absent from databases made before `validate`
        tables[name] = db.dataset(name) if db.has_table(name) else None
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


def write_db_report(db, out_dir: Path, compare: Sequence[str] | None = None, n_samples: int = 40, *,
                    k: int = 5, tokens: bool = True, token_top: int = 3, token_pages: int = 12, device: str = "cpu",
                    seed: int = 0, trajectory: pa.Table | None = None) -> Path:
    """The static HTML report of a database: the summary table, plots by frequency bucket and by
    model correctness, and the query explorer (report/explorer.py) over `n_samples` sampled
    queries with every run side by side (or only the runs in `compare`), top-`k` hits each.

    With `tokens`, the top `token_top` proponents of each gradient run on the first `token_pages`
    query pages are shaded by per-token contribution (one backward pass each), recomputed from
    the recorded checkpoint (skipped, with a note on stderr, when
    the model or a run's tables and R are not available). `trajectory`: a Simfluence probe's
    recorded vs simulated loss (simfluence.evaluate.report_trajectory, handed in by the caller)."""
    runs = db.ids("runs", "run_id")
    if not runs:
        raise TrackstarError(f"{db.path}: no retrieval runs to report; run 'trackstar-db retrieve' first")
    missing = [r for r in (compare or ()) if r not in runs]
    if missing:
        raise TrackstarError(f"no run {missing[0]!r}; runs: {', '.join(sorted(runs))}")
    summary = evaluation(db)
    ordered = [r for r in summary.column("run_id").to_pylist() if r in runs]
    shown = list(compare) if compare else ordered + sorted(runs - set(ordered))
    names = ("retrievals", "queries", "examples", "ground_truth", "tail_patch", "predictions", "facts")
    tables = {name: db.dataset(name) if db.count(name) else None for name in names}
    pages = build_pages(tables, shown, choose_queries(tables["retrievals"], shown, n_samples, seed), k=k)
    if tokens and pages:
        _shade(db, pages[:token_pages], token_top, device)
    return write_report(out_dir, summary, by_bucket=evaluation(db, "bucket"), by_correct=evaluation(db, "correct"),
                        pages=pages, trajectory=trajectory, lds=_lds(db, shown),
                        sections=_curation_sections(db))


def _lds(db, runs: Sequence[str]) -> pa.Table | None:
    """LDS with intervals of the shown runs under the validation the summary uses (most subsets)."""
    if not db.has_table("validate_runs") or db.count("validate_runs") == 0:
        return None
    table = lds_table(db)
    if table.num_rows == 0:
        return None
    most: dict[str, int] = {}  # as summary.sql: the validation with the most subsets, then by name
    for name, n in zip(table.column("validation").to_pylist(), table.column("n_subsets").to_pylist()):
        most[name] = max(n, most.get(name, 0))
    chosen = min(most, key=lambda name: (-most[name], name))
    return table.filter(pc.and_(pc.equal(table.column("validation"), chosen),
                                pc.is_in(table.column("run_id"), pa.array(list(runs), pa.string()))))


def _curation_sections(db) -> list[tuple[str, str, str]]:
    """The report's self-influence distribution and contribution ledger by source, when available."""
    return sections(db)


def _shade(db, pages: list[dict], top: int, device: str) -> None:
    """Per-token shading of the top proponents of every gradient run whose needs are met."""
    from trackstar_db.retrieval.tokens import TokenAttributor  # heavy: torch

    contributions = TokenAttributor(db, device=device)
    usable = []
    for method in sorted({c["method"] for p in pages for c in p["columns"]} & set(METHODS)):
        try:
            contributions(pages[0]["prompt"] or "x", pages[0]["target"] or "x", "", method, text="probe")
            usable.append(method)
        except (TrackstarError, OSError) as exc:
            print(f"report: no token shading for {method}: {exc}", file=sys.stderr)
    if usable:
        add_tokens(pages, lambda prompt, target, example_id, method, text: contributions(
            prompt, target, example_id, method, text), usable, top)
