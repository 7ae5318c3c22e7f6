"""The optimizer correction g / (sqrt(V) + eps), elementwise, per tracked matrix.

V comes from one of (config.correction):
- "adam-exact":    Adam/AdamW bias-corrected exp_avg_sq, used elementwise (W = 1/(sqrt(V)+eps),
                   [rows, cols]); the featurizer then materialises each per-example gradient.
- "adam-factored": the same V, factorised Adafactor-style, see below.
- "adafactor":     exp_avg_sq_row [rows] / exp_avg_sq_col [cols] (row and column MEANS of V,
                   as torch and transformers Adafactor keep them), factored.
- "estimated":     V = mean over a sample of training examples of the squared per-example
                   gradient (of each whole tracked parameter, tied uses summed), factored; rows
                   and columns the sample never touched take the smallest touched value.

Factored form: row sums r [rows], column sums c [cols], V ~ r c^T / sum(r). Its square root is
a b^T with a = sqrt(r) / S^(1/4), b = sqrt(c) / S^(1/4) (S = sum(r)); eps enters each factor:
d_r = 1 / (a + sqrt(eps)), d_c = 1 / (b + sqrt(eps)), so the correction is D_r G D_c (exactly
1/sqrt(V~) as eps -> 0) and folds into the projections: (P_r D_r) G (P_c D_c)^T.
Elementwise form: eps is added after the square root, as in Adam's update.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Iterable

import torch

from .config import FeaturizerConfig
from .optimizer_state import OptimizerState
from .tracked import TrackedMatrix, add_routed, dense_gradient, find_tracked, per_example_backward


@dataclass
class SecondMoment:
    """Per tracked name: mode "elementwise" -> (W [rows, cols],); "factored" -> (d_r [rows], d_c [cols])."""

    mode: str
    weights: dict[str, tuple[torch.Tensor, ...]]
    source: str

    def describe(self) -> str:
        return self.source


def elementwise(v: torch.Tensor, eps: float) -> tuple[torch.Tensor]:
    return (1.0 / (v.double().clamp(min=0).sqrt() + eps)).float(),


def factored(row_sums: torch.Tensor, col_sums: torch.Tensor, eps: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(d_r, d_c) of V ~ r c^T / sum(r), eps inside each factor (see the module docstring)."""
    r, c = row_sums.double().clamp(min=0), col_sums.double().clamp(min=0)
    quarter = r.sum().clamp(min=torch.finfo(torch.float64).tiny) ** 0.25
    root_eps = eps ** 0.5
    return (1.0 / (r.sqrt() / quarter + root_eps)).float(), (1.0 / (c.sqrt() / quarter + root_eps)).float()


def _check(name: str, tensor: torch.Tensor | None, shape: tuple, what: str) -> torch.Tensor:
    if tensor is None:
        raise ValueError(f"optimizer state: no {what} for tracked parameter {name!r}")
    if tuple(tensor.shape) != tuple(shape):
        raise ValueError(f"optimizer state: {what} of {name!r} has shape {tuple(tensor.shape)}, expected {tuple(shape)}")
    return tensor


def _as_matrix(tensor: torch.Tensor | None, shape: tuple) -> torch.Tensor | None:
    """A fused-experts tensor's state [E, R, C] (Adafactor rows [E, R]) read in the tracked
    matrix's 2-D view [E * R, C] ([E * R]); other shapes as they are (checked by _check)."""
    if tensor is None or tuple(tensor.shape) == tuple(shape) or tensor.numel() != math.prod(shape):
        return tensor
    return tensor.reshape(shape) if tensor.dim() == len(shape) + 1 else tensor


