"""TracIn-CP against final-checkpoint TrackStar on a generated world (the demo flow plus kept checkpoints).

    python benchmarks/tracin_cp_world.py WORKDIR [tiny|demo] [checkpoints=3] [dim=4096] [methods,...] [tail-patch queries]

Trains the testbed model keeping intermediate checkpoints, featurizes the final checkpoint and
then each kept one into its own gradient tables (`ingest gradients --checkpoint NAME`), fits R,
retrieves with grad-dot, grad-cos, opt-cos, trackstar and the three tracin-cp variants (summed
over the stored per-checkpoint tables), tail-patches their top 10, and prints the table.
"""
import shutil
import sys
import time
from pathlib import Path

import torch

torch.set_num_threads(1)

from trackstar_db.report.analysis import evaluation  # noqa: E402
from trackstar_db.evaluation.sql import format_table  # noqa: E402
from trackstar_db.gradients.fit import fit  # noqa: E402
from trackstar_db.gradients.worker import GradientJob, ingest_gradients  # noqa: E402
from trackstar_db.retrieval.runs import RetrieveOptions, retrieve  # noqa: E402
from trackstar_db.sources.corpus import ingest_corpus  # noqa: E402
from trackstar_db.sources.facts import ingest_facts  # noqa: E402
from trackstar_db.store.checkpoints import kept  # noqa: E402
from trackstar_db.api import Database  # noqa: E402
from trackstar_db.tailpatch.runs import tail_patch_runs  # noqa: E402
from trackstar_db.testbed.model import train_testbed  # noqa: E402
from trackstar_db.testbed.world import generate_world  # noqa: E402

work = Path(sys.argv[1])
size = sys.argv[2] if len(sys.argv) > 2 else "tiny"
n_checkpoints = int(sys.argv[3]) if len(sys.argv) > 3 else 3
dim = int(sys.argv[4]) if len(sys.argv) > 4 else 4096
shutil.rmtree(work, ignore_errors=True)
start = time.perf_counter()
world = generate_world(work / "world", seed=0, size=size)
db = Database.create(work / "db")
ingest_corpus(db, [world.sentences_path], progress=False)
ingest_facts(db, [world.facts_path], progress=False)
train_testbed(db, work / "model", {"seed": 0} if size == "demo" else {"seed": 0, "epochs": 10}, progress=False,
              checkpoints=n_checkpoints)
print(f"[{time.perf_counter() - start:.0f} s] trained", flush=True)
for point in [None] + [p.name for p in kept(work / "model")[:-1]]:  # the final checkpoint first
    for split in ("train", "queries"):
        ingest_gradients(db, {"dim": dim}, GradientJob(split, batch_size=32, checkpoint=point), progress=False)
print(f"[{time.perf_counter() - start:.0f} s] featurized {n_checkpoints} + 1 checkpoints", flush=True)
fit(db)
methods = ["grad-dot", "grad-cos", "opt-cos", "trackstar", "tracin-cp", "tracin-cp-cos", "tracin-cp-opt"]
if len(sys.argv) > 5:
    methods = sys.argv[5].split(",")
max_queries = int(sys.argv[6]) if len(sys.argv) > 6 else None
for method in methods:
    retrieve(db, method, RetrieveOptions(k=100))
    print(f"[{time.perf_counter() - start:.0f} s] {method}", flush=True)
tail_patch_runs(db, methods, k=10, max_queries=max_queries)
print(f"[{time.perf_counter() - start:.0f} s] done", flush=True)
print(format_table(evaluation(db), "table"))
