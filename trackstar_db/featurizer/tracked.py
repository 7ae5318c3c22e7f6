"""Which weight matrices are tracked, and a per-example backward that hands each one's gradient
factors to a callback.

Tracked: the weight of every nn.Linear, transformers Conv1D (GPT-2) and nn.Embedding that
requires grad and that the task selects (task.Task.modules: name patterns; all by default),
named as in model.named_parameters() (so a tied weight, e.g. GPT-2's lm_head tied to wte, is
ONE tracked matrix with two uses whose contributions are added). Biases, norm gains and any
other parameter are NOT tracked; the manifest lists the tracked names.

In its own storage layout a matrix's per-example gradient is G = X_r^T X_c, X_r [T, rows],
X_c [T, cols] (summed over the calls of the module in one forward):

    nn.Linear    weight [out, in]:   X_r = output-grads B,  X_c = inputs A
    Conv1D       weight [in, out]:   X_r = inputs A,        X_c = output-grads B
    nn.Embedding weight [vocab, d]:  X_r = one-hot(ids),    X_c = output-grads B

X_r of an embedding is handed over as the token ids [batch, tokens] (long), never one-hot.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch
from transformers.pytorch_utils import Conv1D

from .task import Task, per_example_loss

KINDS = {torch.nn.Linear: "linear", Conv1D: "conv1d", torch.nn.Embedding: "embedding"}


@dataclass(frozen=True)
class TrackedMatrix:
    """A tracked weight [rows, cols] and the modules (module path, kind) that use it."""

    name: str
    rows: int
    cols: int
    uses: tuple[tuple[str, str], ...]


def _kind(module: torch.nn.Module) -> str | None:
    for cls, kind in KINDS.items():
        if isinstance(module, cls):
            return kind
    return None


def find_tracked(model: torch.nn.Module, task: Task | None = None) -> list[TrackedMatrix]:
    """Tracked matrices in named_parameters() order: those `task` selects (all by default)."""
    task = task or Task()
    names = {id(p): n for n, p in model.named_parameters() if task.tracks(n)}
    uses: dict[str, list[tuple[str, str]]] = {}
    for path, module in model.named_modules(remove_duplicate=False):
        kind = _kind(module)
        weight = getattr(module, "weight", None)
        if kind is None or weight is None or not weight.requires_grad or weight.dim() != 2 or id(weight) not in names:
            continue
        use = (path, kind)
        if use not in uses.setdefault(names[id(weight)], []):
            uses[names[id(weight)]].append(use)
    if not uses and task.modules is not None:
        raise ValueError(f"task modules {list(task.modules)} select no Linear, Conv1D or Embedding weight of the model")
    params = dict(model.named_parameters())
    return [TrackedMatrix(n, *params[n].shape, tuple(uses[n])) for n in params if n in uses]


# on_factors(name, x_r, x_c): x_r [batch, tokens, rows] float or [batch, tokens] long (ids),
# x_c [batch, tokens, cols] float; called once per use of a tracked matrix during backward.
OnFactors = Callable[[str, torch.Tensor, torch.Tensor], None]


def _flat(x: torch.Tensor, dtype: torch.dtype | None = torch.float32) -> torch.Tensor:
    """[batch, ..., n] -> [batch, tokens, n] in `dtype` (None: as it is)."""
    x = x.reshape(x.shape[0], -1, x.shape[-1])
    return x if dtype is None else x.to(dtype)


def per_example_backward(model: torch.nn.Module, tracked: list[TrackedMatrix],
                         batch: dict[str, torch.Tensor], on_factors: OnFactors,
                         factor_dtype: torch.dtype | None = torch.float32) -> tuple[torch.Tensor, torch.Tensor]:
    """One forward and one backward of sum_i loss_i (loss_i: mean token loss of example i).

    Each example's rows of the output-grads belong to its own loss only, so the factors are
    per-example. A module output shared by the batch (batch dim 1, e.g. GPT-2's position
    embedding) is expanded to the batch so each example gets its own rows. The model runs in
    eval mode (restored after). Gradients are taken w.r.t. the embedding outputs (or, when no
    tracked embedding is used, e.g. only LoRA adapters are trainable, w.r.t. the tracked
    modules' outputs) (torch.autograd.grad), so no parameter .grad is filled and weight gradients are never
    computed. Hooks are removed on exit. Factors come in `factor_dtype` (None: the model's).
    Returns loss [batch] (float32) and n_tokens [batch].
    """
    modules = dict(model.named_modules(remove_duplicate=False))
    roots: list[torch.Tensor] = []
    others: list[torch.Tensor] = []  # the roots when no tracked embedding is used (LoRA adapters only)
    size = batch["input_ids"].shape[0]

    def make_hook(name: str, kind: str):
        def hook(module, args, output):
            if not torch.is_grad_enabled() or not output.requires_grad:
                return
            x = args[0].detach()
            if output.shape[0] == 1 < size:  # shared across the batch (GPT-2 position ids)
                output = output.expand(size, *output.shape[1:])
                x = x.expand(size, *x.shape[1:])
            if kind == "embedding":
                roots.append(output)
                ids = x.reshape(x.shape[0], -1)
                output.register_hook(lambda g: on_factors(name, ids, _flat(g, factor_dtype)))
            elif kind == "linear":
                others.append(output)
                output.register_hook(lambda g: on_factors(name, _flat(g, factor_dtype), _flat(x, factor_dtype)))
            else:
                others.append(output)
                output.register_hook(lambda g: on_factors(name, _flat(x, factor_dtype), _flat(g, factor_dtype)))
            return output
        return hook

    handles = [modules[path].register_forward_hook(make_hook(m.name, kind))
               for m in tracked for path, kind in m.uses]
    was_training = model.training
    model.eval()  # no dropout: a vector depends on the example only
    try:
        with torch.enable_grad():
            logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
            loss, n_tokens = per_example_loss(logits, batch["labels"])
            if not roots and not others:
                raise ValueError("the model used no tracked matrix; cannot take per-example gradients")
            torch.autograd.grad(loss.sum(), roots or others, allow_unused=True)
    finally:
        for handle in handles:
            handle.remove()
        model.train(was_training)
    return loss.detach(), n_tokens


def dense_gradient(x_r: torch.Tensor, x_c: torch.Tensor, rows: int) -> torch.Tensor:
    """Materialised per-example G = X_r^T X_c [batch, rows, cols] (small models / samples only)."""
    if x_r.dtype == torch.long:  # ids: scatter-add rows of X_c, no one-hot
        batch, tokens, cols = x_c.shape
        index = (x_r + rows * torch.arange(batch, device=x_r.device)[:, None]).reshape(-1)
        out = torch.zeros(batch * rows, cols, dtype=x_c.dtype, device=x_c.device)
        return out.index_add_(0, index, x_c.reshape(-1, cols)).view(batch, rows, cols)
    return x_r.transpose(1, 2) @ x_c
