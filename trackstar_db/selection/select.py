"""Data selection for a task (`trackstar-db select`, `Database.select`): score every training
example by its mean score against the task's queries and keep the best N (or fraction), or drop
the most harmful.

A task is a set of queries: the database's own, chosen by relation, frequency bucket, template
or ids (stored query gradients), or a JSONL file of {"prompt", "target"} examples featurized in
memory by the same featurizer as the stored ones (retrieval/adhoc.py).

Aggregate: mean over the task's queries of score(z, q), computed by the method's runner in the
registry (retrieval/runners.aggregate): for a gradient rung one scan against the mean query
vector (`aggregate='mean-vector'`; 'mean-score' averages each row's nq scores, the reference the
tests compare against), for BM25 the mean of the per-query Tantivy scores (0 where a text does
not match). With `ann` (retrieval.ann.AnnOptions), the top N come from the rung's ANN index
searched with the mean of the task's t_query vectors: approximate, top-N only.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import torch

from trackstar_db import defaults
from trackstar_db.errors import ParameterError, TrackstarError
from trackstar_db.featurizer.kfac import KINDS as RERANK_KINDS
from trackstar_db.option_checks import COUNT, FRACTION, Choice, check_fields, ruled
from trackstar_db.retrieval import runners
from trackstar_db.retrieval.adhoc import PromptAttributor
from trackstar_db.retrieval.embedding import query_text
from trackstar_db.retrieval.scoring import AGGREGATES
from trackstar_db.sources.records import iter_records, require_text

FORMATS = {".jsonl": "json", ".parquet": "parquet"}


@dataclass
class Task:
    """Which queries the selection serves. Filters combine (AND); `examples` (a JSONL file of
    prompt/target records) replaces the stored queries."""

    relation: str | None = None
    bucket: int | None = None
    query_ids: tuple[str, ...] | None = None
    template: str | None = "prompt0"  # None: every template
    examples: Path | None = None

    def describe(self) -> str:
        if self.examples is not None:
            return f"examples in {self.examples}"
        parts = [f"{name} {value!r}" for name, value in (("relation", self.relation), ("bucket", self.bucket),
                                                         ("template", self.template)) if value is not None]
        if self.query_ids:
            parts.append(f"{len(self.query_ids)} query ids")
        return "queries with " + ", ".join(parts) if parts else "every query"


@dataclass
class Selection:
    """The chosen rows (example_id, rank, score, text and the examples' other fields) and how."""

    rows: pa.Table
    method: str
    aggregate: str
    n_queries: int
    n_scored: int


@dataclass(frozen=True)
class SelectOptions:
    """select's amount and scoring options, checked by their rules: exactly one of top (examples
    kept) and fraction (share kept); aggregate: how the queries' scores combine; rerank and
    candidates: the second stage (retrieval/rerank.py)."""

    top: int | None = ruled(COUNT, None)
    fraction: float | None = ruled(FRACTION, None)
    aggregate: str = ruled(Choice(AGGREGATES), "mean-vector")
    rerank: str | None = ruled(Choice(RERANK_KINDS), None)
    candidates: int = ruled(COUNT, defaults.CANDIDATES)

    def __post_init__(self):
        if (self.top is None) == (self.fraction is None):
            raise ParameterError("top", "or fraction: give exactly one of them", others=("fraction",))
        check_fields(self)


def check_output(db, out: str | Path) -> tuple[Path, str]:
    """(path, write_table format) of an output file: .jsonl or .parquet, outside the database."""
    out = Path(out)
    fmt = FORMATS.get(out.suffix.lower())
    if fmt is None:
        raise TrackstarError(f"{out}: the output must end in .jsonl or .parquet")
    resolved, home = out.resolve(), Path(db.path).resolve()
    if resolved == home or home in resolved.parents:
        raise TrackstarError(f"{out}: inside the database directory {db.path}; write the selection elsewhere")
    if not resolved.parent.is_dir():
        raise TrackstarError(f"{out}: no such directory {out.parent}")
    return out, fmt


def task_queries(db, task: Task) -> pa.Table:
    """query_id, prompt, target of the task's stored queries (sorted by query_id)."""
    queries = db.table("queries", columns=["query_id", "fact_id", "template", "prompt", "target"])
    if task.template is not None:
        templates = set(queries.column("template").to_pylist())
        if task.template not in templates:
            raise TrackstarError(f"unknown task template {task.template!r}; templates: {', '.join(sorted(templates))}")
        queries = queries.filter(pc.field("template") == task.template)
    if task.relation is not None or task.bucket is not None:
        facts = db.table("facts", columns=["fact_id", "relation", "frequency_bucket"])
        if task.relation is not None:
            relations = set(facts.column("relation").to_pylist())
            if task.relation not in relations:
                raise TrackstarError(f"unknown task relation {task.relation!r}; relations: "
                                     f"{', '.join(sorted(relations)) or '(no facts)'}")
            facts = facts.filter(pc.field("relation") == task.relation)
        if task.bucket is not None:
            facts = facts.filter(pc.field("frequency_bucket") == task.bucket)
        queries = queries.filter(pc.is_in(queries.column("fact_id"), facts.column("fact_id")))
    if task.query_ids:
        known = set(queries.column("query_id").to_pylist())
        missing = [q for q in task.query_ids if q not in known]
        if missing:
            raise TrackstarError(f"unknown task query id {missing[0]!r} ({len(missing)} of {len(task.query_ids)} "
                                 "not among the chosen queries)")
        queries = queries.filter(pc.is_in(queries.column("query_id"), pa.array(list(task.query_ids), pa.string())))
    if queries.num_rows == 0:
        raise TrackstarError(f"{db.path}: no {task.describe()}")
    return queries.select(["query_id", "prompt", "target"]).sort_by("query_id")


def read_examples(path: str | Path) -> pa.Table:
    """query_id ('<file>:<line>'), prompt, target of a task file (JSON lines or Parquet, read by
    sources/records.py); a bad record is a one-line error naming its line and field."""
    path = Path(path)
    if not path.is_file():
        raise TrackstarError(f"{path}: no such task file")
    rows = [{"query_id": f"{path.name}:{line}", "prompt": require_text(record, "prompt", path, line),
             "target": require_text(record, "target", path, line)} for line, record in iter_records(path)]
    if not rows:
        raise TrackstarError(f"{path}: no task examples")
    return pa.Table.from_pylist(rows)


def task_gradients(db, spec, task: Task, queries: pa.Table, device: str = "cpu") -> torch.Tensor | None:
    """[nq, d] raw gradients of a task file's queries in the rung's variant, featurized by the
    database's featurizer (retrieval/adhoc.py); None for stored queries (the runner reads them)."""
    if task.examples is None or spec is None:
        return None

    attributor = PromptAttributor(db, device)
    return torch.cat([attributor.gradient(p, t, spec.table).float().cpu() for p, t in
                      zip(queries.column("prompt").to_pylist(), queries.column("target").to_pylist())])


def _with_fields(db, ids: list[str], scores: np.ndarray) -> pa.Table:
    """rank, example_id, score and the examples' fields (text first), in the order given."""
    examples = db.table("examples")
    examples = examples.take(pc.index_in(pa.array(ids, pa.string()), value_set=examples.column("example_id")))
    keep = [c for c in examples.column_names if c not in ("example_id", "text")]
    return pa.table({"rank": pa.array(np.arange(1, len(ids) + 1), pa.int32()),
                     "example_id": pa.array(ids, pa.string()),
                     "score": pa.array(scores, pa.float32()),
                     "text": examples.column("text"),
                     **{c: examples.column(c) for c in keep}})


def select(db, task: Task | None = None, *, top: int | None = None, fraction: float | None = None,
           drop_opponents: bool = False, method: str | None = None, aggregate: str = "mean-vector", ann=None,
           device: str = "cpu", progress: bool = False, out: str | Path | None = None, rerank: str | None = None,
           candidates: int = defaults.CANDIDATES) -> Selection:
    """The top N (or fraction) of the training examples for `task`, best first; with
    `drop_opponents`, every example except the N (or fraction) lowest-scoring, best first.
    `out` (.jsonl or .parquet, outside the database): also written there. `rerank` ('kfac' |
    'ekfac'): the method's top max(N, candidates) re-scored by their mean second-stage score
    (retrieval/rerank.py) and the best N of those kept; first_score keeps the method's score."""
    SelectOptions(top=top, fraction=fraction, aggregate=aggregate, rerank=rerank, candidates=candidates)
    target = check_output(db, out) if out is not None else None
    task = task or Task()
    n_examples = db.count("examples")
    if n_examples == 0:
        raise TrackstarError(f"{db.path}: no training examples to select from")
    method = method or runners.best_method(db)
    scorers = {m.name: m for m in runners.aggregating()}
    if method not in scorers:
        rungs = [m.name for m in scorers.values() if m.spec is not None]
        others = [m.name for m in scorers.values() if m.spec is None]
        raise TrackstarError(f"select scores with a gradient method ({', '.join(rungs)}) or {' or '.join(others)}, "
                             f"not {method!r}")
    entry = scorers[method]
    if ann is not None and (not entry.serves_ann or drop_opponents or aggregate != "mean-vector"):
        raise ParameterError("ann", "serves the top N of a gradient method's mean query vector only (not bm25, "
                                    "drop_opponents or aggregate mean-score)", others=("drop_opponents", "aggregate"))
    queries = read_examples(task.examples) if task.examples is not None else task_queries(db, task)
    n = top if top is not None else max(1, round(fraction * n_examples))
    n = min(n, n_examples)
    prompts, targets = queries.column("prompt").to_pylist(), queries.column("target").to_pylist()
    texts = [query_text(p, t) for p, t in zip(prompts, targets)]
    request = runners.Request(queries.column("query_id").to_pylist(), texts, n, device, ann=ann, aggregate=aggregate,
                              query_vectors=task_gradients(db, entry.spec, task, queries, device), progress=progress)
    scored = runners.aggregate(db, entry, request)
    ids, scores, aggregate = scored.ids, scored.scores, scored.aggregate
    if ann is not None:  # the index's best n, best first
        selection = Selection(_with_fields(db, ids, scores), f"{method}-ann", aggregate, queries.num_rows, len(ids))
        return _written(selection, target)
    order = np.argsort(-scores, kind="stable")  # best first; ties: scan order
    if rerank is not None:
        return _written(_reranked(db, queries, ids, scores, order, n, method, rerank, candidates, device, drop_opponents),
                        target)
    order = order[: len(order) - n] if drop_opponents else order[:n]
    selection = Selection(_with_fields(db, [ids[i] for i in order], scores[order]), method, aggregate,
                          queries.num_rows, len(ids))
    return _written(selection, target)


def _reranked(db, queries: pa.Table, ids, scores: np.ndarray, order: np.ndarray, n: int, method: str, kind: str,
              candidates: int, device: str, drop_opponents: bool) -> Selection:
    """The first stage's best max(n, candidates) re-scored by their mean second-stage score; the
    best n of them, with the first stage's score beside (first_score)."""
    from trackstar_db.retrieval.rerank import check_rerank, score_examples  # heavy: transformers

    check_rerank(kind, candidates)
    if drop_opponents:
        raise ParameterError("rerank", "re-scores the best candidates; it does not serve drop_opponents",
                             others=("drop_opponents",))
    pool = order[: max(n, candidates)]
    pairs = list(zip(queries.column("prompt").to_pylist(), queries.column("target").to_pylist()))
    _, second = score_examples(db, pairs, [ids[i] for i in pool], kind, device)
    mean = second.mean(axis=0)
    best = np.argsort(-mean, kind="stable")[:n]
    rows = _with_fields(db, [ids[pool[i]] for i in best], mean[best])
    rows = rows.append_column("first_score", pa.array(scores[pool[best]], pa.float32()))
    return Selection(rows, f"{method}-{kind}", "mean-score", queries.num_rows, len(ids))


def _written(selection: Selection, target: tuple[Path, str] | None) -> Selection:
    """Write the selection as JSONL (one example a line) or Parquet, when a target was given."""
    if target is not None:
        from trackstar_db.evaluation.sql import write_table  # heavy: duckdb

        write_table(selection.rows, target[1], target[0])
    return selection
