"""trackstar's featurizer next to bergson's gradient collector: same model, same batches, one run.

    PYTHONPATH=. /work/bergson-venv/bin/python benchmarks/bench_bergson.py [--model gpt2-124m|pythia-160m|...]
        [--dim 4096] [--batch 32] [--seq 32] [--batches 4] [--repeats 5] [--threads 2] [--train-step]

Needs an environment with bergson (tested with 2.5.1 on a CPU-only torch) and trackstar_db's
featurizer on the path (PYTHONPATH=. from the repository root; the featurizer needs torch and
transformers only). Models are bench_featurize's: the 4x128 GPT-2 by default or a preset config,
random weights, built in memory; nothing is downloaded and bergson's CLI (which loads a model and
a dataset by name) is not used. bergson runs in-process through its own pieces, as its `build`
worker wires them: GradientProcessor (per-module projection) -> InMemoryCollector (hooks,
in-memory Builder) -> fwd_bwd_factory's forward/backward, with the model prepared as bergson's
setup_model_and_peft leaves it (requires_grad off except the input embeddings).

Matching. trackstar projects every tracked matrix (Linear, Conv1D and Embedding weights, a tied
weight once) to k_r x k_c with k_r = floor(sqrt(dim // L)), concatenated. bergson projects every
Linear/Conv1D module to p x p. Here p = trackstar's k_r, so each module's block is the same size;
the totals differ by the matrices one side tracks and the other does not (printed). Both use
Gaussian projections, per-example mean token loss, no optimizer correction, no unit norm.
Two bergson scopes are timed: "bergson" on the whole model (its lm_head, i.e. GPT-2's tied wte,
is projected like trackstar's), and "bergson-base" on model.base_model, which is what bergson's
collect_gradients hands its collector (no lm_head/embed_out). `repeats` timed passes over the
batches alternate between the steps after one warm-up batch each; the median pass counts (the
ratio of median process CPU seconds is printed too: on a shared machine it moves less).
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import os
import statistics
import sys
import tempfile
import time

import numpy as np
import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from bench_featurize import _plain_step, add_workload_arguments, build_model  # noqa: E402

from trackstar_db.featurizer import Featurizer, FeaturizerConfig  # noqa: E402


def bergson_step(model: torch.nn.Module, scope: str, p: int, n_rows: int, run_dir: str, device: str = "cpu"):
    """A step function (rows, batch) -> [batch, bergson dim] and the number of modules tracked."""
    from datasets import Dataset

    from bergson import IndexConfig, InMemoryCollector, PreprocessConfig
    from bergson.collector.collector import fwd_bwd_factory
    from bergson.utils.worker_utils import processor_for

    model = copy.deepcopy(model).to(device)
    model.requires_grad_(False)  # as bergson's setup_model_and_peft leaves a plain model
    model.get_input_embeddings().requires_grad_(True)
    cfg = IndexConfig(run_path=os.path.join(run_dir, scope), projection_dim=p, projection_type="normal",
                      loss_reduction="mean")
    data = Dataset.from_dict({"row": list(range(n_rows))})
    collector = InMemoryCollector(model=model if scope == "bergson" else model.base_model, cfg=cfg,
                                  processor=processor_for(cfg), data=data, preprocess_cfg=PreprocessConfig())
    forward_backward = fwd_bwd_factory(cfg)

    def step(rows: list[int], batch: dict[str, torch.Tensor]) -> torch.Tensor:
        labels = batch["labels"].masked_fill(batch["attention_mask"] == 0, -100)
        with collector.with_batch(batch["attention_mask"].bool()):
            losses = forward_backward(model, batch["input_ids"], labels, {})
        collector.process_batch(rows, losses=losses)
        return torch.from_numpy(np.asarray(collector.builder.grad_buffer[rows], dtype=np.float32))

    return step, len(collector.target_info)


def trackstar_step(model: torch.nn.Module, config: FeaturizerConfig, device: str = "cpu"):
    featurizer = Featurizer(model.to(device), config, device=device)
    return (lambda rows, batch: featurizer.featurize(batch).vectors["uncorrected"]), featurizer


def gram_agreement(a: torch.Tensor, b: torch.Tensor) -> float:
    """Pearson correlation of the pairwise cosine similarities of two sets of vectors of the same
    examples: two random projections of the same gradients agree up to projection noise (nan
    below 3 examples: one pair has no correlation)."""
    def cosines(x):
        x = torch.nn.functional.normalize(x.double(), dim=1)
        rows, cols = torch.triu_indices(len(x), len(x), offset=1)
        return (x @ x.t())[rows, cols]
    return float(torch.corrcoef(torch.stack([cosines(a), cosines(b)]))[0, 1]) if len(a) > 2 else float("nan")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default=None, help="a bench_featurize preset or a local directory")
    parser.add_argument("--model-dtype", default="float32", choices=["float32", "bfloat16"])
    parser.add_argument("--device", default="cpu", help="cpu or cuda (batches and both models there)")
    add_workload_arguments(parser)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--train-step", action="store_true", help="also time a plain AdamW training step")
    parser.add_argument("--no-base", action="store_true", help="skip the bergson-base scope")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    import bergson

    torch.manual_seed(0)
    model, name = build_model(args)
    config = FeaturizerConfig(dim=args.dim, combine="concat", correction="none", max_length=max(args.seq, 2))
    batches = []
    for i in range(args.batches):
        ids = torch.randint(3, model.config.vocab_size, (args.batch, args.seq))
        rows = list(range(i * args.batch, (i + 1) * args.batch))
        ids = ids.to(args.device)
        batches.append((rows, {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids.clone()}))
    n_rows = args.batch * args.batches

    steps, info = {}, {}
    steps["trackstar"], featurizer = trackstar_step(model, config, args.device)
    reference, _ = trackstar_step(model, dataclasses.replace(config, seed=1), args.device)
    block = featurizer.layout.blocks[0]
    p = block.k_r
    info["trackstar"] = f"{len(featurizer.tracked)} matrices x {block.k_r}x{block.k_c} = {featurizer.layout.dim}"
    with tempfile.TemporaryDirectory() as run_dir:
        for scope in ("bergson",) + (() if args.no_base else ("bergson-base",)):
            steps[scope], modules = bergson_step(model, scope, p, n_rows, run_dir, args.device)
            info[scope] = f"{modules} modules x {p}x{p} = {modules * p * p}"
        if args.train_step:
            plain = _plain_step(model, torch.device(args.device))
            steps["train step"] = lambda rows, batch: plain(batch)
            info["train step"] = "AdamW, all parameters"
        run(steps, info, batches, args, name, bergson.__version__, reference(*batches[0]))


def run(steps, info, batches, args, name, version, reference) -> None:
    tokens = sum(b["input_ids"].numel() for _, b in batches)
    vectors = {"trackstar seed 1": reference}
    for key, step in steps.items():  # warm-up (projection matrices made), and the vectors of batch 0
        vectors[key] = step(*batches[0])
    times: dict[str, list[float]] = {key: [] for key in steps}
    cpu: dict[str, list[float]] = {key: [] for key in steps}
    for _ in range(args.repeats):  # alternating passes: a busy machine slows every step alike
        for key, step in steps.items():
            t0, c0 = time.perf_counter(), time.process_time()
            for rows, batch in batches:
                step(rows, batch)
            if torch.cuda.is_available():
                torch.cuda.synchronize()
            times[key].append(time.perf_counter() - t0)
            cpu[key].append(time.process_time() - c0)
    print(f"{name}; batch {args.batch} x seq {args.seq} x {args.batches} batches, {args.device}, "
          f"{torch.get_num_threads()} threads, bergson {version}, {args.repeats} alternating passes")
    print(f"{'step':<14}{'tokens/s':>10}{'min':>10}{'max':>10}  projection")
    for key, ts in times.items():
        print(f"{key:<14}{tokens / statistics.median(ts):>10.0f}{tokens / max(ts):>10.0f}"
              f"{tokens / min(ts):>10.0f}  {info[key]}")
    ts = statistics.median(times["trackstar"])
    print(f"agreement of example-pair cosines (batch 0), trackstar seed 0 vs seed 1 (projection noise "
          f"alone): r = {gram_agreement(vectors['trackstar'], vectors['trackstar seed 1']):.2f}")
    for key in times:
        if key.startswith("bergson"):
            print(f"ratio trackstar / {key} (tokens/s, median passes): {statistics.median(times[key]) / ts:.2f}"
                  f"; pass by pass {min(b / t for b, t in zip(times[key], times['trackstar'])):.2f}"
                  f"-{max(b / t for b, t in zip(times[key], times['trackstar'])):.2f}"
                  f"; by process CPU time {statistics.median(cpu[key]) / statistics.median(cpu['trackstar']):.2f}")
            print(f"  agreement of example-pair cosines (batch 0), trackstar vs {key}: "
                  f"r = {gram_agreement(vectors['trackstar'], vectors[key]):.2f}")


if __name__ == "__main__":
    main()
