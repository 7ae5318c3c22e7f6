"""The one place that scores: what each kind of method (trackstar_db/ladder.py: Method.runner)
implements, as one `Runner` per kind:

- `top_k`: its top-k proponents (and opponents) of each query, called through `run(db, method, request)`
  by stored runs (retrieval/runs.py), one-prompt queries (retrieval/adhoc.py) and the server;
- `status`: why it cannot answer this database now (a table, R, the factors, a package or the
  model missing), or None; through `status(db, method)` for the server's method list, and
  `best_method` (the rung a request that names none gets);
- `mean`: where it has one, its mean score over a set of queries for every example (select's
  aggregate, selection/select.py), through `aggregate(db, method, request)`: a gradient rung by
  one scan against the mean query vector (or each query's scores averaged, 'mean-score'), or an
  ANN search with the mean query vector; BM25 by the mean of the per-query scores.

Callers look a method up and call these; nothing else branches on a method's name.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Callable

import numpy as np
import pyarrow.compute as pc

from trackstar_db import defaults
from trackstar_db.errors import ParameterError, TrackstarError
from trackstar_db.ladder import REGISTRY, Method, factors_missing, lookup
from trackstar_db.store.vectors import scan_progress, to_torch

from .ann import search_ann
from .lm_embedding import top_k
from .methods import extra_installed
from .scoring import Scoring, mean_scores, score_table
from .topk import TopKResult, search
from .tracin_cp import top_k_stored


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
    candidates: int = defaults.CANDIDATES
    aggregate: str = "mean-vector"  # how `aggregate` takes a rung's mean: one of retrieval/scoring.AGGREGATES
    progress: bool | None = None  # the scan's bar (trackstar_db/progress.py); False skips its bookkeeping too


PREFERENCE = ("trackstar", "r-train", "opt-cos", "grad-cos")  # best_method's order


@dataclass
class MeanScores:
    """What `aggregate` answers: per example, the mean over the request's queries of score(z, q),
    for every example in scan order, or, from an ANN index (Request.ann), for the best
    Request.k only, best first. `aggregate` says how the mean was taken ('mean-vector' | 'mean-score')."""

    ids: list[str]
    scores: np.ndarray  # float32, one per id
    aggregate: str


def stored_query_vectors(db, spec, query_ids: list[str]):
    """[nq, d] float32 stored gradients of `query_ids`, in that order."""
    table = db.gradient_table("queries", corrected=spec.table == "corrected").require()
    stored = table.dataset().to_table(columns=["id", "vector"], filter=pc.field("id").isin(query_ids))
    position = {qid: i for i, qid in enumerate(stored.column("id").to_pylist())}
    missing = [q for q in query_ids if q not in position]
    if missing:
        raise TrackstarError(f"{len(missing)} queries have no gradient (first {missing[0]!r}); "
                             f"run 'trackstar-db ingest gradients {db.path} --split queries'")

    return to_torch(stored.column("vector").take([position[q] for q in query_ids]), table.dtype)


def gradient(db, method: Method, request: Request) -> TopKResult:
    """A rung of the ladder: the one scoring path (retrieval/scoring.py), an ANN index, or another engine's scan."""
    spec = method.spec
    vectors = request.query_vectors
    if vectors is None:
        vectors = stored_query_vectors(db, spec, request.query_ids)
    if request.ann is not None:
        return search_ann(db, method.name, vectors, request.k, request.ann)
    if request.scorer is not None:
        return request.scorer(db, spec, vectors, request.k, batch_rows=request.batch_rows)

    return score_table(db, spec, vectors, request.k, device=request.device, batch_rows=request.batch_rows,
                       progress=request.progress)


def gradient_mean(db, method: Method, request: Request) -> MeanScores:
    """A rung's mean score over the queries: one scan (retrieval/scoring.mean_scores), or with
    `request.ann` the best request.k from its ANN index searched with the mean query vector."""
    vectors = request.query_vectors
    if vectors is None:
        vectors = stored_query_vectors(db, method.spec, request.query_ids)
    if request.ann is not None:
        best = search_ann(db, method.name, vectors, request.k, request.ann, mean=True)
        ids = best.proponent_ids[0]
        return MeanScores(ids, best.proponent_scores[0, :len(ids)], request.aggregate)

    ids, scores = mean_scores(db, method.spec, vectors, request.aggregate, device=request.device,
                              batch_rows=request.batch_rows, progress=request.progress)
    return MeanScores(ids, scores, request.aggregate)


