"""One-prompt query latency against the bare read of the vectors it scans (issue 9, item 5).

A database with a real model (the testbed's generated fact world, a model trained on it, its
TrackStar gradients and R: the `trackstar-db demo` flow up to `fit`) is built once in --workdir
and reused. Printed side by side in one run, per rung:

    read    bare sequential read of the rung's gradient column (warm page cache): the limit
    warm    Database.query(prompt, target, method=rung) in a process that has answered before
            (featurizing the prompt included); goal: at most 1.5 x read
    cold    `trackstar-db query DB --prompt P --target T --method rung` as a fresh process
            (interpreter, imports, checkpoint load, featurizing, scan, texts); goal: at most
            read + 1.5 s

plus `python -c pass`, `trackstar-db --help` and loading the database's model with transformers in
a fresh process (importing torch, transformers and the model's class, reading its weights: what any
cold gradient query must do before trackstar-db's own work) as the floor of a cold command; the
last column is what a cold query costs beyond that floor and the read.

    python benchmarks/bench_query.py                         # demo world (5,426 sentences), builds in minutes
    python benchmarks/bench_query.py --size tiny --repeats 3 # a few hundred sentences: a smoke test
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

RUNGS = ("grad-dot", "grad-cos", "trak", "opt-cos", "r-train", "trackstar")
CLI = [str(Path(sys.executable).with_name("trackstar-db"))]  # the installed entry point, as a user runs it


def build(workdir: Path, size: str, dim: int) -> Path:
    """The database at workdir/db (built when missing): world, corpus, facts, model, gradients, R."""
    from trackstar_db.gradients.fit import fit
    from trackstar_db.gradients.worker import GradientJob, ingest_gradients
    from trackstar_db.sources.corpus import ingest_corpus
    from trackstar_db.sources.facts import ingest_facts
    from trackstar_db.api import Database
    from trackstar_db.testbed.model import train_testbed
    from trackstar_db.testbed.world import generate_world

    path = workdir / "db"
    if (path / "manifest.json").exists() and (path / ".bench-complete").exists():
        return path
    shutil.rmtree(workdir, ignore_errors=True)
    world = generate_world(workdir / "world", size=size)
    db = Database.create(path)
    ingest_corpus(db, [world.sentences_path], progress=False)
    ingest_facts(db, [world.facts_path], progress=False)
    train_testbed(db, workdir / "model", {} if size == "demo" else {"epochs": 10}, progress=False)
    for split in ("train", "queries"):
        ingest_gradients(db, {"dim": dim}, GradientJob(split, batch_size=32), progress=False)
    fit(db)
    (path / ".bench-complete").write_text("built by benchmarks/bench_query.py\n")
    return path


def bare_read(db, variant: str) -> tuple[float, int]:
    """Seconds of the second of two sequential reads of the gradient column, and its bytes."""
    dataset = db.gradient_table("train", corrected=variant == "corrected").dataset()
    for _ in range(2):
        start, total = time.perf_counter(), 0
        for batch in dataset.to_batches(columns=["vector"]):
            total += batch.column(0).values.nbytes
        seconds = time.perf_counter() - start
    return seconds, total


def timed(call, repeats: int) -> float:
    """Median seconds of `repeats` calls."""
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        call()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workdir", type=Path, default=Path("bench-query"))
    parser.add_argument("--size", default="demo", choices=["demo", "tiny"])
    parser.add_argument("--dim", type=int, default=4096)
    parser.add_argument("--repeats", type=int, default=5, help="warm queries per rung (median)")
    parser.add_argument("--cold-repeats", type=int, default=3, help="cold CLI queries per rung (median)")
    parser.add_argument("--rungs", default=",".join(RUNGS))
    args = parser.parse_args()
    threads = os.environ.get("BENCH_THREADS")
    env = dict(os.environ, **({"OMP_NUM_THREADS": threads} if threads else {}))
    import torch

    if threads:
        torch.set_num_threads(int(threads))
    from trackstar_db import connect
    from trackstar_db.retrieval.methods import get_method

    path = build(args.workdir, args.size, args.dim)
    db = connect(path)
    first = db.table("queries", columns=["prompt", "target"]).slice(0, 1).to_pylist()[0]
    prompt, target = first["prompt"], first["target"]
    model = db.model_info()
    load_model = ("import torch; from transformers import AutoModelForCausalLM, AutoTokenizer; "
                  f"AutoModelForCausalLM.from_pretrained({model['path']!r}, local_files_only=True); "
                  f"AutoTokenizer.from_pretrained({model['tokenizer']!r}, local_files_only=True)")
    floor = {"python -c pass": [sys.executable, "-c", "pass"], "trackstar-db --help": CLI + ["--help"],
             "load the model (torch, transformers)": [sys.executable, "-c", load_model]}
    print(f"{path}: {db.count('examples'):,} examples; prompt {prompt!r} -> {target!r}; "
          f"torch threads {torch.get_num_threads()}; load average {os.getloadavg()[0]:.2f}")
    floors = {}
    for name, command in floor.items():
        floors[name] = timed(lambda: subprocess.run(command, env=env, capture_output=True, check=True), args.cold_repeats)
        print(f"{name:36} {floors[name]:6.2f} s (cold process)")
    load = floors["load the model (torch, transformers)"]
    print(f"{'rung':10} {'MB':>6} {'read s':>7} {'warm s':>7} {'warm/read':>9} {'cold s':>7} {'cold-read s':>11} "
          f"{'cold-read-model s':>17}")
    for rung in filter(None, args.rungs.split(",")):
        read, nbytes = bare_read(db, get_method(rung).table)
        db.query(prompt, target, method=rung)  # loads the featurizer, R, the page cache
        warm = timed(lambda: db.query(prompt, target, method=rung), args.repeats)
        command = CLI + ["query", str(path), "--prompt", prompt, "--target", target, "--method", rung,
                         "--device", "cpu", "--format", "json"]
        cold = timed(lambda: subprocess.run(command, env=env, capture_output=True, check=True), args.cold_repeats)
        print(f"{rung:10} {nbytes / 1e6:6.0f} {read:7.3f} {warm:7.3f} {warm / read:9.2f} {cold:7.2f} {cold - read:11.2f} "
              f"{cold - read - load:17.2f}", flush=True)
    print(f"load average after: {os.getloadavg()[0]:.2f}")


if __name__ == "__main__":
    main()
