"""One scoring path: query gradients against a stored gradient table, for any rung of the ladder.

A rung scores t_train(g_z) . t_query(g_q) with t(x) = unit?(x R^p) (retrieval/methods.py). R is
symmetric, so its powers move to the query side and the scan of stored vectors stays pure:

    score(z, q) = g_z . (g_q R^(p_train + p_query)) / (n_z n_q)
    n_q = |g_q R^p_query|,  n_z = |g_z R^p_train|       (both 1 without unit norm)

n_z is read, never recomputed with R: with p_train = 0 it is the row's own norm (computed in the
scan, one pass over data already in memory); with p_train != 0 it is the whitened row norm
computed once when R was fitted (gradients/fit.py) and stored inside R's file, valid for the
table version it was fitted on. A table changed since is refused, never silently mixed.

`score_table` is used by stored runs (retrieval/runs.py) and by one-prompt queries
(retrieval/adhoc.py) alike.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from trackstar_db.errors import TrackstarError
from trackstar_db.store.vectors import scan_progress

from .methods import MethodSpec
from .topk import TopKResult, search


@dataclass
class Scoring:
    """What a scan of one rung needs: the table, R (or None) and the stored row norms (or None)."""

    spec: MethodSpec
    table: object  # store.gradient_table.GradientTable of the training split
    preconditioner: object | None
    row_norms: torch.Tensor | None  # [n_rows] whitened norms in scan order, when p_train != 0

    def query_side(self, g_q: torch.Tensor) -> torch.Tensor:
        """[nq, d] raw query gradients -> [nq, d] vectors dotted with raw stored rows."""
        spec, pre = self.spec, self.preconditioner
        g_q = g_q.float()
        total = spec.train_power + spec.query_power
        q = pre.apply(g_q, total) if total != 0 else g_q
        if spec.unit_norm:
            seen = pre.apply(g_q, spec.query_power) if spec.query_power != 0 else g_q
            q = q / _norms(seen, "query")[:, None]
        return q


def _norms(x: torch.Tensor, what: str) -> torch.Tensor:
    norms = torch.linalg.vector_norm(x, dim=1)
    bad = ~torch.isfinite(norms) | (norms == 0)
    if bool(bad.any()):
        raise ValueError(f"{what} row {int(bad.nonzero()[0])} has zero or non-finite norm")
    return norms


def prepare(db, spec: MethodSpec) -> Scoring:
    """The table, R and row norms `spec` needs, checked against the table's current version."""
    table = db.gradient_table("train", corrected=spec.table == "corrected").require()
    if not spec.preconditioner:
        return Scoring(spec, table, None, None)
    pre = table.load_preconditioner(spec.preconditioner)
    norms = None
    if spec.unit_norm and spec.train_power != 0:
        norms = pre.row_norms.get(spec.train_power)
        if norms is None:
            raise TrackstarError(f"{table.name}: the {spec.preconditioner!r} preconditioner holds no row norms "
                                 f"for power {spec.train_power}; run 'trackstar-db fit {db.path}'")
        version, rows = table.version(), table.count()
        if pre.params.get("table_version") != version or len(norms) != rows:
            raise TrackstarError(f"{table.name} changed since R was fitted (version {pre.params.get('table_version')} "
                                 f"with {len(norms):,} rows, now {version} with {rows:,}); "
                                 f"run 'trackstar-db fit {db.path}'")
    return Scoring(spec, table, pre, norms)


def _scaled(batches, scoring: Scoring, device):
    """Stored batches with each row divided by its n_z (see the module docstring)."""
    offset = 0
    for ids, x in batches:
        if scoring.spec.unit_norm:
            if scoring.row_norms is not None:
                n_z = scoring.row_norms[offset: offset + len(ids)].to(x.device)
            else:
                n_z = _norms(x, f"stored {scoring.table.name}")
            x = x / n_z[:, None]
        offset += len(ids)
        yield ids, x


def score_table(db, spec: MethodSpec, g_q: torch.Tensor, k: int, *, device="cpu", batch_rows: int = 65536,
                progress: bool = True, scoring: Scoring | None = None) -> TopKResult:
    """Top-k proponents and opponents of raw query gradients g_q [nq, d] under rung `spec`."""
    scoring = scoring or prepare(db, spec)
    q = scoring.query_side(g_q.to(device))
    batches = scoring.table.batches(batch_size=batch_rows, device=device)
    if progress:
        batches = scan_progress(batches, scoring.table.count(), spec.name)
    try:
        return search(q, _scaled(batches, scoring, device), k)
    except ValueError as exc:
        if isinstance(exc, TrackstarError):
            raise
        raise TrackstarError(f"{spec.name}: {exc}") from None
