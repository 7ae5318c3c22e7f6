"""Tail-patch the proponents of stored retrieval runs (`trackstar-db tail-patch`).

Reads each run's top-k proponents from the retrievals table, runs tailpatch.TailPatcher over
all the runs at once (a (query, example) pair shared by several runs is measured once), and
replaces those runs' rows in the tail_patch table, new rows written before the old are dropped
(Database.swap_rows), a row with a NaN or infinite probability refused. `max_queries` takes a deterministic sample
(by crc32 of the query id) so a quick look costs less than the full set.
"""

from __future__ import annotations

import zlib

import pyarrow as pa
import pyarrow.compute as pc

from trackstar_db import defaults
from trackstar_db.errors import TrackstarError
from trackstar_db.featurizer import optimizer_state as _optimizer_state
from trackstar_db.featurizer.task import task_of
from trackstar_db.models.load import open_model
from trackstar_db.option_checks import COUNT, K, check
from trackstar_db.store.checkpoints import source

from .patcher import TailPatchConfig, TailPatcher


def _sample(query_ids: list[str], limit: int | None) -> set[str]:
    ordered = sorted(set(query_ids), key=lambda q: (zlib.crc32(q.encode()), q))
    return set(ordered if limit is None else ordered[:limit])


def patch_model(db, device: str = "cpu"):
    """(model, tokenizer, optimizer state) of the final checkpoint, from the one model factory
    (models/load.open_model: the tokenizer cut at the model's context), weights in float32: the
    optimizer step is taken in full precision whatever the checkpoint's dtype."""
    point = source(db).with_dtype("float32")
    if point.optimizer_state is None:
        raise TrackstarError("tail-patch needs the model's optimizer state (optimizer.safetensors)")
    state = _optimizer_state.load(point.optimizer_state)
    model, tokenizer = open_model(point, device)
    return model, tokenizer, state


def load_patcher(db, k: int = defaults.K_TAIL_PATCH, device: str = "cpu") -> TailPatcher:
    """A TailPatcher over the database's recorded checkpoint and its saved optimizer state (the one
    set-up of stored tail-patch runs and of `query --verify`)."""
    model, tokenizer, state = patch_model(db, device)
    task = task_of(db.manifest)  # the step takes the database's loss (a completion's, a chat's)
    return TailPatcher(model, tokenizer, state, TailPatchConfig(k=k), task=task, spans=stored_spans(db, task))


def stored_spans(db, task):
    """The loss spans a patcher's steps take on `db`'s examples: read from db's view when the
    task is loss-masked, none (every token's loss) otherwise."""
    return _StoredSpans(db) if task.masked else {}


class _StoredSpans:
    """example_id -> its loss spans, read from the examples table when a step needs them."""

    def __init__(self, db):
        self.db = db

    def get(self, example_id: str, default=None):
        rows = self.db.table("examples", columns=["loss_spans"], filter=pc.field("example_id") == example_id)
        return rows.column("loss_spans")[0].as_py() if rows.num_rows else default


def tail_patch_runs(db, run_ids: list[str], k: int = defaults.K_TAIL_PATCH, max_queries: int | None = None,
                    device: str = "cpu") -> pa.Table:
    check("k", K, k)
    check("max_queries", COUNT, max_queries)
    known = db.ids("runs", "run_id")
    for run_id in run_ids:
        if run_id not in known:
            raise TrackstarError(f"no run {run_id!r}; runs: {', '.join(sorted(known)) or 'none'}")
    patcher = load_patcher(db, k, device)
    retrievals = db.table("retrievals", columns=["run_id", "query_id", "kind", "rank", "example_id"],
                          filter=(pc.field("kind") == "proponent") & (pc.field("rank") <= int(k)))
    retrievals = retrievals.filter(pc.is_in(retrievals.column("run_id"), pa.array(run_ids)))
    keep = _sample(retrievals.column("query_id").to_pylist(), max_queries)
    retrievals = retrievals.filter(pc.is_in(retrievals.column("query_id"), pa.array(sorted(keep), pa.string())))
    queries = {r["query_id"]: r for r in db.table("queries", columns=["query_id", "prompt", "target"]).to_pylist()}
    wanted = pa.array(sorted(set(retrievals.column("example_id").to_pylist())), pa.string())
    examples = db.table("examples", columns=["example_id", "text"])
    examples = examples.filter(pc.is_in(examples.column("example_id"), wanted))
    texts = dict(zip(examples.column("example_id").to_pylist(), examples.column("text").to_pylist()))
    missing = set(wanted.to_pylist()) - set(texts)
    if missing:
        raise TrackstarError(f"{len(missing)} retrieved examples are not in the examples table (first "
                             f"{sorted(missing)[0]!r}); ingest their corpus or import a results file with texts")
    unknown = set(retrievals.column("query_id").to_pylist()) - set(queries)
    if unknown:
        raise TrackstarError(f"{len(unknown)} retrieved queries are not in the queries table (first {sorted(unknown)[0]!r})")

    runs: dict[str, dict[str, list]] = {run_id: {} for run_id in run_ids}
    for row in retrievals.to_pylist():
        runs[row["run_id"]].setdefault(row["query_id"], []).append((row["rank"], row["example_id"],
                                                                     texts[row["example_id"]]))
    pairs = {run_id: [(q, queries[q]["prompt"], queries[q]["target"], props) for q, props in sorted(by_query.items())]
             for run_id, by_query in runs.items()}
    rows = patcher.run(pairs)
    _check_finite(rows)
    # write-then-swap (Database.swap_rows): the old rows stay until every new row is stored
    db.swap_rows("tail_patch", "run_id", run_ids, rows, fault="tailpatch",
                 command=f"tail-patch --run {' --run '.join(run_ids)}")
    return rows


def _check_finite(rows: pa.Table) -> None:
    """Refuse NaN or infinite probabilities (a diverged step): they would poison every average."""
    for column in ("p_before", "p_after"):
        values = rows.column(column)
        bad = pc.invert(pc.is_finite(values))
        if pc.any(bad).as_py():
            row = rows.filter(bad).slice(0, 1).to_pylist()[0]
            raise TrackstarError(f"tail-patch of run {row['run_id']!r}, query {row['query_id']!r}, example "
                                 f"{row['example_id']!r}: {column} is {row[column]}; nothing was stored")
