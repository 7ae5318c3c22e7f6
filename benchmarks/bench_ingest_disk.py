"""Ingest of a datasets.save_to_disk directory against the same records as one JSON lines file:
rows per second and the peak resident memory of each run (a fresh process each), beside the
input's size on disk. Prompt/completion records, so the loss-span path is what is timed.

    python benchmarks/bench_ingest_disk.py --rows 100000 --batch-size 10000
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

CHILD = """
import json, resource, sys, time
from trackstar_db import Database
from trackstar_db.sources.corpus import CorpusOptions, ingest_corpus
db = Database.create(sys.argv[1])
start = time.perf_counter()
report = ingest_corpus(db, [sys.argv[2]], CorpusOptions(prompt_field="prompt", completion_field="completion",
                                                        batch_size=int(sys.argv[3])), progress=False)
print(json.dumps({"rows": report.added, "seconds": time.perf_counter() - start,
                  "peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}))
"""


def records(n: int):
    for i in range(n):
        yield {"id": f"r{i}", "prompt": f"Question {i}: which river runs past the mill number {i % 977}?",
               "completion": f"The river {i % 131} runs past mill {i % 977}, north of the town of {i % 53}."}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--rows", type=int, default=100_000)
    parser.add_argument("--batch-size", type=int, default=10_000)
    args = parser.parse_args()
    import datasets

    root = Path(tempfile.mkdtemp(prefix="bench_disk_"))
    jsonl = root / "pairs.jsonl"
    with jsonl.open("w") as handle:
        for record in records(args.rows):
            handle.write(json.dumps(record) + "\n")
    datasets.Dataset.from_generator(lambda: records(args.rows)).save_to_disk(str(root / "pairs"), num_shards=4)
    disk = sum(p.stat().st_size for p in (root / "pairs").glob("*.arrow"))
    env = dict(os.environ, OMP_NUM_THREADS="1")
    print(f"{args.rows:,} prompt/completion rows; JSONL {jsonl.stat().st_size / 2**20:.1f} MiB, "
          f"save_to_disk {disk / 2**20:.1f} MiB; batch {args.batch_size:,}; load: {os.getloadavg()[0]:.1f}")
    results = {}
    for name, source in (("jsonl", jsonl), ("save_to_disk", root / "pairs")):
        out = subprocess.run([sys.executable, "-c", CHILD, str(root / f"db_{name}"), str(source), str(args.batch_size)],
                             capture_output=True, text=True, env=env, check=True).stdout
        results[name] = json.loads(out.strip().splitlines()[-1])
        r = results[name]
        print(f"{name:<13} {r['rows'] / r['seconds']:>9,.0f} rows/s  peak RSS {r['peak_rss_mib']:,.0f} MiB")
    base, disk_run = results["jsonl"], results["save_to_disk"]
    print(f"ratio save_to_disk / jsonl: speed {base['seconds'] / disk_run['seconds']:.2f}x, "
          f"peak RSS {disk_run['peak_rss_mib'] / base['peak_rss_mib']:.2f}x")


if __name__ == "__main__":
    main()