def from_optimizer_state(config: FeaturizerConfig, tracked: list[TrackedMatrix],
                         state: OptimizerState) -> SecondMoment:
    """The correction from an optimizer state; a fused-experts tensor [E, R, C] is read as its
    tracked matrix [E * R, C]: Adam's V reshaped, Adafactor's per-expert column means [E, C]
    summed into the column sums of the whole matrix."""
    weights = {}
    for m in tracked:
        if config.correction == "adafactor":
            row = _check(m.name, _as_matrix(state.moment("exp_avg_sq_row", m.name), (m.rows,)), (m.rows,),
                         "exp_avg_sq_row")
            col = state.moment("exp_avg_sq_col", m.name)
            if col is not None and col.dim() == 2 and col.shape[1] == m.cols and m.rows % col.shape[0] == 0:
                col = col.sum(0) * (m.rows // col.shape[0]) / m.rows  # per-expert means -> whole-matrix means
            col = _check(m.name, col, (m.cols,), "exp_avg_sq_col")
            weights[m.name] = factored(row, col * m.rows, config.eps)  # means -> V~ = row col^T / mean(row)
            continue
        v = _check(m.name, _as_matrix(state.second_moment(m.name), (m.rows, m.cols)), (m.rows, m.cols), "exp_avg_sq")
        weights[m.name] = (elementwise(v, config.eps) if config.correction == "adam-exact"
                           else factored(v.double().sum(1), v.double().sum(0), config.eps))
    mode = "elementwise" if config.correction == "adam-exact" else "factored"
    what = {"adam-exact": "Adam exp_avg_sq (bias-corrected), elementwise",
            "adam-factored": "Adam exp_avg_sq (bias-corrected), row/column factorised",
            "adafactor": "Adafactor exp_avg_sq_row/exp_avg_sq_col, factored"}[config.correction]
    return SecondMoment(mode, weights, f"{what}; optimizer={state.optimizer} step={state.step}; eps={config.eps}")


def estimate(config: FeaturizerConfig, model: torch.nn.Module, tracked: list[TrackedMatrix],
             batches: Iterable[dict[str, torch.Tensor]], device: str | torch.device = "cpu") -> SecondMoment:
    """V = mean_i G_i^2 over the examples of `batches`, used factored. Materialises every
    per-example gradient of a batch: keep sample batches small."""
    shapes = {m.name: (m.rows, m.cols) for m in tracked}
    total = {n: torch.zeros(s, dtype=torch.float64, device=device) for n, s in shapes.items()}
    count = 0
    for batch in batches:
        batch = {k: v[:, : config.max_length].to(device) for k, v in batch.items()}
        grads: dict[str, torch.Tensor] = {}

        def on_factors(name, x_r, x_c, routed=None):
            if routed is None:
                g = dense_gradient(x_r, x_c, shapes[name][0])
                grads[name] = grads[name] + g if name in grads else g
                return
            if name not in grads:  # the experts' rows, added in place
                grads[name] = torch.zeros(routed.batch, *shapes[name], dtype=x_c.dtype, device=x_c.device)
            add_routed(grads[name], x_r, x_c, routed)

        per_example_backward(model, tracked, batch, on_factors)
        for name, g in grads.items():
            total[name] += g.double().square().sum(0)
        count += batch["input_ids"].shape[0]
    if count == 0:
        raise ValueError("estimated second moment: the sample has no examples")
    weights = {n: factored(seen_floor((t / count).sum(1)), seen_floor((t / count).sum(0)), config.eps)
               for n, t in total.items()}
    return SecondMoment("factored", weights,
                        f"estimated: mean squared per-example gradient over {count} training examples, "
                        f"row/column factorised, unseen rows floored at the smallest seen; eps={config.eps}")


def seen_floor(sums: torch.Tensor) -> torch.Tensor:
    """Row (or column) sums of an estimated V with the zeros the sample never touched (tokens or
    positions absent from it) raised to the smallest sum it did touch. Without the floor such a
    row would be scaled by 1/sqrt(eps) (1e4 at eps=1e-8) the first time a query used it."""
    seen = sums[sums > 0]
    return sums if seen.numel() in (0, sums.numel()) else sums.clamp(min=float(seen.min()))


def build_second_moment(config: FeaturizerConfig, model: torch.nn.Module,
                        optimizer_state: OptimizerState | None = None,
                        sample_batches: Iterable[dict[str, torch.Tensor]] | None = None,
                        device: str | torch.device = "cpu") -> SecondMoment | None:
    """The SecondMoment config.correction asks for (None for "none")."""
    if config.correction == "none":
        return None
    if config.correction not in ("estimated", "adam-exact", "adam-factored", "adafactor"):
        raise ValueError(f"correction {config.correction!r} must be resolved first (featurizer.settings.resolve)")
    tracked = find_tracked(model)
    if config.correction == "estimated":
        if sample_batches is None:
            raise ValueError("correction 'estimated' needs sample_batches of training examples")
        return estimate(config, model, tracked, sample_batches, device)
    if optimizer_state is None:
        raise ValueError(f"correction {config.correction!r} needs an optimizer state (optimizer.safetensors)")
    return from_optimizer_state(config, tracked, optimizer_state)
