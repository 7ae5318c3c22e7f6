"""The GPU figures of issue 26 in one process: featurizer vs a training step on the preset shapes,
--dim 65536 on the 1B shape with its peak memory and the planned token budget, and the sharded
(FSDP2, world size 1) featurizer against the unsharded one. Results go to OUT/results.json as each
step ends (a step that fails records its error and the next one runs).

    python benchmarks/gpu/run_gpu.py --out DIR [--presets gpt2-124m,pythia-160m,...] [--batch 8]
        [--seq 1024] [--batches 4] [--repeats 5] [--tiny]

--tiny: a 2-layer GPT-2 and a 2-layer GPT-NeoX of width 64 and short batches, float32 on the
CPU when no GPU is present (to try the script before a device session). Imports torch,
transformers and trackstar_db.featurizer / gradients.memory / gradients.sharded only.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
import traceback

import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
from bench_featurize import PRESETS, run_featurize_bench  # noqa: E402

from trackstar_db.featurizer import Featurizer, FeaturizerConfig  # noqa: E402

TINY = {"tiny-gpt2": ("gpt2", dict(n_layer=2, n_embd=64, n_head=2, vocab_size=512, n_positions=256)),
        "tiny-neox": ("gpt_neox", dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                                       intermediate_size=128, vocab_size=512, max_position_embeddings=256))}
GiB = 2**30


def make_model(preset: str, dtype: torch.dtype, device: torch.device) -> torch.nn.Module:
    """A preset's config with random weights, initialised on `device` (fast on a GPU)."""
    import transformers

    model_type, fields = {**PRESETS, **TINY}[preset]
    config = transformers.AutoConfig.for_model(model_type, bos_token_id=1, eos_token_id=2, **fields)
    torch.manual_seed(0)
    with torch.device(device):
        model = transformers.AutoModelForCausalLM.from_config(config)
    return model.to(dtype).eval()


