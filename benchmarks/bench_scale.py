"""Attribution at corpus scale on one machine: every step of a synthetic build, side by side.

A synthetic database (trackstar_db/testbed/synthetic.py: N rows of d-dim vectors per gradient
table, written through GradientTable.create + Database.append) gets R fitted (gradients/fit.py)
and an ANN index (retrieval/ann.py). Each step runs in a fresh subprocess that reports its
seconds and its peak RSS (resource.getrusage). Printed in one run:

    write          rows/s and GB/s through the project's write path
    fit            the three R fits and their whitened row norms
    read           bare sequential read of the vector column (GB/s: the limit of any scan)
    scan <rung>    one exact query per rung, warm: seconds, GB/s, ratio to the read
    retrieve       a stored trackstar run over all queries (k=100), as `retrieve` does it
    index          ANN index build (materialise + LanceDB index), seconds
    ann            single-query latency (proponents and opponents: one query of `query --ann`) in a
                   warm process, each query's first search and the same search repeated (Lance's
                   index cache then holds its partitions), recall@10/@100 against exact

    python benchmarks/bench_scale.py                      # N=20,000, d=4,096 float16: minutes on 2 cores
    python benchmarks/bench_scale.py --n 1000000 --workdir /big/disk   # the 1M case (16 GB of tables + 8 GB ANN)

The database is kept in --workdir (delete it after; --reuse skips write and fit when it exists).
`--rates benchmarks/rates.json` writes the rates `trackstar-db plan` divides by into that file
(the entries this run measured, each with its command, machine, date and load).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import subprocess
import sys
import time
from pathlib import Path

RUNGS = ("grad-dot", "grad-cos", "trak", "opt-cos", "r-train", "trackstar")
# search settings per index kind (retrieval/ann.py; measured figures in docs/scale.md)
ANN_SETTINGS = {
    "ivf_pq": ({"nprobes": 4, "refine_factor": 3}, {"nprobes": 8, "refine_factor": 5}, {"nprobes": 8, "refine_factor": 10},
               {"nprobes": 16, "refine_factor": 10}),
    "ivf_rq": ({"nprobes": 2, "refine_factor": 2}, {"nprobes": 2, "refine_factor": 3}, {"nprobes": 4, "refine_factor": 3},
               {"nprobes": 8, "refine_factor": 5}),
    "ivf_hnsw_sq": ({"nprobes": 2, "ef": 150}, {"nprobes": 4, "ef": 300}, {"nprobes": 8, "ef": 600}),
    "ivf_flat": ({"nprobes": 4}, {"nprobes": 8}, {"nprobes": 16}),
}


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def query_ids(n: int) -> list[str]:
    return [f"q{i:06d}:prompt0" for i in range(n)]


# -- steps: each runs in its own process and returns a dict --------------------------------
def step_write(args) -> dict:
    from trackstar_db.testbed.synthetic import synthetic_database

    shutil.rmtree(args.db, ignore_errors=True)
    start = time.perf_counter()
    synthetic_database(args.db, args.n, args.dim, args.dtype, n_queries=args.queries,
                       n_blocks=args.dim // args.block, progress=False)
    seconds = time.perf_counter() - start
    stored = 2 * args.n * args.dim * (4 if args.dtype == "float32" else 2)
    return {"seconds": seconds, "rows/s": 2 * args.n / seconds, "GB/s": stored / seconds / 1e9}


def step_fit(args) -> dict:
    from trackstar_db import connect
    from trackstar_db.gradients.fit import fit

    start = time.perf_counter()
    fit(connect(args.db))
    return {"seconds": time.perf_counter() - start}


def _read(db) -> tuple[float, int]:
    dataset = db.gradient_table("train").dataset()
    start, total = time.perf_counter(), 0
    for batch in dataset.to_batches(columns=["vector"], batch_size=8192):
        total += batch.column(0).values.nbytes  # the buffer is read; nothing converted
    return time.perf_counter() - start, total


def step_read(args) -> dict:
    from trackstar_db import connect

    db = connect(args.db)
    _read(db)  # warm the page cache
    seconds, total = _read(db)
    return {"seconds": seconds, "GB/s": total / seconds / 1e9, "bytes": total}


def step_scan(args) -> dict:
    from trackstar_db import connect
    from trackstar_db.retrieval.methods import get_method
    from trackstar_db.retrieval.runners import stored_query_vectors
    from trackstar_db.retrieval.scoring import prepare, score_table

    db, spec = connect(args.db), get_method(args.rung)
    g = stored_query_vectors(db, spec, query_ids(1))
    scoring = prepare(db, spec)
    score_table(db, spec, g, 100, progress=False, scoring=scoring)  # warm: page cache, R powers
    start = time.perf_counter()
    score_table(db, spec, g, 100, progress=False, scoring=scoring)
    seconds = time.perf_counter() - start
    stored = scoring.table.count() * scoring.table.dim * (4 if scoring.table.dtype == "float32" else 2)
    return {"seconds": seconds, "GB/s": stored / seconds / 1e9}


def step_retrieve(args) -> dict:
    from trackstar_db import connect
    from trackstar_db.retrieval.runs import RetrieveOptions, retrieve

    start = time.perf_counter()
    retrieve(connect(args.db), args.retrieve_method, RetrieveOptions(k=100), run_id="bench", replace=True)
    return {"seconds": time.perf_counter() - start}


def step_index(args) -> dict:
    from trackstar_db import connect
    from trackstar_db.retrieval.ann_build import build_index

    start = time.perf_counter()
    entry = build_index(connect(args.db), "trackstar", args.kind, ef_construction=args.ef_construction, progress=False)
    return {"seconds": time.perf_counter() - start, "write_s": entry["write_seconds"],
            "index_s": entry["index_seconds"], "partitions": entry["params"]["num_partitions"]}


def step_ann(args) -> dict:
    import numpy as np

    from trackstar_db import connect
    from trackstar_db.retrieval.ann import AnnOptions, search_ann
    from trackstar_db.retrieval.methods import get_method
    from trackstar_db.retrieval.runners import stored_query_vectors
    from trackstar_db.retrieval.scoring import score_table

    db, spec = connect(args.db), get_method("trackstar")
    g = stored_query_vectors(db, spec, query_ids(args.queries))
    exact = score_table(db, spec, g, 100, progress=False)
    # the exact scan pushed the index out of the page cache; a process serving queries keeps it
    # there: read its files once (vectors, codes), as a warm server would have them
    for path in (args.db / "ann").rglob("*"):
        if path.is_file():
            with path.open("rb") as handle:
                while handle.read(1 << 24):
                    pass
    out = {}
    for setting in ANN_SETTINGS[args.kind]:
        options = AnnOptions(**setting)
        recall = {10: [], 100: []}
        seconds = {"first": [], "repeat": []}  # each query's first search with this setting, then again
        for row in range(len(g)):
            for times in seconds.values():
                start = time.perf_counter()
                hits = search_ann(db, "trackstar", g[row: row + 1], 100, options)
                times.append(time.perf_counter() - start)
            for k, found in recall.items():
                truth = set(exact.proponent_ids[row][:k])
                found.append(len(truth & set(hits.proponent_ids[0][:k])) / k)
        out[json.dumps(setting)] = {"ms": 1000 * float(np.median(seconds["repeat"])),
                                    "ms first": 1000 * float(np.median(seconds["first"])),
                                    "recall@10": float(np.mean(recall[10])), "recall@100": float(np.mean(recall[100]))}
    return out


STEPS = {"write": step_write, "fit": step_fit, "read": step_read, "scan": step_scan, "retrieve": step_retrieve,
         "index": step_index, "ann": step_ann}


def run_step(args, step: str, **extra) -> dict:
    """One step in a fresh interpreter; its result dict plus peak RSS (MB)."""
    command = [sys.executable, __file__, "--step", step, "--db", str(args.db), "--n", str(args.n),
               "--dim", str(args.dim), "--dtype", args.dtype, "--queries", str(args.queries),
               "--block", str(args.block), "--kind", args.kind, "--ef-construction", str(args.ef_construction),
               "--retrieve-method", args.retrieve_method]
    for key, value in extra.items():
        command += [f"--{key}", str(value)]
    done = subprocess.run(command, capture_output=True, text=True, check=False)
    if done.returncode != 0:
        raise SystemExit(f"step {step} failed:\n{done.stderr[-3000:]}")
    result = json.loads(done.stdout.strip().splitlines()[-1])
    result["load"] = os.getloadavg()[0]  # 1-minute load average as the step ends (a shared machine)
    return result


def machine() -> str:
    """This machine in words: CPU model, cores, memory."""
    model = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                  if line.startswith("model name")), "unknown CPU") if Path("/proc/cpuinfo").exists() else "unknown CPU"
    memory = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
    return f"{os.cpu_count()} cores, {memory:.0f} GB ({model})"


def write_rates(path: Path, args, results: dict) -> None:
    """Merge the rates this run measured into the rates file the cost plan reads."""
    rates = json.loads(path.read_text()) if path.exists() else {}
    stamp = {"command": " ".join([f"BENCH_THREADS={os.environ.get('BENCH_THREADS', '')}", "python", *sys.argv]),
             "machine": machine(), "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
             "load": " ".join(f"{x:.1f}" for x in os.getloadavg())}
    loads = [r["load"] for r in results.values() if isinstance(r, dict) and "load" in r]
    stamp["load"] = f"{min(loads):.1f}-{max(loads):.1f}" if loads else stamp["load"]
    if "read" in results and results["scans"]:
        scan = dict(rates.get("scan", {}), **stamp, dim=args.dim, block=args.block, read_gbps=round(results["read"]["GB/s"], 3),
                    scan_gbps={rung: round(r["GB/s"], 3) for rung, r in results["scans"].items()})
        if "write" in results:
            scan["write_gbps"] = round(results["write"]["GB/s"], 4)
        if "fit" in results:
            scan["fit_seconds_per_row"] = results["fit"]["seconds"] / args.n
            scan.pop("note", None)
        rates["scan"] = scan
    default = json.dumps({"nprobes": 4, "refine_factor": 3})
    if "index" in results and default in results.get("ann", {}):
        rates["ann"] = dict(rates.get("ann", {}), **stamp, dim=args.dim,
                            ann_build_rows_per_s=round(args.n / results["index"]["seconds"]),
                            ann_query_s=round(results["ann"][default]["ms"] / 1000, 4))
    path.write_text(json.dumps(rates, indent=2) + "\n")
    print(f"rates written to {path}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=20_000, help="training rows")
    parser.add_argument("--dim", type=int, default=4096)
    parser.add_argument("--dtype", default="float16", choices=["float16", "bfloat16", "float32"])
    parser.add_argument("--queries", type=int, default=32)
    parser.add_argument("--block", type=int, default=256, help="block size of the block-diagonal R")
    parser.add_argument("--kind", default="ivf_rq", choices=sorted(ANN_SETTINGS), help="ANN index kind")
    parser.add_argument("--ef-construction", type=int, default=300, help="HNSW build candidate list size")
    parser.add_argument("--workdir", type=Path, default=Path("bench-scale"))
    parser.add_argument("--reuse", action="store_true", help="keep an existing database (skip write and fit)")
    parser.add_argument("--skip", default="", help="comma-separated steps to skip (e.g. index,ann)")
    parser.add_argument("--rungs", default=",".join(RUNGS), help="comma-separated rungs to scan (without a fit: "
                        "grad-dot,grad-cos,opt-cos, the rungs without R)")
    parser.add_argument("--retrieve-method", default="trackstar", help="the method of the retrieve step")
    parser.add_argument("--rates", type=Path, default=None, help="merge the measured rates into this file "
                        "(benchmarks/rates.json: what 'trackstar-db plan' reads)")
    parser.add_argument("--step", help=argparse.SUPPRESS)
    parser.add_argument("--db", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--rung", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.step:
        import torch

        torch.set_num_threads(int(os.environ.get("BENCH_THREADS", torch.get_num_threads())))
        result = STEPS[args.step](args)
        result["peak_rss_mb"] = peak_rss_mb()
        print(json.dumps(result))
        return
    args.db = args.workdir / f"db-{args.n}-{args.dim}-{args.dtype}"
    skip = set(filter(None, args.skip.split(",")))
    print(f"N={args.n:,} d={args.dim} {args.dtype}, {args.queries} queries, R blocks of {args.block}, "
          f"index {args.kind}, {os.cpu_count()} CPUs; database {args.db}")
    results = {}
    reuse = args.reuse and (args.db / "manifest.json").exists()
    for step in ("write", "fit"):
        if reuse or step in skip:
            continue
        results[step] = run_step(args, step)
        print(f"{step:10} {results[step]['seconds']:9.1f} s   peak RSS {results[step]['peak_rss_mb']:8.0f} MB"
              + (f"   {results[step]['GB/s']:.3f} GB/s written" if step == "write" else "")
              + f"   load {results[step]['load']:.1f}", flush=True)
    read = run_step(args, "read")
    print(f"{'read':10} {read['seconds']:9.3f} s   peak RSS {read['peak_rss_mb']:8.0f} MB   "
          f"{read['GB/s']:.2f} GB/s bare sequential read of {read['bytes'] / 1e9:.2f} GB   load {read['load']:.1f}",
          flush=True)
    results["read"], results["scans"] = read, {}
    print(f"{'rung':10} {'1 query s':>9}   {'peak RSS MB':>11}   {'GB/s':>6}   {'vs read':>7}   {'load':>5}")
    for rung in filter(None, args.rungs.split(",")):
        scan = results["scans"][rung] = run_step(args, "scan", rung=rung)
        print(f"{rung:10} {scan['seconds']:9.3f}   {scan['peak_rss_mb']:11.0f}   {scan['GB/s']:6.2f}   "
              f"{scan['GB/s'] / read['GB/s']:7.2f}   {scan['load']:5.1f}", flush=True)
    if "retrieve" not in skip:
        r = run_step(args, "retrieve")
        print(f"retrieve {args.retrieve_method}, {args.queries} queries, k=100: {r['seconds']:.1f} s, peak RSS {r['peak_rss_mb']:.0f} MB, "
              f"load {r['load']:.1f}",
              flush=True)
    if "index" not in skip:
        index = results["index"] = run_step(args, "index")
        print(f"index {args.kind}: {index['seconds']:.1f} s ({index['write_s']:.1f} s materialise, "
              f"{index['index_s']:.1f} s LanceDB index, {index['partitions']} partitions), "
              f"peak RSS {index['peak_rss_mb']:.0f} MB, load {index['load']:.1f}", flush=True)
    if "ann" not in skip:
        ann = run_step(args, "ann")
        rss, load = ann.pop("peak_rss_mb"), ann.pop("load")
        results["ann"] = ann
        for setting, row in ann.items():
            print(f"ann {setting:28} {row['ms first']:7.1f} ms/query first, {row['ms']:6.1f} repeated   "
                  f"recall@10 {row['recall@10']:.3f}   recall@100 {row['recall@100']:.3f}")
        print(f"ann step peak RSS {rss:.0f} MB (exact reference scan included), load {load:.1f}")
    if args.rates:
        write_rates(args.rates, args, results)


if __name__ == "__main__":
    main()
