"""The optimizer state saved next to a checkpoint, as safetensors (never a pickle).

File `optimizer.safetensors` in the model directory holds, per trainable parameter name
(as in model.named_parameters()):
    exp_avg.<name>, exp_avg_sq.<name>            Adam / AdamW moments
or  exp_avg_sq_row.<name>, exp_avg_sq_col.<name>  Adafactor-style factored second moments
and its metadata (all strings) records: optimizer ('adamw' | 'adam' | 'adafactor'), step, lr
(the final learning rate), beta1, beta2, eps, weight_decay.

A checkpoint saved by the transformers Trainer (checkpoint-N/) holds optimizer.pt instead: a
torch optimizer state_dict whose state is keyed by parameter INDEX. `load_hf_trainer` reads it
with torch.load(weights_only=True) (tensors and plain types, never code), maps the indices to
names the way Trainer.create_optimizer numbered them (trainable parameters in
model.named_parameters() order, split into a weight-decay group and a no-decay group; or one
group of all of them), checks every shape, and takes the final learning rate from
trainer_state.json (log_history's last 'learning_rate'), else scheduler.pt ('_last_lr'), else
the optimizer's param group. Adam/AdamW (exp_avg, exp_avg_sq) and Adafactor (exp_avg_sq_row,
exp_avg_sq_col) states are read. `load(path)` accepts either format.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from trackstar_db.errors import TrackstarError, first_line

from .trainer_state import final_lr, parameter_order, skeleton

FILENAME = "optimizer.safetensors"
TRAINER_FILENAME = "optimizer.pt"  # transformers Trainer checkpoints


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


def from_torch(optimizer: torch.optim.Optimizer, named_params: dict[str, torch.nn.Parameter],
               lr: float | None = None) -> OptimizerState:
    """Capture a live Adam/AdamW (exp_avg, exp_avg_sq) or Adafactor (exp_avg_sq_row/col) optimizer,
    keyed by parameter name; lr: the final learning rate (default: the first param group's)."""
    optimizer = getattr(optimizer, "optimizer", optimizer)  # accelerate's AcceleratedOptimizer
    group = optimizer.param_groups[0]
    by_id = {id(p): n for n, p in named_params.items()}
    tensors: dict[str, torch.Tensor] = {}
    kind, step = None, 0
    for p, state in optimizer.state.items():
        name = by_id.get(id(p))
        if name is None:
            continue
        keys = [k for k in ("exp_avg", "exp_avg_sq", "exp_avg_sq_row", "exp_avg_sq_col") if k in state]
        if "exp_avg_sq_row" in state or "RMS" in state:
            kind = "adafactor"
        elif "exp_avg_sq" in state:
            kind = kind or "adamw"
        for key in keys:
            tensors[f"{key}.{name}"] = state[key].detach().float().cpu().contiguous()
        step = max(step, int(state.get("step", 0)))
    if kind is None:
        raise TrackstarError("optimizer state: no Adam/AdamW or Adafactor moments (before the first step?)")
    betas = group.get("betas") or (0.9, 0.999)
    eps = group.get("eps", 1e-8)
    eps = float(eps[0] if isinstance(eps, (tuple, list)) else eps)
    return OptimizerState(kind, step, float(lr if lr is not None else group["lr"]), float(betas[0]), float(betas[1]),
                          eps, float(group.get("weight_decay", 0.0) or 0.0), tensors)


def save(state: OptimizerState, model_dir: str | Path) -> Path:
    path = Path(model_dir) / FILENAME
    meta = {"optimizer": state.optimizer, "step": str(state.step), "lr": repr(state.lr),
            "beta1": repr(state.beta1), "beta2": repr(state.beta2), "eps": repr(state.eps),
            "weight_decay": repr(state.weight_decay)}
    save_file({k: v.contiguous() for k, v in state.tensors.items()}, str(path), metadata=meta)
    return path


def find(model_dir: str | Path) -> Path | None:
    """The optimizer state file inside a checkpoint directory: optimizer.safetensors, else
    the Trainer's optimizer.pt, else None."""
    for name in (FILENAME, TRAINER_FILENAME):
        if (Path(model_dir) / name).is_file():
            return Path(model_dir) / name
    return None


def _is_safetensors(path: Path) -> bool:
    """By name, then content: torch.save writes a zip ('PK') or a pickle (0x80); anything else is
    read as safetensors."""
    if path.suffix in (".pt", ".pth", ".bin"):
        return False
    try:
        with path.open("rb") as handle:
            head = handle.read(9)
    except OSError:
        return path.suffix == ".safetensors"
    if head[8:9] == b"{":  # safetensors: 8-byte header length, then the JSON header (the length may start 0x80)
        return True
    return not (head.startswith(b"PK") or head[:1] == b"\x80")


def load(path: str | Path, model: torch.nn.Module | None = None) -> OptimizerState:
    """Load a state from a checkpoint directory, an optimizer.safetensors file or a Trainer
    optimizer.pt (whose parameter names come from `model`, or from the checkpoint's config)."""
    path = Path(path)
    if path.is_dir():
        path = find(path) or path / FILENAME
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no optimizer state")
    if not _is_safetensors(path):
        return load_hf_trainer(path.parent, model, path)

    try:
        with safe_open(str(path), framework="pt") as handle:
            meta = handle.metadata() or {}
        tensors = load_file(str(path))
    except Exception as exc:  # a truncated or foreign file (the Rust side raises its own types)
        raise TrackstarError(f"{path}: not a readable safetensors optimizer state ({first_line(exc)})") from None
    try:
        state = OptimizerState(meta["optimizer"], int(meta["step"]), float(meta["lr"]),
                               float(meta.get("beta1", 0.9)), float(meta.get("beta2", 0.999)),
                               float(meta.get("eps", 1e-8)), float(meta.get("weight_decay", 0.0)))
    except KeyError as exc:
        raise TrackstarError(f"{path}: optimizer metadata lacks field {exc.args[0]!r}") from None
    state.tensors = tensors
    return state


def peek_kind(path: str | Path) -> str | None:
    """The optimizer name recorded in a state file, without loading its tensors (None if unreadable)."""
    path = Path(path)
    if path.is_dir():
        path = find(path) or path / FILENAME
    if not _is_safetensors(path):
        return None  # a Trainer optimizer.pt: its kind is recorded in the manifest at init
    try:
        with safe_open(str(path), framework="pt") as handle:
            return (handle.metadata() or {}).get("optimizer")
    except Exception:  # a missing or foreign file is reported by load(), where it is needed
        return None


# -- transformers Trainer checkpoints (optimizer.pt; the Trainer's numbering in trainer_state.py) --
def load_hf_trainer(model_dir: str | Path, model: torch.nn.Module | None = None,
                    path: str | Path | None = None) -> OptimizerState:
    """The optimizer state of a transformers Trainer checkpoint directory, keyed by parameter name.

    model: the checkpoint's model (only names, shapes and requires_grad are used); default: built
    from model_dir/config.json on the meta device."""
    model_dir = Path(model_dir)
    path = Path(path) if path is not None else model_dir / TRAINER_FILENAME
    try:
        saved = torch.load(str(path), map_location="cpu", weights_only=True)
    except Exception as exc:  # not a torch file, truncated, or holding objects weights_only refuses
        raise TrackstarError(f"{path}: not a readable torch optimizer state ({first_line(exc)})") from None
    if not (isinstance(saved, dict) and isinstance(saved.get("state"), dict) and saved.get("param_groups")):
        raise TrackstarError(f"{path}: not an optimizer state_dict (needs 'state' and 'param_groups')")

    groups = saved["param_groups"]
    order = parameter_order(model if model is not None else skeleton(model_dir),
                            [len(g["params"]) for g in groups], path)
    indices = [i for g in groups for i in g["params"]]
    tensors: dict[str, torch.Tensor] = {}
    kind, step = None, 0
    for index, (name, param) in zip(indices, order):
        state = saved["state"].get(index)
        if not state:
            continue  # a parameter that never received a gradient
        if "exp_avg_sq_row" in state:
            kind, keys = "adafactor", ("exp_avg_sq_row", "exp_avg_sq_col")
            shapes = (tuple(param.shape[:-1]), tuple(param.shape[:-2]) + tuple(param.shape[-1:]))
        elif "exp_avg_sq" in state:
            kind = kind or ("adafactor" if "RMS" in state else "adamw")
            keys, shapes = (("exp_avg", "exp_avg_sq") if "exp_avg" in state else ("exp_avg_sq",)), None
        else:
            raise TrackstarError(f"{path}: state of {name!r} has neither exp_avg_sq nor exp_avg_sq_row/col "
                                 f"(keys: {', '.join(sorted(state))}); only Adam/AdamW and Adafactor are read")
        for j, key in enumerate(keys):
            tensor = state[key]
            expected = shapes[j] if shapes else tuple(param.shape)
            if tuple(tensor.shape) != expected:
                raise TrackstarError(f"{path}: {key} of {name!r} has shape {tuple(tensor.shape)}, the model's "
                                     f"parameter needs {expected}; was it saved for this model?")
            tensors[f"{key}.{name}"] = tensor.detach().float().contiguous()
        step = max(step, int(state.get("step", 0)))
    if kind is None:
        raise TrackstarError(f"{path}: the optimizer state is empty (saved before the first step?)")
    first = groups[0]
    betas = first.get("betas") or (0.9, 0.999)
    eps = first.get("eps", 1e-8)
    eps = float(eps[0] if isinstance(eps, (tuple, list)) else eps)
    weight_decay = max(float(g.get("weight_decay", 0.0) or 0.0) for g in groups)
    return OptimizerState(kind, step, final_lr(model_dir, groups), float(betas[0]), float(betas[1]), eps,
                          weight_decay, tensors)


def describe(path: str | Path) -> dict:
    """What the manifest records about a state file ({optimizer, optimizer_step, optimizer_lr}),
    checked readable: a Trainer optimizer.pt is loaded and mapped in full, so a mismatch is
    refused at init, not at the first gradient run; a safetensors file by its metadata."""
    path = Path(path)
    if not _is_safetensors(path):
        state = load_hf_trainer(path.parent, path=path)
        return {"optimizer": state.optimizer, "optimizer_step": state.step, "optimizer_lr": state.lr}

    try:
        with safe_open(str(path), framework="pt") as handle:
            meta = handle.metadata() or {}
    except Exception as exc:  # a truncated or foreign file
        raise TrackstarError(f"{path}: not a readable safetensors optimizer state ({first_line(exc)})") from None
    try:
        return {"optimizer": meta["optimizer"], "optimizer_step": int(meta["step"]), "optimizer_lr": float(meta["lr"])}
    except (KeyError, ValueError) as exc:
        raise TrackstarError(f"{path}: optimizer metadata lacks or garbles field {exc.args[0]!r}") from None
