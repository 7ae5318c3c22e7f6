"""LDS of every method on a generated fact world (issue 24): how well each method's scores predict
the target loss of models retrained on random halves of the corpus.

Builds the world with the demo's own pipeline (trackstar_db/demo.run_demo with full=True: model with
intermediate checkpoints for TracIn-CP, gradients, R, every method), refits R with --shrinkage,
re-retrieves each method (k = every example unless --k; validate scores every example itself, so
the LDS does not depend on k), tail-patches a sample of queries, then runs `validate` (M retrained
models, each on a seeded random half, trained with the base model's schedule scaled to the half:
--schedule) and prints the LDS table with bootstrap intervals, the retrained models' and the
attributed model's mean target loss, the wall time of each stage and the machine load. With
--compare-shrinkage RULE the R rungs are refitted with RULE, retrieved again under run ids
METHOD:RULE and scored on the same retrained models (nothing retrained).

    python benchmarks/bench_lds.py                               # tiny world, M=24 (a few minutes on 2 cores)
    python benchmarks/bench_lds.py --size demo --models 12 --k 1000   # the demo world (much longer)
    python benchmarks/bench_lds.py --dim 16384 --compare-shrinkage none,ledoit-wolf   # the damping rule against others
    python benchmarks/bench_lds.py --workdir W --reuse           # this code's methods on W's world and retrained models
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
from pathlib import Path

METHODS = ("grad-dot", "grad-cos", "trak", "opt-cos", "r-train", "trackstar", "bm25", "tracin-cp")
AFTER_BUILD = []  # hook(db): run on the built (or reused) world before retrieval (bench_lds_kfac.py)
AFTER_VALIDATE = []  # compare(db, k, args) -> (label, run ids): runs retrieved after validate, scored on its models


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", choices=("tiny", "demo"), default="tiny")
    parser.add_argument("--models", type=int, default=24, help="M: retrained models (subsets)")
    parser.add_argument("--fraction", type=float, default=0.5)
    parser.add_argument("--steps", type=int, default=None, help="optimizer steps per retrained model (default: "
                                                                "the base model's own config)")
    parser.add_argument("--dim", type=int, default=1024, help="projected gradient width")
    parser.add_argument("--schedule", default="scaled", help="retrained models' schedule (validate --schedule)")
    parser.add_argument("--shrinkage", default="prior", help="R's shrinkage (fit --shrinkage)")
    parser.add_argument("--compare-shrinkage", default=None,
                        help="comma-separated rules: also score the R rungs refitted with each")
    parser.add_argument("--k", type=int, default=None, help="re-retrieve with this k (default: every example; on the "
                                                            "demo world that stores 2 x 5,426 rows per query and method)")
    parser.add_argument("--patch-queries", type=int, default=20, help="queries tail-patched per method")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--workdir", type=Path, default=None)
    parser.add_argument("--reuse", action="store_true", help="reuse the world an earlier run left in --workdir (its "
                                                             "model, gradients, R and retrained models); the methods "
                                                             "are retrieved and scored again with this code")
    args = parser.parse_args()

    import pyarrow as pa
    import pyarrow.compute as pc

    from trackstar_db.api import connect
    from trackstar_db.evaluation.sql import format_table
    from trackstar_db.retrieval.runs import RetrieveOptions, retrieve
    from trackstar_db.tailpatch.runs import tail_patch_runs
    from trackstar_db.demo import run_demo

    workdir = args.workdir or Path(tempfile.mkdtemp(prefix="bench-lds-")) / "world"
    load = os.getloadavg()
    times = {}
    started = time.perf_counter()
    if args.reuse and (workdir / "db" / "manifest.json").is_file():  # its retrained models are reused too
        print(f"reusing the world, model, gradients, R and retrained models in {workdir}", flush=True)
    else:
        run_demo(workdir, size=args.size, dim=args.dim, full=True, simfluence=False, tail_patch_queries=1)
        times["build (world, train, featurize, fit, retrieve k=100)"] = time.perf_counter() - started
    db = connect(workdir / "db")
    for hook in AFTER_BUILD:
        hook(db)
    shrinkage = _rule(args.shrinkage)
    if shrinkage != "prior":  # the demo fitted with the default rule
        db.fit(shrinkage=shrinkage)
    n = db.count("examples")
    k = min(args.k or n, n)
    mark = time.perf_counter()
    for method in METHODS:
        retrieve(db, method, RetrieveOptions(k=k, device=args.device), replace=True)
    tail_patch_runs(db, list(METHODS), k=10, max_queries=args.patch_queries, device=args.device)
    times[f"re-retrieve {len(METHODS)} methods with k={k}, tail-patch {args.patch_queries} queries"] = \
        time.perf_counter() - mark
    mark = time.perf_counter()
    table = db.validate(models=args.models, fraction=args.fraction, steps=args.steps, device=args.device,
                        schedule=args.schedule, report=lambda line: print(line, flush=True))
    times[f"validate: train {args.models} models + losses + LDS"] = time.perf_counter() - mark
    from trackstar_db.validate.runner import loss_summary

    losses = loss_summary(db, "lds")
    shown = METHODS
    if args.compare_shrinkage:
        rungs = [m for m in METHODS if m in ("trak", "r-train", "trackstar")]
        for rule in args.compare_shrinkage.split(","):
            mark = time.perf_counter()
            db.fit(shrinkage=_rule(rule))
            for method in rungs:
                retrieve(db, method, RetrieveOptions(k=k, device=args.device), run_id=f"{method}:{rule}", replace=True)
            table = db.validate(models=args.models, fraction=args.fraction, steps=args.steps, device=args.device,
                                schedule=args.schedule)
            times[f"refit R with shrinkage {rule}, retrieve and score {len(rungs)} rungs"] = time.perf_counter() - mark
            shown += tuple(f"{m}:{rule}" for m in rungs)
    for compare in AFTER_VALIDATE:  # more rows scored on the same retrained models (bench_lds_kfac.py)
        mark = time.perf_counter()
        label, runs = compare(db, k, args)
        table = db.validate(models=args.models, fraction=args.fraction, steps=args.steps, device=args.device,
                            schedule=args.schedule)
        times[label] = time.perf_counter() - mark
        shown += tuple(runs)
    table = table.filter(pc.is_in(table.column("run_id"), pa.array(shown)))
    summary = db.evaluate().select(["method", "run_id", "mrr", "recall_at_10", "tailpatch_at_1", "lds", "lds_partial"])
    print(f"world {args.size}: {n:,} examples, {db.count('queries') // 3} prompt0 queries; M={args.models}, "
          f"fraction {args.fraction}, d={args.dim}, R shrinkage {args.shrinkage}, schedule {args.schedule}, "
          f"steps {args.steps or 'scaled from the base'}, stored k={k}, device {args.device}")
    print(f"mean target loss: retrained models {losses['retrained']:.3f}, attributed model {losses['attributed']:.3f}")
    print(format_table(table.select(["run_id", "n_queries", "n_undefined", "n_subsets", "n_scored", "partial", "lds",
                                     "lds_low", "lds_high"]), "table"))
    print(format_table(summary, "table"))
    for stage, seconds in times.items():
        print(f"{stage}: {seconds:.0f} s")
    print(f"total {time.perf_counter() - started:.0f} s; load average at start {load[0]:.2f}, "
          f"at end {os.getloadavg()[0]:.2f}; {os.cpu_count()} CPUs")


def _rule(text: str):
    return text if text in ("prior", "ledoit-wolf", "none") else float(text)


if __name__ == "__main__":
    main()
