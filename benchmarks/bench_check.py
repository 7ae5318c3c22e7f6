"""How long `trackstar-db check` takes: rows/s and MB/s of a full check against a plain scan.

    python benchmarks/bench_check.py [--rows 100000] [--dim 1024] [--dtype float16] [--dir /tmp/bench-check]

Builds a database of `rows` synthetic examples (short texts, BM25 indexed) with a train
gradient table of random vectors (one table, as written by `--no-uncorrected`), then times,
side by side in one run: a plain scan of the gradient table (its Lance dataset, every column)
and check(db) (every table read fully, vectors tested finite, ids compared in DuckDB, BM25
counted). The ratio is check's overhead over reading the bytes once.
"""

from __future__ import annotations

import argparse
import shutil
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import torch


def build(path: Path, rows: int, dim: int, dtype: str):
    from trackstar_db import Database
    from trackstar_db.store import vectors as _vectors
    from trackstar_db.store.bm25 import BM25Index

    if path.exists():
        shutil.rmtree(path)
    db = Database.create(path)
    ids = [f"E{i:08d}" for i in range(rows)]
    texts = [f"example {i} says word{i % 97} and word{i % 89}" for i in range(rows)]
    db.append("examples", pa.table({"example_id": ids, "text": texts, "source": ["bench"] * rows,
                                    "content_hash": [str(i) for i in range(rows)]}))
    BM25Index(path).add(ids, texts)
    table = db.gradient_table("train")
    table.create(dim, dtype)
    g = torch.Generator().manual_seed(0)
    for start in range(0, rows, 20000):
        n = min(20000, rows - start)
        x = torch.randn(n, dim, generator=g)
        db.append(table.name, pa.table({"id": ids[start:start + n], "vector": _vectors.to_arrow(x, dtype),
                                        "norm": pa.array(x.norm(dim=1).numpy(), pa.float32()),
                                        "loss": pa.array(np.ones(n, np.float32)),
                                        "n_tokens": pa.array(np.ones(n, np.int32))}))
    return db


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--rows", type=int, default=100_000)
    parser.add_argument("--dim", type=int, default=1024)
    parser.add_argument("--dtype", default="float16")
    parser.add_argument("--dir", type=Path, default=Path("/tmp/bench-check"))
    args = parser.parse_args()
    torch.set_num_threads(1)
    from trackstar_db.store.check import check

    db = build(args.dir, args.rows, args.dim, args.dtype)
    mb = sum(f.stat().st_size for f in (args.dir / "tables").rglob("*") if f.is_file()) / 1e6
    start = time.perf_counter()
    scanned = sum(b.num_rows for b in db.dataset("grads_train_corrected").to_batches(batch_size=8192))
    scan_s = time.perf_counter() - start
    start = time.perf_counter()
    problems = check(db)
    check_s = time.perf_counter() - start
    print(f"rows={args.rows:,} dim={args.dim} dtype={args.dtype} tables={mb:,.0f} MB")
    print(f"plain scan of the gradient table: {scan_s:.2f} s ({scanned / scan_s:,.0f} rows/s)")
    print(f"check (all tables, ids, vectors, bm25): {check_s:.2f} s ({args.rows / check_s:,.0f} rows/s, "
          f"{mb / check_s:,.0f} MB/s); {check_s / scan_s:.1f}x the plain scan; problems: {problems.num_rows}")
    for row in problems.to_pylist():
        print(" ", row)


if __name__ == "__main__":
    main()
