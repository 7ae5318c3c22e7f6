"""Stored retrieval runs: one method over the database's queries into the retrievals table.

Methods (trackstar_db/ladder.py: ALL_METHODS): the gradient ladder, scored by the one scoring
path (retrieval/scoring.py) from the stored query gradients; bm25 (Tantivy); embedding
(all-MiniLM-L6-v2, when installed). A rerun with `replace` writes the new rows first and only
then drops the old ones, so a failure keeps the old run.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import pyarrow as pa
import pyarrow.compute as pc

from trackstar_db.errors import TrackstarError

from . import embedding
from .methods import ALL_METHODS, METHODS, get_method
from .scoring import score_table
from .topk import TopKResult, search


@dataclass
class RetrieveOptions:
    k: int = 100
    template: str | None = "prompt0"  # which queries; None = all
    device: str = "cpu"
    batch_rows: int = 65536
    query_text: str = "prompt+target"  # what BM25 and embedding see: 'prompt+target' or 'prompt'
    ann: object | None = None  # retrieval.ann.AnnOptions: approximate top-k from the method's index

    def __post_init__(self):
        from trackstar_db.validation import K_MAX, count

        count("--k", self.k, 1, K_MAX)
        count("batch_rows", self.batch_rows)
        if self.query_text not in ("prompt+target", "prompt"):
            raise TrackstarError(f"query text must be 'prompt+target' or 'prompt', not {self.query_text!r}")


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


def stored_query_vectors(db, spec, query_ids: list[str]):
    """[nq, d] float32 stored gradients of `query_ids`, in that order."""
    table = db.gradient_table("queries", corrected=spec.table == "corrected").require()
    stored = table.dataset().to_table(columns=["id", "vector"], filter=pc.field("id").isin(query_ids))
    position = {qid: i for i, qid in enumerate(stored.column("id").to_pylist())}
    missing = [q for q in query_ids if q not in position]
    if missing:
        raise TrackstarError(f"{len(missing)} queries have no gradient (first {missing[0]!r}); "
                             f"run 'trackstar-db ingest gradients {db.path} --split queries'")
    from trackstar_db.store.vectors import to_torch

    return to_torch(stored.column("vector").take([position[q] for q in query_ids]), table.dtype)


def example_embeddings(db, device: str = "cpu"):
    """(ids, embeddings) batches of every example text, for the embedding baseline."""
    texts = ((b.column("example_id").to_pylist(), b.column("text").to_pylist())
             for b in db.dataset("examples").to_batches(columns=["example_id", "text"], batch_size=4096))
    return embedding.embed_batches(texts, device=device)


def run_method(db, method: str, query_ids: list[str], texts: list[str], k: int, device: str = "cpu",
               query_vectors=None, batch_rows: int = 65536, ann=None, scorer=None) -> TopKResult:
    """Top-k of one method for a set of queries: texts for bm25/embedding, gradients otherwise
    (`query_vectors` [nq, d], or the stored query gradients of `query_ids`); with `ann`
    (AnnOptions), approximately from the method's index (retrieval/ann.py). `scorer` replaces
    scoring.score_table for the gradient scan (distributed/scan.py: Ray tasks over fragment ranges)."""
    if ann is not None and method not in METHODS:
        raise TrackstarError(f"--ann serves the gradient methods ({', '.join(METHODS)}), not {method}")
    if method == "bm25":
        from trackstar_db.store.bm25 import BM25Index

        return TopKResult.from_hits(BM25Index(db.path, must_exist=db.count("examples") > 0).search_many(texts, k), k)
    if method == "embedding":
        from trackstar_db.store.vectors import scan_progress

        batches = scan_progress(example_embeddings(db, device), db.count("examples"), "embedding")
        return search(embedding.embed(texts, device=device), batches, k, opponents=False)
    if method == "lm-embedding":
        from .lm_embedding import top_k

        return top_k(db, texts, k, device)
    if method.startswith("tracin-cp"):
        from .tracin_cp import top_k_stored

        return top_k_stored(db, query_ids, k, method, device)
    spec = get_method(method)
    if query_vectors is None:
        query_vectors = stored_query_vectors(db, spec, query_ids)
    if ann is not None:
        from .ann import search_ann

        return search_ann(db, method, query_vectors, k, ann)
    if scorer is not None:
        return scorer(db, spec, query_vectors, k, batch_rows=batch_rows)
    return score_table(db, spec, query_vectors, k, device=device, batch_rows=batch_rows)


def retrieve(db, method: str, options: RetrieveOptions | None = None, run_id: str | None = None,
             replace: bool = False, scorer=None) -> tuple[str, pa.Table]:
    """Retrieve proponents (and opponents, for gradient methods) of the queries; store and return them.
    scorer: another engine's score_table (trackstar_db.distributed.scan.score_table for Ray)."""
    options = options or RetrieveOptions()
    if method not in ALL_METHODS:
        raise TrackstarError(f"unknown method {method!r}; methods: {', '.join(ALL_METHODS)}")
    from trackstar_db.validation import name

    run_id = name("--run", run_id or (f"{method}-ann" if options.ann is not None else method))
    existing = db.table("runs", columns=["run_id"], filter=pc.field("run_id") == run_id).num_rows
    if existing and not replace:
        raise TrackstarError(f"run {run_id!r} exists; pick another --run name or pass --replace")
    query_rows = _queries(db, options.template)
    query_ids = query_rows.column("query_id").to_pylist()
    result = run_method(db, method, query_ids, _query_texts(query_rows, options.query_text), options.k,
                        options.device, batch_rows=options.batch_rows, ann=options.ann, scorer=scorer)
    rows = result.to_arrow(query_ids, run_id, method)
    if method in METHODS and rows.num_rows == 0:
        raise TrackstarError(f"{method}: the scan returned no rows; is the gradient table damaged? "
                             f"run 'trackstar-db check {db.path}'")
    parameters = dict(asdict(options), engine=getattr(scorer, "engine", "local") if scorer else "local")
    if method in METHODS:
        parameters["preconditioners"] = db.manifest.get("preconditioners", {})
    if options.ann is not None:
        parameters["ann_index"] = db.manifest["ann"][method]
    db.replace_run(run_id, method, parameters, rows)
    return run_id, rows
