"""What a validation is: its name, how many subsets, what fraction, which seed, which trainer
and which queries; and the subset each (seed, subset number) draws."""

from __future__ import annotations

from dataclasses import asdict, dataclass

import numpy as np

from trackstar_db.errors import TrackstarError

SCHEDULES = ("scaled", "same-steps", "base")  # validate/trainers.schedule_for


@dataclass(frozen=True)
class ValidateOptions:
    """models: subsets to train (M); fraction: share of the training examples each draws; seed:
    draws the subsets; name: the validation's name in validate_runs (a rerun with the same name
    resumes it, more models extend it); train_command: a command line with {data} (a JSON lines
    file of the subset's examples: example_id, text) and {out} (the directory it must write a
    transformers checkpoint to), None for the testbed trainer; steps / epochs: override the
    testbed trainer's (its own training config otherwise); schedule: how the testbed trainer
    scales the base model's schedule to a subset ('scaled': its epochs with the warm-up as a share
    of the run, 'same-steps': its optimizer steps, 'base': its config unchanged;
    validate/trainers.schedule_for); template: which queries ('all' for
    every template); keep_models: keep each checkpoint under DB/validate/NAME/ (else deleted once
    its losses are stored)."""

    models: int = 8
    fraction: float = 0.5
    seed: int = 0
    name: str = "lds"
    train_command: str | None = None
    steps: int | None = None
    epochs: int | None = None
    schedule: str = "scaled"
    template: str = "prompt0"
    device: str = "cpu"
    threads: int | None = None
    keep_models: bool = False

    def __post_init__(self):
        if self.models < 2:
            raise TrackstarError(f"validate: --models must be >= 2 (a correlation needs two subsets), not {self.models}")
        if not 0 < self.fraction < 1:
            raise TrackstarError(f"validate: --fraction must be in (0, 1), not {self.fraction}")
        if not self.name or not self.name.replace("-", "").replace("_", "").isalnum():
            raise TrackstarError(f"validate: --name must be letters, digits, '-' or '_', not {self.name!r}")
        for field in ("steps", "epochs"):
            value = getattr(self, field)
            if value is not None and value < 1:
                raise TrackstarError(f"validate: --{field} must be >= 1, not {value}")
        if self.schedule not in SCHEDULES:
            raise TrackstarError(f"validate: --schedule must be one of {', '.join(SCHEDULES)}, not {self.schedule!r}")
        if self.train_command is not None and ("{data}" not in self.train_command or "{out}" not in self.train_command):
            raise TrackstarError("validate: --train-command must contain {data} and {out}, e.g. "
                                 "'python train.py --data {data} --out {out}'")

    def identity(self) -> dict:
        """The settings every subset of one validation must share (stored in validate_runs.parameters)."""
        return {k: v for k, v in asdict(self).items() if k not in ("models", "name", "device", "threads", "keep_models")}


def draw_subset(n_examples: int, fraction: float, seed: int, subset: int) -> np.ndarray:
    """Sorted indices of subset number `subset`: round(fraction * n) of range(n) without
    replacement, from a generator seeded by (seed, subset), so each subset is drawn alone."""
    size = min(n_examples, max(1, round(fraction * n_examples)))
    rng = np.random.default_rng([seed, subset])
    return np.sort(rng.choice(n_examples, size, replace=False))
