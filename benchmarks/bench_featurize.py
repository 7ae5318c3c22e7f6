"""Featurizer tokens/s next to a plain AdamW training step on a small GPT-2 (random weights).

    python benchmarks/bench_featurize.py [--device cuda] [--dim 4096] [--batch 32] [--seq 32]

Featurizer throughput next to a plain training step, measured side by side in one run.

run_featurize_bench times, on the same model, batches and device: the featurizer (one forward,
one backward to the embedding outputs, projections in hooks) and a plain training step
(forward, backward of the mean loss filling .grad, AdamW step) on a copy of the model.
After a warm-up and one pass each for peak memory, `repeats` timed passes over the batches
alternate between the two; the median pass of each counts.
Peak memory: torch.cuda.max_memory_allocated on CUDA; on CPU the growth of the peak resident
set over one pass (sampled every 1 ms), in a fresh (spawned) process per step kind.
"""

from __future__ import annotations

import argparse
import copy
import multiprocessing
import resource
import statistics
import threading
import time

import torch

from trackstar_db.featurizer import Featurizer, FeaturizerConfig
from trackstar_db.featurizer.tokenize import per_example_loss


def _plain_step(model, device):
    """A plain training step (forward, backward filling .grad, AdamW) on a copy of the model."""
    trained = copy.deepcopy(model).to(device).train()
    optimizer = torch.optim.AdamW(trained.parameters(), lr=1e-4)

    def plain_step(batch):
        logits = trained(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        loss, _ = per_example_loss(logits, batch["labels"])
        loss.mean().backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    return plain_step


def _build(name, model, device, config):
    return _plain_step(model, device) if name == "plain" else Featurizer(model.to(device), config, device=device).featurize


def _rss_mib() -> float:
    with open("/proc/self/statm") as handle:
        return int(handle.read().split()[1]) * resource.getpagesize() / 2**20


def _cpu_peak_child(name, model, batches, config, queue) -> None:
    """Runs one pass of one step kind in a fresh process, sampling its resident set every 1 ms."""
    torch.set_num_threads(1)
    step = _build(name, model, torch.device("cpu"), config)
    before, peak, done = _rss_mib(), [0.0], threading.Event()

    def sample():
        while not done.is_set():
            peak[0] = max(peak[0], _rss_mib())
            time.sleep(0.001)

    sampler = threading.Thread(target=sample)
    sampler.start()
    for batch in batches:
        step(batch)
    done.set()
    sampler.join()
    queue.put(max(peak[0], _rss_mib()) - before)


def _peak(name, step, model, batches, device, config) -> float | None:
    """Peak memory a pass adds over the loaded model, in MiB: CUDA allocator peak on a GPU; on
    CPU the growth of the peak resident set in a fresh process (this one has seen other peaks)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        start = torch.cuda.memory_allocated(device)
        _pass(step, batches, device)
        return (torch.cuda.max_memory_allocated(device) - start) / 2**20
    context = multiprocessing.get_context("spawn")
    queue = context.Queue()
    child = context.Process(target=_cpu_peak_child, args=(name, model, batches, config, queue))
    child.start()
    child.join()
    return queue.get() if child.exitcode == 0 else None


def _pass(step, batches, device) -> float:
    t0 = time.perf_counter()
    for batch in batches:
        step(batch)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return time.perf_counter() - t0


def run_featurize_bench(model: torch.nn.Module, batches: list[dict[str, torch.Tensor]],
                        device: str | torch.device = "cpu", config: FeaturizerConfig | None = None,
                        warmup: int = 1, repeats: int = 5) -> dict:
    """Tokens/s of the featurizer and of a plain AdamW training step; ratio = featurizer / plain."""
    device = torch.device(device)
    config = config or FeaturizerConfig()
    batches = [{k: v[:, : config.max_length].to(device) for k, v in b.items()} for b in batches]
    tokens = sum(int(b["input_ids"].numel()) for b in batches)

    featurizer = Featurizer(model.to(device), config, device=device)
    steps = {"plain": _plain_step(model, device), "feat": featurizer.featurize}
    for step in steps.values():
        for batch in batches[:warmup]:
            step(batch)
    peaks = {name: _peak(name, step, model.cpu() if device.type == "cpu" else model, batches, device, config)
             for name, step in steps.items()}
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




import transformers


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--dim", type=int, default=4096)
    parser.add_argument("--combine", default="concat", choices=["concat", "sum"])
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--width", type=int, default=128)
    parser.add_argument("--vocab", type=int, default=2000)
    parser.add_argument("--seq", type=int, default=32)
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--batches", type=int, default=4)
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()

    torch.manual_seed(0)
    config = transformers.GPT2Config(n_layer=args.layers, n_embd=args.width, n_head=4, vocab_size=args.vocab,
                                     n_positions=args.seq, bos_token_id=1, eos_token_id=2)
    model = transformers.GPT2LMHeadModel(config)
    batches = []
    for _ in range(args.batches):
        ids = torch.randint(3, args.vocab, (args.batch, args.seq))
        batches.append({"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids.clone()})
    result = run_featurize_bench(model, batches, args.device,
                                 FeaturizerConfig(dim=args.dim, combine=args.combine), repeats=args.repeats)
    print(f"GPT-2 {args.layers}x{args.width}, vocab {args.vocab}, batch {args.batch} x seq {args.seq}, "
          f"{result['tracked']} tracked matrices, d={result['dim']} ({args.combine}), "
          f"{result['device']}, {result['threads']} threads")
    print(f"{'step':<22}{'tokens/s':>12}{'peak MiB':>12}")
    for name, key in (("featurize", "featurize"), ("train step (AdamW)", "train_step")):
        peak = result[f"{key}_peak_mib"]
        print(f"{name:<22}{result[f'{key}_tokens_per_s']:>12.0f}{'' if peak is None else f'{peak:.1f}':>12}")
    print(f"ratio featurize / train step: {result['ratio']:.2f}")


if __name__ == "__main__":
    main()
