"""Commands for data curation: select (training data for a task) and rank (self-influence outliers)."""

from __future__ import annotations

from pathlib import Path

import click

from . import main
from .common import DB_ARG, FORMATS, _open, print_table
from .scale import ann_flags
from trackstar_db import defaults
from trackstar_db.devices import resolve_device
from trackstar_db.errors import TrackstarError

from .types import DEVICE, FRACTION, NON_NEGATIVE, POSITIVE, TOP_K


@main.command("select")
@DB_ARG
@click.option("--top", type=POSITIVE, default=None, help="Keep this many examples.")
@click.option("--fraction", type=FRACTION, default=None, help="Keep this fraction of the examples, in (0, 1].")
@click.option("--out", required=True, type=click.Path(dir_okay=False, path_type=Path),
              help="FILE.jsonl or FILE.parquet (outside the database): rank, example_id, score, text and fields.")
@click.option("--relation", default=None, help="Task: the queries of the facts of this relation.")
@click.option("--bucket", type=NON_NEGATIVE, default=None, help="Task: the queries of the facts of this frequency bucket.")
@click.option("--query-id", "query_ids", multiple=True, help="Task: these query ids (repeatable).")
@click.option("--template", default="prompt0", show_default=True, help="Task: which query template ('all': every one).")
@click.option("--task-file", type=click.Path(dir_okay=False, path_type=Path), default=None,
              help="Task: a JSONL file of {\"prompt\", \"target\"} examples, featurized on the fly, instead of stored queries.")
@click.option("--method", default=None, help="A gradient method or bm25 (default: the best rung the database serves).")
@click.option("--aggregate", type=click.Choice(["mean-vector", "mean-score"]), default="mean-vector", show_default=True,
              help="mean-vector: score against the mean query vector (equal to the mean of the scores, one "
                   "product a row); mean-score: every query's score, then their mean.")
@click.option("--drop-opponents", is_flag=True, help="Write every example except the N (fraction) most harmful.")
@click.option("--device", type=DEVICE, default="auto", show_default=True, help="auto (a GPU when present), cpu, cuda or cuda:N.")
@ann_flags
@click.option("--rerank", type=click.Choice(["kfac", "ekfac"]), default=None,
              help="Re-score the method's best candidates by their mean Kronecker-factored score ('trackstar-db "
                   "fit-factors') and keep the best of those.")
@click.option("--candidates", type=POSITIVE, default=defaults.CANDIDATES, show_default=True,
              help="With --rerank: how many of the method's best are re-scored (at least --top).")
def select_cmd(db, top, fraction, out, relation, bucket, query_ids, template, task_file, method, aggregate,
               drop_opponents, device, ann, rerank, candidates):
    """Select training data for a task: the examples with the highest mean score against its queries."""
    from trackstar_db.selection.select import Task  # heavy: torch

    task = Task(relation=relation, bucket=bucket, query_ids=tuple(query_ids) or None,
                template=None if template == "all" else template, examples=task_file)
    chosen = _open(db).select(task, top=top, fraction=fraction, drop_opponents=drop_opponents, method=method,
                              aggregate=aggregate, ann=ann, device=resolve_device(device), out=out,
                              rerank=rerank, candidates=candidates)
    what = "kept after dropping the most harmful" if drop_opponents else "selected"
    click.echo(f"{chosen.rows.num_rows:,} of {chosen.n_scored:,} examples {what} for {task.describe()} "
               f"({chosen.n_queries} queries; {chosen.method}, {chosen.aggregate}); wrote {out}")


@main.command()
@DB_ARG
@click.option("--k", type=TOP_K, default=20, show_default=True, help="How many of the highest self-influence examples to list.")
@click.option("--mix", type=click.Choice(["train", "mixed"]), default="train", show_default=True,
              help="R_train, or the task-specific mixed R.")
@click.option("--variant", type=click.Choice(["corrected", "uncorrected"]), default="corrected", show_default=True)
@click.option("--format", "fmt", type=FORMATS, default="table", show_default=True)
def rank(db, k, mix, variant, fmt):
    """List the training examples with the highest self-influence g R^-1 g (outliers, contradictions)."""
    if k < 1:
        raise TrackstarError(f"--k must be >= 1, not {k}")
    print_table(_open(db).self_influence(variant=variant, mix=mix, k=k), fmt)
