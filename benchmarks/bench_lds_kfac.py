"""bench_lds.py with the Kronecker-factored methods added (issue 31): the same world, retrained bank
and LDS table, with `fit-factors --kind ekfac` run after the demo build and kfac-proj, ekfac-proj
(projected rungs) and kfac, ekfac (the second stage over the best rung's candidates; with the
default N = 200 the tiny world's 354 examples are all re-scored) retrieved with the others.

    python benchmarks/bench_lds_kfac.py                     # tiny world, M = 24, d = 1,024
    python benchmarks/bench_lds_kfac.py --dim 16384         # the projected rungs at a wider projection

Takes bench_lds.py's options.
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))

import bench_lds  # noqa: E402

FACTOR_METHODS = ("kfac-proj", "ekfac-proj", "kfac", "ekfac")


def main() -> None:
    import trackstar_db.demo as demo

    build = demo.run_demo

    def run_demo(workdir, **options):
        out = build(workdir, **options)
        from trackstar_db.api import connect

        entry = connect(Path(workdir) / "db").fit_factors("ekfac", progress=False).entry
        print(f"fit-factors: {entry['n_examples']:,} examples, {entry['tokens']:,} tokens", flush=True)
        return out

    demo.run_demo = run_demo
    bench_lds.METHODS = tuple(bench_lds.METHODS) + FACTOR_METHODS
    bench_lds.main()


if __name__ == "__main__":
    main()
