"""How a transformers Trainer checkpoint numbers and schedules its parameters, for reading its
optimizer.pt (optimizer_state.load_hf_trainer): which parameter each state index is
(Trainer.create_optimizer's weight-decay and no-decay groups, or one group) and the final
learning rate (trainer_state.json, scheduler.pt or the param group).
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from transformers.trainer_pt_utils import get_parameter_names

from trackstar_db.errors import TrackstarError, first_line
from trackstar_db.models.load import model_from_config, open_config

_NO_DECAY = (r"bias", r"layernorm", r"rmsnorm", r"(?:^|\.)norm(?:$|\.)", r"_norm(?:$|\.)")


def skeleton(model_dir: Path) -> torch.nn.Module:
    """The checkpoint's model built from its config.json on the meta device (names and shapes, no memory)."""
    if not (model_dir / "config.json").is_file():
        raise TrackstarError(f"{model_dir}: optimizer.pt must sit in its checkpoint directory (no config.json there)")
    return model_from_config(open_config(model_dir), meta=True)


def _decay_names(model: torch.nn.Module) -> set[str]:
    """Parameters the Trainer puts in its weight-decay group (Trainer.get_decay_parameter_names)."""
    return set(get_parameter_names(model, [torch.nn.LayerNorm], list(_NO_DECAY)))


def parameter_order(model: torch.nn.Module, group_sizes: list[int], path: Path) -> list[tuple[str, torch.nn.Parameter]]:
    """(name, parameter) for optimizer indices 0..n-1: the Trainer's decay / no-decay groups,
    or one group of every trainable parameter, each in named_parameters() order."""
    trainable = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    decay = _decay_names(model)
    split = [[(n, p) for n, p in trainable if n in decay], [(n, p) for n, p in trainable if n not in decay]]
    if group_sizes == [len(split[0]), len(split[1])]:
        return split[0] + split[1]
    if group_sizes == [len(trainable)]:
        return trainable
    raise TrackstarError(f"{path}: parameter groups of sizes {group_sizes} do not fit the model's "
                         f"{len(trainable)} trainable parameters ({len(split[0])} with weight decay, "
                         f"{len(split[1])} without); was it saved for this model?")


def final_lr(model_dir: Path, groups: list[dict]) -> float:
    """The learning rate of the last step: trainer_state.json's log, else scheduler.pt, else the group's."""

    trainer_state = model_dir / "trainer_state.json"
    if trainer_state.is_file():
        try:
            history = json.loads(trainer_state.read_text(encoding="utf-8")).get("log_history", [])
        except (ValueError, OSError, AttributeError) as exc:
            raise TrackstarError(f"{trainer_state}: unreadable ({first_line(exc)})") from None
        rates = [e["learning_rate"] for e in history if isinstance(e, dict) and "learning_rate" in e]
        if rates:
            return float(rates[-1])
    scheduler = model_dir / "scheduler.pt"
    if scheduler.is_file():
        try:
            last = torch.load(str(scheduler), map_location="cpu", weights_only=True).get("_last_lr")
            if last:
                return float(last[0])
        except Exception:  # a scheduler state torch cannot load safely: fall back to the param group
            pass
    return float(groups[0]["lr"])
