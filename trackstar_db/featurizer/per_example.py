"""Per-example projected, optimizer-corrected loss gradients: the vectors of a gradient table.

For each tracked matrix (tracked.py) and each example, its block of the output vector is
P_r C(G) P_c^T flattened row-major [k_r * k_c], with G = X_r^T X_c the per-example gradient
and C the optimizer correction (second_moment.py):

- none / factored corrections: (X_r P_r'^T)^T (X_c P_c'^T), [batch, tokens, k_r] x
  [batch, tokens, k_c] -> [batch, k_r, k_c], with P' = P D folding the factored correction in;
  G is never formed.
- elementwise correction ("adam-exact", small models): G [batch, rows, cols] is formed per use,
  multiplied by W = 1/(sqrt(V)+eps), then projected.

A fused-experts tensor (experts.py) comes as `Routed` rows grouped by expert: each routed
token's projected rows (P_r[:, its expert's rows] x_r)(P_c x_c)^T are added to its example's
block (P_c x_c one matmul for all experts; chunks of rows bound the memory); the elementwise
correction forms each expert's slice of G.

Blocks are concatenated or summed by the layout (config.py). Vectors are neither whitened nor
unit-normalised: R and unit norm are applied downstream.

Precision: the model runs in its own dtype. With a bfloat16 model the factors stay bfloat16 and
each side X P^T is one bfloat16 matmul (float32 accumulation inside, as on tensor cores);
the sum over tokens, (X_r P_r^T)^T (X_c P_c^T), and the blocks' sums are float32. A float16
model projects in float32: P diag(1/(sqrt(V)+eps)) overflows float16's range (65,504).
Vectors are float32 whatever the model dtype.

`featurize(batch, non_blocking=True)` on CUDA copies inputs (pinned by the caller) and outputs
(into pinned host memory) without waiting; `FeaturizeOutput.wait()` is then the point where the
host may read the output.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from typing import Any

import torch

from .config import FeaturizerConfig, FeaturizerWarning, Layout, check_width, plan_layout
from .experts import Routed
from .projection import Projections
from .second_moment import SecondMoment
from .task import Task
from .tracked import coverage, dense_gradient, find_tracked, per_example_backward

ROUTED_CHUNK = 2**22  # floats of per-row outer products made at once for routed (expert) rows


@dataclass
class FeaturizeOutput:
    """vectors: {"corrected": [batch, dim] (with a second moment), "uncorrected": [batch, dim]
    (without one, or when asked)} float32;
    loss [batch] float32 (mean token loss); n_tokens [batch] (tokens carrying loss). All on CPU."""

    vectors: dict[str, torch.Tensor]
    loss: torch.Tensor
    n_tokens: torch.Tensor
    ready: Any = None  # a CUDA event after a non-blocking copy; None when the tensors are ready

    def wait(self) -> "FeaturizeOutput":
        """Block until the (non-blocking) device-to-host copy is done; returns self."""
        if self.ready is not None:
            self.ready.synchronize()
            self.ready = None
        return self


def projection_dtype(model_dtype: torch.dtype) -> torch.dtype:
    """The dtype of P and of the X P^T matmuls: bfloat16 for a bfloat16 model, else float32."""
    return torch.bfloat16 if model_dtype == torch.bfloat16 else torch.float32


def _project_side(x: torch.Tensor, p: torch.Tensor) -> torch.Tensor:
    """(X P^T)^T per example: x [batch, tokens, n] float or [batch, tokens] ids, p [k, n] ->
    [batch, k, tokens] float32 (computed in p's dtype). It is one P [k, n] x X^T [n, batch*tokens]
    matmul: with k much smaller than batch*tokens this orientation (long side of the output on
    the tokens) runs about twice as fast on CPU as X P^T for the same dot products."""
    if x.dtype == torch.long:
        side = p[:, x]  # [k, batch, tokens]: columns of P picked by id
    else:
        side = (p @ x.reshape(-1, x.shape[-1]).to(p.dtype).t()).view(p.shape[0], *x.shape[:2])
    return side.transpose(0, 1).float()


def _routed_block(x_r: torch.Tensor, x_c: torch.Tensor, p_r: torch.Tensor, p_c: torch.Tensor,
                  routed: Routed) -> torch.Tensor:
    """[routed.batch, k_r * k_c]: sum over each example's rows i of (P_r x_r[i]) (p_c x_c[i])^T,
    P_r the columns of p_r [k_r, rows] of row i's expert (its group's offset); x_r [n, r],
    x_c [n, c], p_c [k_c, c] shared by the experts, so that side is one matmul."""
    width = x_r.shape[-1]
    side_c = (x_c.to(p_c.dtype) @ p_c.t()).float()  # [n, k_c]
    side_r = torch.cat([(x_r[start:stop].to(p_r.dtype) @ p_r[:, offset: offset + width].t()).float()
                        for offset, start, stop in routed.groups])  # [n, k_r]
    k_r, k_c = side_r.shape[1], side_c.shape[1]
    example = routed.example
    if routed.per_example is not None:  # equal rows per example: sort them by example, one bmm
        order = torch.argsort(example, stable=True)
        side_r = side_r[order].view(routed.batch, routed.per_example, k_r)
        side_c = side_c[order].view(routed.batch, routed.per_example, k_c)
        return torch.bmm(side_r.transpose(1, 2), side_c).flatten(1)
    out = torch.zeros(routed.batch, k_r * k_c, device=side_r.device)
    step = max(1, ROUTED_CHUNK // (k_r * k_c))
    for start in range(0, side_r.shape[0], step):
        rows = slice(start, start + step)
        outer = (side_r[rows, :, None] * side_c[rows, None, :]).flatten(1)
        out.index_add_(0, example[rows], outer)
    return out


def _to_host(tensor: torch.Tensor, non_blocking: bool) -> torch.Tensor:
    if not non_blocking or tensor.device.type != "cuda":
        return tensor.cpu()
    host = torch.empty(tensor.shape, dtype=tensor.dtype, pin_memory=True)
    return host.copy_(tensor, non_blocking=True)


class Featurizer:
    """Featurizes batches from trackstar_db.featurizer.tokenize.collate with one model, one config
    and one task (featurizer/task.py: the tracked matrices; the batches' labels carry its loss mask)."""

    def __init__(self, model: torch.nn.Module, config: FeaturizerConfig,
                 second_moment: SecondMoment | None = None, device: str | torch.device = "cpu",
                 uncorrected: bool = False, task: Task | None = None):
        if (config.correction == "none") != (second_moment is None):
            raise ValueError(f"correction {config.correction!r} and second_moment "
                             f"{'given' if second_moment else 'missing'} do not agree")
        self.model = model
        self.config = config
        self.second_moment = second_moment
        self.device = torch.device(device)
        self.task = task or Task()
        self.tracked = find_tracked(model, self.task)
        self.coverage = coverage(model, self.tracked, self.task)
        if self.coverage.warning():
            warnings.warn(self.coverage.warning(), FeaturizerWarning, stacklevel=2)
        check_width(config, self.tracked)
        self.layout: Layout = plan_layout(config, [m.name for m in self.tracked])
        self._blocks = {b.name: b for b in self.layout.blocks}
        self.rows = {m.name: m.rows for m in self.tracked}
        self.cols = {m.name: m.cols for m in self.tracked}
        # Without a second moment the vectors ARE the uncorrected ones; with one, `uncorrected`
        # asks for the plain projection too (the first rungs of the ladder need it).
        if second_moment is None:
            self.variants = ["uncorrected"]
        else:
            self.variants = ["corrected"] + (["uncorrected"] if uncorrected else [])
        self.model_dtype = next(model.parameters()).dtype
        self.dtype = projection_dtype(self.model_dtype)
        self._projections = Projections(config.seed, self.device)
        self._elementwise: dict[str, torch.Tensor] = {}

    def manifest(self) -> dict:
        """What the database manifest records about this featurizer; the task only when it is not
        the default (absent = default, so the settings of older databases still compare equal)."""
        entry = {"config": self.config.to_dict(), "layout": self.layout.to_dict(),
                 "tracked": [m.name for m in self.tracked], "coverage": self.coverage.to_dict(),
                 "correction_source": self.second_moment.describe() if self.second_moment else "none"}
        if self.task != Task():
            entry["task"] = self.task.to_dict()
        return entry

    def _pair(self, name: str, corrected: bool, dtype: torch.dtype | None = None
              ) -> tuple[torch.Tensor, torch.Tensor]:
        block = self._blocks[name]
        scale = (None, None)
        if corrected and self.second_moment is not None and self.second_moment.mode == "factored":
            scale = self.second_moment.weights[name]
        dtype = dtype or self.dtype
        return (self._projections.get(name, "row", block.k_r, self.rows[name], scale[0], dtype),
                self._projections.get(name, "col", block.k_c, self.cols[name], scale[1], dtype))

    def block_vector(self, name: str, x_r: torch.Tensor, x_c: torch.Tensor, corrected: bool,
                     routed: Routed | None = None) -> torch.Tensor:
        """[batch, k_r * k_c] contribution of one use of `name` (with `routed`: of one expert's
        rows, [routed.batch, k_r * k_c])."""
        if corrected and self.second_moment is not None and self.second_moment.mode == "elementwise":
            p_r, p_c = self._pair(name, corrected, torch.float32)
            if name not in self._elementwise:
                self._elementwise[name] = self.second_moment.weights[name][0].to(self.device)
            weight = self._elementwise[name]
            x_r = x_r if x_r.dtype == torch.long else x_r.float()
            if routed is not None:  # per expert: its slice of G and of W, and its columns of P_r
                out, width = 0, x_r.shape[-1]
                for offset, start, stop in routed.groups:
                    span = slice(offset, offset + width)
                    g = dense_gradient(x_r, x_c.float(), width, Routed(routed.at, ((0, start, stop),), routed.batch,
                                                                       routed.tokens))
                    out = out + (p_r[:, span] @ (g * weight[span]) @ p_c.t()).flatten(1)
                return out
            g = dense_gradient(x_r, x_c.float(), self.rows[name]) * weight
            return (p_r @ g @ p_c.t()).flatten(1)
        p_r, p_c = self._pair(name, corrected)
        if routed is not None:
            return _routed_block(x_r, x_c, p_r, p_c, routed)
        return torch.bmm(_project_side(x_r, p_r), _project_side(x_c, p_c).transpose(1, 2)).flatten(1)

    def featurize(self, batch: dict[str, torch.Tensor], non_blocking: bool = False) -> FeaturizeOutput:
        """batch: input_ids, attention_mask, labels, each [batch, tokens]. non_blocking: on CUDA,
        return before the outputs reach the host (call .wait() before reading them)."""
        for key in ("input_ids", "attention_mask", "labels"):
            if key not in batch:
                raise ValueError(f"featurize: batch lacks field {key!r}")
        batch = {k: batch[k][:, : self.config.max_length].to(self.device, non_blocking=non_blocking)
                 for k in ("input_ids", "attention_mask", "labels")}
        size = batch["input_ids"].shape[0]
        out = {v: torch.zeros(size, self.layout.dim, device=self.device) for v in self.variants}

        def on_factors(name: str, x_r: torch.Tensor, x_c: torch.Tensor, routed: Routed | None = None) -> None:
            block = self._blocks[name]
            for variant in self.variants:
                span = out[variant][:, block.offset: block.offset + block.size]
                span += self.block_vector(name, x_r, x_c, corrected=variant == "corrected", routed=routed)

        loss, n_tokens = per_example_backward(self.model, self.tracked, batch, on_factors,
                                              factor_dtype=None if self.dtype == torch.bfloat16 else torch.float32)
        non_blocking = non_blocking and self.device.type == "cuda"
        result = FeaturizeOutput({k: _to_host(v, non_blocking) for k, v in out.items()},
                                 _to_host(loss.float(), non_blocking), _to_host(n_tokens, non_blocking))
        if non_blocking:
            result.ready = torch.cuda.Event()
            result.ready.record()
        return result