def make_batches(vocab: int, n: int, rows: int, seq: int, seed: int = 0) -> list[dict[str, torch.Tensor]]:
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n):
        ids = torch.randint(3, vocab, (rows, seq), generator=g)
        out.append({"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids.clone()})
    return out


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(step, batches, device, repeats: int) -> float:
    """Median seconds of `repeats` passes over the batches (after one warm-up batch)."""
    step(batches[0])
    sync(device)
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        for batch in batches:
            step(batch)
        sync(device)
        times.append(time.perf_counter() - t0)
    return sorted(times)[len(times) // 2]


def bench_presets(args, device, dtype, results) -> None:
    for preset in args.presets:
        model = make_model(preset, dtype, device)
        batches = make_batches(model.config.vocab_size, args.batches, args.batch, args.seq)
        config = FeaturizerConfig(dim=args.dim, correction="none", max_length=args.seq)
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
        row = run_featurize_bench(model, batches, device, config, repeats=args.repeats)
        row.update(preset=preset, params_m=sum(p.numel() for p in model.parameters()) / 1e6,
                   batch=args.batch, seq=args.seq, model_dtype=str(dtype))
        if device.type == "cuda":
            row["max_memory_allocated_gib"] = torch.cuda.max_memory_allocated(device) / GiB
        results["presets"].append(row)
        print(f"{preset}: featurize {row['featurize_tokens_per_s']:,.0f} tok/s, train step "
              f"{row['train_step_tokens_per_s']:,.0f} tok/s, ratio {row['ratio']:.2f}, "
              f"featurize peak +{row['featurize_peak_mib'] or 0:.0f} MiB", flush=True)
        del model
        if device.type == "cuda":
            torch.cuda.empty_cache()


def bench_wide(args, device, dtype, results) -> None:
    """--dim 65536 on the largest preset: tokens/s, peak memory, and the memory plan's budget
    run as one batch (capped at args.plan_cap tokens) to show it fits."""
    from trackstar_db.gradients.memory import plan_batch_tokens

    preset = args.presets[-1]
    model = make_model(preset, dtype, device)
    config = FeaturizerConfig(dim=args.wide_dim, correction="none", max_length=args.seq)
    featurizer = Featurizer(model, config, device=device)
    batches = make_batches(model.config.vocab_size, args.batches, args.batch, args.seq, seed=1)
    batches = [{k: v.to(device) for k, v in b.items()} for b in batches]
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    seconds = timed(featurizer.featurize, batches, device, args.repeats)
    tokens = sum(b["input_ids"].numel() for b in batches)
    row = {"preset": preset, "dim": featurizer.layout.dim, "k": [featurizer.layout.blocks[0].k_r,
           featurizer.layout.blocks[0].k_c], "tracked": len(featurizer.tracked), "batch": args.batch,
           "seq": args.seq, "featurize_tokens_per_s": tokens / seconds}
    if device.type == "cuda":
        row["max_memory_allocated_gib"] = torch.cuda.max_memory_allocated(device) / GiB
        row["weights_gib"] = sum(p.numel() * p.element_size() for p in model.parameters()) / GiB
        plan = plan_batch_tokens(featurizer, args.seq)
        row["plan"] = plan.describe()
        rows = max(1, min(plan.batch_tokens, args.plan_cap) // args.seq)
        big = make_batches(model.config.vocab_size, 1, rows, args.seq, seed=2)[0]
        torch.cuda.reset_peak_memory_stats(device)
        t0 = time.perf_counter()
        featurizer.featurize(big)
        sync(device)
        row.update(planned_rows=rows, planned_batch_tokens=plan.batch_tokens,
                   planned_batch_seconds=time.perf_counter() - t0,
                   planned_batch_peak_gib=torch.cuda.max_memory_allocated(device) / GiB,
                   device_total_gib=torch.cuda.get_device_properties(device).total_memory / GiB)
    results["wide"] = row
    print(f"wide: {json.dumps(row)}", flush=True)
    del model, featurizer
    if device.type == "cuda":
        torch.cuda.empty_cache()


def bench_sharded(args, device, dtype, results) -> None:
    """FSDP2 (fully_shard over a world of one) featurizer against the unsharded one on the same
    batches: largest row-relative difference and both tokens/s."""
    from trackstar_db.gradients.sharded import init_ranks, mesh_for, shard_model

    os.environ.setdefault("MASTER_PORT", "29517")
    rank = init_ranks(str(device))
    preset = args.sharded_preset or args.presets[0]
    config = FeaturizerConfig(dim=args.dim, correction="none", max_length=args.seq)
    batches = make_batches(make_model(preset, dtype, "meta").config.vocab_size, args.batches, args.batch, args.seq, seed=3)
    batches = [{k: v.to(device) for k, v in b.items()} for b in batches]
    plain = Featurizer(make_model(preset, dtype, "cpu").to(device), config, device=device)  # same weights:
    sharded = Featurizer(shard_model(make_model(preset, dtype, "cpu"), mesh_for(rank)), config, device=device)  # CPU init
    ref = plain.featurize(batches[0]).vectors["uncorrected"]
    got = sharded.featurize(batches[0]).vectors["uncorrected"]
    rel = float(((got - ref).norm(dim=1) / ref.norm(dim=1)).max())
    row = {"preset": preset, "world": rank.world, "max_row_relative_difference": rel,
           "unsharded_tokens_per_s": 0.0, "sharded_tokens_per_s": 0.0}
    tokens = sum(b["input_ids"].numel() for b in batches)
    for _ in range(2):  # alternate, so drift hits both alike
        row["unsharded_tokens_per_s"] = max(row["unsharded_tokens_per_s"],
                                            tokens / timed(plain.featurize, batches, device, args.repeats))
        row["sharded_tokens_per_s"] = max(row["sharded_tokens_per_s"],
                                          tokens / timed(sharded.featurize, batches, device, args.repeats))
    results["sharded"] = row
    print(f"sharded: {json.dumps(row)}", flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", required=True)
    parser.add_argument("--presets", default="gpt2-124m,pythia-160m,pythia-410m,pythia-1b")
    parser.add_argument("--sharded-preset", default="pythia-410m")
    parser.add_argument("--steps", default="presets,wide,sharded")
    parser.add_argument("--dim", type=int, default=4096)
    parser.add_argument("--wide-dim", type=int, default=65536)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--seq", type=int, default=1024)
    parser.add_argument("--batches", type=int, default=4)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--plan-cap", type=int, default=65536, help="most tokens of the planned-budget batch")
    parser.add_argument("--tiny", action="store_true")
    args = parser.parse_args()
    cuda = torch.cuda.is_available()
    device = torch.device("cuda" if cuda else "cpu")
    dtype = torch.bfloat16 if cuda else torch.float32
    if args.tiny:
        args.presets, args.sharded_preset = "tiny-gpt2,tiny-neox", "tiny-neox"
        args.batch, args.seq, args.batches, args.repeats, args.dim, args.wide_dim = 2, 32, 2, 2, 1024, 4096
    args.presets = args.presets.split(",")
    os.makedirs(args.out, exist_ok=True)
    results = {"date_utc": time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime()), "torch": torch.__version__,
               "device": torch.cuda.get_device_name() if cuda else platform.processor() or "cpu",
               "commit": os.environ.get("TRACKSTAR_COMMIT", "unknown"), "args": vars(args), "presets": [],
               "errors": {}}
    if args.sharded_preset is None:
        args.sharded_preset = args.presets[0]
    for step in args.steps.split(","):
        t0 = time.perf_counter()
        try:
            {"presets": bench_presets, "wide": bench_wide, "sharded": bench_sharded}[step](args, device, dtype, results)
        except Exception:  # recorded; the next step still runs
            results["errors"][step] = traceback.format_exc()
            print(results["errors"][step], flush=True)
        results.setdefault("seconds", {})[step] = time.perf_counter() - t0
        with open(os.path.join(args.out, "results.json"), "w") as handle:
            json.dump(results, handle, indent=1)


if __name__ == "__main__":
    main()
