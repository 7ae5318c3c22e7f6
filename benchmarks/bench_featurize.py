"""Featurizer tokens/s next to a plain AdamW training step of the same model (random weights).

    python benchmarks/bench_featurize.py [--model gpt2-124m|pythia-160m|pythia-410m|pythia-1b|DIR]
        [--model-dtype float32|bfloat16|float16] [--device cuda] [--dim 4096] [--batch 32] [--seq 32]
        [--plan-gib 80]

Default model: a 4-layer, 128-wide GPT-2 (--layers/--width/--vocab). --model takes a preset
(configs of the published shapes, built from dicts here, random weights) or a local directory:
a checkpoint (its weights) or a config.json alone (random weights). --plan-gib G prints the
token budget the ingest worker's memory plan (trackstar_db.gradients.memory) would pick on a
device with G GiB free after the weights, and whether one max_length example fits.
Imports torch, transformers and trackstar_db.featurizer only (no LanceDB, Arrow or DuckDB), so
it runs on a machine that has nothing else.

Featurizer throughput next to a plain training step, measured side by side in one run.

run_featurize_bench times, on the same model, batches and device: the featurizer (one forward,
one backward to the embedding outputs, projections in hooks) and a plain training step
(forward, backward of the mean loss filling .grad, AdamW step) on a copy of the model.
After a warm-up and one pass each for peak memory, `repeats` timed passes over the batches
alternate between the two; the median pass of each counts. Also printed: the range of the
pass-by-pass ratios and the ratio of median process CPU seconds (on a shared machine CPU time
is less moved by other processes than wall time; with 2+ threads it includes spin-waits).
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
from functools import partial

import torch

from trackstar_db.featurizer import Featurizer, FeaturizerConfig
from trackstar_db.featurizer.task import per_example_loss


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


def _pass(step, batches, device, cpu_times: list[float] | None = None) -> float:
    """Wall seconds of one pass; its process CPU seconds are appended to `cpu_times` when given."""
    t0, c0 = time.perf_counter(), time.process_time()
    for batch in batches:
        step(batch)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    if cpu_times is not None:
        cpu_times.append(time.process_time() - c0)
    return time.perf_counter() - t0


def run_featurize_bench(model: torch.nn.Module, batches: list[dict[str, torch.Tensor]],
                        device: str | torch.device = "cpu", config: FeaturizerConfig | None = None,
                        warmup: int = 1, repeats: int = 5) -> dict:
    """Tokens/s of the featurizer and of a plain AdamW training step; ratio = featurizer / plain."""
    device = torch.device(device)
    config = config or FeaturizerConfig(correction="none")
    batches = [{k: v[:, : config.max_length].to(device) for k, v in b.items()} for b in batches]
    tokens = sum(int(b["input_ids"].numel()) for b in batches)

    featurizer = Featurizer(model.to(device), config, device=device)
    # as the pipelined worker calls it: on CUDA the host copy is not waited for (a pass ends
    # with a device synchronize), so the next batch's kernels queue behind this one's
    feat = featurizer.featurize if device.type != "cuda" else partial(featurizer.featurize, non_blocking=True)
    steps = {"plain": _plain_step(model, device), "feat": feat}
    for step in steps.values():
        for batch in batches[:warmup]:
            step(batch)
    peaks = {name: _peak(name, step, model.cpu() if device.type == "cpu" else model, batches, device, config)
             for name, step in steps.items()}
    times: dict[str, list[float]] = {name: [] for name in steps}
    cpu: dict[str, list[float]] = {name: [] for name in steps}
    for _ in range(repeats):  # interleaved, so a busy machine slows both alike
        for name, step in steps.items():
            times[name].append(_pass(step, batches, device, cpu[name]))
    plain_s, feat_s = statistics.median(times["plain"]), statistics.median(times["feat"])
    plain_mib, feat_mib = peaks["plain"], peaks["feat"]
    return {"device": str(device), "tokens": tokens, "dim": featurizer.layout.dim,
            "tracked": len(featurizer.tracked), "threads": torch.get_num_threads(),
            "featurize_tokens_per_s": tokens / feat_s, "train_step_tokens_per_s": tokens / plain_s,
            "ratio": plain_s / feat_s, "pair_ratios": sorted(p / f for p, f in zip(times["plain"], times["feat"])),
            "cpu_ratio": statistics.median(cpu["plain"]) / statistics.median(cpu["feat"]), "featurize_peak_mib": feat_mib, "train_step_peak_mib": plain_mib}

PRESETS = {
    "gpt2-124m": ("gpt2", dict(n_layer=12, n_embd=768, n_head=12, vocab_size=50257, n_positions=1024)),
    "pythia-160m": ("gpt_neox", dict(hidden_size=768, num_hidden_layers=12, num_attention_heads=12,
                                     intermediate_size=3072, vocab_size=50304, max_position_embeddings=2048,
                                     rotary_pct=0.25, use_parallel_residual=True, tie_word_embeddings=False)),
    "pythia-410m": ("gpt_neox", dict(hidden_size=1024, num_hidden_layers=24, num_attention_heads=16,
                                     intermediate_size=4096, vocab_size=50304, max_position_embeddings=2048,
                                     rotary_pct=0.25, use_parallel_residual=True, tie_word_embeddings=False)),
    "pythia-1b": ("gpt_neox", dict(hidden_size=2048, num_hidden_layers=16, num_attention_heads=8,
                                   intermediate_size=8192, vocab_size=50304, max_position_embeddings=2048,
                                   rotary_pct=0.25, use_parallel_residual=True, tie_word_embeddings=False)),
}


def build_model(args) -> tuple[torch.nn.Module, str]:
    """(model in args.model_dtype, description) from --model, or the small default GPT-2."""
    import os

    import transformers

    dtype = getattr(torch, args.model_dtype)
    if args.model is None:
        config = transformers.GPT2Config(n_layer=args.layers, n_embd=args.width, n_head=4, vocab_size=args.vocab,
                                         n_positions=max(args.seq, 32), bos_token_id=1, eos_token_id=2)
        name = f"GPT-2 {args.layers}x{args.width}, vocab {args.vocab}"
        model = transformers.GPT2LMHeadModel(config)
    elif args.model in PRESETS:
        model_type, fields = PRESETS[args.model]
        config = transformers.AutoConfig.for_model(model_type, bos_token_id=1, eos_token_id=2, **fields)
        name = f"{args.model} (preset config, random weights)"
        model = transformers.AutoModelForCausalLM.from_config(config)
    elif os.path.isdir(args.model):
        weights = any(f.endswith((".safetensors", ".bin")) and not f.startswith("optimizer")
                      for f in os.listdir(args.model))
        if weights:
            model = transformers.AutoModelForCausalLM.from_pretrained(args.model, local_files_only=True)
            name = f"{args.model} (checkpoint)"
        else:
            config = transformers.AutoConfig.from_pretrained(args.model, local_files_only=True)
            model = transformers.AutoModelForCausalLM.from_config(config)
            name = f"{args.model} (config, random weights)"
    else:
        raise SystemExit(f"--model {args.model!r}: not a preset ({', '.join(PRESETS)}) nor a directory")
    params = sum(p.numel() for p in model.parameters())
    return model.to(dtype).eval(), f"{name}, {params / 1e6:.0f}M parameters, {args.model_dtype}"


def print_plan(model, config, gib: float) -> None:
    """The worker's token budget on a device with `gib` GiB free after the weights."""
    from trackstar_db.errors import TrackstarError
    from trackstar_db.gradients.memory import plan_batch_tokens

    featurizer = Featurizer(model, config, device="cpu")
    try:
        plan = plan_batch_tokens(featurizer, config.max_length, free_bytes=int(gib * 2**30))
        print(f"memory plan for {gib:g} GiB free, d={featurizer.layout.dim}: {plan.describe()}; "
              f"{plan.batch_tokens // config.max_length} rows of {config.max_length} tokens")
    except TrackstarError as exc:
        print(f"memory plan for {gib:g} GiB free: refused: {exc}")


