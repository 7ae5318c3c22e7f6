"""Per-example gradient factors of mixture-of-experts layers: fused expert tensors and routers.

transformers stores the experts of an MoE layer as fused tensors in one module (classes decorated
with `use_experts_implementation`: Mixtral, Qwen2/3-MoE, OLMoE, gpt-oss, DeepSeek-V2/V3, ...):
    gate_up_proj [E, 2I, H] (or up_proj [E, I, H] without a gate), down_proj [E, H, I],
    and in gpt-oss biases gate_up_proj_bias [E, 2I], down_proj_bias [E, H];
with `is_transposed` the weights are [E, in, out] (gpt-oss: gate_up_proj [E, H, 2I]).

Each such tensor is ONE tracked matrix, its storage read as 2-D: a weight [E, R, C] is the matrix
[E * R, C] (expert e owns rows e*R .. e*R + R - 1), a bias [E, n] the matrix [E, n]. Its
per-example gradient is the sum over the example's tokens routed to expert e of the outer
product the expert's matmul gives (the routing weight is inside the output-grad, through
autograd). So the two-sided projection P_r G P_c^T of the whole tensor is, per routed token,

    (P_r[:, e*R : e*R + R] x_r) (P_c x_c)^T

with one row projection over the E*R rows (each expert its own columns of P_r, i.e. independent
Gaussian projections per expert) and one column projection shared by the experts: the same
Kronecker projection every other matrix gets, applied to the tensor's 2-D view. The optimizer's
second moment of the tensor (its Adam exp_avg_sq [E, R, C]) is read through the same view.

`tapped_forward` replaces the experts module's forward while one per-example backward runs: it
computes what the eager implementation computes (each expert's matmuls on its routed tokens) with
the (token, expert) pairs sorted by expert, so each matrix's outputs are one hooked tensor. The
factors come as `Routed` rows: the tokens routed to each expert, each with its flat position
b * tokens + t in the batch.

Llama-4's experts (Llama4TextExperts: no use_experts_implementation; weights [E, in, out]; its
forward takes every token once per expert, [E x N, H], scaled beforehand by the router's score,
zero where the token is not routed, and runs one bmm per matrix) get `dense_tapped_forward`: the
same bmm, hooked, and per expert the rows whose input is not zero (the others add nothing to the
gradient) handed over as `Routed` rows.

Per hooked tensor one call hands over every expert's rows, grouped by expert (Routed.groups), so
the column side is projected once for all of them (P_c is shared) and only the row side once
per expert.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch

WEIGHTS = ("gate_up_proj", "up_proj", "down_proj")


@dataclass(frozen=True)
class Routed:
    """Where a factor pair's rows belong. Row i is at flat position at[i] = b * tokens + t of a
    [batch, tokens] batch; the rows come in groups (offset, start, stop): rows start .. stop - 1
    belong to one expert and their x_r columns stand for rows offset .. offset + x_r width - 1 of
    the tracked matrix (expert e of a weight [E, R, C]: offset e * R; of a bias [E, n]: e)."""

    at: torch.Tensor
    groups: tuple[tuple[int, int, int], ...]
    batch: int
    tokens: int
    per_example: int | None = None  # every example has exactly this many rows (every token routed top_k times)

    @property
    def example(self) -> torch.Tensor:
        """[n] the example of each row."""
        return torch.div(self.at, self.tokens, rounding_mode="floor")

    def per_position(self) -> "Routed":
        """The same rows with every position its own 'example' (per-token parts of one example)."""
        rows = None if self.per_example is None else self.per_example // self.tokens
        return Routed(self.at, self.groups, self.batch * self.tokens, 1, rows)


def is_experts(module: torch.nn.Module) -> bool:
    """A transformers fused-experts module (use_experts_implementation sets has_gate,
    is_transposed) or Llama-4's dense one."""
    down = getattr(module, "down_proj", None)
    if not (isinstance(down, torch.nn.Parameter) and down.dim() == 3):
        return False
    return (hasattr(module, "has_gate") and hasattr(module, "is_transposed")) or is_dense_experts(module)


def is_dense_experts(module: torch.nn.Module) -> bool:
    """Llama-4's experts: every token through every expert, inputs pre-scaled by the router."""
    return type(module).__name__ == "Llama4TextExperts"


