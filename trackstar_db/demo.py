"""`trackstar-db demo`: the whole flow on a generated fact world, in one call.

world (testbed/world.py) -> database -> corpus and facts -> testbed model -> gradients -> R ->
every retrieval method -> tail-patch -> the method-by-metric table and the HTML report. Each
step is a verb of the handle (api.py) that the CLI also exposes one by one; this module only
chains them.

`full=True` (`trackstar-db demo --full`) adds the line of work around TrackStar, which does not
fit the plain demo's 5 minutes on 2 cores: training keeps FULL_CHECKPOINTS intermediate
checkpoints, each is featurized into its own gradient tables (`ingest gradients --checkpoint`),
the TracIn-CP methods score from those stored tables and are tail-patched like the rest, and
Simfluence records SIMFLUENCE short runs, evaluates on the held-out ones (printed) and puts a
probe's recorded vs simulated loss in the report (simfluence/evaluate.py).
"""

from __future__ import annotations

import shutil
import time
from pathlib import Path

import pyarrow as pa
from click import echo

from trackstar_db import defaults
from trackstar_db.api import Database
from trackstar_db.errors import ParameterError
from trackstar_db.evaluation.sql import format_table
from trackstar_db.ladder import CHECKPOINT_METHODS
from trackstar_db.retrieval.methods import expand, not_installed
from trackstar_db.store.checkpoints import kept
from trackstar_db.testbed.model import format_accuracy
from trackstar_db.testbed.world import generate_world

DEMO_MARKER = ".trackstar-demo"
FULL_CHECKPOINTS = 3
SIMFLUENCE = {"runs": 8, "steps": 40, "probes": 32}  # 6 runs fit, 2 held out (eval --holdout 0.25)


def run_demo(workdir: Path, size: str = "demo", seed: int = 0, tail_patch_queries: int | None = None,
             dim: int = defaults.DIM, full: bool = False, simfluence: bool | None = None) -> pa.Table:
    """The whole flow on the generated fact world: returns the method-by-metric table.
    simfluence: record and evaluate Simfluence runs (default: with `full`)."""
    workdir = Path(workdir)
    if workdir.exists() and any(workdir.iterdir()):
        if not (workdir / DEMO_MARKER).exists():
            raise ParameterError("workdir", f"{workdir}: not empty and not a trackstar-db demo directory; pick another")
        shutil.rmtree(workdir)
    workdir.mkdir(parents=True)
    (workdir / DEMO_MARKER).write_text("made by trackstar-db demo; rebuilt on every run\n")
    started = time.perf_counter()

    def step(message: str) -> None:
        echo(f"[{time.perf_counter() - started:6.1f} s] {message}")

    step(f"generating the {size} fact world (seed {seed})")
    world = generate_world(workdir / "world", seed=seed, size=size)
    db = Database.create(workdir / "db")
    db.ingest_corpus([world.sentences_path])
    db.ingest_facts([world.facts_path])
    step(f"{db.count('examples'):,} examples, {db.count('facts'):,} facts, {db.count('queries'):,} queries; training")
    accuracy = db.train(workdir / "model", seed=seed, epochs=None if size == "demo" else 10,
                        checkpoints=FULL_CHECKPOINTS if full else 0)
    echo(format_accuracy(accuracy))
    step("featurizing training examples and queries (TrackStar gradients)")
    for split in ("train", "queries"):  # correction auto: the AdamW state saved with the model
        db.ingest_gradients(split, dim=dim, batch_size=32)
    if full:
        for point in kept(workdir / "model")[:-1]:
            step(f"featurizing checkpoint {point.name} (lr {point.lr:.2g}) for TracIn-CP")
            for split in ("train", "queries"):
                db.ingest_gradients(split, batch_size=32, checkpoint=point.name)
    step(f"fitting R_train and the task-specific mixed R "
         f"(correction: {db.manifest['featurizer']['correction_source'].split(';')[0]})")
    for name, params in db.fit().preconditioners.items():
        echo(f"  {name}: lambda={params['lambda']:.3f}")
    methods = expand(["all"]) + (list(CHECKPOINT_METHODS) if full else [])
    for left in not_installed():
        echo(f"  ({left.name} baseline skipped: pip install 'trackstar-db[{left.extra}]' to add it)")
    step(f"retrieving with {', '.join(methods)}")
    for method in methods:
        db.retrieve(method)
    step(f"tail-patching the top-10 proponents of {tail_patch_queries or 'all'} queries per method")
    db.tail_patch(methods, max_queries=tail_patch_queries)
    if full if simfluence is None else simfluence:
        step(f"Simfluence: recording {SIMFLUENCE['runs']} runs of {SIMFLUENCE['steps']} steps from scratch, "
             f"{SIMFLUENCE['probes']} probes; fit on the first, simulate the held-out ones (eval --holdout 0.25)")
        db.simfluence_record(**SIMFLUENCE)
        held_out = db.simfluence_evaluate()
        echo(format_table(held_out, "table"))
    step("evaluating (queries/summary.sql)")
    summary = db.evaluate()
    report = db.write_report(workdir / "report")
    step(f"done; database {db.path}, report {report}")
    return summary

