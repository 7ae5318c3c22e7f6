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
(retrieval/adhoc.py) alike; `mean_scores` by select's aggregate (retrieval/runners.py): the mean
over the queries of score(z, q) = x_z . v_q is x_z . mean(v_q), one matrix-vector product per
stored row whatever the number of queries ('mean-vector'; 'mean-score' averages the nq scores
of each row, the reference the tests compare against).

The scan reads each record batch zero-copy in its stored dtype and widens it to float32 tile by
tile (a few MB, cache-resident) into one buffer reused for every batch, dividing by n_z while
the tile is hot; float32 rungs without unit norm are scored straight from the Arrow buffer.
Memory: one batch of vectors, one float32 buffer [batch_rows, d], the running top-k.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from trackstar_db import defaults
from trackstar_db.errors import ParameterError, TrackstarError
from trackstar_db.store.vectors import BATCH_BYTES, scan_progress, vector_batches

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


_LOADED: dict[tuple, tuple] = {}  # (folder, table, mix) -> ((path, inode, size, mtime), Preconditioner): a warm process's R


def load_preconditioner(table, mix: str):
    """table.load_preconditioner(mix), kept while its file is unchanged (a refit replaces the
    file, so a new inode or mtime loads the new R). R's powers stay cached inside it. One R is
    kept per table and mix: a server following a database through refits holds the current
    ones, not those of the versions before."""
    path = table.preconditioner_path(mix)
    try:
        stat = path.stat()
        key = (str(path), stat.st_ino, stat.st_size, stat.st_mtime_ns)
    except OSError:
        return table.load_preconditioner(mix)  # names what to run
    family = (str(path.parent), getattr(table, "name", ""), mix)
    held = _LOADED.get(family)
    if held is None or held[0] != key:
        pre = table.load_preconditioner(mix)
        _LOADED.pop(family, None)
        if len(_LOADED) >= 4:
            _LOADED.pop(next(iter(_LOADED)))
        _LOADED[family] = held = (key, pre)
    return held[1]


def prepare(db, spec: MethodSpec) -> Scoring:
    """The table, R and row norms `spec` needs, checked against the table's current version."""
    table = db.gradient_table("train", corrected=spec.table == "corrected").require()
    if not spec.preconditioner:
        return Scoring(spec, table, None, None)
    pre = load_preconditioner(table, spec.preconditioner)
    norms = None
    if spec.unit_norm and spec.train_power != 0:
        norms = pre.row_norms.get(spec.train_power)
        if norms is None:
            raise TrackstarError(f"{table.name}: the {spec.preconditioner!r} preconditioner holds no row norms "
                                 f"for power {spec.train_power}; run 'trackstar-db fit {db.path}'")
        check_fitted(db, table, pre, norms)
    return Scoring(spec, table, pre, norms)


def check_fitted(db, table, pre, norms: torch.Tensor) -> None:
    """Refuse row norms stored with R for another version of the table than the current one."""
    version, rows = table.version(), table.count()
    if pre.params.get("table_version") != version or len(norms) != rows:
        raise TrackstarError(f"{table.name} changed since R was fitted (version {pre.params.get('table_version')} "
                             f"with {len(norms):,} rows, now {version} with {rows:,}); "
                             f"run 'trackstar-db fit {db.path}'")


AGGREGATES = ("mean-vector", "mean-score")  # how mean_scores takes the mean over the queries
TILE_BYTES = 4 << 20  # float32 bytes widened per step on the CPU: stays in cache
_BUFFER: dict[str, torch.Tensor] = {}  # the float32 scan buffer, kept between scans of a warm process


def _buffer(rows: int, dim: int, device: torch.device) -> torch.Tensor:
    """A float32 [rows, dim] view of the one reused scan buffer (faulting fresh pages costs more
    than widening the vectors into them)."""
    held = _BUFFER.get("buffer")
    if held is None or held.device != device or held.shape[1] != dim or held.shape[0] < rows:
        _BUFFER.clear()
        with torch.inference_mode(False):  # a normal tensor: writable inside and outside inference mode
            held = _BUFFER["buffer"] = torch.empty((rows, dim), dtype=torch.float32, device=device)
    return held[:rows]


