"""Featurize tokens/s of a mixture-of-experts model against the dense model of the same active
parameter count, and the tracked share of each family's published shape.

    python benchmarks/bench_moe.py [--device cuda] [--width 256] [--layers 4] [--experts 8] [--top-k 2]
        [--expert-width 256] [--dim 4096] [--batch 16] [--seq 128] [--repeats 5]
    python benchmarks/bench_moe.py --coverage

Speed: an OLMoE-shaped model (OlmoeConfig: --experts experts of width --expert-width, top
--top-k routing, random weights) and a dense OLMo-2-shaped model (Olmo2Config, MLP width top_k x
expert width, so the active parameters per token match up to the router) see the same batches on
the same device. After a warm-up, `repeats` timed passes alternate between the two, each pass
timing the featurizer and a plain training step (forward, backward filling .grad); the median
pass of each counts. Printed: tokens/s of each, the ratio MoE / dense for the featurizer, the
same ratio for the plain step (what routing costs by itself), and their quotient (what the
per-expert factors cost on top).

--coverage: for each family's default config in the installed transformers (the published
shapes: Mixtral-8x7B, OLMoE-1B-7B, Qwen3-30B-A3B, gpt-oss-120b, DeepSeek-V3, ...), built on the
meta device (no weights, no download), the share of parameters the featurizer tracks, as the
Markdown table of docs/models.md.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
import transformers

from trackstar_db.featurizer import Featurizer, FeaturizerConfig, find_tracked
from trackstar_db.featurizer.task import per_example_loss
from trackstar_db.featurizer.tracked import coverage

FAMILIES = ("llama", "qwen2", "qwen3", "mistral", "gemma2", "gemma3_text", "phi3", "phi", "olmo2", "gpt_neox",
            "gpt2", "falcon", "stablelm", "starcoder2", "granite", "cohere",
            "mixtral", "qwen2_moe", "qwen3_moe", "olmoe", "gpt_oss", "deepseek_v3", "llama4_text", "deepseek_v2",
            "glm4_moe", "phimoe", "granitemoe")


def models(args):
    shared = dict(vocab_size=args.vocab, hidden_size=args.width, num_hidden_layers=args.layers,
                  num_attention_heads=args.width // 64, num_key_value_heads=args.width // 64,
                  max_position_embeddings=max(args.seq, 64))
    moe = transformers.OlmoeConfig(num_experts=args.experts, num_experts_per_tok=args.top_k,
                                   intermediate_size=args.expert_width, **shared)
    dense = transformers.Olmo2Config(intermediate_size=args.top_k * args.expert_width, **shared)
    out = {}
    for name, config in (("moe", moe), ("dense", dense)):
        config._attn_implementation = "eager" if args.device == "cpu" else "sdpa"
        torch.manual_seed(0)
        model = transformers.AutoModelForCausalLM.from_config(config).to(args.device).eval()
        with torch.no_grad():
            for param in model.parameters():  # routers start at zero: random routing
                if param.dim() == 2 and param.abs().sum() == 0:
                    param.normal_(0, 0.02)
        out[name] = model
    return out


def active(model, top_k: int) -> int:
    """Parameters one token uses: the experts' tensors count top_k / E of their size."""
    total = 0
    for name, param in model.named_parameters():
        experts = param.shape[0] if "experts" in name and param.dim() == 3 else 1
        total += param.numel() * min(top_k, experts) // experts
    return total


def timed(step, batches, device) -> tuple[float, float]:
    """(wall seconds, process CPU seconds) of one pass over `batches`."""
    if device != "cpu":
        torch.cuda.synchronize()
    start, cpu = time.perf_counter(), time.process_time()
    for batch in batches:
        step(batch)
    if device != "cpu":
        torch.cuda.synchronize()
    return time.perf_counter() - start, time.process_time() - cpu


def plain(model):
    def step(batch):
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        per_example_loss(logits, batch["labels"])[0].mean().backward()
        model.zero_grad(set_to_none=True)
    return step


def speed(args) -> None:
    built = models(args)
    g = torch.Generator().manual_seed(0)
    batches = []
    for _ in range(args.steps):
        ids = torch.randint(3, args.vocab, (args.batch, args.seq), generator=g).to(args.device)
        batches.append({"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids.clone()})
    config = FeaturizerConfig(dim=args.dim, correction="none", max_length=args.seq)
    steps = {}
    for name, model in built.items():
        featurizer = Featurizer(model, config, device=args.device)
        steps[name] = {"featurize": featurizer.featurize, "plain": plain(model)}
        print(f"{name}: {sum(p.numel() for p in model.parameters()):,} parameters, "
              f"{active(model, args.top_k):,} active per token, {featurizer.coverage.describe()}, "
              f"{len(featurizer.tracked)} matrices -> dim {featurizer.layout.dim}")
    for kinds in steps.values():  # warm-up
        for step in kinds.values():
            timed(step, batches[:1], args.device)
    seconds = {(n, k): [] for n in steps for k in ("featurize", "plain")}
    for _ in range(args.repeats):
        for name, kinds in steps.items():
            for kind, step in kinds.items():
                seconds[name, kind].append(timed(step, batches, args.device))
    tokens = args.steps * args.batch * args.seq
    for clock, which in (("wall", 0), ("CPU", 1)):  # CPU time: less moved by other processes on a shared machine
        rate = {key: tokens / statistics.median(v[which] for v in values) for key, values in seconds.items()}
        print(f"{clock} clock: " + ", ".join(f"{name} {kind} {value:,.0f} tokens/s" for (name, kind), value in rate.items()))
        featurize = rate["moe", "featurize"] / rate["dense", "featurize"]
        step = rate["moe", "plain"] / rate["dense", "plain"]
        print(f"  ratio MoE/dense, featurize: {featurize:.3f}; plain forward+backward: {step:.3f}; "
              f"featurize overhead of the experts beyond routing: {step / featurize:.3f}x")


def coverage_table() -> None:
    print("| family | default config (published shape) | parameters | tracked | matrices | untracked 2-D |")
    print("| --- | --- | ---: | ---: | ---: | --- |")
    for family in FAMILIES:
        config = transformers.AutoConfig.for_model(family)
        with torch.device("meta"):
            model = transformers.AutoModelForCausalLM.from_config(config)
        tracked = find_tracked(model)
        cover = coverage(model, tracked)
        print(f"| {family} | {type(config).__name__}() | {cover.total / 1e9:.2f} B | {cover.share:.4%} | "
              f"{len(tracked)} | {', '.join(cover.untracked) or 'none'} |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--coverage", action="store_true", help="print the families' tracked shares and stop")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--width", type=int, default=256)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--experts", type=int, default=8)
    parser.add_argument("--top-k", type=int, default=2)
    parser.add_argument("--expert-width", type=int, default=256)
    parser.add_argument("--vocab", type=int, default=4096)
    parser.add_argument("--dim", type=int, default=4096)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--seq", type=int, default=128)
    parser.add_argument("--steps", type=int, default=2, help="batches per timed pass")
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    if args.coverage:
        coverage_table()
    else:
        speed(args)


if __name__ == "__main__":
    main()
