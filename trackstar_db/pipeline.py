"""Multi-step flows over a database: training the testbed model, scoring its predictions, the demo.

Each step is a library call the CLI also exposes one by one; this module only chains them.
"""

from __future__ import annotations

import time
from pathlib import Path

import pyarrow as pa
import pyarrow.compute  # noqa: F401  (pa.compute)
import torch
from click import echo

from .errors import TrackstarError
from .tokenize import collate, encode_query, pad_id, per_example_loss


@torch.no_grad()
def score_predictions(db, batch_size: int = 64) -> pa.Table:
    """Write the predictions table: greedy correctness and P(target | prompt) of every query."""
    from .train import fact_accuracy

    model, tokenizer = db.load_model()
    queries = db.table("queries", columns=["query_id", "prompt", "target"])
    ids = queries.column("query_id").to_pylist()
    prompts, targets = queries.column("prompt").to_pylist(), queries.column("target").to_pylist()
    correct = fact_accuracy(model, tokenizer, prompts, targets, batch_size)
    probabilities = []
    for first in range(0, len(ids), batch_size):
        items = [encode_query(tokenizer, p, t) for p, t in zip(prompts[first:first + batch_size],
                                                               targets[first:first + batch_size])]
        batch = collate(items, pad_id(tokenizer))
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        loss, n_tokens = per_example_loss(logits, batch["labels"])
        probabilities += torch.exp(-(loss * n_tokens).double()).tolist()
    table = pa.table({"query_id": ids, "correct": correct, "p_target": probabilities})
    db.replace("predictions", table)
    return table


ACCURACY_SQL = """
SELECT f.frequency_bucket, count(*) AS n_queries, round(avg(p.correct::INT), 3) AS accuracy,
       round(avg(p.p_target), 3) AS mean_p_target
FROM predictions p JOIN queries q USING (query_id) JOIN facts f USING (fact_id)
WHERE q.template = 'prompt0'
GROUP BY ALL ORDER BY f.frequency_bucket
"""


def accuracy_by_bucket(db) -> pa.Table:
    """Accuracy of the model on prompt0 queries, by fact frequency bucket."""
    import duckdb

    con = duckdb.connect()
    for name in ("predictions", "queries", "facts"):
        con.register(name, db.table(name))
    return con.sql(ACCURACY_SQL).to_arrow_table()


def train_testbed(db, out_dir: Path, overrides: dict | None = None, progress: bool = True) -> pa.Table | None:
    """Train the testbed model on the examples, record it in the manifest, score the queries."""
    from .train import TrainConfig, train_model

    texts = db.table("examples", columns=["text"]).column("text").to_pylist()
    if not texts:
        raise TrackstarError(f"{db.path}: no examples to train on; run 'trackstar-db ingest corpus' first")
    result = train_model(texts, out_dir, TrainConfig(**(overrides or {})), progress=progress)
    db.set_model(out_dir)
    echo(f"trained {result.steps} steps in {result.wall_time_s:.0f} s: loss {result.first_loss:.3f} -> "
         f"{result.final_loss:.3f}; model {db.manifest['model']['fingerprint']} saved to {out_dir}")
    if db.count("queries") == 0:
        return None
    score_predictions(db)
    return accuracy_by_bucket(db)


def evaluation(db, by: str = "method") -> pa.Table:
    """The method-by-metric table from queries/*.sql; by='bucket' or 'correct' splits each method's row."""
    from .evaluate import run_sql_file

    names = {"method": "summary.sql", "bucket": "summary_by_bucket.sql", "correct": "summary_by_correct.sql"}
    if by not in names:
        raise TrackstarError(f"--by must be one of {', '.join(names)}, not {by!r}")
    views = db.views()
    tables = {name: views[name] for name in ("retrievals", "ground_truth", "facts", "tail_patch", "runs",
                                             "model_correct")}
    # Evaluate the queries some run retrieved for (e.g. the prompt0 ones), not every template.
    retrieved = pa.array(sorted(set(db.table("retrievals", columns=["query_id"]).column("query_id").to_pylist())),
                         pa.string())
    queries = db.table("queries")
    tables["queries"] = queries.filter(pa.compute.is_in(queries.column("query_id"), retrieved))
    return run_sql_file(names[by], tables)


def import_run(db, path: Path, method: str, run_id: str) -> int:
    """Load a viewer-format results file as a run; unknown queries and examples are added too."""
    from .viewer_format import import_viewer

    if run_id in db.ids("runs", "run_id"):
        raise TrackstarError(f"run {run_id!r} exists; pick another --run name")
    imported = import_viewer(path, method, run_id)
    for name, key, rows in (("queries", "query_id", imported.queries), ("examples", "example_id", imported.examples)):
        have = db.ids(name, key)
        fresh = [i for i, value in enumerate(rows.column(key).to_pylist()) if value not in have]
        db.append(name, rows.take(pa.array(fresh, pa.int64())))
    db.append("retrievals", imported.retrievals)
    db.record_run(run_id, method, {"imported_from": str(path)})
    return imported.retrievals.num_rows


def write_db_report(db, out_dir: Path, compare: tuple[str, str] | None = None, n_samples: int = 8) -> Path:
    """The static HTML report of a database: summary, per-bucket plots, two runs side by side."""
    from .report import build_samples, write_report

    runs = db.ids("runs", "run_id")
    if not runs:
        raise TrackstarError(f"{db.path}: no retrieval runs to report; run 'trackstar-db retrieve' first")
    if compare is None:
        preferred = [r for r in ("trackstar", "bm25", "grad-dot") if r in runs]
        compare = tuple((preferred + sorted(runs - set(preferred)))[:2])
    missing = [r for r in compare if r not in runs]
    if missing:
        raise TrackstarError(f"no run {missing[0]!r}; runs: {', '.join(sorted(runs))}")
    samples = build_samples(db.dataset("retrievals"), db.dataset("queries"), db.dataset("examples"),
                            db.dataset("ground_truth"), list(compare), n=n_samples)
    return write_report(out_dir, evaluation(db), samples, by_bucket=evaluation(db, "bucket"))


DEMO_MARKER = ".trackstar-demo"


def run_demo(workdir: Path, size: str = "demo", seed: int = 0, tail_patch_queries: int | None = None,
             dim: int = 4096) -> pa.Table:
    """The whole flow on the generated fact world: returns the method-by-metric table."""
    import shutil

    from .corpus import ingest_corpus
    from .database import Database
    from .facts import ingest_facts
    from .featurizer.config import FeaturizerConfig
    from .fit import fit
    from .gradients import GradientJob, ingest_gradients
    from .influence import tail_patch_runs
    from .retrieval import embedding
    from .retrieve import RetrieveOptions, retrieve
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
    config = FeaturizerConfig(dim=dim, correction="adam-factored")
    for split in ("train", "queries"):
        ingest_gradients(db, config, GradientJob(split, batch_size=32))
    step("fitting R_train and the task-specific mixed R")
    for name, params in fit(db).items():
        echo(f"  {name}: lambda={params['lambda']:.3f}")
    methods = ["bm25"] + (["embedding"] if embedding.available() else []) + \
              ["grad-dot", "grad-cos", "trak", "opt-cos", "r-train", "trackstar"]
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


def format_accuracy(table: pa.Table) -> str:
    from .sql import format_table

    return "model accuracy on prompt0 queries by frequency bucket:\n" + format_table(table, "table")
