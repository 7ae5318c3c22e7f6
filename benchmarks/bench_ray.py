"""Scale-out of the exact scan: one process against 1 and 2 Ray workers, on one synthetic table.

A Lance table of N random d-dim vectors (float16 by default, F fragments) is scanned by
  local     the one-process path: distributed.scan.scan_range over the whole table, in this
            process (retrieval.scoring.scan + retrieval.topk.search, what `retrieve` runs)
  ray xW    the same table cut into W fragment ranges (distributed/ranges.py), one Ray task per
            range, merged with distributed.scan.merge_topk (what `retrieve --engine ray` runs)
for one rung without R (grad-cos: unit norm from the rows' own norms). Each Ray setting runs
twice: 'cold' includes the workers' start (imports), 'warm' is the steady state. Printed: wall
seconds and speed-up against local, the longest task, the overhead (wall - longest task:
scheduling, transfers, merge), CPU seconds (robust on a shared machine) and the per-worker rate
(GB of stored vectors per CPU-second) the scale model in docs/distributed.md starts from.

    python benchmarks/bench_ray.py                 # N=100,000 x d=4,096 float16 (820 MB)
    python benchmarks/bench_ray.py --quick         # N=20,000 x d=2,048
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time
from pathlib import Path

import pyarrow as pa
import torch


def write_table(path: Path, n: int, dim: int, dtype: str, fragments: int) -> None:
    import lance

    from trackstar_db.store import vectors

    rows_per = -(-n // fragments)
    rng = torch.Generator().manual_seed(0)
    for f, start in enumerate(range(0, n, rows_per)):
        m = min(rows_per, n - start)
        table = pa.table({"id": [f"ex-{i:09d}" for i in range(start, start + m)],
                          "vector": vectors.to_arrow(torch.randn(m, dim, generator=rng), dtype)})
        lance.write_dataset(table, str(path), mode="append" if f else "create")


def timed_scan(r, table, q, k, batch_rows):
    """scan_range with its own wall and CPU seconds (CPU time is what a shared machine cannot
    inflate: on an idle machine wall ~ CPU for this single-threaded scan)."""
    from trackstar_db.distributed.scan import scan_range

    wall, cpu = time.perf_counter(), time.process_time()
    result = scan_range(r, table, "grad-cos", q, None, k, batch_rows)
    return result, time.perf_counter() - wall, time.process_time() - cpu


def run_ray(ray, dataset, table, q, k, batch_rows, workers):
    """(merged top-k, [(task wall, task CPU)]) of one scan spread over `workers` Ray tasks."""
    from trackstar_db.distributed.ranges import fragment_ranges
    from trackstar_db.distributed.scan import merge_topk

    task = ray.remote(num_cpus=1)(timed_scan)
    q_ref = ray.put(q)
    parts = ray.get([task.remote(r, table, q_ref, k, batch_rows) for r in fragment_ranges(dataset, workers)])
    return merge_topk([p[0] for p in parts], k), [(p[1], p[2]) for p in parts]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=100_000)
    parser.add_argument("--dim", type=int, default=4096)
    parser.add_argument("--dtype", default="float16", choices=["float16", "float32", "bfloat16"])
    parser.add_argument("--fragments", type=int, default=8)
    parser.add_argument("--queries", type=int, default=16)
    parser.add_argument("--k", type=int, default=100)
    parser.add_argument("--batch-rows", type=int, default=8192)
    parser.add_argument("--quick", action="store_true", help="N=20,000, d=2,048")
    parser.add_argument("--json", type=Path, default=None, help="also write the figures here")
    args = parser.parse_args()
    if args.quick:
        args.n, args.dim = 20_000, 2048
    torch.set_num_threads(1)  # one core per scanner, as each Ray task gets
    import lance
    import ray

    from trackstar_db.distributed.ranges import fragment_ranges

    gb = args.n * args.dim * (4 if args.dtype == "float32" else 2) / 1e9
    q = torch.randn(args.queries, args.dim)
    q = q / q.norm(dim=1, keepdim=True)
    table = {"name": "bench", "dtype": args.dtype, "dim": args.dim}
    results = {"n": args.n, "dim": args.dim, "dtype": args.dtype, "gb": gb, "fragments": args.fragments,
               "queries": args.queries, "k": args.k}
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "bench.lance"
        write_table(path, args.n, args.dim, args.dtype, args.fragments)
        dataset = lance.dataset(str(path))
        whole = fragment_ranges(dataset, 1)[0]
        timed_scan(whole, table, q, args.k, args.batch_rows)  # warm the page cache and the code path
        reference, wall, cpu = timed_scan(whole, table, q, args.k, args.batch_rows)
        results["local"] = {"wall": wall, "cpu": cpu, "tasks": [(wall, cpu)]}
        start = time.perf_counter()
        ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, configure_logging=False)
        results["ray_init"] = time.perf_counter() - start
        for workers in (1, 2):
            for phase in ("cold", "warm"):
                start = time.perf_counter()
                merged, tasks = run_ray(ray, dataset, table, q, args.k, args.batch_rows, workers)
                wall = time.perf_counter() - start
                results[f"ray x{workers} {phase}"] = {"wall": wall, "cpu": sum(c for _, c in tasks), "tasks": tasks}
                assert merged.proponent_ids == reference.proponent_ids, "ray ranking differs from one process"
        ray.shutdown()
    local = results["local"]
    print(f"table: {args.n:,} x {args.dim:,} {args.dtype} ({gb:.2f} GB, {args.fragments} fragments); "
          f"{args.queries} queries, k={args.k}; Ray start {results['ray_init']:.1f} s; load average "
          f"{os.getloadavg()[0]:.1f} on {os.cpu_count()} CPUs")
    print(f"{'scan':<14}{'wall s':>8}{'speed-up':>9}{'longest task':>13}{'overhead':>9}{'CPU s':>8}"
          f"{'GB/CPU-s':>9}{'CPU speed-up':>13}")
    for name in ("local", "ray x1 cold", "ray x1 warm", "ray x2 cold", "ray x2 warm"):
        row = results[name]
        longest_wall = max(w for w, _ in row["tasks"])
        longest_cpu = max(c for _, c in row["tasks"])
        print(f"{name:<14}{row['wall']:>8.2f}{local['wall'] / row['wall']:>9.2f}{longest_wall:>13.2f}"
              f"{row['wall'] - longest_wall:>9.2f}{row['cpu']:>8.2f}{gb / row['cpu']:>9.3f}"
              f"{local['cpu'] / longest_cpu:>13.2f}")
    results["per_worker_gb_per_cpu_s"] = gb / results["ray x1 warm"]["cpu"]
    print("speed-up: local wall / wall; overhead: wall - longest task (scheduling, transfer, merge); "
          "CPU speed-up: local CPU s / longest task's CPU s (the speed-up on an idle machine)")
    print(f"per-worker rate (ray x1 warm): {results['per_worker_gb_per_cpu_s']:.3f} GB per CPU-second")
    if args.json:
        args.json.write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
