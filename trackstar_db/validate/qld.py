"""A second counterfactual check beside the LDS: the query loss difference (QLD, bergson's name).

For each of a few validated queries, retrain without the run's top `top` share of examples for
that query (every example scored by the run's method: validate/scores.py) and measure how much
that query's target loss rises over a model retrained on every example with the same trainer,
schedule and seed (validate/trainers.py); beside it, the rise after removing as many examples
drawn at random (seeded by the query), the control a method must beat. The mean rises come with
bootstrap intervals over the queries (validate/lds.bootstrap_interval).

Cost: 1 + 2 x queries retrained models (`queries` small by default); nothing is stored.
"""

from __future__ import annotations

import tempfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from trackstar_db.errors import ParameterError, TrackstarError
from trackstar_db.option_checks import COUNT, NON_NEGATIVE, PROPER_FRACTION, check_fields, ruled

from .lds import bootstrap_interval
from .options import ValidateOptions
from .scores import _texts, score_every_example
from .trainers import make_trainer


@dataclass(frozen=True)
class QLDOptions:
    """run: the retrieval run whose method ranks the examples; queries: how many of its queries
    (drawn with `seed`); top: the share of the corpus removed per query; random_control: also
    retrain without as many random examples; bootstrap: draws for the intervals."""

    run: str
    queries: int = ruled(COUNT, 4)
    top: float = ruled(PROPER_FRACTION, 0.1)
    seed: int = ruled(NON_NEGATIVE, 0)
    random_control: bool = True
    bootstrap: int = ruled(COUNT, 1000)

    def __post_init__(self):
        check_fields(self)


def _pick_queries(db, run: str, count: int, seed: int, template: str) -> pa.Table:
    runs = db.table("runs", columns=["run_id", "method", "parameters"], filter=pc.field("run_id") == run)
    if runs.num_rows == 0:
        raise ParameterError("run", f"{run!r}: no such retrieval run; run 'trackstar-db retrieve' first")
    ids = sorted(db.table("retrievals", columns=["query_id"], filter=pc.field("run_id") == run)
                 .column("query_id").unique().to_pylist())
    rows = db.table("queries", columns=["query_id", "prompt", "target", "template"],
                    filter=pc.field("query_id").isin(ids))
    if template != "all":
        rows = rows.filter(pc.equal(rows.column("template"), template))
    if rows.num_rows == 0:
        raise TrackstarError(f"run {run!r} holds no {template} queries to check")
    rows = rows.sort_by("query_id")
    chosen = np.sort(np.random.default_rng([seed, 1]).choice(rows.num_rows, min(count, rows.num_rows), replace=False))
    return rows.take(chosen), runs.to_pylist()[0]


def query_loss_difference(db, options: QLDOptions, validate: ValidateOptions | None = None,
                          progress=None) -> tuple[pa.Table, dict]:
    """(per-query table, summary). Per query: query_id, n_removed, loss_full, loss_removed, rise
    (= loss_removed - loss_full) and, with random_control, loss_random and random_rise. Summary:
    method, queries, top, mean_rise with rise_low / rise_high, and the same for random_rise and
    the difference rise - random_rise. validate: the trainer settings (schedule, steps, device,
    template...), ValidateOptions' defaults otherwise."""
    from trackstar_db.testbed.train import ProbeLosses  # heavy: torch

    validate = validate or ValidateOptions()
    queries, run = _pick_queries(db, options.run, options.queries, options.seed, validate.template)
    query_ids = queries.column("query_id").to_pylist()
    examples = db.table("examples", columns=["example_id", "text"]).sort_by("example_id")
    ids, texts = examples.column("example_id").to_pylist(), examples.column("text").to_pylist()
    full_scores = score_every_example(db, run["method"], query_ids, _texts(db, run["parameters"], query_ids),
                                      device=validate.device, examples=ids)
    n_removed = max(1, round(options.top * len(ids)))
    keep_all = np.arange(len(ids))

    def train_and_measure(keep: np.ndarray, losses_of, scratch: Path, name: str) -> list[float]:
        trainer = make_trainer(db, validate, len(keep))
        model, _ = trainer([texts[i] for i in keep], scratch / name, [ids[i] for i in keep])
        return losses_of(model)

    rows = []
    with tempfile.TemporaryDirectory(prefix="trackstar-qld-") as scratch:
        losses_of = None
        for i, query_id in enumerate(query_ids):
            if losses_of is None:
                tokenizer = make_trainer(db, validate, len(ids)).tokenizer
                losses_of = ProbeLosses(tokenizer, queries.column("prompt").to_pylist(),
                                        queries.column("target").to_pylist(), device=validate.device)
                full = train_and_measure(keep_all, losses_of, Path(scratch), "full")
            top = np.argsort(-full_scores.scores[i], kind="stable")[:n_removed]
            removed = train_and_measure(np.setdiff1d(keep_all, top), losses_of, Path(scratch), f"top-{i}")
            row = {"query_id": query_id, "n_removed": n_removed, "loss_full": full[i], "loss_removed": removed[i],
                   "rise": removed[i] - full[i]}
            if options.random_control:
                drawn = np.random.default_rng([options.seed, 2, i]).choice(len(ids), n_removed, replace=False)
                random = train_and_measure(np.setdiff1d(keep_all, drawn), losses_of, Path(scratch), f"random-{i}")
                row.update(loss_random=random[i], random_rise=random[i] - full[i])
            rows.append(row)
            if progress is not None:
                progress(f"qld {query_id}: loss {full[i]:.3f} -> {removed[i]:.3f} without the top {n_removed}"
                         + (f", {row['loss_random']:.3f} without {n_removed} random" if options.random_control else ""))
    table = pa.Table.from_pylist(rows)
    summary = {"run": options.run, "method": run["method"], "queries": len(rows), "top": options.top,
               "n_removed": n_removed}
    columns = ["rise"] + (["random_rise", "rise_minus_random"] if options.random_control else [])
    for column in columns:
        values = (table.column("rise").to_numpy() - table.column("random_rise").to_numpy()
                  if column == "rise_minus_random" else table.column(column).to_numpy())
        low, high = bootstrap_interval(np.asarray(values, float), options.bootstrap, options.seed)
        summary.update({f"mean_{column}": float(np.mean(values)), f"{column}_low": low, f"{column}_high": high})
    return table, summary
