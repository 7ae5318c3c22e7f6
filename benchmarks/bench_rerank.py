"""Latency of a reranked one-prompt query (issue 31, item 5): the plain first-stage query against
the same query with its top N candidates re-scored through the Kronecker factors, warm, in one run.

The database is bench_query.py's (the `trackstar-db demo` flow up to `fit`: the testbed's generated
fact world, a 2-layer GPT-2 trained on it, TrackStar gradients and R), built once in --workdir;
the factors are fitted here when missing (their fitting time is printed). Printed per run:

    plain    Database.query(prompt, target, method=FIRST) in a warm process (the featurizer,
             R and the page cache loaded by an untimed first call)
    rerank   Database.query(..., method=FIRST, rerank=KIND, candidates=N), warm likewise:
             the first stage with k = N, then N proponents and N opponents featurized in full
             and scored through the factors; goal: at most 2 s on a CPU with N = 200
    ratio    rerank / plain

    python benchmarks/bench_rerank.py                                   # demo world, CPU, N = 200
    python benchmarks/bench_rerank.py --device cuda                     # the same on a GPU
    python benchmarks/bench_rerank.py --size tiny --repeats 3           # a smoke test
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))

from bench_query import build, timed  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workdir", type=Path, default=Path("bench-query"))
    parser.add_argument("--size", default="demo", choices=["demo", "tiny"])
    parser.add_argument("--dim", type=int, default=4096)
    parser.add_argument("--kind", default="ekfac", choices=["kfac", "ekfac"])
    parser.add_argument("--candidates", type=int, default=200)
    parser.add_argument("--first", default="trackstar", help="the first stage's method")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--repeats", type=int, default=5, help="warm queries per variant (median)")
    parser.add_argument("--queries", type=int, default=3, help="distinct prompts timed")
    args = parser.parse_args()
    import torch

    threads = os.environ.get("BENCH_THREADS")
    if threads:
        torch.set_num_threads(int(threads))
    from trackstar_db import connect

    path = build(args.workdir, args.size, args.dim)
    db = connect(path)
    fitted = (db.manifest.get("factors") or {}).get("kind")
    if fitted != "ekfac" and fitted != args.kind:
        start = time.perf_counter()
        report = db.fit_factors(args.kind, device=args.device, progress=False)
        print(f"fit-factors --kind {args.kind}: {time.perf_counter() - start:.1f} s for {report.entry['n_examples']:,} "
              f"examples ({report.entry['tokens']:,} tokens)")
        db = connect(path)
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                            cwd=Path(__file__).parent).stdout.strip()
    device = torch.cuda.get_device_name() if args.device.startswith("cuda") else f"CPU, {os.cpu_count()} cores"
    print(f"{path}: {db.count('examples'):,} examples; commit {commit}; {device}; torch threads "
          f"{torch.get_num_threads()}; load average {os.getloadavg()[0]:.2f}")
    pairs = db.table("queries", columns=["prompt", "target"]).slice(0, args.queries).to_pylist()
    print(f"{'prompt':40} {'plain s':>8} {'rerank s':>9} {'ratio':>6} {'top-10 kept':>11}")
    ratios = []
    for pair in pairs:
        prompt, target = pair["prompt"], pair["target"]

        def plain():
            return db.query(prompt, target, method=args.first, device=args.device)

        def reranked():
            return db.query(prompt, target, method=args.first, device=args.device, rerank=args.kind,
                            candidates=args.candidates)

        first, second = plain(), reranked()  # warm: model, R, factors, page cache
        t_plain, t_rerank = timed(plain, args.repeats), timed(reranked, args.repeats)
        ids = lambda rows: [r["example_id"] for r in rows.to_pylist() if r["kind"] == "proponent"][:10]  # noqa: E731
        kept = len(set(ids(first)) & set(ids(second)))
        ratios.append(t_rerank / t_plain)
        print(f"{(prompt + ' ' + target)[:40]:40} {t_plain:8.3f} {t_rerank:9.3f} {t_rerank / t_plain:6.1f} "
              f"{kept:>8}/10", flush=True)
    print(f"{args.kind} rerank of N = {args.candidates} {args.first} candidates: median ratio "
          f"{sorted(ratios)[len(ratios) // 2]:.1f} x plain; load average after {os.getloadavg()[0]:.2f}")


if __name__ == "__main__":
    main()
