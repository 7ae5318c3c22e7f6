"""Featurizer throughput next to a plain training step, measured side by side in one run.

run_featurize_bench times, on the same model, batches and device: the featurizer (one forward,
one backward to the embedding outputs, projections in hooks) and a plain training step
(forward, backward of the mean loss filling .grad, AdamW step) on a copy of the model.
After a warm-up and one pass each for peak memory, `repeats` timed passes over the batches
alternate between the two; the median pass of each counts.
Peak memory: torch.cuda.max_memory_allocated on CUDA; on CPU the peak resident set (VmHWM,
reset through /proc/self/clear_refs) minus the resident set at the phase start.
"""

from __future__ import annotations

import copy
import statistics
import time
from pathlib import Path

import torch

from ..tokenize import per_example_loss
from .config import FeaturizerConfig
from .per_example import Featurizer


def _rss_kib(field: str) -> int | None:
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1])
    except OSError:
        return None
    return None


def _reset_peak(device: torch.device) -> int | None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        return torch.cuda.memory_allocated(device)
    try:
        Path("/proc/self/clear_refs").write_text("5")
    except OSError:
        pass
    return _rss_kib("VmRSS")


def _peak_mib(device: torch.device, start: int | None) -> float | None:
    if device.type == "cuda":
        return (torch.cuda.max_memory_allocated(device) - start) / 2**20
    peak = _rss_kib("VmHWM")
    return None if peak is None or start is None else (peak - start) / 1024


def _pass(step, batches, device) -> float:
    t0 = time.perf_counter()
    for batch in batches:
        step(batch)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return time.perf_counter() - t0


def _peak(step, batches, device) -> float | None:
    start = _reset_peak(device)
    _pass(step, batches, device)
    return _peak_mib(device, start)


def run_featurize_bench(model: torch.nn.Module, batches: list[dict[str, torch.Tensor]],
                        device: str | torch.device = "cpu", config: FeaturizerConfig | None = None,
                        warmup: int = 1, repeats: int = 5) -> dict:
    """Tokens/s of the featurizer and of a plain AdamW training step; ratio = featurizer / plain."""
    device = torch.device(device)
    config = config or FeaturizerConfig()
    batches = [{k: v[:, : config.max_length].to(device) for k, v in b.items()} for b in batches]
    tokens = sum(int(b["input_ids"].numel()) for b in batches)

    trained = copy.deepcopy(model).to(device).train()
    optimizer = torch.optim.AdamW(trained.parameters(), lr=1e-4)

    def plain_step(batch):
        logits = trained(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        loss, _ = per_example_loss(logits, batch["labels"])
        loss.mean().backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    featurizer = Featurizer(model.to(device), config, device=device)
    steps = {"plain": plain_step, "feat": featurizer.featurize}
    for step in steps.values():
        for batch in batches[:warmup]:
            step(batch)
    peaks = {name: _peak(step, batches, device) for name, step in steps.items()}
    times: dict[str, list[float]] = {name: [] for name in steps}
    for _ in range(repeats):  # interleaved, so a busy machine slows both alike
        for name, step in steps.items():
            times[name].append(_pass(step, batches, device))
    plain_s, feat_s = statistics.median(times["plain"]), statistics.median(times["feat"])
    plain_mib, feat_mib = peaks["plain"], peaks["feat"]
    return {"device": str(device), "tokens": tokens, "dim": featurizer.layout.dim,
            "tracked": len(featurizer.tracked), "threads": torch.get_num_threads(),
            "featurize_tokens_per_s": tokens / feat_s, "train_step_tokens_per_s": tokens / plain_s,
            "ratio": plain_s / feat_s, "featurize_peak_mib": feat_mib, "train_step_peak_mib": plain_mib}
