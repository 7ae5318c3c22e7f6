"""A transformers TrainerCallback that leaves every checkpoint attributable by trackstar-db.

    from trackstar_db.integrations.hf_trainer import TrackstarCallback
    trainer = Trainer(model, args, train_dataset=..., processing_class=tokenizer,
                      callbacks=[TrackstarCallback()])

At each save it writes optimizer.safetensors into checkpoint-N/ (featurizer/optimizer_state.py:
the Adam/AdamW moments or Adafactor factors keyed by parameter name, with the step and the
learning rate of the last step), so `trackstar-db init DB --model OUT/checkpoint-N` takes the
optimizer correction from it by default. (`init` reads the Trainer's own optimizer.pt too; this
file is the safe, name-keyed form that needs no model to decode.) Pass processing_class to the
Trainer so the checkpoint also holds the tokenizer `init` needs.
"""

from __future__ import annotations

from pathlib import Path

from transformers import TrainerCallback
from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR

from trackstar_db.featurizer import optimizer_state


def last_lr(optimizer, lr_scheduler=None) -> float:
    """The learning rate of the last optimizer step (the scheduler's, else the param group's)."""
    if lr_scheduler is not None:
        try:
            return float(lr_scheduler.get_last_lr()[0])
        except (AttributeError, IndexError, AssertionError):  # a scheduler that has not stepped
            pass
    return float(getattr(optimizer, "optimizer", optimizer).param_groups[0]["lr"])


def write_optimizer_state(model, optimizer, directory: str | Path, lr: float | None = None) -> Path:
    """Write optimizer.safetensors for `model`'s parameters into `directory`; returns its path."""
    model = getattr(model, "module", model)  # a DistributedDataParallel wrapper
    state = optimizer_state.from_torch(optimizer, dict(model.named_parameters()), lr)
    return optimizer_state.save(state, directory)


class TrackstarCallback(TrainerCallback):
    """Writes optimizer.safetensors next to each checkpoint the Trainer saves (main process only)."""

    def on_save(self, args, state, control, model=None, optimizer=None, lr_scheduler=None, **kwargs):
        if not state.is_world_process_zero or model is None or optimizer is None:
            return control
        directory = Path(args.output_dir) / f"{PREFIX_CHECKPOINT_DIR}-{state.global_step}"
        if directory.is_dir():
            write_optimizer_state(model, optimizer, directory, last_lr(optimizer, lr_scheduler))
        return control
