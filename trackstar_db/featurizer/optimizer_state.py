"""The optimizer state saved next to a checkpoint, as safetensors (never a pickle).

File `optimizer.safetensors` in the model directory holds, per trainable parameter name
(as in model.named_parameters()):
    exp_avg.<name>, exp_avg_sq.<name>            Adam / AdamW moments
or  exp_avg_sq_row.<name>, exp_avg_sq_col.<name>  Adafactor-style factored second moments
and its metadata (all strings) records: optimizer ('adamw' | 'adam' | 'adafactor'), step, lr
(the final learning rate), beta1, beta2, eps, weight_decay.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

FILENAME = "optimizer.safetensors"


@dataclass
class OptimizerState:
    optimizer: str
    step: int
    lr: float
    beta1: float = 0.9
    beta2: float = 0.999
    eps: float = 1e-8
    weight_decay: float = 0.0
    tensors: dict[str, torch.Tensor] = field(default_factory=dict)

    def moment(self, kind: str, name: str) -> torch.Tensor | None:
        return self.tensors.get(f"{kind}.{name}")

    def second_moment(self, name: str) -> torch.Tensor | None:
        """Bias-corrected exp_avg_sq of parameter `name` (Adam/AdamW), or None."""
        v = self.moment("exp_avg_sq", name)
        if v is None:
            return None
        return v / (1.0 - self.beta2 ** self.step)


def from_torch_adam(optimizer: torch.optim.Optimizer, named_params: dict[str, torch.nn.Parameter],
                    kind: str = "adamw") -> OptimizerState:
    """Capture a torch Adam/AdamW optimizer's state, keyed by parameter name."""
    group = optimizer.param_groups[0]
    by_id = {id(p): n for n, p in named_params.items()}
    tensors: dict[str, torch.Tensor] = {}
    step = 0
    for p, state in optimizer.state.items():
        name = by_id.get(id(p))
        if name is None or "exp_avg" not in state:
            continue
        tensors[f"exp_avg.{name}"] = state["exp_avg"].detach().cpu().contiguous()
        tensors[f"exp_avg_sq.{name}"] = state["exp_avg_sq"].detach().cpu().contiguous()
        step = int(state["step"])
    return OptimizerState(kind, step, float(group["lr"]), float(group["betas"][0]), float(group["betas"][1]),
                          float(group["eps"]), float(group.get("weight_decay", 0.0)), tensors)


def save(state: OptimizerState, model_dir: str | Path) -> Path:
    path = Path(model_dir) / FILENAME
    meta = {"optimizer": state.optimizer, "step": str(state.step), "lr": repr(state.lr),
            "beta1": repr(state.beta1), "beta2": repr(state.beta2), "eps": repr(state.eps),
            "weight_decay": repr(state.weight_decay)}
    save_file({k: v.contiguous() for k, v in state.tensors.items()}, str(path), metadata=meta)
    return path


def load(path: str | Path) -> OptimizerState:
    """Load a state from a model directory or an optimizer.safetensors file."""
    path = Path(path)
    if path.is_dir():
        path = path / FILENAME
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no optimizer state")
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as handle:
        meta = handle.metadata() or {}
    try:
        state = OptimizerState(meta["optimizer"], int(meta["step"]), float(meta["lr"]),
                               float(meta.get("beta1", 0.9)), float(meta.get("beta2", 0.999)),
                               float(meta.get("eps", 1e-8)), float(meta.get("weight_decay", 0.0)))
    except KeyError as exc:
        raise ValueError(f"{path}: optimizer metadata lacks field {exc.args[0]!r}") from None
    state.tensors = load_file(str(path))
    return state


def peek_kind(path: str | Path) -> str | None:
    """The optimizer name recorded in a state file, without loading its tensors (None if unreadable)."""
    path = Path(path)
    if path.is_dir():
        path = path / FILENAME
    try:
        from safetensors import safe_open

        with safe_open(str(path), framework="pt") as handle:
            return (handle.metadata() or {}).get("optimizer")
    except Exception:  # a missing or foreign file is reported by load(), where it is needed
        return None
