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
computes what the eager implementation computes (a loop over the experts hit, each on its routed
tokens) and hooks each expert's matmul outputs. The factors of expert e come as `Routed` rows:
only the tokens routed to e, each with its flat position b * tokens + t in the batch.

Llama-4's experts (Llama4TextExperts: no use_experts_implementation; weights [E, in, out]; its
forward takes every token once per expert, [E x N, H], scaled beforehand by the router's score,
zero where the token is not routed, and runs one bmm per matrix) get `dense_tapped_forward`: the
same bmm, hooked, and per expert the rows whose input is not zero (the others add nothing to the
gradient) handed over as `Routed` rows.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch

WEIGHTS = ("gate_up_proj", "up_proj", "down_proj")


@dataclass(frozen=True)
class Routed:
    """Where a factor pair's rows belong: row i is at flat position at[i] = b * tokens + t of a
    [batch, tokens] batch, and its x_r columns stand for rows offset .. offset + x_r width - 1
    of the tracked matrix (expert e of a weight [E, R, C]: offset e * R)."""

    at: torch.Tensor
    offset: int
    batch: int
    tokens: int

    @property
    def example(self) -> torch.Tensor:
        """[n] the example of each row."""
        return torch.div(self.at, self.tokens, rounding_mode="floor")

    def per_position(self) -> "Routed":
        """The same rows with every position its own 'example' (per-token parts of one example)."""
        return Routed(self.at, self.offset, self.batch * self.tokens, 1)


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


# emit(name, x_r [n, r], x_c [n, c], routed): the factors of one expert of a tracked tensor
Emit = Callable[[str, torch.Tensor, torch.Tensor, Routed], None]


def tapped_forward(module: torch.nn.Module, names: dict[str, str], size: int, tokens: int, emit: Emit,
                   outputs: list[torch.Tensor], dtype: torch.dtype | None = torch.float32) -> Callable:
    """A forward for the fused-experts `module` that computes what the eager loop computes and
    hooks the factors of the tracked tensors `names` (attribute -> tracked name); `outputs`
    collects the hooked tensors (the roots of the backward when no embedding is tracked)."""
    if is_dense_experts(module):
        return dense_tapped_forward(module, names, size, tokens, emit, outputs, dtype)
    transposed = bool(module.is_transposed)
    up_attr = "gate_up_proj" if module.has_gate else "up_proj"
    experts = getattr(module, up_attr).shape[0]

    def cast(x: torch.Tensor) -> torch.Tensor:
        return x if dtype is None else x.to(dtype)

    def linear(x: torch.Tensor, attr: str, e: int) -> torch.Tensor:
        weight = getattr(module, attr)[e]
        out = x @ weight if transposed else torch.nn.functional.linear(x, weight)
        bias = getattr(module, attr + "_bias", None)
        return out if bias is None else out + bias[e]

    def tap(attr: str, e: int, x: torch.Tensor, out: torch.Tensor, at: torch.Tensor) -> None:
        weight, bias = names.get(attr), names.get(attr + "_bias")
        if (weight is None and bias is None) or not out.requires_grad:
            return
        x = x.detach()
        rows = getattr(module, attr).shape[1]

        def hook(g: torch.Tensor) -> None:
            if weight is not None:  # [R, C] = out-grads x inputs, or inputs x out-grads when transposed
                x_r, x_c = (x, g) if transposed else (g, x)
                emit(weight, cast(x_r), cast(x_c), Routed(at, e * rows, size, tokens))
            if bias is not None:  # row e of the bias matrix [E, n]: the out-grads, summed
                emit(bias, cast(torch.ones_like(g[:, :1])), cast(g), Routed(at, e, size, tokens))

        outputs.append(out)
        out.register_hook(hook)

    def forward(hidden_states: torch.Tensor, top_k_index: torch.Tensor | None = None,
                top_k_weights: torch.Tensor | None = None, **kwargs) -> torch.Tensor:
        top_k_index = kwargs.pop("router_indices", top_k_index)
        top_k_weights = kwargs.pop("routing_weights", top_k_weights)
        if hidden_states.shape[0] != size * tokens:
            raise ValueError(f"experts module got {hidden_states.shape[0]} token rows, expected batch x tokens = "
                             f"{size} x {tokens}")
        final = torch.zeros_like(hidden_states)
        with torch.no_grad():
            hit = torch.unique(top_k_index)
        for e in hit.tolist():
            if not 0 <= e < experts:  # expert-parallel sentinels
                continue
            token_idx, slot = torch.where(top_k_index == e)
            x = hidden_states[token_idx]
            up = linear(x, up_attr, e)
            tap(up_attr, e, x, up, token_idx)
            h = module._apply_gate(up) if module.has_gate else module.act_fn(up)
            down = linear(h, "down_proj", e)
            tap("down_proj", e, h, down, token_idx)
            if getattr(module, "has_post_expert_norm", False):
                down = module.post_expert_norm(down)
            down = down * top_k_weights[token_idx, slot, None]
            final.index_add_(0, token_idx, down.to(final.dtype))
        return final

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
            for e in range(experts):
                at = x[e].abs().sum(-1).nonzero().flatten()  # the tokens routed to e
                if at.numel():
                    x_r, x_c = x[e, at], g[e, at]
                    emit(name, x_r if dtype is None else x_r.to(dtype), x_c if dtype is None else x_c.to(dtype),
                         Routed(at, e * rows, size, tokens))

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
