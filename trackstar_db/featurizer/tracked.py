"""Which weight matrices are tracked, and a per-example backward that hands each one's gradient
factors to a callback.

Tracked: the weight of every nn.Linear, transformers Conv1D (GPT-2) and nn.Embedding, the
weight of every MoE router (a module whose class name says Router, e.g. TopKRouter: logits =
x W^T), and the fused expert tensors of every MoE experts module (experts.py: gate_up_proj,
up_proj, down_proj and their per-expert biases, each read as one 2-D matrix), that requires grad
and that the task selects (task.Task.modules: name patterns; all by default), named as in
model.named_parameters() (so a tied weight, e.g. GPT-2's lm_head tied to wte, is ONE tracked
matrix with two uses whose contributions are added). Biases of Linear layers (and routers), norm
gains and any other parameter are NOT tracked; the manifest lists the tracked names and the
share of the trainable parameters they hold (`coverage`).

In its own storage layout a matrix's per-example gradient is G = X_r^T X_c, X_r [T, rows],
X_c [T, cols] (summed over the calls of the module in one forward):

    nn.Linear    weight [out, in]:   X_r = output-grads B,  X_c = inputs A
    Conv1D       weight [in, out]:   X_r = inputs A,        X_c = output-grads B
    nn.Embedding weight [vocab, d]:  X_r = one-hot(ids),    X_c = output-grads B
    router       weight [E, d]:      X_r = logit-grads,     X_c = inputs A
    experts      [E, R, C] as [E*R, C]: per routed token, see experts.py (`Routed` rows)

X_r of an embedding is handed over as the token ids [batch, tokens] (long), never one-hot.
A module that runs on the flattened [batch * tokens, d] states (a shared expert, a gate, a
router) has its rows mapped back to [batch, tokens, d]: row i belongs to example i // tokens.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch
from transformers.pytorch_utils import Conv1D

from .experts import Routed, expert_tensors, is_experts, matrix_shape, tapped_forward
from .task import Task, per_example_loss

KINDS = {torch.nn.Linear: "linear", Conv1D: "conv1d", torch.nn.Embedding: "embedding"}


@dataclass(frozen=True)
class TrackedMatrix:
    """A tracked weight [rows, cols] and the modules (module path, kind) that use it; experts:
    the number of experts whose slices stack into its rows (a fused-experts tensor), else 1."""

    name: str
    rows: int
    cols: int
    uses: tuple[tuple[str, str], ...]
    experts: int = 1


def is_router(module: torch.nn.Module) -> bool:
    """An MoE router: a class named ...Router whose 2-D weight [E, d] gives the logits x W^T."""
    weight = getattr(module, "weight", None)
    return "router" in type(module).__name__.lower() and isinstance(weight, torch.Tensor) and weight.dim() == 2


def _matrices(module: torch.nn.Module) -> list[tuple[torch.Tensor, str, tuple[int, int]]]:
    """(parameter, kind, 2-D shape) of each matrix `module` uses that is tracked when selected."""
    if is_experts(module):
        return [(param, "experts", matrix_shape(param)) for _, param in expert_tensors(module)]
    weight = getattr(module, "weight", None)
    if not isinstance(weight, torch.Tensor) or weight.dim() != 2:
        return []
    if is_router(module):
        return [(weight, "router", tuple(weight.shape))]
    for cls, kind in KINDS.items():
        if isinstance(module, cls):
            return [(weight, kind, tuple(weight.shape))]
    return []


def find_tracked(model: torch.nn.Module, task: Task | None = None) -> list[TrackedMatrix]:
    """Tracked matrices in named_parameters() order: those `task` selects (all by default)."""
    task = task or Task()
    names = {id(p): n for n, p in model.named_parameters() if task.tracks(n)}
    uses: dict[str, list[tuple[str, str]]] = {}
    shapes: dict[str, tuple[int, int]] = {}
    experts: dict[str, int] = {}
    for path, module in model.named_modules(remove_duplicate=False):
        for param, kind, shape in _matrices(module):
            if not param.requires_grad or id(param) not in names:
                continue
            name, use = names[id(param)], (path, kind)
            shapes[name] = shape
            experts[name] = param.shape[0] if kind == "experts" else 1
            if use not in uses.setdefault(name, []):
                uses[name].append(use)
    if not uses and task.modules is not None:
        raise ValueError(f"task modules {list(task.modules)} select no Linear, Conv1D, Embedding, router or "
                         "expert weight of the model")
    return [TrackedMatrix(n, *shapes[n], tuple(uses[n]), experts[n]) for n, _ in model.named_parameters() if n in uses]


@dataclass(frozen=True)
class Coverage:
    """The share of a model's trainable parameters (entries) that the tracked matrices hold, and
    the trainable parameters of two or more dimensions the task selects that are not tracked."""

    tracked: int
    total: int
    untracked: tuple[str, ...]

    @property
    def share(self) -> float:
        return self.tracked / self.total if self.total else 0.0

    def to_dict(self) -> dict:
        return {"share": round(self.share, 6), "tracked_parameters": self.tracked, "parameters": self.total,
                "untracked_matrices": list(self.untracked)}

    def describe(self) -> str:
        return f"tracked: {self.share:.1%} of the model's {self.total:,} trainable parameters"

    def warning(self, limit: int = 6) -> str | None:
        """One line naming the untracked matrices (None when every selected matrix is tracked)."""
        if not self.untracked:
            return None
        shown = ", ".join(self.untracked[:limit]) + (f" and {len(self.untracked) - limit} more"
                                                     if len(self.untracked) > limit else "")
        return (f"{len(self.untracked)} parameter(s) of 2+ dimensions are not tracked (not a Linear, Conv1D, "
                f"Embedding, router or fused-experts weight; their gradients are left out): {shown}")


def coverage(model: torch.nn.Module, tracked: list[TrackedMatrix], task: Task | None = None) -> Coverage:
    """Coverage of `tracked` over model.named_parameters() that require grad (each shared
    parameter once); `untracked` lists those of 2+ dims the task selects but no tracked matrix is."""
    task = task or Task()
    names = {m.name for m in tracked}
    params = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    done = sum(p.numel() for n, p in params if n in names)
    missed = tuple(n for n, p in params if n not in names and p.dim() >= 2 and task.tracks(n))
    return Coverage(done, sum(p.numel() for _, p in params), missed)


# on_factors(name, x_r, x_c, routed): x_r [batch, tokens, rows] float or [batch, tokens] long
# (ids), x_c [batch, tokens, cols] float, routed None; or, for one expert of a fused-experts
# tensor, x_r [n, r] and x_c [n, cols] rows placed by `routed` (experts.Routed). Called once per
# use of a tracked matrix (per expert hit, for an experts tensor) during backward.
OnFactors = Callable[..., None]


def _flat(x: torch.Tensor, dtype: torch.dtype | None = torch.float32) -> torch.Tensor:
    """[batch, ..., n] -> [batch, tokens, n] in `dtype` (None: as it is)."""
    x = x.reshape(x.shape[0], -1, x.shape[-1])
    return x if dtype is None else x.to(dtype)


def _examples(x: torch.Tensor, size: int, tokens: int) -> torch.Tensor:
    """A module's input or output with the batch first: a shared one [1, ...] expanded to the
    batch, the flattened [batch * tokens, n] of an MoE block viewed as [batch, tokens, n]."""
    if x.shape[0] == 1 < size:  # shared across the batch (GPT-2 position ids)
        return x.expand(size, *x.shape[1:])
    if x.shape[0] != size and x.shape[0] == size * tokens:
        return x.reshape(size, tokens, *x.shape[1:])
    return x


def _logits(module: torch.nn.Module, output) -> torch.Tensor | None:
    """The router output that is its matmul with its weight (logits); routers return a tuple
    (transformers: router_logits first; Llama-4: scores first) or the logits alone."""
    candidates = output if isinstance(output, (tuple, list)) else (output,)
    for tensor in candidates:
        if isinstance(tensor, torch.Tensor) and tensor.requires_grad and _uses_directly(tensor, module.weight):
            return tensor
    return None


def _uses_directly(tensor: torch.Tensor, weight: torch.Tensor, depth: int = 4) -> bool:
    """True when the op that made `tensor` (past view and dtype nodes) is a matmul one of whose
    operands is `weight` (past transpose, view and dtype nodes)."""
    passing = ("View", "Reshape", "UnsafeView", "ToCopy", "T", "Transpose", "Permute", "Expand")

    def is_weight(fn, left: int) -> bool:
        if fn is None or left < 0:
            return False
        if type(fn).__name__ == "AccumulateGrad":
            return fn.variable is weight
        return type(fn).__name__.removesuffix("Backward0") in passing and any(
            is_weight(f, left - 1) for f, _ in fn.next_functions)

    fn = tensor.grad_fn
    for _ in range(depth):
        kind = type(fn).__name__.removesuffix("Backward0") if fn is not None else ""
        if kind in ("Mm", "Addmm", "Bmm", "Linear", "Matmul"):
            return any(is_weight(f, depth) for f, _ in fn.next_functions)
        if kind not in passing:
            return False
        fn = fn.next_functions[0][0]
    return False


def per_example_backward(model: torch.nn.Module, tracked: list[TrackedMatrix],
                         batch: dict[str, torch.Tensor], on_factors: OnFactors,
                         factor_dtype: torch.dtype | None = torch.float32, summed: bool = False,
                         relabel: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] | None = None
                         ) -> tuple[torch.Tensor, torch.Tensor]:
    """One forward and one backward of sum_i loss_i (loss_i: mean token loss of example i; with
    `summed`, its summed token loss, each token weighted as the training loss weighs it).
    relabel(logits, labels), when given, returns the labels the loss takes instead of the batch's
    (fit-factors' labels drawn from the model), from this forward's logits (detached).

    Each example's rows of the output-grads belong to its own loss only, so the factors are
    per-example. A module output shared by the batch (batch dim 1, e.g. GPT-2's position
    embedding) is expanded to the batch so each example gets its own rows; one on the flattened
    [batch * tokens, n] states is viewed as [batch, tokens, n]. Fused-experts modules run
    experts.tapped_forward for the duration. The model runs in eval mode (restored after).
    Gradients are taken w.r.t. the embedding outputs (or, when no tracked embedding is used,
    e.g. only LoRA adapters are trainable, w.r.t. the tracked modules' outputs)
    (torch.autograd.grad), so no parameter .grad is filled and weight gradients are never
    computed. Hooks are removed on exit. Factors come in `factor_dtype` (None: the model's).
    Returns loss [batch] (float32) and n_tokens [batch].
    """
    modules = dict(model.named_modules(remove_duplicate=False))
    roots: list[torch.Tensor] = []
    others: list[torch.Tensor] = []  # the roots when no tracked embedding is used (LoRA adapters only)
    size, tokens = batch["input_ids"].shape

    def per_example(x: torch.Tensor) -> torch.Tensor:
        return _flat(_examples(x, size, tokens), factor_dtype)

    def make_hook(name: str, kind: str):
        def hook(module, args, output):
            replaced = None
            if kind == "router":
                output = _logits(module, output)
                if output is None:
                    raise ValueError(f"router {name!r}: none of its outputs is the matmul of its input with its "
                                     "weight; leave it out with the task's modules")
            if not torch.is_grad_enabled() or not output.requires_grad:
                return None
            if output.shape[0] == 1 < size:  # shared across the batch: each example gets its own rows
                output = replaced = output.expand(size, *output.shape[1:])
            x = _examples(args[0].detach(), size, tokens)
            if kind == "embedding":
                roots.append(output)
                ids = x.reshape(x.shape[0], -1)
                output.register_hook(lambda g: on_factors(name, ids, per_example(g)))
            elif kind in ("linear", "router"):
                others.append(output)
                output.register_hook(lambda g: on_factors(name, per_example(g), per_example(x)))
            else:
                others.append(output)
                output.register_hook(lambda g: on_factors(name, per_example(x), per_example(g)))
            return replaced
        return hook

    handles, patched = [], []
    experts: dict[str, dict[str, str]] = {}  # module path -> {attribute: tracked name}
    for m in tracked:
        for path, kind in m.uses:
            if kind == "experts":
                module = modules[path]
                attrs = {id(p): a for a, p in expert_tensors(module)}
                experts.setdefault(path, {})[attrs[id(model.get_parameter(m.name))]] = m.name
            else:
                handles.append(modules[path].register_forward_hook(make_hook(m.name, kind)))

    def emit(name: str, x_r: torch.Tensor, x_c: torch.Tensor, routed: Routed) -> None:
        on_factors(name, x_r, x_c, routed)

    for path, names in experts.items():
        module = modules[path]
        patched.append((module, module.__dict__.get("forward")))  # an instance forward (accelerate hooks) comes back
        module.forward = tapped_forward(module, names, size, tokens, emit, others, factor_dtype)
    was_training = model.training
    model.eval()  # no dropout: a vector depends on the example only
    try:
        with torch.enable_grad():
            logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
            labels = batch["labels"] if relabel is None else relabel(logits.detach(), batch["labels"])
            loss, n_tokens = per_example_loss(logits, labels)
            if not roots and not others:
                raise ValueError("the model used no tracked matrix; cannot take per-example gradients")
            total = (loss * n_tokens).sum() if summed else loss.sum()
            torch.autograd.grad(total, roots or others, allow_unused=True)
    finally:
        for handle in handles:
            handle.remove()
        for module, previous in patched:
            if previous is None:
                del module.forward  # back to the class's forward
            else:
                module.forward = previous
        model.train(was_training)
    return loss.detach(), n_tokens


def dense_gradient(x_r: torch.Tensor, x_c: torch.Tensor, rows: int, routed: Routed | None = None) -> torch.Tensor:
    """Materialised per-example G = X_r^T X_c [batch, rows, cols] (small models / samples only);
    with `routed`, each expert's rows placed at their examples and matrix rows."""
    if routed is not None:
        out = torch.zeros(routed.batch, rows, x_c.shape[-1], dtype=x_c.dtype, device=x_c.device)
        add_routed(out, x_r, x_c, routed)
        return out
    if x_r.dtype == torch.long:  # ids: scatter-add rows of X_c, no one-hot
        batch, tokens, cols = x_c.shape
        index = (x_r + rows * torch.arange(batch, device=x_r.device)[:, None]).reshape(-1)
        out = torch.zeros(batch * rows, cols, dtype=x_c.dtype, device=x_c.device)
        return out.index_add_(0, index, x_c.reshape(-1, cols)).view(batch, rows, cols)
    return x_r.transpose(1, 2) @ x_c


def add_routed(out: torch.Tensor, x_r: torch.Tensor, x_c: torch.Tensor, routed: Routed) -> None:
    """out [batch, rows, cols] += the per-example gradient the routed rows make (in place)."""
    example, width = routed.example, x_r.shape[-1]
    for offset, start, stop in routed.groups:
        part = x_r[start:stop, :, None] * x_c[start:stop, None, :]
        out[:, offset: offset + width].index_add_(0, example[start:stop], part)
