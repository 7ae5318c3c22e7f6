"""Held-out evaluation of Simfluence: fit on some recorded runs, simulate the others.

Metrics, averaged over held-out runs (each run rolled out from the probes' initial loss through
its recorded batches, never fed the recorded losses):
  - mse: mean squared error of the predicted loss over every probe and every step 1..T;
  - spearman: Spearman correlation, across probes, of predicted and actual final loss (the
    paper's metric).
Methods: simfluence-linear; tracin-additive (the additive special case alpha = 0, fitted the same
way: what TracIn amounts to as a simulator, with fitted rather than gradient-derived effects);
constant (every probe keeps its initial loss); mean-curve (each probe's mean trajectory over the
training runs, blind to the curriculum).
"""

from __future__ import annotations

import numpy as np
import pyarrow as pa

from trackstar_db.errors import TrackstarError
from trackstar_db.option_checks import PROPER_FRACTION, check

from .data import load_runs
from .fit import fit


def split_runs(run_ids: list[str], holdout: float) -> tuple[list[str], list[str]]:
    """(training runs, held-out runs): the last round(holdout * n) runs (at least 1) are held out."""
    if len(run_ids) < 2:
        raise TrackstarError(f"simfluence eval needs at least 2 recorded runs, found {len(run_ids)}")
    check("holdout", PROPER_FRACTION, holdout)
    n_held = min(len(run_ids) - 1, max(1, round(holdout * len(run_ids))))
    return run_ids[:-n_held], run_ids[-n_held:]


def _spearman(a: np.ndarray, b: np.ndarray) -> float:
    from scipy.stats import spearmanr  # heavy: scipy

    if np.ptp(a) == 0 or np.ptp(b) == 0:
        return float("nan")
    return float(spearmanr(a, b).statistic)


def evaluate(db, holdout: float = 0.25, ridge: float = 1.0) -> pa.Table:
    """The method-by-metric table of held-out simulation (Arrow)."""
    runs = load_runs(db)
    train_ids, held_ids = split_runs([r.run_id for r in runs.runs], holdout)
    return evaluate_runs(runs, train_ids, held_ids, ridge)


def evaluate_runs(runs, train_ids: list[str], held_ids: list[str], ridge: float = 1.0) -> pa.Table:
    train, held = runs.subset(train_ids), runs.subset(held_ids).runs
    linear, additive = fit(train, "linear", ridge), fit(train, "additive", ridge)
    width = min(len(r.batches) for r in train.runs) + 1
    mean_curve = np.mean([r.losses[:, :width] for r in train.runs], axis=0)

    def predict(method: str, run) -> np.ndarray:
        if method == "simfluence-linear":
            return linear.simulate(run.batches, run.losses[:, 0])
        if method == "tracin-additive":
            return additive.simulate(run.batches, run.losses[:, 0])
        if method == "constant":
            return np.repeat(run.losses[:, :1], run.losses.shape[1], axis=1)
        curve = np.pad(mean_curve, ((0, 0), (0, max(0, run.losses.shape[1] - width))), mode="edge")
        return curve[:, :run.losses.shape[1]]

    rows = []
    for method in ("simfluence-linear", "tracin-additive", "constant", "mean-curve"):
        mse, rho = [], []
        for run in held:
            predicted = predict(method, run)
            mse.append(float(np.mean((predicted[:, 1:] - run.losses[:, 1:]) ** 2)))
            rho.append(_spearman(predicted[:, -1], run.losses[:, -1]))
        rows.append({"method": method, "train_runs": len(train.runs), "held_out_runs": len(held),
                     "probes": len(runs.query_ids), "mse": float(np.mean(mse)),
                     "spearman": float(np.nanmean(rho)) if not np.isnan(rho).all() else float("nan")})
    return pa.Table.from_pylist(rows)


def trajectories(runs, train_ids: list[str], run_id: str, query_id: str, ridge: float = 1.0) -> pa.Table:
    """Actual vs simulated loss of one probe over one (held-out) run: step, actual, linear, additive."""
    train = runs.subset(train_ids)
    run = next((r for r in runs.runs if r.run_id == run_id), None)
    if run is None or query_id not in runs.query_ids:
        raise TrackstarError(f"no recorded run {run_id!r} with probe {query_id!r}")
    q = runs.query_ids.index(query_id)
    out = {"step": np.arange(run.losses.shape[1]), "actual": run.losses[q]}
    for model in ("linear", "additive"):
        out[model] = fit(train, model, ridge).simulate(run.batches, run.losses[:, 0])[q]
    return pa.table(out)


def report_trajectory(db, holdout: float = 0.25, ridge: float = 1.0) -> pa.Table | None:
    """The report's trajectory plot: on the first held-out run (split_runs), the probe whose
    recorded loss moves most, with its Simfluence-Linear, additive (TracIn as simulator) and
    constant-loss predictions; None when the database has fewer than 2 recorded runs."""
    if not db.has_table("sim_runs") or db.count("sim_runs") < 2:
        return None
    runs = load_runs(db)
    train_ids, held_ids = split_runs([r.run_id for r in runs.runs], holdout)
    run = next(r for r in runs.runs if r.run_id == held_ids[0])
    probe = int(np.argmax(np.abs(run.losses[:, -1] - run.losses[:, 0])))
    table = trajectories(runs, train_ids, run.run_id, runs.query_ids[probe], ridge)
    table = table.append_column("constant", pa.array(np.full(table.num_rows, run.losses[probe, 0])))
    return table.replace_schema_metadata({"run_id": run.run_id, "query_id": runs.query_ids[probe],
                                          "train_runs": str(len(train_ids))})