def expert_tensors(module: torch.nn.Module) -> list[tuple[str, torch.nn.Parameter]]:
    """(attribute, parameter) of the module's expert weights [E, R, C] and biases [E, n]."""
    found = []
    for attr in WEIGHTS:
        for name, dims in ((attr, 3), (attr + "_bias", 2)):
            param = getattr(module, name, None)
            if isinstance(param, torch.nn.Parameter) and param.dim() == dims:
                found.append((name, param))
    return found


def matrix_shape(param: torch.Tensor) -> tuple[int, int]:
    """The 2-D view of an expert tensor: [E, R, C] -> (E * R, C); a bias [E, n] -> (E, n)."""
    return (param.shape[0] * param.shape[1], param.shape[2]) if param.dim() == 3 else tuple(param.shape)


# emit(name, x_r [n, r], x_c [n, c], routed): the factors of a tracked tensor, grouped by expert
Emit = Callable[[str, torch.Tensor, torch.Tensor, Routed], None]


def _cast(x: torch.Tensor, dtype: torch.dtype | None) -> torch.Tensor:
    return x if dtype is None else x.to(dtype)


def _tap(module: torch.nn.Module, attr: str, names: dict[str, str], x: torch.Tensor, out: torch.Tensor,
         at: torch.Tensor, segments: list[tuple[int, int, int]], transposed: bool, size: int, tokens: int,
         emit: Emit, outputs: list[torch.Tensor], dtype: torch.dtype | None, per_example: int | None) -> None:
    """Hook `out` = the rows of x through expert tensor `attr` (rows grouped by expert:
    segments (e, start, stop)); its backward emits the weight's (and bias's) factors."""
    weight, bias = names.get(attr), names.get(attr + "_bias")
    if (weight is None and bias is None) or not out.requires_grad:
        return
    x = x.detach()
    rows = getattr(module, attr).shape[1]

    def hook(g: torch.Tensor) -> None:
        if weight is not None:  # [R, C] = out-grads x inputs, or inputs x out-grads when transposed
            x_r, x_c = (x, g) if transposed else (g, x)
            groups = tuple((e * rows, start, stop) for e, start, stop in segments)
            emit(weight, _cast(x_r, dtype), _cast(x_c, dtype), Routed(at, groups, size, tokens, per_example))
        if bias is not None:  # row e of the bias matrix [E, n]: the out-grads, summed
            groups = tuple((e, start, stop) for e, start, stop in segments)
            emit(bias, _cast(torch.ones_like(g[:, :1]), dtype), _cast(g, dtype),
                 Routed(at, groups, size, tokens, per_example))

    outputs.append(out)
    out.register_hook(hook)