def gradient_status(db, method: Method) -> str | None:
    """A rung needs its training table and, with R, R fitted on it."""
    spec = method.spec
    table = db.gradient_table("train", corrected=spec.table == "corrected")
    if not table.exists():
        return f"no {table.name} table (ingest gradients)"
    fitted = db.manifest.get("preconditioners", {})
    if spec.preconditioner and table.preconditioner_key(spec.preconditioner) not in fitted:
        return f"no {spec.preconditioner!r} R fitted (trackstar-db fit)"
    return None


def bm25(db, method: Method, request: Request) -> TopKResult:
    """Tantivy's BM25 over the examples, searched with each query's text."""
    from trackstar_db.store.bm25 import BM25Index  # heavy: tantivy

    index = BM25Index.reader(db, must_exist=db.count("examples") > 0)
    return TopKResult.from_hits(index.search_many(request.texts, request.k), request.k)


def bm25_mean(db, method: Method, request: Request) -> MeanScores:
    """The mean over the query texts of each example's BM25 score (0 where a text does not match it)."""
    from trackstar_db.store.bm25 import BM25Index  # heavy: tantivy

    ids = db.table("examples", columns=["example_id"]).column("example_id").to_pylist()
    position = {example_id: i for i, example_id in enumerate(ids)}
    total = np.zeros(len(ids), np.float64)
    for hits in BM25Index.reader(db, must_exist=True).search_many(request.texts, max(1, len(ids))):
        for example_id, score in hits:
            if example_id in position:
                total[position[example_id]] += score
    return MeanScores(ids, (total / max(1, len(request.texts))).astype(np.float32), "mean-score")


def ready(db, method: Method) -> str | None:
    """Nothing beyond the examples: BM25 builds its index as it goes."""
    return None


def embedding(db, method: Method, request: Request) -> TopKResult:
    """The dense sentence-embedding baseline: cosine of the query texts' and the examples' embeddings."""
    from . import embedding as dense  # heavy: transformers

    texts = ((b.column("example_id").to_pylist(), b.column("text").to_pylist())
             for b in db.dataset("examples").to_batches(columns=["example_id", "text"], batch_size=4096))
    batches = scan_progress(dense.embed_batches(texts, device=request.device), db.count("examples"), "embedding")
    return search(dense.embed(request.texts, device=request.device), batches, request.k, opponents=False)


def embedding_status(db, method: Method) -> str | None:
    """The embedding baseline needs its package."""
    return None if extra_installed(method.name) else f"pip install 'trackstar-db[{method.extra}]'"


def lm_embedding(db, method: Method, request: Request) -> TopKResult:
    """FTRACE's baseline: the attributed model's own hidden states (retrieval/lm_embedding.py)."""
    return top_k(db, request.texts, request.k, request.device)


def model_status(db, method: Method) -> str | None:
    """A method that loads the attributed model needs one recorded."""
    return None if db.manifest.get("model") else "no model recorded"


def tracin_cp(db, method: Method, request: Request) -> TopKResult:
    """TracIn-CP over the checkpoints' stored gradient tables (retrieval/tracin_cp.py)."""
    return top_k_stored(db, request.query_ids, request.k, method.name, request.device)


def factor_status(db, method: Method) -> str | None:
    """The Kronecker-factored methods need 'trackstar-db fit-factors' (gradients/factors.py)."""
    return factors_missing(db.manifest, method.name)


def kronecker_proj(db, method: Method, request: Request) -> TopKResult:
    """kfac-proj / ekfac-proj: the uncorrected vectors through the projected curvature F_p that
    fit-factors stored (gradients/factors.py), by the one scoring path (g_z . g_q F_p^-1)."""
    from trackstar_db.gradients.factors import load_projected  # heavy: torch

    spec = method.spec
    vectors = request.query_vectors
    if vectors is None:
        vectors = stored_query_vectors(db, spec, request.query_ids)
    table = db.gradient_table("train", corrected=False).require()
    scoring = Scoring(spec, table, load_projected(db, spec.preconditioner), None)
    return score_table(db, spec, vectors, request.k, device=request.device, batch_rows=request.batch_rows,
                       scoring=scoring)


