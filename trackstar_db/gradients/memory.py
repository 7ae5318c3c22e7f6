"""Memory planned, not discovered: the largest token budget a batch may have on the device.

A batch of T tokens (rows x padded width) costs about T x `bytes_per_token` on top of what is
fixed (the weights, already loaded, and the projection matrices):

- every use of a tracked matrix keeps its input and output for the backward, in the model's
  dtype (b bytes): b x (rows + cols) per token (an embedding's rows are ids: cols only);
  times SLACK for what the tracked modules do not show (norms, residuals, activation
  functions, the gradients in flight during the backward);
- the logits' float32 copies of per_example_loss (the copy, the log-softmax it keeps, the
  gradient): 12 bytes x vocab;
- eager attention keeps the probabilities and their scores: 2 x b x heads x max_length per
  layer (SDPA / flash attention keep none);
- an elementwise correction ('adam-exact') forms one per-example gradient of the largest matrix
  per row: 4 x rows x cols bytes, spread over max_length tokens.

On CUDA the budget is (free x HEADROOM - projections - RESERVE) / bytes_per_token, free from
torch.cuda.mem_get_info; on the CPU a fixed CPU_BATCH_TOKENS. A budget below one
max_length example is refused with the figures that say why.
"""

from __future__ import annotations

from dataclasses import dataclass

from trackstar_db.errors import TrackstarError

CPU_BATCH_TOKENS = 4096
SLACK = 1.5
HEADROOM = 0.85  # of the free memory; the rest for the allocator's fragmentation
RESERVE = 512 * 2**20  # cuBLAS workspaces, the CUDA context's growth
GiB = 2**30


@dataclass
class MemoryPlan:
    batch_tokens: int
    bytes_per_token: int
    fixed_bytes: int
    free_bytes: int | None  # None on the CPU (no plan needed)

    def describe(self) -> str:
        if self.free_bytes is None:
            return f"batch budget {self.batch_tokens:,} tokens (the CPU default)"
        return (f"batch budget {self.batch_tokens:,} tokens: {self.free_bytes / GiB:.1f} GiB free, "
                f"{self.fixed_bytes / GiB:.2f} GiB for projections, ~{self.bytes_per_token / 2**20:.2f} MiB per token")


def projection_bytes(featurizer) -> int:
    """Bytes the featurizer's projection matrices take once made (both variants)."""
    size = featurizer.dtype.itemsize
    total = 0
    for matrix in featurizer.tracked:
        block = featurizer.layout.block(matrix.name)
        total += (block.k_r * matrix.rows + block.k_c * matrix.cols) * size * len(featurizer.variants)
    return total


def bytes_per_token(featurizer, max_length: int) -> int:
    """Estimated device bytes one token of a batch costs while it is featurized."""
    model = featurizer.model
    size = featurizer.model_dtype.itemsize
    per_use = 0
    for matrix in featurizer.tracked:
        for _, kind in matrix.uses:
            per_use += matrix.cols if kind == "embedding" else matrix.rows + matrix.cols
    config = getattr(model, "config", None)
    vocab = getattr(config, "vocab_size", 0) or 0
    total = SLACK * size * per_use + 12 * vocab
    if getattr(config, "_attn_implementation", None) == "eager":
        layers = getattr(config, "num_hidden_layers", None) or getattr(config, "n_layer", 0) or 0
        heads = getattr(config, "num_attention_heads", None) or getattr(config, "n_head", 0) or 0
        total += 2 * size * heads * max_length * layers
    moment = featurizer.second_moment
    if moment is not None and moment.mode == "elementwise":
        total += 4 * max(m.rows * m.cols for m in featurizer.tracked) / max_length
    return int(total)


def plan_batch_tokens(featurizer, max_length: int, free_bytes: int | None = None) -> MemoryPlan:
    """The largest token budget that fits featurizer.device (free_bytes: override the free
    memory, e.g. to plan for another GPU). Raises TrackstarError when one example does not fit."""
    device = featurizer.device
    if device.type != "cuda" and free_bytes is None:
        return MemoryPlan(CPU_BATCH_TOKENS, bytes_per_token(featurizer, max_length), 0, None)
    if free_bytes is None:
        import torch

        torch.cuda.empty_cache()  # blocks cached by earlier steps (the second-moment sample) count as free
        free_bytes, _ = torch.cuda.mem_get_info(device)
    per_token = bytes_per_token(featurizer, max_length)
    fixed = projection_bytes(featurizer)
    budget = int((free_bytes * HEADROOM - fixed - RESERVE) // per_token)
    if budget < max_length:
        raise TrackstarError(
            f"{device}: one {max_length}-token example needs ~{max_length * per_token / GiB:.2f} GiB but "
            f"{free_bytes / GiB:.2f} GiB are free and projections take {fixed / GiB:.2f} GiB; lower --dim or "
            "max_length, use --model-dtype bfloat16, or give --batch-tokens")
    return MemoryPlan(budget, per_token, fixed, int(free_bytes))
