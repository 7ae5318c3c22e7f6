"""Verbs of Simfluence-Linear (simfluence/): record short training runs, fit per-example effects,
simulate a curriculum, evaluate on held-out runs."""

from __future__ import annotations

from pathlib import Path

import pyarrow as pa

from trackstar_db.simfluence.evaluate import evaluate
from trackstar_db.simfluence.fit import fit_and_store
from trackstar_db.simfluence.record import RecordOptions, record_runs
from trackstar_db.simfluence.simulate import simulate_file


class SimfluenceVerbs:
    """simfluence_record, simfluence_fit, simulate, simfluence_evaluate (mixed into api.Database)."""

    def simfluence_record(self, options: RecordOptions | None = None, progress: bool | None = None,
                          **settings) -> list[str]:
        """Train short runs on random subsets and orders, recording their batches and probe losses
        (options: simfluence.record.RecordOptions, or its fields as keywords: runs, steps, subset,
        probes, ...); returns the new runs' ids."""
        return record_runs(self, options or RecordOptions(**settings), progress=progress)

    def simfluence_fit(self, ridge: float = 1.0, run_ids: list[str] | None = None) -> dict:
        """Fit Simfluence-Linear and its additive special case on the recorded runs (all, or those
        named) into sim_coefficients; returns the fitted simulators by model name."""
        return fit_and_store(self, ridge, run_ids=run_ids)

    def simulate(self, curriculum: str | Path, model: str = "linear", query_ids: list[str] | None = None) -> pa.Table:
        """The probes' predicted loss after every step of a curriculum file (JSON lines of batches)."""
        with self.reading():
            return simulate_file(self, curriculum, model, query_ids)

    def simfluence_evaluate(self, holdout: float = 0.25, ridge: float = 1.0) -> pa.Table:
        """Held-out runs: all-steps MSE and Spearman of final losses, linear vs additive vs constant."""
        with self.reading():
            return evaluate(self, holdout, ridge)
