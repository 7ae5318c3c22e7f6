"""What a validation is: its name, how many subsets, what fraction, which seed, which trainer
and which queries; and the subset each (seed, subset number) draws."""

from __future__ import annotations

from dataclasses import asdict, dataclass

import numpy as np

from trackstar_db.devices import DEVICE
from trackstar_db.errors import ParameterError
from trackstar_db.option_checks import COUNT, IDENTIFIER, MODELS, NON_NEGATIVE, PROPER_FRACTION, Choice, check_fields, ruled

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

    models: int = ruled(MODELS, 8)
    fraction: float = ruled(PROPER_FRACTION, 0.5)
    seed: int = ruled(NON_NEGATIVE, 0)
    name: str = ruled(IDENTIFIER, "lds")
    train_command: str | None = None
    steps: int | None = ruled(COUNT, None)
    epochs: int | None = ruled(COUNT, None)
    schedule: str = ruled(Choice(SCHEDULES), "scaled")
    template: str = "prompt0"
    device: str = ruled(DEVICE, "cpu")
    threads: int | None = ruled(COUNT, None)
    keep_models: bool = False

    def __post_init__(self):
        check_fields(self)
        if self.train_command is not None and ("{data}" not in self.train_command or "{out}" not in self.train_command):
            raise ParameterError("train_command", "must contain {data} and {out}, e.g. "
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
