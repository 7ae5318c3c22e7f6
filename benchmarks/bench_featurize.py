"""Featurizer tokens/s next to a plain AdamW training step on a small GPT-2 (random weights).

    python benchmarks/bench_featurize.py [--device cuda] [--dim 4096] [--batch 32] [--seq 32]
"""

from __future__ import annotations

import argparse

import torch
import transformers

from trackstar_db.featurizer import FeaturizerConfig
from trackstar_db.featurizer.bench import run_featurize_bench


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