def stages(db, method: Method, rerank: str | None) -> tuple[Method, str | None]:
    """(the method whose answer comes first, the second stage re-scoring it or None): kfac /
    ekfac as methods are the best rung's top candidates re-scored by themselves."""
    if method.runner != "rerank":
        return method, rerank
    if rerank not in (None, method.name):
        raise ParameterError("rerank", f"{rerank!r} with method {method.name}, itself the {method.name} second "
                                       f"stage; name a first-stage method")
    return lookup(best_method(db)), method.name


def rerank(db, method: Method, request: Request) -> TopKResult:
    """kfac / ekfac as methods: the best rung's top candidates re-scored (retrieval/rerank.py)."""
    first, second = stages(db, method, request.rerank)
    return run(db, first, dataclasses.replace(request, rerank=second))


@dataclass(frozen=True)
class Runner:
    """What one kind of method implements: its top-k, why it cannot answer a database now (or
    None), and, where it has one, its mean score over a set of queries (select's aggregate)."""

    top_k: Callable[[object, Method, Request], TopKResult]
    status: Callable[[object, Method], str | None]
    mean: Callable[[object, Method, Request], MeanScores] | None = None


RUNNERS: dict[str, Runner] = {
    "gradient": Runner(gradient, gradient_status, gradient_mean), "bm25": Runner(bm25, ready, bm25_mean),
    "embedding": Runner(embedding, embedding_status), "lm-embedding": Runner(lm_embedding, model_status),
    "tracin-cp": Runner(tracin_cp, model_status), "kronecker-proj": Runner(kronecker_proj, factor_status),
    "rerank": Runner(rerank, factor_status),
}


def status(db, method: Method) -> str | None:
    """Why `method` cannot answer from `db` now (what its kind needs, then the examples), or None."""
    reason = RUNNERS[method.runner].status(db, method)
    if reason is None and db.count("examples") == 0:
        return "no examples"
    return reason


def best_method(db) -> str:
    """The first rung of PREFERENCE whose tables and R this database holds."""
    for name in PREFERENCE:
        entry = lookup(name)
        if RUNNERS[entry.runner].status(db, entry) is None:
            return name
    raise TrackstarError(f"{db.path}: no gradient method can answer yet; run 'trackstar-db ingest gradients {db.path}'")


def aggregating() -> list[Method]:
    """The methods with a mean score over a set of queries (`aggregate`), in display order."""
    return [m for m in REGISTRY.values() if RUNNERS[m.runner].mean is not None]


def aggregate(db, method: Method, request: Request) -> MeanScores:
    """Every example's mean score over the request's queries under `method` (its kind's `mean`);
    with `request.ann`, the best request.k from the method's ANN index."""
    mean = RUNNERS[method.runner].mean
    if mean is None:
        raise TrackstarError(f"{method.name} has no mean score over a set of queries; methods that have one: "
                             f"{', '.join(m.name for m in aggregating())}")
    if request.ann is not None and not method.serves_ann:
        raise TrackstarError(f"ann: an ANN index serves the gradient methods, not {method.name}")
    return mean(db, method, request)


def run(db, method: Method, request: Request) -> TopKResult:
    """Top-k of `method` for `request`; an ANN search only where the method serves one."""
    if request.ann is not None and not method.serves_ann and method.runner != "rerank":
        raise TrackstarError(f"ann: an ANN index serves the gradient methods, not {method.name}")
    if request.rerank is None or method.runner == "rerank":
        return RUNNERS[method.runner].top_k(db, method, request)
    from .rerank import check_rerank  # heavy: transformers
    from .rerank import rerank as second_stage  # heavy: transformers

    check_rerank(request.rerank, request.candidates)
    if request.pairs is None:
        raise TrackstarError(f"rerank: the queries' (prompt, target) pairs are needed to re-score {method.name}")
    wide = dataclasses.replace(request, k=request.candidates, rerank=None)
    candidates = RUNNERS[method.runner].top_k(db, method, wide)
    return second_stage(db, candidates, request.pairs, request.k, request.rerank, request.device,
                        first_method=method.name)
