"""Predict probe loss trajectories for a new curriculum with a fitted simulator.

A curriculum file is JSON lines, one line per optimizer step: a list of example ids, or an object
with an "example_ids" list. The simulator is read back from sim_coefficients (written by
`trackstar-db simfluence fit`); the starting loss of each probe is its recorded loss before training.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from trackstar_db.errors import TrackstarError

from .fit import Simulator, from_table


def read_curriculum(path: str | Path, example_ids: list[str]) -> list[np.ndarray]:
    """Batches (example indices into `example_ids`) of a curriculum file."""
    path = Path(path)
    if not path.is_file():
        raise TrackstarError(f"{path}: no such curriculum file")
    position = {e: i for i, e in enumerate(example_ids)}
    batches = []
    for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as exc:
            raise TrackstarError(f"{path}:{number}: not JSON ({exc.msg})") from None
        batch = record.get("example_ids") if isinstance(record, dict) else record
        if not isinstance(batch, list) or not batch or not all(isinstance(e, str) for e in batch):
            raise TrackstarError(f"{path}:{number}: expected a non-empty list of example ids (or {{\"example_ids\": [...]}})")
        unknown = [e for e in batch if e not in position]
        if unknown:
            raise TrackstarError(f"{path}:{number}: example {unknown[0]!r} is not in the examples table")
        batches.append(np.array([position[e] for e in batch], dtype=np.int64))
    if not batches:
        raise TrackstarError(f"{path}: the curriculum holds no batches")
    return batches


def stored_simulator(db, model: str = "linear", query_ids: list[str] | None = None) -> Simulator:
    """The fitted simulator in sim_coefficients, for every fitted probe (or those named)."""
    if db.count("sim_coefficients") == 0:
        raise TrackstarError(f"{db.path}: no fitted simulator; run 'trackstar-db simfluence fit {db.path}'")
    table = db.table("sim_coefficients", filter=pc.field("model") == model)
    fitted = sorted(set(table.column("query_id").to_pylist()))
    if query_ids:
        missing = [q for q in query_ids if q not in fitted]
        if missing:
            raise TrackstarError(f"query {missing[0]!r} is not a fitted probe (probes: {len(fitted)} in sim_coefficients)")
        fitted = list(query_ids)
    example_ids = sorted(db.table("examples", columns=["example_id"]).column("example_id").to_pylist())
    start = db.table("sim_trajectories", columns=["query_id", "loss"], filter=pc.field("step") == 0)
    initial = {}
    for q, v in zip(start.column("query_id").to_pylist(), start.column("loss").to_pylist()):
        initial.setdefault(q, []).append(v)
    return from_table(table, model, example_ids, fitted, np.array([np.mean(initial[q]) for q in fitted]))


def trajectory_table(sim: Simulator, losses: np.ndarray) -> pa.Table:
    """[probes, T + 1] losses as rows (query_id, step, loss)."""
    n_probes, n_steps = losses.shape
    return pa.table({
        "query_id": pa.array(np.repeat(sim.query_ids, n_steps).tolist(), pa.string()),
        "step": pa.array(np.tile(np.arange(n_steps), n_probes), pa.int32()),
        "loss": pa.array(losses.reshape(-1), pa.float64()),
    })


def simulate_file(db, curriculum: str | Path, model: str = "linear", query_ids: list[str] | None = None) -> pa.Table:
    """Predicted loss of each probe after every step of the curriculum in `curriculum` (step 0 = start)."""
    sim = stored_simulator(db, model, query_ids)
    return trajectory_table(sim, sim.simulate(read_curriculum(curriculum, sim.example_ids)))