def add_workload_arguments(parser) -> None:
    """The model shape (without --model), batches and repeats; bench_bergson.py takes the same."""
    parser.add_argument("--dim", type=int, default=4096)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--width", type=int, default=128)
    parser.add_argument("--vocab", type=int, default=2000)
    parser.add_argument("--seq", type=int, default=32)
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--batches", type=int, default=4)
    parser.add_argument("--repeats", type=int, default=5)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default=None, help=f"a preset ({', '.join(PRESETS)}) or a local directory")
    parser.add_argument("--model-dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    parser.add_argument("--plan-gib", type=float, default=None,
                        help="also print the memory plan for this many GiB free (no run when --batches 0)")
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--combine", default="concat", choices=["concat", "sum"])
    add_workload_arguments(parser)
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    torch.manual_seed(0)
    if args.batches == 0:  # plan only: shapes on the meta device, no weights made
        with torch.device("meta"):
            model, name = build_model(args)
    else:
        model, name = build_model(args)
    vocab = model.config.vocab_size
    config = FeaturizerConfig(dim=args.dim, combine=args.combine, correction="none", max_length=max(args.seq, 2))
    if args.plan_gib is not None:
        print_plan(model, config, args.plan_gib)
        if args.batches == 0:
            return
    batches = []
    for _ in range(args.batches):
        ids = torch.randint(3, vocab, (args.batch, args.seq))
        batches.append({"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids.clone()})
    result = run_featurize_bench(model, batches, args.device, config, repeats=args.repeats)
    print(f"{name}; batch {args.batch} x seq {args.seq}, {result['tracked']} tracked matrices, "
          f"d={result['dim']} ({args.combine}), {result['device']}, {result['threads']} threads")
    print(f"{'step':<22}{'tokens/s':>12}{'peak MiB':>12}")
    for name, key in (("featurize", "featurize"), ("train step (AdamW)", "train_step")):
        peak = result[f"{key}_peak_mib"]
        print(f"{name:<22}{result[f'{key}_tokens_per_s']:>12.0f}{'' if peak is None else f'{peak:.1f}':>12}")
    pairs = result["pair_ratios"]
    print(f"ratio featurize / train step: {result['ratio']:.2f} (pass pairs {pairs[0]:.2f}-{pairs[-1]:.2f}; "
          f"by process CPU time {result['cpu_ratio']:.2f})")


if __name__ == "__main__":
    main()