def scan(scoring: Scoring, device="cpu", batch_rows: int = defaults.SCAN_BATCH_ROWS):
    """(ids, x [nb, d] float32) batches of the stored rows, each row divided by its n_z (see the
    module docstring). x is a view of a buffer reused by the next batch: consume it first."""
    batch_rows = max(1, min(batch_rows, BATCH_BYTES // (4 * scoring.table.dim)))
    batches = vector_batches(scoring.table.dataset(), dtype=scoring.table.dtype, batch_size=batch_rows, native=True)
    return widen(batches, unit=scoring.spec.unit_norm, row_norms=scoring.row_norms, device=device,
                 batch_rows=batch_rows, label=scoring.table.name)


def widen(batches, *, unit: bool, row_norms: torch.Tensor | None = None, device="cpu", batch_rows: int = defaults.STREAM_BATCH_ROWS,
          label: str = "vectors"):
    """(ids, x in its stored dtype) batches -> (ids, x float32) in the reused buffer, tile by tile;
    with `unit`, each row divided by row_norms[its position] or, without them, by its own norm."""
    device = torch.device(device)
    if row_norms is not None:
        row_norms = row_norms.to(device)
    offset = 0
    for ids, x in batches:
        x, n = x.to(device, non_blocking=True), len(ids)
        if not unit and x.dtype == torch.float32:
            yield ids, x
            offset += n
            continue
        out = _buffer(max(n, batch_rows), x.shape[1], device)[:n]
        tile = n if device.type != "cpu" else max(1, TILE_BYTES // (4 * x.shape[1]))
        for a in range(0, n, tile):
            part = out[a: a + tile]
            part.copy_(x[a: a + tile])
            if unit:
                n_z = row_norms[offset + a: offset + a + len(part)] if row_norms is not None else \
                    torch.linalg.vector_norm(part, dim=1)
                bad = ~torch.isfinite(n_z) | (n_z == 0)
                if bool(bad.any()):
                    raise TrackstarError(f"{label}: example {ids[a + int(bad.nonzero()[0])]!r} has a zero or "
                                         f"non-finite {'whitened ' if row_norms is not None else ''}norm")
                part.mul_(n_z.reciprocal()[:, None])  # mul_: div_ is several times slower on CPU
        offset += n
        yield ids, out


def score_table(db, spec: MethodSpec, g_q: torch.Tensor, k: int, *, device="cpu", batch_rows: int = defaults.SCAN_BATCH_ROWS,
                progress: bool | None = None, scoring: Scoring | None = None) -> TopKResult:
    """Top-k proponents and opponents of raw query gradients g_q [nq, d] under rung `spec`
    (progress: trackstar_db/progress.py; False skips the bar's bookkeeping too)."""
    scoring = scoring or prepare(db, spec)
    q = scoring.query_side(g_q.to(device))
    batches = scan(scoring, device, batch_rows)
    if progress is not False:
        batches = scan_progress(batches, scoring.table.count(), spec.name, progress)
    try:
        return search(q, batches, k)
    except ValueError as exc:
        if isinstance(exc, TrackstarError):
            raise
        raise TrackstarError(f"{spec.name}: {exc}") from None


def mean_scores(db, spec: MethodSpec, g_q: torch.Tensor, aggregate: str = "mean-vector", *, device="cpu",
                batch_rows: int = defaults.SCAN_BATCH_ROWS, progress: bool | None = False
                ) -> tuple[list[str], np.ndarray]:
    """(ids, float32 mean score of each stored row over the raw query gradients g_q [nq, d]) in
    scan order, under rung `spec`; `aggregate`: 'mean-vector' or 'mean-score' (module docstring)."""
    if aggregate not in AGGREGATES:
        raise ParameterError("aggregate", f"must be one of {', '.join(AGGREGATES)}, not {aggregate!r}")
    scoring = prepare(db, spec)
    v = scoring.query_side(g_q.to(device))  # [nq, d]
    side = v.mean(dim=0, keepdim=True) if aggregate == "mean-vector" else v
    batches = scan(scoring, device, batch_rows)
    if progress:
        batches = scan_progress(batches, scoring.table.count(), spec.name, progress)
    ids, parts = [], []
    with torch.inference_mode():
        for batch_ids, x in batches:
            scores = (x @ side.T).mean(dim=1)  # [nb]; one column on the fast path
            if not bool(torch.isfinite(scores).all()):
                bad = int((~torch.isfinite(scores)).nonzero()[0])
                raise TrackstarError(f"{spec.name}: non-finite score for example {batch_ids[bad]!r}")
            ids += batch_ids
            parts.append(scores.cpu().numpy())
    return ids, np.concatenate(parts) if parts else np.zeros(0, np.float32)
