"""Stored retrieval runs: one method over the database's queries into the retrievals table.

Methods are entries of the registry (trackstar_db/ladder.py: `lookup`); each one's top-k comes
from its runner (retrieval/runners.py). A rerun with `replace` writes the new rows first and only
then drops the old ones, so a failure keeps the old run.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import pyarrow as pa
import pyarrow.compute as pc

from trackstar_db import defaults
from trackstar_db.devices import DEVICE
from trackstar_db.errors import ParameterError, TrackstarError
from trackstar_db.ladder import lookup
from trackstar_db.option_checks import COUNT, Choice, K, check_fields, name, ruled

from . import embedding
from . import runners
from .rerank import RERANKS
from .runners import Request

QUERY_TEXTS = ("prompt+target", "prompt")  # what BM25 and embedding see of a query


@dataclass
class RetrieveOptions:
    k: int = ruled(K, defaults.K_RETRIEVE)
    template: str | None = defaults.TEMPLATE  # which queries; None = all
    device: str = ruled(DEVICE, "cpu")
    batch_rows: int = ruled(COUNT, defaults.SCAN_BATCH_ROWS)
    query_text: str = ruled(Choice(QUERY_TEXTS), "prompt+target")  # what BM25 and embedding see
    ann: object | None = None  # retrieval.ann.AnnOptions: approximate top-k from the method's index
    rerank: str | None = ruled(RERANKS, None)  # re-score the method's top `candidates` (retrieval/rerank.py)
    candidates: int = ruled(COUNT, defaults.CANDIDATES)

    def __post_init__(self):
        check_fields(self)


def _queries(db, template: str | None) -> pa.Table:
    rows = db.table("queries", columns=["query_id", "prompt", "target"],
                    filter=pc.field("template") == template if template else None)
    if rows.num_rows == 0:
        raise TrackstarError(f"{db.path}: no queries" + (f" with template {template!r}" if template else ""))
    return rows.sort_by("query_id")


def _query_texts(rows: pa.Table, mode: str) -> list[str]:
    prompts, targets = rows.column("prompt").to_pylist(), rows.column("target").to_pylist()
    if mode == "prompt":
        return prompts
    return [embedding.query_text(p, t) for p, t in zip(prompts, targets)]


def retrieve(db, method: str, options: RetrieveOptions | None = None, run_id: str | None = None,
             replace: bool = False, scorer=None) -> tuple[str, pa.Table]:
    """Retrieve proponents (and opponents, for gradient methods) of the queries; store and return them.
    scorer: another engine's score_table (trackstar_db.distributed.scan.score_table for Ray)."""
    options = options or RetrieveOptions()
    entry = lookup(method)

    default = f"{method}-ann" if options.ann is not None else method
    if options.rerank is not None:  # the second stage's name: its column and default run (trackstar-ekfac)
        default, method = f"{default}-{options.rerank}", options.rerank
    run_id = name("run_id", run_id or default)
    existing = db.table("runs", columns=["run_id"], filter=pc.field("run_id") == run_id).num_rows
    if existing and not replace:
        raise ParameterError("run_id", f"{run_id!r}: that run exists; name another run or replace it")
    query_rows = _queries(db, options.template)
    query_ids = query_rows.column("query_id").to_pylist()
    request = Request(query_ids, _query_texts(query_rows, options.query_text), options.k, options.device,
                      batch_rows=options.batch_rows, ann=options.ann, scorer=scorer,
                      pairs=list(zip(query_rows.column("prompt").to_pylist(), query_rows.column("target").to_pylist())),
                      rerank=options.rerank, candidates=options.candidates)
    result = runners.run(db, entry, request)
    rows = result.to_arrow(query_ids, run_id, method)
    if entry.spec is not None and rows.num_rows == 0:
        raise TrackstarError(f"{method}: the scan returned no rows; is the gradient table damaged? "
                             f"run 'trackstar-db check {db.path}'")
    parameters = dict(asdict(options), engine=getattr(scorer, "engine", "local") if scorer else "local")
    if entry.spec is not None:
        parameters["preconditioners"] = db.manifest.get("preconditioners", {})
    if options.rerank is not None or entry.needs_factors:  # what the second stage re-scored with
        parameters["factors"] = {k: v for k, v in (db.manifest.get("factors") or {}).items() if k != "projected"}
        parameters["first_stage"] = getattr(result, "first_method", None)
    if options.ann is not None:
        parameters["ann_index"] = db.manifest["ann"][parameters.get("first_stage") or method]
    db.replace_run(run_id, method, parameters, rows)
    if hasattr(result, "annotate"):  # a second stage: the answer keeps the first stage's scores (not stored)
        rows = result.annotate(rows)
    return run_id, rows
