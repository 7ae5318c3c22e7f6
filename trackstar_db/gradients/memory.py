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
from trackstar_db.models.load import model_from_config, open_config

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
                f"{self.fixed_bytes / GiB:.2f} GiB for projections (and gathered FSDP groups), ~{self.bytes_per_token / 2**20:.2f} MiB per token")


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
    config = getattr(model, "config", None)
    top_k = getattr(config, "num_experts_per_tok", None) or 1
    for matrix in featurizer.tracked:
        for _, kind in matrix.uses:
            if kind == "experts":  # a token's factors: one expert's slice per routed expert
                per_use += min(top_k, matrix.experts) * (matrix.rows // matrix.experts + matrix.cols)
            else:
                per_use += matrix.cols if kind == "embedding" else matrix.rows + matrix.cols
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
        import torch  # heavy: torch

        torch.cuda.empty_cache()  # blocks cached by earlier steps (the second-moment sample) count as free
        free_bytes, _ = torch.cuda.mem_get_info(device)
    per_token = bytes_per_token(featurizer, max_length)
    fixed = projection_bytes(featurizer) + gathered_bytes(featurizer.model)
    budget = int((free_bytes * HEADROOM - fixed - RESERVE) // per_token)
    if budget < max_length:
        raise TrackstarError(
            f"{device}: one {max_length}-token example needs ~{max_length * per_token / GiB:.2f} GiB but "
            f"{free_bytes / GiB:.2f} GiB are free and projections take {fixed / GiB:.2f} GiB; lower dim or "
            "max_length, use model_dtype bfloat16, or give batch_tokens")
    return MemoryPlan(budget, per_token, fixed, int(free_bytes))


# -- how many devices: the model sharded with FSDP2 (gradients/sharded.py) ----------------------

DEVICE_COUNTS = (1, 2, 4, 8, 16, 32, 64)


@dataclass
class DeviceNeed:
    """Bytes one device needs to featurize a `tokens`-token batch with the model sharded over
    `devices` processes (devices == 1: the unsharded worker)."""

    devices: int
    shard_bytes: int  # this device's 1/N of the weights (all of them at N = 1)
    gathered_bytes: int  # the root group, held gathered, and two blocks (one running, one prefetched)
    projection_bytes: int
    activation_bytes: int
    total_bytes: int  # the above + RESERVE, over HEADROOM: the memory the device must have


def _group_bytes(model) -> tuple[int, int, int]:
    """(all weights, the root group: what no block holds, the largest block) in bytes."""
    from .sharded import block_modules  # heavy: torch

    size = {id(p): p.numel() * p.element_size() for p in model.parameters()}
    blocks = [{id(p) for p in block.parameters()} for block in block_modules(model)]
    in_blocks = set().union(*blocks) if blocks else set()
    largest = max((sum(size[i] for i in block) for block in blocks), default=0)
    return sum(size.values()), sum(b for i, b in size.items() if i not in in_blocks), largest


def gathered_bytes(model) -> int:
    """Bytes FSDP holds gathered besides a rank's shards: the root group and two blocks; 0 for a
    model that is not sharded (its parameters are plain tensors, not DTensors)."""
    if type(next(model.parameters())).__name__ != "DTensor":
        return 0
    _, root, block = _group_bytes(model)
    return root + 2 * block


def device_need(featurizer, devices: int, tokens: int, max_length: int) -> DeviceNeed:
    """What one of `devices` devices needs for a batch of `tokens` tokens (featurizer.model may
    live on the meta device: only shapes and dtypes are read)."""
    weights, root, block = _group_bytes(featurizer.model)
    shard = -(-weights // devices)
    gathered = 0 if devices == 1 else root + 2 * block
    projections = projection_bytes(featurizer)
    activations = tokens * bytes_per_token(featurizer, max_length)
    total = int((shard + gathered + projections + activations + RESERVE) / HEADROOM)
    return DeviceNeed(devices, shard, gathered, projections, activations, total)


def devices_needed(featurizer, device_bytes: int, max_length: int, tokens: int | None = None) -> DeviceNeed:
    """The fewest devices of `device_bytes` each (from DEVICE_COUNTS) that featurize a batch of
    `tokens` (default one max_length example). Raises TrackstarError when none does."""
    tokens = tokens or max_length
    for devices in DEVICE_COUNTS:
        need = device_need(featurizer, devices, tokens, max_length)
        if need.total_bytes <= device_bytes:
            return need
    need = device_need(featurizer, DEVICE_COUNTS[-1], tokens, max_length)
    raise TrackstarError(
        f"no sharding up to {DEVICE_COUNTS[-1]} devices of {device_bytes / GiB:.0f} GiB fits: each would need "
        f"{need.total_bytes / GiB:.1f} GiB ({need.gathered_bytes / GiB:.2f} GiB of gathered groups, "
        f"{need.activation_bytes / GiB:.2f} GiB for {tokens:,} tokens); lower max_length or use larger devices")


def plan_rows_for_model(model_dir, dim: int, device_gib: float, model_dtype: str = "bfloat16",
                        max_length: int = 512) -> list[dict]:
    """Rows for `trackstar-db plan --model DIR --device-gib G`: the devices the featurizer of the
    model in DIR (config.json; no weights are read) needs at `dim`, and one device's memory at
    each count. Shapes come from the config on the meta device."""
    from trackstar_db.featurizer.config import FeaturizerConfig  # heavy: torch
    from trackstar_db.featurizer.per_example import Featurizer  # heavy: torch

    model = model_from_config(open_config(model_dir), meta=True, dtype=model_dtype)
    featurizer = Featurizer(model, FeaturizerConfig(dim=dim, correction="none", max_length=max_length))
    params = sum(p.numel() for p in model.parameters())
    what = f"{params / 1e6:,.0f}M parameters {model_dtype}, d = {featurizer.layout.dim:,}, {max_length}-token example"
    rows = []
    try:
        best = devices_needed(featurizer, int(device_gib * GiB), max_length)
        how = "1 device, unsharded" if best.devices == 1 else f"{best.devices} devices, --shard-model"
        rows.append({"item": f"devices: featurize on {device_gib:g} GiB devices", "ram_bytes": best.total_bytes,
                     "note": f"{how}; {what}"})
    except TrackstarError as exc:
        rows.append({"item": f"devices: featurize on {device_gib:g} GiB devices", "note": str(exc)})
    for devices in (1, 2, 4, 8):
        need = device_need(featurizer, devices, max_length, max_length)
        rows.append({"item": f"device memory: {devices} device{'s' if devices > 1 else ''}", "ram_bytes": need.total_bytes,
                     "note": f"weights {need.shard_bytes / GiB:.2f} + gathered {need.gathered_bytes / GiB:.2f} + "
                             f"projections {need.projection_bytes / GiB:.2f} + one example {need.activation_bytes / GiB:.2f} "
                             f"GiB, + {RESERVE >> 20} MiB reserve, / {HEADROOM}"})
    return rows
