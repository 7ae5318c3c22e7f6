"""bench_lds.py with the Kronecker-factored methods added (issue 31): the same world, retrained bank
and LDS table, with `fit-factors --kind ekfac` run after the demo build and kfac-proj, ekfac-proj
(projected rungs) and kfac, ekfac (the second stage over the best rung's candidates; with the
default N = 200 the tiny world's 354 examples are all re-scored) retrieved with the others.

    python benchmarks/bench_lds_kfac.py                     # tiny world, M = 24, d = 1,024
    python benchmarks/bench_lds_kfac.py --dim 16384         # the projected rungs at a wider projection
    python benchmarks/bench_lds_kfac.py --compare-damping 0.01,1   # the factors refitted with other dampings

Takes bench_lds.py's options, and --compare-damping D1,D2,...: after validate, the factors are
refitted with each damping (lambda = D x mean eigenvalue per matrix), the four methods retrieved
again as METHOD:dD and scored on the same retrained models (nothing retrained).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))

import bench_lds  # noqa: E402

FACTOR_METHODS = ("kfac-proj", "ekfac-proj", "kfac", "ekfac")


def main() -> None:
    def fit_factors(db) -> None:  # on the built or reused world: the factors of this code's defaults
        entry = db.fit_factors("ekfac", progress=False).entry
        print(f"fit-factors: {entry['n_examples']:,} examples, {entry['tokens']:,} tokens, "
              f"{entry['fitted_on'].get('fisher', 'empirical')} Fisher, {entry.get('token_loss', 'mean')} token loss",
              flush=True)

    bench_lds.AFTER_BUILD.append(fit_factors)
    bench_lds.METHODS = tuple(bench_lds.METHODS) + FACTOR_METHODS
    parser = argparse.ArgumentParser(add_help=False)
    parser.add_argument("--compare-damping", default=None)
    ours, sys.argv[1:] = parser.parse_known_args()
    for damping in (ours.compare_damping.split(",") if ours.compare_damping else []):
        bench_lds.AFTER_VALIDATE.append(lambda db, k, args, damping=float(damping): _refit(db, k, args, damping))
    bench_lds.main()


def _refit(db, k: int, args, damping: float) -> tuple[str, list[str]]:
    """The factors refitted with `damping`, the four methods retrieved again as METHOD:dDAMPING."""
    from trackstar_db.retrieval.runs import RetrieveOptions, retrieve

    db.fit_factors("ekfac", damping=damping, progress=False)
    runs = [f"{method}:d{damping:g}" for method in FACTOR_METHODS]
    for method, run in zip(FACTOR_METHODS, runs):
        retrieve(db, method, RetrieveOptions(k=k, device=args.device), run_id=run, replace=True)
    return f"refit the factors with damping {damping:g}, retrieve and score {len(runs)} methods", runs


if __name__ == "__main__":
    main()
