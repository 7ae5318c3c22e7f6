"""Recorded Simfluence runs as arrays: each run's batches (example indices) and probe losses.

Indices refer to `Runs.example_ids` (every example of the database, sorted); loss trajectories
are [probes, steps + 1] float64 with column 0 the loss before training.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pyarrow.compute as pc

from trackstar_db.errors import TrackstarError
from trackstar_db.store.schema import arrow_schema

TABLES = ("sim_runs", "sim_steps", "sim_batches", "sim_trajectories")


@dataclass
class Run:
    run_id: str
    batches: list[np.ndarray]  # per step t = 1..T: example indices of the batch
    losses: np.ndarray         # [probes, T + 1]


@dataclass
class Runs:
    example_ids: list[str]
    query_ids: list[str]
    runs: list[Run]

    def subset(self, run_ids) -> "Runs":
        keep = set(run_ids)
        return Runs(self.example_ids, self.query_ids, [r for r in self.runs if r.run_id in keep])


def ensure_tables(db) -> None:
    """Create the sim_* tables (schema/sim_*.json) where the database lacks them."""
    for name in (*TABLES, "sim_coefficients"):
        if not db.has_table(name):
            db.create_table(name, arrow_schema(name))


def load_runs(db, run_ids: list[str] | None = None) -> Runs:
    """Every recorded run (or those named), with the probes every run recorded."""
    if db.count("sim_runs") == 0:
        raise TrackstarError(f"{db.path}: no recorded runs in sim_runs; run 'trackstar-db simfluence record {db.path}'")
    known = sorted(db.table("sim_runs", columns=["run_id"]).column("run_id").to_pylist())
    if run_ids is not None:
        missing = [r for r in run_ids if r not in known]
        if missing:
            raise TrackstarError(f"{db.path}: no recorded run {missing[0]!r} in sim_runs (runs: {', '.join(known)})")
        known = sorted(run_ids)
    example_ids = sorted(db.table("examples", columns=["example_id"]).column("example_id").to_pylist())
    position = {e: i for i, e in enumerate(example_ids)}
    run_filter = pc.field("run_id").isin(known)
    batches = db.table("sim_batches", filter=run_filter).sort_by([("run_id", "ascending"), ("step", "ascending")])
    trajectories = db.table("sim_trajectories", filter=run_filter)
    query_ids = _common_probes(trajectories, known, db.path)
    runs = []
    for run_id in known:
        rows = batches.filter(pc.equal(batches.column("run_id"), run_id))
        steps = rows.column("step").to_numpy()
        try:
            indices = np.array([position[e] for e in rows.column("example_id").to_pylist()], dtype=np.int64)
        except KeyError as exc:
            raise TrackstarError(f"sim_batches: run {run_id} names example {exc.args[0]!r}, not in examples") from None
        n_steps = int(steps.max()) if len(steps) else 0
        bounds = np.searchsorted(steps, np.arange(1, n_steps + 2))
        run_batches = [indices[bounds[t]:bounds[t + 1]] for t in range(n_steps)]
        losses = _trajectory(trajectories, run_id, query_ids, n_steps)
        runs.append(Run(run_id, run_batches, losses))
    return Runs(example_ids, query_ids, runs)


def _common_probes(trajectories, run_ids: list[str], path) -> list[str]:
    common = None
    for run_id in run_ids:
        rows = trajectories.filter(pc.equal(trajectories.column("run_id"), run_id))
        probes = set(rows.column("query_id").to_pylist())
        common = probes if common is None else common & probes
    if not common:
        raise TrackstarError(f"{path}: sim_trajectories holds no probe query recorded in every run")
    return sorted(common)


def _trajectory(trajectories, run_id: str, query_ids: list[str], n_steps: int) -> np.ndarray:
    rows = trajectories.filter(pc.equal(trajectories.column("run_id"), run_id))
    row_of = {q: i for i, q in enumerate(query_ids)}
    losses = np.full((len(query_ids), n_steps + 1), np.nan)
    queries, steps, values = (rows.column(c).to_pylist() for c in ("query_id", "step", "loss"))
    for q, s, v in zip(queries, steps, values):
        if q in row_of and s <= n_steps:
            losses[row_of[q], s] = v
    if np.isnan(losses).any():
        probe, step = map(int, np.argwhere(np.isnan(losses))[0])
        raise TrackstarError(f"sim_trajectories: run {run_id} lacks the loss of {query_ids[probe]!r} at step {step}")
    return losses