def tapped_forward(module: torch.nn.Module, names: dict[str, str], size: int, tokens: int, emit: Emit,
                   outputs: list[torch.Tensor], dtype: torch.dtype | None = torch.float32) -> Callable:
    """A forward for the fused-experts `module` that computes what the eager loop computes, with
    the (token, expert) pairs sorted by expert so each matrix is one hooked tensor, and hands the
    factors of the tracked tensors `names` (attribute -> tracked name) to `emit`; `outputs`
    collects the hooked tensors (the roots of the backward when no embedding is tracked)."""
    if is_dense_experts(module):
        return dense_tapped_forward(module, names, size, tokens, emit, outputs, dtype)
    transposed = bool(module.is_transposed)
    up_attr = "gate_up_proj" if module.has_gate else "up_proj"
    experts = getattr(module, up_attr).shape[0]

    def linear(x: torch.Tensor, attr: str, segments: list[tuple[int, int, int]]) -> torch.Tensor:
        weight, bias = getattr(module, attr), getattr(module, attr + "_bias", None)
        parts = []  # split, not sliced: a slice's backward writes a zero tensor of x's size per expert
        for (e, _, _), rows in zip(segments, x.split([stop - start for _, start, stop in segments])):
            part = rows @ weight[e] if transposed else torch.nn.functional.linear(rows, weight[e])
            parts.append(part if bias is None else part + bias[e])
        return torch.cat(parts) if len(parts) > 1 else parts[0]

    def forward(hidden_states: torch.Tensor, top_k_index: torch.Tensor | None = None,
                top_k_weights: torch.Tensor | None = None, **kwargs) -> torch.Tensor:
        top_k_index = kwargs.pop("router_indices", top_k_index)
        top_k_weights = kwargs.pop("routing_weights", top_k_weights)
        if hidden_states.shape[0] != size * tokens:
            raise ValueError(f"experts module got {hidden_states.shape[0]} token rows, expected batch x tokens = "
                             f"{size} x {tokens}")
        final = torch.zeros_like(hidden_states)
        with torch.no_grad():
            flat = top_k_index.reshape(-1)
            order = torch.argsort(flat, stable=True)
            order = order[(flat[order] >= 0) & (flat[order] < experts)]  # expert-parallel sentinels out
            counts = torch.bincount(flat[order], minlength=experts).tolist()
        if not order.numel():
            return final
        token_idx, slot = order // top_k_index.shape[-1], order % top_k_index.shape[-1]
        segments, start = [], 0
        for e, count in enumerate(counts):
            if count:
                segments.append((e, start, start + count))
                start += count
        complete = order.numel() == flat.numel()  # no sentinel dropped: each token has top_k rows
        tap = dict(names=names, at=token_idx, segments=segments, transposed=transposed, size=size, tokens=tokens,
                   emit=emit, outputs=outputs, dtype=dtype,
                   per_example=tokens * top_k_index.shape[-1] if complete else None)
        x = hidden_states[token_idx]
        up = linear(x, up_attr, segments)
        _tap(module, up_attr, x=x, out=up, **tap)
        h = module._apply_gate(up) if module.has_gate else module.act_fn(up)
        down = linear(h, "down_proj", segments)
        _tap(module, "down_proj", x=h, out=down, **tap)
        if getattr(module, "has_post_expert_norm", False):
            down = module.post_expert_norm(down)
        down = down * top_k_weights[token_idx, slot, None]
        return final.index_add_(0, token_idx, down.to(final.dtype))

    return forward


def dense_tapped_forward(module: torch.nn.Module, names: dict[str, str], size: int, tokens: int, emit: Emit,
                         outputs: list[torch.Tensor], dtype: torch.dtype | None = torch.float32) -> Callable:
    """Llama4TextExperts.forward, hooked: hidden_states [E x N, H] (N = batch x tokens, each
    token once per expert, zero where not routed) -> [E x N, H]; weights [E, in, out]."""
    experts = module.gate_up_proj.shape[0]

    def tap(attr: str, x: torch.Tensor, out: torch.Tensor) -> None:
        name = names.get(attr)
        if name is None or not out.requires_grad:
            return
        x = x.detach()
        rows = getattr(module, attr).shape[1]

        def hook(g: torch.Tensor) -> None:  # x [E, N, in], g [E, N, out]
            picked, groups, start = [], [], 0
            for e in range(experts):
                at = x[e].abs().sum(-1).nonzero().flatten()  # the tokens routed to e
                if at.numel():
                    picked.append((e, at))
                    groups.append((e * rows, start, start + at.numel()))
                    start += at.numel()
            if picked:
                x_r = torch.cat([x[e, at] for e, at in picked])
                x_c = torch.cat([g[e, at] for e, at in picked])
                at = torch.cat([at for _, at in picked])
                emit(name, _cast(x_r, dtype), _cast(x_c, dtype), Routed(at, tuple(groups), size, tokens))

        outputs.append(out)
        out.register_hook(hook)

    def forward(hidden_states: torch.Tensor) -> torch.Tensor:
        x = hidden_states.view(experts, -1, hidden_states.shape[-1])
        if x.shape[1] != size * tokens:
            raise ValueError(f"experts module got {x.shape[1]} token rows per expert, expected batch x tokens = "
                             f"{size} x {tokens}")
        gate_up = torch.bmm(x, module.gate_up_proj)
        tap("gate_up_proj", x, gate_up)
        gate, up = gate_up.chunk(2, dim=-1)
        h = up * module.act_fn(gate)
        out = torch.bmm(h, module.down_proj)
        tap("down_proj", h, out)
        return out.view(-1, hidden_states.shape[-1])

    return forward
