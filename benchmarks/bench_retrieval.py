"""Exact retrieval throughput against the machine's own matrix-multiply speed, side by side.

For each stored dtype (float32, float16, bfloat16) and each query count (1, 1000) it streams N
random vectors of width D as Arrow record batches through the scan path of stored runs (zero-copy
read in the stored dtype, widened and unit-normalised tile by tile by retrieval.scoring.widen,
scored and merged into the running top-k of proponents and opponents by retrieval.topk) and
times it; in the same run it times the bare float32 matmul Q @ X^T over the same number of
vectors (the compute ceiling) and prints the ratio, then the per-row time of float16 and
bfloat16 relative to float32 (<= 1.0: half precision scans at least as fast per row). It also
writes a small Lance table per dtype and reports bytes per example.

    python benchmarks/bench_retrieval.py            # 200k x 4096 (minutes on a small CPU)
    python benchmarks/bench_retrieval.py --quick    # 20k x 1024, under 2 minutes on 2 cores
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import lance
import numpy as np
import pyarrow as pa
import torch

from trackstar_db.retrieval.scoring import widen
from trackstar_db.retrieval.topk import search
from trackstar_db.store import vectors
from trackstar_db.store.vectors import vector_batches


def stream(batch: pa.RecordBatch, n: int):
    """The same record batch repeated until n vectors have gone by (no corpus held in memory)."""
    for start in range(0, n, batch.num_rows):
        yield batch.slice(0, min(batch.num_rows, n - start))


def timed(fn, repeats: int = 3) -> float:
    """Best of `repeats` runs (the minimum is robust to other processes on a shared machine)."""
    best = float("inf")
    for _ in range(repeats):
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        start = time.perf_counter()
        fn()
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        best = min(best, time.perf_counter() - start)
    return best


def storage_bytes(dim: int, dtype: str, rows: int = 2000) -> float:
    """On-disk bytes per example of a Lance gradient table (id, vector, norm, loss, n_tokens)."""
    table = pa.table({"id": [f"example-{i:08d}" for i in range(rows)],
                      "vector": vectors.to_arrow(torch.randn(rows, dim), dtype),
                      "norm": pa.array(np.ones(rows, np.float32)), "loss": pa.array(np.ones(rows, np.float32)),
                      "n_tokens": pa.array(np.full(rows, 20, np.int32))})
    with tempfile.TemporaryDirectory() as tmp:
        lance.write_dataset(table, str(Path(tmp) / "g.lance"))
        return sum(p.stat().st_size for p in Path(tmp).rglob("*") if p.is_file()) / rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=200_000, help="vectors scanned")
    parser.add_argument("--dim", type=int, default=4096)
    parser.add_argument("--batch", type=int, default=8192, help="vectors per record batch")
    parser.add_argument("--k", type=int, default=10)
    parser.add_argument("--quick", action="store_true", help="20k x 1024: under 2 minutes on 2 cores")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.quick:
        args.n, args.dim = 20_000, 1024
    device = torch.device(args.device)
    print(f"torch {torch.__version__}, device {device}, threads {torch.get_num_threads()}, "
          f"N={args.n}, D={args.dim}, batch={args.batch}, k={args.k}")
    print(f"{'dtype':8} {'queries':>7} {'search s':>9} {'vectors/s':>11} {'GB/s':>7} {'matmul s':>9} {'ratio':>6}")
    per_row = {}
    for dtype in ("float32", "float16", "bfloat16"):
        x = torch.randn(args.batch, args.dim)
        batch = pa.record_batch({"id": pa.array([f"e{i}" for i in range(args.batch)]),
                                 "vector": vectors.to_arrow(x, dtype)})
        x_dev = x.to(device)
        for n_queries in (1, 1000):
            q = torch.nn.functional.normalize(torch.randn(n_queries, args.dim, device=device), dim=1)

            def scan():
                native = vector_batches(stream(batch, args.n), dtype=dtype, native=True)
                search(q, widen(native, unit=True, device=device, batch_rows=args.batch), args.k)

            seconds = timed(scan, 1 if n_queries > 1 else 5)
            per_row[dtype, n_queries] = seconds / args.n

            def matmul():
                for start in range(0, args.n, args.batch):
                    q @ x_dev[: min(args.batch, args.n - start)].T

            reference = timed(matmul, 1 if n_queries > 1 else 5)
            gbytes = args.n * vectors.bytes_per_vector(args.dim, dtype) / 1e9
            print(f"{dtype:8} {n_queries:7d} {seconds:9.3f} {args.n / seconds:11.3g} {gbytes / seconds:7.2f} "
                  f"{reference:9.3f} {reference / seconds:6.2f}")
    for n_queries in (1, 1000):
        print(f"per-row time vs float32, {n_queries} quer{'y' if n_queries == 1 else 'ies'}: " + ", ".join(
            f"{dtype} {per_row[dtype, n_queries] / per_row['float32', n_queries]:.2f}" for dtype in ("float16", "bfloat16")))
    raw = {dtype: vectors.bytes_per_vector(args.dim, dtype) for dtype in ("float16", "float32")}
    for dtype in ("float16", "float32"):
        print(f"storage {dtype}: {storage_bytes(args.dim, dtype):,.0f} bytes/example on disk "
              f"(vector alone {raw[dtype]:,} bytes)")
    print("ratio = bare float32 matmul time / search time (1.0 = search as fast as the matmul alone)")


if __name__ == "__main__":
    main()
