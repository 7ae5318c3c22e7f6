"""Per-example projected, optimizer-corrected loss gradients: the vectors of a gradient table.

For each tracked matrix (tracked.py) and each example, its block of the output vector is
P_r C(G) P_c^T flattened row-major [k_r * k_c], with G = X_r^T X_c the per-example gradient
and C the optimizer correction (second_moment.py):

- none / factored corrections: (X_r P_r'^T)^T (X_c P_c'^T), [batch, tokens, k_r] x
  [batch, tokens, k_c] -> [batch, k_r, k_c], with P' = P D folding the factored correction in;
  G is never formed.
- elementwise correction ("adam-exact", small models): G [batch, rows, cols] is formed per use,
  multiplied by W = 1/(sqrt(V)+eps), then projected.

Blocks are concatenated or summed by the layout (config.py). Vectors are neither whitened nor
unit-normalised: R and unit norm are applied downstream.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .config import FeaturizerConfig, Layout, plan_layout
from .projection import Projections
from .second_moment import SecondMoment
from .tracked import dense_gradient, find_tracked, per_example_backward


@dataclass
class FeaturizeOutput:
    """vectors: {"corrected": [batch, dim] (with a second moment), "uncorrected": [batch, dim]
    (without one, or when asked)} float32;
    loss [batch] float32 (mean token loss); n_tokens [batch] (tokens carrying loss). All on CPU."""

    vectors: dict[str, torch.Tensor]
    loss: torch.Tensor
    n_tokens: torch.Tensor


def _project_side(x: torch.Tensor, p: torch.Tensor) -> torch.Tensor:
    """X P^T: x [batch, tokens, n] float or [batch, tokens] ids, p [k, n] -> [batch, tokens, k]."""
    return p.t()[x] if x.dtype == torch.long else x @ p.t()


class Featurizer:
    """Featurizes batches from trackstar_db.featurizer.tokenize.collate with one model and one config."""

    def __init__(self, model: torch.nn.Module, config: FeaturizerConfig,
                 second_moment: SecondMoment | None = None, device: str | torch.device = "cpu",
                 uncorrected: bool = False):
        if (config.correction == "none") != (second_moment is None):
            raise ValueError(f"correction {config.correction!r} and second_moment "
                             f"{'given' if second_moment else 'missing'} do not agree")
        self.model = model
        self.config = config
        self.second_moment = second_moment
        self.device = torch.device(device)
        self.tracked = find_tracked(model)
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
        self._projections = Projections(config.seed, self.device)
        self._elementwise: dict[str, torch.Tensor] = {}

    def manifest(self) -> dict:
        """What the database manifest records about this featurizer."""
        return {"config": self.config.to_dict(), "layout": self.layout.to_dict(),
                "tracked": [m.name for m in self.tracked],
                "correction_source": self.second_moment.describe() if self.second_moment else "none"}

    def _pair(self, name: str, corrected: bool) -> tuple[torch.Tensor, torch.Tensor]:
        block = self._blocks[name]
        scale = (None, None)
        if corrected and self.second_moment is not None and self.second_moment.mode == "factored":
            scale = self.second_moment.weights[name]
        return (self._projections.get(name, "row", block.k_r, self.rows[name], scale[0]),
                self._projections.get(name, "col", block.k_c, self.cols[name], scale[1]))

    def _block(self, name: str, x_r: torch.Tensor, x_c: torch.Tensor, corrected: bool) -> torch.Tensor:
        """[batch, k_r * k_c] contribution of one use of `name`."""
        p_r, p_c = self._pair(name, corrected)
        if corrected and self.second_moment is not None and self.second_moment.mode == "elementwise":
            if name not in self._elementwise:
                self._elementwise[name] = self.second_moment.weights[name][0].to(self.device)
            g = dense_gradient(x_r, x_c, self.rows[name]) * self._elementwise[name]
            return (p_r @ g @ p_c.t()).flatten(1)
        return torch.bmm(_project_side(x_r, p_r).transpose(1, 2), _project_side(x_c, p_c)).flatten(1)

    def featurize(self, batch: dict[str, torch.Tensor]) -> FeaturizeOutput:
        """batch: input_ids, attention_mask, labels, each [batch, tokens]."""
        for key in ("input_ids", "attention_mask", "labels"):
            if key not in batch:
                raise ValueError(f"featurize: batch lacks field {key!r}")
        batch = {k: batch[k][:, : self.config.max_length].to(self.device)
                 for k in ("input_ids", "attention_mask", "labels")}
        size = batch["input_ids"].shape[0]
        out = {v: torch.zeros(size, self.layout.dim, device=self.device) for v in self.variants}

        def on_factors(name: str, x_r: torch.Tensor, x_c: torch.Tensor) -> None:
            block = self._blocks[name]
            for variant in self.variants:
                span = out[variant][:, block.offset: block.offset + block.size]
                span += self._block(name, x_r, x_c, corrected=variant == "corrected")

        loss, n_tokens = per_example_backward(self.model, self.tracked, batch, on_factors)
        return FeaturizeOutput({k: v.cpu() for k, v in out.items()}, loss.float().cpu(), n_tokens.cpu())
