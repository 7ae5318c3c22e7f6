"""Fit on Ray: the g g^T sums and the whitened row norms of a training table, range by range.

`gram` gives the GramAccumulator a one-process scan would (featurizer/preconditioner.py): each
Ray task sums g g^T per span (float64) over one fragment range (ranges.py) and the driver adds
the partial sums and counts. `row_norms` computes |g R^p| per range and concatenates the ranges
in scan order, the order retrieval/scoring.py reads them in. gradients/fit.py does everything
else (which R, the query side, the eigendecompositions, the files), so `fit(engine='ray')` writes
the same preconditioners as `fit()` up to float64 summation order.
"""

from __future__ import annotations

import torch

from trackstar_db import defaults

from . import cluster_cpus, ray_session
from .ranges import Range, fragment_ranges, range_batches
from .scan import unwrap


def gram_range(r: Range, dtype: str, spans, batch_rows: int):
    from trackstar_db.featurizer.preconditioner import GramAccumulator  # heavy: transformers

    acc = GramAccumulator(spans)
    for _, x in range_batches(r, dtype, batch_rows):
        acc.update(x)
    return acc


def norms_range(r: Range, dtype: str, pre, powers, batch_rows: int) -> dict:
    parts = {p: [] for p in powers}
    with torch.inference_mode():
        for _, x in range_batches(r, dtype, batch_rows):
            for p in powers:
                parts[p].append(pre.norms(x, p))
    return {p: torch.cat(v) if v else torch.zeros(0) for p, v in parts.items()}


def _ranges(table, workers, storage_options):
    ray = ray_session()
    return ray, fragment_ranges(table.dataset(), workers or cluster_cpus(ray), storage_options)


def gram(table, spans, *, workers: int | None = None, batch_rows: int = defaults.STREAM_BATCH_ROWS, storage_options: dict | None = None):
    """GramAccumulator of every row of `table` (a GradientTable), summed by Ray tasks."""
    from trackstar_db.featurizer.preconditioner import GramAccumulator  # heavy: transformers

    ray, ranges = _ranges(table, workers, storage_options)
    task = ray.remote(num_cpus=1)(gram_range)
    total = GramAccumulator([tuple(s) for s in spans])
    for part in unwrap(ray, f"fit {table.name}", [task.remote(r, table.dtype, total.spans, batch_rows)
                                                   for r in ranges]):
        total.merge(part)
    return total


def row_norms(table, pre, powers, *, workers: int | None = None, batch_rows: int = defaults.STREAM_BATCH_ROWS,
              storage_options: dict | None = None) -> dict:
    """{power: [n_rows] |g R^power|} in the table's scan order, computed by Ray tasks."""
    ray, ranges = _ranges(table, workers, storage_options)
    task = ray.remote(num_cpus=1)(norms_range)
    pre_ref = ray.put(pre)
    parts = unwrap(ray, f"fit {table.name}", [task.remote(r, table.dtype, pre_ref, sorted(powers), batch_rows)
                                               for r in ranges])
    return {p: torch.cat([part[p] for part in parts]) for p in powers}
