"""How each kind of method computes its top-k: one function per runner of the registry
(trackstar_db/ladder.py: Method.runner), all called as `runner(db, method, request)`.

retrieval/runs.py (stored runs) and retrieval/adhoc.py (one prompt) look a method up and call
its runner; nothing else branches on a method's name.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Callable

import pyarrow.compute as pc

from trackstar_db import defaults
from trackstar_db.errors import ParameterError, TrackstarError
from trackstar_db.ladder import Method

from .topk import TopKResult


@dataclass
class Request:
    """What a runner is asked: the queries (ids, and their texts for the text methods), k, where to
    compute, and for gradient methods optionally the query vectors [nq, d] (else the stored
    query gradients of `query_ids`), an ANN search (retrieval.ann.AnnOptions) or another
    engine's scan (`scorer`, e.g. distributed/scan.score_table)."""

    query_ids: list[str]
    texts: list[str]
    k: int
    device: str = "cpu"
    query_vectors: object | None = None
    batch_rows: int = defaults.SCAN_BATCH_ROWS
    ann: object | None = None
    scorer: Callable | None = None
    pairs: list | None = None  # (prompt, target) per query: what the second stage featurizes
    rerank: str | None = None  # 'kfac' | 'ekfac': re-score this method's top `candidates` (rerank.py)
    candidates: int = 200  # retrieval/rerank.DEFAULT_CANDIDATES


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


def gradient(db, method: Method, request: Request) -> TopKResult:
    """A rung of the ladder: the one scoring path (retrieval/scoring.py), an ANN index, or another engine's scan."""
    spec = method.spec
    vectors = request.query_vectors
    if vectors is None:
        vectors = stored_query_vectors(db, spec, request.query_ids)
    if request.ann is not None:
        from .ann import search_ann

        return search_ann(db, method.name, vectors, request.k, request.ann)
    if request.scorer is not None:
        return request.scorer(db, spec, vectors, request.k, batch_rows=request.batch_rows)
    from .scoring import score_table

    return score_table(db, spec, vectors, request.k, device=request.device, batch_rows=request.batch_rows)


def bm25(db, method: Method, request: Request) -> TopKResult:
    """Tantivy's BM25 over the examples, searched with each query's text."""
    from trackstar_db.store.bm25 import BM25Index

    index = BM25Index.reader(db, must_exist=db.count("examples") > 0)
    return TopKResult.from_hits(index.search_many(request.texts, request.k), request.k)


def embedding(db, method: Method, request: Request) -> TopKResult:
    """The dense sentence-embedding baseline: cosine of the query texts' and the examples' embeddings."""
    from trackstar_db.store.vectors import scan_progress

    from . import embedding as dense
    from .topk import search

    texts = ((b.column("example_id").to_pylist(), b.column("text").to_pylist())
             for b in db.dataset("examples").to_batches(columns=["example_id", "text"], batch_size=4096))
    batches = scan_progress(dense.embed_batches(texts, device=request.device), db.count("examples"), "embedding")
    return search(dense.embed(request.texts, device=request.device), batches, request.k, opponents=False)


def lm_embedding(db, method: Method, request: Request) -> TopKResult:
    """FTRACE's baseline: the attributed model's own hidden states (retrieval/lm_embedding.py)."""
    from .lm_embedding import top_k

    return top_k(db, request.texts, request.k, request.device)


def tracin_cp(db, method: Method, request: Request) -> TopKResult:
    """TracIn-CP over the checkpoints' stored gradient tables (retrieval/tracin_cp.py)."""
    from .tracin_cp import top_k_stored

    return top_k_stored(db, request.query_ids, request.k, method.name, request.device)


def kronecker_proj(db, method: Method, request: Request) -> TopKResult:
    """kfac-proj / ekfac-proj: the uncorrected vectors through the projected curvature F_p that
    fit-factors stored (gradients/factors.py), by the one scoring path (g_z . g_q F_p^-1)."""
    from trackstar_db.gradients.factors import load_projected  # heavy: torch

    from .scoring import Scoring, score_table

    spec = method.spec
    vectors = request.query_vectors
    if vectors is None:
        vectors = stored_query_vectors(db, spec, request.query_ids)
    table = db.gradient_table("train", corrected=False).require()
    scoring = Scoring(spec, table, load_projected(db, spec.preconditioner), None)
    return score_table(db, spec, vectors, request.k, device=request.device, batch_rows=request.batch_rows,
                       scoring=scoring)


def first_stage(db) -> str:
    """The first stage of a bare kfac / ekfac request: the best rung the database serves."""
    from .adhoc import best_method

    return best_method(db)


def rerank(db, method: Method, request: Request) -> TopKResult:
    """kfac / ekfac as methods: the best rung's top candidates re-scored (retrieval/rerank.py)."""
    from trackstar_db.ladder import lookup

    first = lookup(first_stage(db))
    return run(db, first, dataclasses.replace(request, rerank=method.name))


RUNNERS: dict[str, Callable[..., TopKResult]] = {
    "gradient": gradient, "bm25": bm25, "embedding": embedding, "lm-embedding": lm_embedding, "tracin-cp": tracin_cp,
    "kronecker-proj": kronecker_proj, "rerank": rerank,
}


def run(db, method: Method, request: Request) -> TopKResult:
    """Top-k of `method` for `request`; an ANN search only where the method serves one."""
    if request.ann is not None and not method.serves_ann and method.runner != "rerank":
        raise TrackstarError(f"ann: an ANN index serves the gradient methods, not {method.name}")
    if method.runner == "rerank" and request.rerank not in (None, method.name):
        raise ParameterError("rerank", f"{request.rerank!r} with method {method.name}, itself the {method.name} second "
                                       f"stage; name a first-stage method")
    if request.rerank is None or method.runner == "rerank":
        return RUNNERS[method.runner](db, method, request)
    from .rerank import check_rerank  # heavy: transformers
    from .rerank import rerank as second_stage  # heavy: transformers

    check_rerank(request.rerank, request.candidates)
    if request.pairs is None:
        raise TrackstarError(f"rerank: the queries' (prompt, target) pairs are needed to re-score {method.name}")
    wide = dataclasses.replace(request, k=request.candidates, rerank=None)
    candidates = RUNNERS[method.runner](db, method, wide)
    return second_stage(db, candidates, request.pairs, request.k, request.rerank, request.device,
                        first_method=method.name)
