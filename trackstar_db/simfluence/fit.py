"""Fit Simfluence-Linear (or its additive special case) by ridge least squares.

Per probe q, every recorded step t of every run is one equation in the per-example effects:

    L_t - L_{t-1} = sum_{i in c_t} (a_i L_{t-1} + b_i)

i.e. y = X w with X = [diag(L_prev) M, M], where M [steps, examples] is the 0/1 batch
membership (scipy sparse, the same for every probe). Ridge: min |X w - y|^2 + ridge |w|^2.
With S equations and n examples the solve is done in the smaller space:
  - primal (2n <= S): (X^T X + ridge I) w = X^T y, X^T X built from sparse products;
  - dual (S < 2n): u = (K + ridge I)^-1 y with the kernel K = X X^T = (M M^T) * (l l^T + 1)
    (elementwise, l = L_prev), then a = M^T (l * u), b = M^T u.
The additive model drops the a columns (K = M M^T, the same for every probe: one factorisation).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from trackstar_db.errors import TrackstarError
from trackstar_db.option_checks import POSITIVE_NUMBER, check

from .data import Runs, ensure_tables, load_runs

MODELS = ("linear", "additive")


@dataclass
class Simulator:
    """Fitted effects: alpha, beta [probes, examples] (alpha all 0 for 'additive'), L_0 [probes]."""

    model: str
    example_ids: list[str]
    query_ids: list[str]
    alpha: np.ndarray
    beta: np.ndarray
    initial: np.ndarray

    def simulate(self, batches: list[np.ndarray], initial: np.ndarray | None = None) -> np.ndarray:
        """Loss trajectories [probes, T + 1] over `batches` (example indices per step), from `initial`
        (default: the recorded initial loss of each probe)."""
        losses = np.empty((len(self.query_ids), len(batches) + 1))
        losses[:, 0] = self.initial if initial is None else initial
        for t, batch in enumerate(batches, start=1):
            a = self.alpha[:, batch].sum(axis=1)
            b = self.beta[:, batch].sum(axis=1)
            losses[:, t] = losses[:, t - 1] * (1.0 + a) + b
        return losses


def membership(runs: Runs):
    """M [all steps, examples] (scipy CSR, 1 where the example is in the step's batch), and for each
    probe the loss before (l [probes, S]) and after (y [probes, S]) every step."""
    import scipy.sparse as sp  # heavy: scipy

    rows, cols, before, after = [], [], [], []
    offset = 0
    for run in runs.runs:
        for t, batch in enumerate(run.batches):
            rows.append(np.full(len(batch), offset + t))
            cols.append(batch)
        before.append(run.losses[:, :-1])
        after.append(run.losses[:, 1:])
        offset += len(run.batches)
    if offset == 0:
        raise TrackstarError("simfluence fit: the recorded runs hold no steps")
    rows, cols = np.concatenate(rows), np.concatenate(cols)
    m = sp.csr_matrix((np.ones(len(rows)), (rows, cols)), shape=(offset, len(runs.example_ids)))
    m.sum_duplicates()
    return m, np.concatenate(before, axis=1), np.concatenate(after, axis=1)


def fit(runs: Runs, model: str = "linear", ridge: float = 1.0, solver: str = "auto") -> Simulator:
    """Fit one simulator per probe of `runs` (solver: 'auto', 'primal' or 'dual')."""
    if model not in MODELS:
        raise TrackstarError(f"simfluence model must be one of {', '.join(MODELS)}, not {model!r}")
    check("ridge", POSITIVE_NUMBER, ridge)
    if solver not in ("auto", "primal", "dual"):
        raise TrackstarError(f"solver must be auto, primal or dual, not {solver!r}")
    m, before, after = membership(runs)
    n_steps, n = m.shape
    width = 2 * n if model == "linear" else n
    if solver == "auto":
        solver = "primal" if width <= n_steps else "dual"
    solve = _primal if solver == "primal" else _dual
    alpha, beta = solve(m, before, after - before, ridge, model == "linear")
    initial = np.mean([run.losses[:, 0] for run in runs.runs], axis=0)
    return Simulator(model, runs.example_ids, runs.query_ids, alpha, beta, initial)


def _primal(m, before, y, ridge, linear):
    import scipy.linalg as la  # heavy: scipy

    n = m.shape[1]
    alpha, beta = np.zeros((len(y), n)), np.zeros((len(y), n))
    mt = m.T.tocsr()
    gram_b = (mt @ m).toarray()
    if not linear:
        factor = la.cho_factor(gram_b + ridge * np.eye(n))
        beta[:] = la.cho_solve(factor, (mt @ y.T)).T
        return alpha, beta
    for q in range(len(y)):
        l = before[q]
        ml = m.multiply(l[:, None]).tocsr()          # diag(l) M
        mlt = ml.T.tocsr()
        gram = np.block([[(mlt @ ml).toarray(), (mlt @ m).toarray()],
                         [(mt @ ml).toarray(), gram_b]])
        rhs = np.concatenate([mlt @ y[q], mt @ y[q]])
        w = la.cho_solve(la.cho_factor(gram + ridge * np.eye(2 * n)), rhs)
        alpha[q], beta[q] = w[:n], w[n:]
    return alpha, beta


def _dual(m, before, y, ridge, linear):
    import scipy.linalg as la  # heavy: scipy

    n_steps, n = m.shape
    alpha, beta = np.zeros((len(y), n)), np.zeros((len(y), n))
    overlap = (m @ m.T).toarray()                     # G = M M^T: shared examples of two steps
    mt = m.T.tocsr()
    if not linear:
        u = la.cho_solve(la.cho_factor(overlap + ridge * np.eye(n_steps)), y.T)  # [S, probes]
        beta[:] = (mt @ u).T
        return alpha, beta
    for q in range(len(y)):
        l = before[q]
        kernel = overlap * (np.outer(l, l) + 1.0)
        kernel[np.diag_indices_from(kernel)] += ridge
        u = la.cho_solve(la.cho_factor(kernel), y[q])
        alpha[q], beta[q] = mt @ (l * u), mt @ u
    return alpha, beta


def to_table(sim: Simulator):
    """The fitted effects as an Arrow table (sim_coefficients), only examples with a non-zero effect."""
    probe, example = np.nonzero((sim.alpha != 0) | (sim.beta != 0))
    return pa.table({
        "model": pa.array([sim.model] * len(probe), pa.string()),
        "query_id": pa.array([sim.query_ids[i] for i in probe], pa.string()),
        "example_id": pa.array([sim.example_ids[i] for i in example], pa.string()),
        "alpha": sim.alpha[probe, example], "beta": sim.beta[probe, example],
    })


def from_table(table, model: str, example_ids: list[str], query_ids: list[str], initial: np.ndarray) -> Simulator:
    """A Simulator back from sim_coefficients rows of one model (examples absent: no effect)."""
    rows = table.filter(pc.equal(table.column("model"), model))
    if rows.num_rows == 0:
        raise TrackstarError(f"sim_coefficients holds no fitted {model!r} simulator; run 'trackstar-db simfluence fit'")
    q_of = {q: i for i, q in enumerate(query_ids)}
    e_of = {e: i for i, e in enumerate(example_ids)}
    alpha, beta = np.zeros((len(query_ids), len(example_ids))), np.zeros((len(query_ids), len(example_ids)))
    for q, e, a, b in zip(*(rows.column(c).to_pylist() for c in ("query_id", "example_id", "alpha", "beta"))):
        if q in q_of and e in e_of:
            alpha[q_of[q], e_of[e]], beta[q_of[q], e_of[e]] = a, b
    return Simulator(model, example_ids, query_ids, alpha, beta, initial)


def fit_and_store(db, ridge: float = 1.0, models=MODELS, run_ids: list[str] | None = None) -> dict:
    """Fit each model on the recorded runs (all, or those named) and replace sim_coefficients."""
    with db.writer("simfluence fit"):  # committed on release, so pinned reads (simulate, eval) see the fit
        ensure_tables(db)
        runs = load_runs(db, run_ids)
        tables, fitted = [], {}
        for model in models:
            sim = fit(runs, model, ridge)
            tables.append(to_table(sim))
            fitted[model] = sim
        db.replace("sim_coefficients", pa.concat_tables(tables))
    return fitted
