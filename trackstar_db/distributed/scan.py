"""Retrieve on Ray: parallel scans of fragment ranges merged into the one-process top-k.

The driver prepares the rung exactly as retrieval/scoring.py does (`prepare`: the table, R and
the stored row norms, checked against the table's version) and moves R to the query side
(`Scoring.query_side`). Each Ray task scans one range (ranges.py) with the same row scaling
(`scoring.scan`, given the range's slice of the row norms) and the same exact streaming
top-k (`topk.search`). `merge_topk` then keeps, per query, the k best of the ranges' lists,
stably: the ranges come in scan order and each list is ordered by score then stream position,
so ties go to the earlier row exactly as in one process's scan.
"""

from __future__ import annotations

import numpy as np

from trackstar_db import defaults
from trackstar_db.errors import TrackstarError
from trackstar_db.retrieval.methods import get_method
from trackstar_db.retrieval.scoring import Scoring, prepare, scan
from trackstar_db.retrieval.topk import TopKResult, search

from . import cluster_cpus, ray_session
from .ranges import Range, RangeSource, fragment_ranges


def merge_topk(parts: list[TopKResult], k: int) -> TopKResult:
    """The k best proponents (highest) and opponents (lowest) per query over per-range results
    given in scan order; equal scores keep the earlier range's row first."""
    def merge(ids_of, scores_of, largest: bool):
        n_queries = len(ids_of(parts[0]))
        ids, scores = [], np.zeros((n_queries, 0), np.float32)
        rows = []
        for q in range(n_queries):
            all_ids = [i for part in parts for i in ids_of(part)[q]]
            all_scores = np.concatenate([scores_of(part)[q, :len(ids_of(part)[q])] for part in parts])
            order = np.argsort(-all_scores if largest else all_scores, kind="stable")[:k]
            ids.append([all_ids[j] for j in order])
            rows.append(all_scores[order])
        width = max((len(r) for r in rows), default=0)
        scores = np.zeros((n_queries, width), np.float32)
        for q, row in enumerate(rows):
            scores[q, :len(row)] = row
        return ids, scores

    if not parts:
        raise TrackstarError("ray scan: the table has no rows")
    best_ids, best = merge(lambda p: p.proponent_ids, lambda p: p.proponent_scores, True)
    worst_ids, worst = merge(lambda p: p.opponent_ids, lambda p: p.opponent_scores, False)
    return TopKResult(best_ids, best, worst_ids, worst)


class RangeTable:
    """The part of a GradientTable that retrieval.scoring.scan reads, over one range."""

    def __init__(self, r: Range, name: str, dtype: str, dim: int):
        self.range, self.name, self.dtype, self.dim = r, name, dtype, dim

    def dataset(self):
        return RangeSource(self.range)


def scan_range(r: Range, table: dict, method: str, q, row_norms, k: int, batch_rows: int) -> TopKResult:
    """One Ray task: the exact top-k of queries q [nq, d] (query side applied) over range r,
    through the one-process scan (scoring.scan: rows divided by n_z) and search."""
    scoring = Scoring(get_method(method), RangeTable(r, **table), None, row_norms)
    return search(q, scan(scoring, "cpu", batch_rows), k)


def unwrap(ray, method: str, futures):
    try:
        return ray.get(futures)
    except ray.exceptions.RayTaskError as exc:
        cause = exc.cause if getattr(exc, "cause", None) is not None else exc
        if isinstance(cause, TrackstarError):
            raise TrackstarError(str(cause)) from None
        raise TrackstarError(f"{method}: {cause}") from None


def score_table(db, spec, g_q, k: int, *, batch_rows: int = defaults.SCAN_BATCH_ROWS, workers: int | None = None,
                scoring=None, storage_options: dict | None = None) -> TopKResult:
    """retrieval.scoring.score_table with the scan spread over Ray tasks (CPU workers)."""
    if k < 1:
        raise TrackstarError(f"top-k: k must be >= 1, not {k}")
    ray = ray_session()
    scoring = scoring or prepare(db, spec)
    q = scoring.query_side(g_q.float().cpu())
    ranges = fragment_ranges(scoring.table.dataset(), workers or cluster_cpus(ray), storage_options)
    task = ray.remote(num_cpus=1)(scan_range)
    q_ref = ray.put(q)
    norms = scoring.row_norms
    table = {"name": scoring.table.name, "dtype": scoring.table.dtype, "dim": scoring.table.dim}
    futures = [task.remote(r, table, spec.name, q_ref,
                           None if norms is None else norms[r.offset: r.offset + r.rows].clone(), k, batch_rows)
               for r in ranges]
    return merge_topk(unwrap(ray, spec.name, futures), k)


score_table.engine = "ray"  # recorded in a run's parameters (retrieval/runs.retrieve(scorer=score_table))
