"""The testbed model: train it on a database's examples, record it, and score its answers.

`train_testbed` trains (train.py) and records the checkpoint in the manifest; `score_predictions`
fills the predictions table (greedy correctness and P(target | prompt) per query), which the
evaluation SQL uses to split results by whether the model knows the fact.
"""

from __future__ import annotations

from pathlib import Path

import pyarrow as pa
import torch
from click import echo

from trackstar_db import defaults
from trackstar_db.errors import ParameterError, TrackstarError
from trackstar_db.featurizer.tokenize import (
    collate,
    encode_query,
    pad_id,
)
from trackstar_db.featurizer.task import per_example_loss
from .train import TrainConfig, fact_accuracy, train_model
from trackstar_db.models.load import open_model
from trackstar_db.option_checks import holds_model, outside_database
from trackstar_db.store.checkpoints import source


@torch.no_grad()
def score_predictions(db, batch_size: int = 64) -> pa.Table:
    """Write the predictions table: greedy correctness and P(target | prompt) of every query."""
    model, tokenizer = open_model(source(db).with_dtype("float32"))
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


ACCURACY_SQL = f"""
SELECT f.frequency_bucket, count(*) AS n_queries, round(avg(p.correct::INT), 3) AS accuracy,
       round(avg(p.p_target), 3) AS mean_p_target
FROM predictions p JOIN queries q USING (query_id) JOIN facts f USING (fact_id)
WHERE q.template = '{defaults.TEMPLATE}'
GROUP BY ALL ORDER BY f.frequency_bucket
"""


def accuracy_table(db) -> pa.Table:
    """Accuracy of the model on prompt0 queries, by fact frequency bucket."""
    from trackstar_db.evaluation.sql import ReadOnlySQL  # heavy: duckdb

    with ReadOnlySQL(db.views()) as con:
        return con.run(ACCURACY_SQL)


def train_testbed(db, out_dir: Path, overrides: dict | None = None, progress: bool | None = None,
                  checkpoints: int = 0, overwrite: bool = False) -> pa.Table | None:
    """Train the testbed model on the examples, record it in the manifest, score the queries
    (checkpoints > 0: also keep that many intermediate checkpoints, for TracIn-CP)."""
    outside_database("out_dir", out_dir)
    if holds_model(out_dir) and not overwrite:
        raise ParameterError("out_dir", f"{out_dir} already holds a model (config.json or weights); choose another "
                                        "out_dir, or overwrite to replace it", others=("out_dir", "overwrite"))

    if db.manifest["gradient_tables"]:
        raise TrackstarError(f"{db.path}: holds gradients of model {db.manifest['model']['fingerprint']}; "
                             "training another model would orphan them - use a new database")
    texts = db.table("examples", columns=["text"]).column("text").to_pylist()
    if not texts:
        raise TrackstarError(f"{db.path}: no examples to train on; run 'trackstar-db ingest corpus' first")
    result = train_model(texts, out_dir, TrainConfig(**(overrides or {})), progress=progress, checkpoints=checkpoints)
    db.set_model(out_dir)
    echo(f"trained {result.steps} steps in {result.wall_time_s:.0f} s: loss {result.first_loss:.3f} -> "
         f"{result.final_loss:.3f}; model {db.manifest['model']['fingerprint']} saved to {out_dir}")
    if db.count("queries") == 0:
        return None
    score_predictions(db)
    return accuracy_table(db)


def format_accuracy(table: pa.Table) -> str:
    from trackstar_db.evaluation.sql import format_table  # heavy: duckdb

    return "model accuracy on prompt0 queries by frequency bucket:\n" + format_table(table, "table")
