"""Per-token parts of one example's projected gradient, which sum exactly to its vector.

For a tracked matrix the per-example gradient is a sum over token positions with no cross
terms (tracked.py: G = X_r^T X_c = sum_t x_r[t] x_c[t]^T, x_r[t] / x_c[t] the output-grad and
input rows at position t, in whichever order the module kind stores them). The projected block
is linear in G, so

    P_r G P_c^T = sum_t (P_r x_r[t]) (P_c x_c[t])^T        (and likewise with the correction)

and each position's term is one outer product of its OWN projected rows. (Splitting the two
sides separately, (sum_t P_r x_r[t]) (sum_s P_c x_c[s])^T, would leave the cross terms t != s;
splitting per position keeps both factors of a term on the same token, so nothing is left
over.) The term of position t is computed by the featurizer's own block code with the tokens
moved into the batch dimension ([1, T, n] -> [T, 1, n]), so the factored, elementwise and no
correction all split the same way as the stored vectors are made. An MoE expert's factors come
as the rows of the tokens routed to it (experts.Routed); each row is already one position's term.

What a position's part means: the gradient flowing through the model's activations AT that
position, i.e. while it reads token t. Its output-grad carries the loss of predicting token
t + 1 and, through attention, of later tokens; so a part is credited to the token being read,
not to the token being predicted. This is the one-backward split; a split by loss term (one
backward per predicted token) would be another exact decomposition.

A score is linear in the training vector (retrieval/scoring.py: score = g_z . q / n_z), so
`token_scores(parts, q, n_z)` sums to the example's score.
"""

from __future__ import annotations

import torch

from .per_example import Featurizer
from .tracked import per_example_backward


def per_token_vectors(featurizer: Featurizer, batch: dict[str, torch.Tensor],
                      variants: list[str] | None = None) -> dict[str, torch.Tensor]:
    """Per-position parts of ONE example's vectors: {variant: [T, dim]} float32 on the CPU, for
    `variants` (default: every variant of the featurizer).

    batch: a collate()d batch of one example (input_ids, attention_mask, labels [1, T]);
    row t of a part belongs to position t (padding, if any, gets zero rows). Summing over rows
    gives featurizer.featurize(batch).vectors[variant][0] up to float rounding.
    """
    if batch["input_ids"].shape[0] != 1:
        raise ValueError(f"per_token_vectors takes one example, got a batch of {batch['input_ids'].shape[0]}")
    length = featurizer.config.max_length
    batch = {k: batch[k][:, :length].to(featurizer.device) for k in ("input_ids", "attention_mask", "labels")}
    tokens = batch["input_ids"].shape[1]
    variants = list(featurizer.variants if variants is None else variants)
    unknown = sorted(set(variants) - set(featurizer.variants))
    if unknown:
        raise ValueError(f"per_token_vectors: the featurizer makes {featurizer.variants}, not {unknown}")
    out = {v: torch.zeros(tokens, featurizer.layout.dim, device=featurizer.device) for v in variants}

    def on_factors(name: str, x_r: torch.Tensor, x_c: torch.Tensor, routed=None) -> None:
        block = featurizer.layout.block(name)
        if routed is not None:  # an expert's routed rows: each position its own "example"
            for variant in variants:
                part = featurizer.block_vector(name, x_r, x_c, corrected=variant == "corrected",
                                               routed=routed.per_position())
                out[variant][:, block.offset: block.offset + block.size] += part
            return
        # [1, T, n] -> [T, 1, n] (ids [1, T] -> [T, 1]): one "example" per position
        x_r = x_r.reshape(tokens, 1, -1) if x_r.dtype != torch.long else x_r.reshape(tokens, 1)
        x_c = x_c.reshape(tokens, 1, -1)
        for variant in variants:
            part = featurizer.block_vector(name, x_r, x_c, corrected=variant == "corrected")
            out[variant][:, block.offset: block.offset + block.size] += part

    per_example_backward(featurizer.model, featurizer.tracked, batch, on_factors,
                         factor_dtype=None if getattr(featurizer, "dtype", None) == torch.bfloat16 else torch.float32)
    return {k: v.cpu() for k, v in out.items()}


def token_scores(parts: torch.Tensor, query: torch.Tensor, norm: float | torch.Tensor = 1.0) -> torch.Tensor:
    """[T] contribution of each position to score = (sum_t parts[t]) . query / norm.

    parts [T, d] (per_token_vectors), query [d] the query side of the scoring rung, norm the
    example's n_z (1 without unit norm). Computed in float64 so the parts sum to the score.
    """
    return (parts.double() @ query.double().reshape(-1)) / float(norm)
