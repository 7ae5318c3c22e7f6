"""`trackstar-db demo`: the whole flow on a generated fact world, in one call.

world (world.py) -> database -> corpus and facts -> testbed model -> gradients -> R -> every
retrieval method -> tail-patch -> the method-by-metric table and the HTML report. Each step is
the library call the CLI also exposes one by one; this module only chains them.
"""

from __future__ import annotations

import time
from pathlib import Path

import pyarrow as pa
from click import echo

from trackstar_db.errors import TrackstarError

DEMO_MARKER = ".trackstar-demo"


def run_demo(workdir: Path, size: str = "demo", seed: int = 0, tail_patch_queries: int | None = None,
             dim: int = 4096) -> pa.Table:
    """The whole flow on the generated fact world: returns the method-by-metric table."""
    import shutil

    from trackstar_db.evaluation.analysis import evaluation, write_db_report
    from trackstar_db.gradients.fit import fit
    from trackstar_db.gradients.worker import GradientJob, ingest_gradients
    from trackstar_db.retrieval.methods import expand
    from trackstar_db.retrieval.runs import RetrieveOptions, retrieve
    from trackstar_db.sources.corpus import ingest_corpus
    from trackstar_db.sources.facts import ingest_facts
    from trackstar_db.api import Database
    from trackstar_db.tailpatch.runs import tail_patch_runs

    from .model import format_accuracy, train_testbed
    from .world import generate_world

    workdir = Path(workdir)
    if workdir.exists() and any(workdir.iterdir()):
        if not (workdir / DEMO_MARKER).exists():
            raise TrackstarError(f"{workdir}: not empty and not a trackstar-db demo directory; pick another --workdir")
        shutil.rmtree(workdir)
    workdir.mkdir(parents=True)
    (workdir / DEMO_MARKER).write_text("made by trackstar-db demo; rebuilt on every run\n")
    started = time.perf_counter()

    def step(message: str) -> None:
        echo(f"[{time.perf_counter() - started:6.1f} s] {message}")

    step(f"generating the {size} fact world (seed {seed})")
    world = generate_world(workdir / "world", seed=seed, size=size)
    db = Database.create(workdir / "db")
    ingest_corpus(db, [world.sentences_path])
    ingest_facts(db, [world.facts_path])
    step(f"{db.count('examples'):,} examples, {db.count('facts'):,} facts, {db.count('queries'):,} queries; training")
    overrides = {"seed": seed} if size == "demo" else {"seed": seed, "epochs": 10}
    accuracy = train_testbed(db, workdir / "model", overrides)
    echo(format_accuracy(accuracy))
    step("featurizing training examples and queries (TrackStar gradients)")
    for split in ("train", "queries"):  # correction auto: the AdamW state saved with the model
        ingest_gradients(db, {"dim": dim}, GradientJob(split, batch_size=32))
    step(f"fitting R_train and the task-specific mixed R "
         f"(correction: {db.manifest['featurizer']['correction_source'].split(';')[0]})")
    for name, params in fit(db).preconditioners.items():
        echo(f"  {name}: lambda={params['lambda']:.3f}")
    methods = expand(["all"])
    if "embedding" not in methods:
        echo("  (embedding baseline skipped: pip install 'trackstar-db[embedding]' to add it)")
    step(f"retrieving with {', '.join(methods)}")
    for method in methods:
        retrieve(db, method, RetrieveOptions(k=100))
    step(f"tail-patching the top-10 proponents of {tail_patch_queries or 'all'} queries per method")
    tail_patch_runs(db, methods, k=10, max_queries=tail_patch_queries)
    step("evaluating (queries/summary.sql)")
    summary = evaluation(db)
    report = write_db_report(db, workdir / "report")
    step(f"done; database {db.path}, report {report}")
    return summary
