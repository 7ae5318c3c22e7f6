"""The second stage: re-score a first stage's candidates through the Kronecker-factored curvature.

A first stage (any method that serves the request: a ladder rung from stored vectors or its ANN
index, BM25, ...) returns its top N proponents and N opponents per query; the union of those
candidates is featurized again on the warm model, this time in full (no projection): each
tracked matrix's per-example gradient rotated into the factors' eigenbasis, Q_r^T G Q_c. The
query's rotated gradient, divided by (Lambda + lambda) (featurizer/kfac.py), is dotted with them:

    score(q, z) = g_q^T (F + lambda)^-1 g_z     F: K-FAC C_r (x) C_c, or EK-FAC's corrected eigenvalues

Each query's candidates are then ranked by that score: the k highest are its proponents, the k
lowest its opponents. The first stage's score and rank of every answer stay beside the new
score (RerankedResult.first_stage; the Arrow answer of a one-prompt query carries them as
first_score, first_rank and first_method).

`score_examples(db, pairs, example_ids)` is the same scoring without a first stage: given
(prompt, target) queries against given example ids (or every example), for callers that need
full rows (validate's LDS over every example).

Cost: one forward and backward per candidate (batched) and [rows, cols] floats per candidate and
tracked matrix in the batch, so N = 200 on the demo's 2-layer GPT-2 is a fraction of a second
on a CPU; for a large model use a GPU (device) and a smaller batch_size.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import torch

from trackstar_db.errors import ParameterError, TrackstarError
from trackstar_db.featurizer import kfac as _kfac
from trackstar_db.option_checks import COUNT, Choice, check
from trackstar_db.featurizer.tokenize import collate, pad_id
from trackstar_db.gradients.factors import load_factors
from trackstar_db.gradients.loader import database_featurizer, stored_config
from trackstar_db.models.cache import ModelKey
from trackstar_db.progress import quiet_transformers

from .topk import TopKResult

BATCH_SIZE = 16  # candidates featurized per forward/backward
DIRECT_QUERIES = 4  # up to this many queries, candidates are scored without rotating their gradients
QUERY_BYTES = 512 << 20  # float32 bytes of preconditioned query gradients held at once


RERANKS = Choice(_kfac.KINDS)  # the second stages: --rerank, RetrieveOptions.rerank, select's rerank


def check_rerank(kind: str | None, candidates: int) -> None:
    """The one check of --rerank / --candidates."""
    check("rerank", RERANKS, kind)
    check("candidates", COUNT, candidates)


def _model(db, device: str):
    """(featurizer, tokenizer) of the database's final model, from the handle's model cache
    (`db.models`, models/cache.py): a featurizer a query already loaded there when it holds one,
    else one loaded now without an optimizer correction (kept there)."""
    warm = db.models.find(db.manifest, device)
    if warm is not None:
        return warm
    config = stored_config(db)
    if config is None:
        raise TrackstarError(f"{db.path}: no gradients stored yet; run 'trackstar-db ingest gradients'")

    def load():
        with quiet_transformers():
            return database_featurizer(db, replace(config, correction="none"), device=device)

    return db.models.get(ModelKey.of(db.manifest, "plain", device), load)


class FactorScorer:
    """g_q^T (F + lambda)^-1 g_z for (prompt, target) queries against training examples, on a
    warm model with the database's stored factors (gradients/factors.py)."""

    def __init__(self, db, kind: str | None = None, device: str = "cpu", batch_size: int = BATCH_SIZE):
        self.db, self.factors = db, load_factors(db)
        self.kind = _kfac.check_kind(kind or self.factors.kind)
        if self.kind == "ekfac" and not self.factors.corrected:
            raise TrackstarError(f"{db.path}: the stored factors are K-FAC; run 'trackstar-db fit-factors "
                                 f"{db.path} --kind ekfac' for EK-FAC")
        self.featurizer, self.tokenizer = _model(db, device)
        self.batch_size = batch_size
        names = [m.name for m in self.featurizer.tracked]
        if sorted(names) != sorted(self.factors.sides):
            raise TrackstarError(f"{db.path}: the factors were fitted on other tracked matrices than the model's; "
                                 f"run 'trackstar-db fit-factors {db.path}'")

    def query_chunk(self) -> int:
        """Queries preconditioned at once: their [rows, cols] per matrix fit in QUERY_BYTES."""
        params = sum(m.rows * m.cols for m in self.featurizer.tracked)
        return max(1, QUERY_BYTES // (4 * params))

    def _batch(self, items) -> dict[str, torch.Tensor]:
        return {k: v.to(self.featurizer.device) for k, v in collate(items, pad_id(self.tokenizer)).items()}

    def _rotated(self, items) -> dict[str, torch.Tensor]:
        rotated, _ = _kfac.rotated_batch(self.featurizer.model, self.featurizer.tracked, self.factors, self._batch(items))
        return rotated

    def queries(self, pairs: list[tuple[str, str]]) -> dict[str, torch.Tensor]:
        """(F + lambda)^-1 g_q in the eigenbasis, {name: [nq, rows, cols]}."""
        task, length = self.featurizer.task, self.featurizer.config.max_length
        parts = [self._rotated([task.encode_query(self.tokenizer, p, t, length) for p, t in pairs[i: i + self.batch_size]])
                 for i in range(0, len(pairs), self.batch_size)]
        rotated = {name: torch.cat([part[name] for part in parts]) for name in parts[0]}
        return _kfac.precondition(self.factors, rotated, self.kind)

    def score(self, preconditioned: dict[str, torch.Tensor], rows: pa.Table) -> np.ndarray:
        """[nq, len(rows)] float64 scores against examples rows (text, and loss_spans when the task masks).
        Up to DIRECT_QUERIES queries: each query's (F + lambda)^-1 g_q is turned back into the
        weight's layout once and dotted with the candidates' token factors (kfac.direct_scores: no
        per-example [rows, cols] is formed); more: the candidates' gradients are rotated once and
        shared by all queries (kfac.rotated_batch, pair_scores)."""
        task, length = self.featurizer.task, self.featurizer.config.max_length
        texts = rows.column("text").to_pylist()
        spans = rows.column("loss_spans").to_pylist() if "loss_spans" in rows.column_names else [None] * len(texts)
        items = [task.encode_example(self.tokenizer, t, s, length) for t, s in zip(texts, spans)]
        order = sorted(range(len(items)), key=lambda i: -len(items[i].input_ids))  # less padding per batch
        n_queries = next(iter(preconditioned.values())).shape[0]
        direct = _kfac.unrotate(self.factors, preconditioned) if n_queries <= DIRECT_QUERIES else None
        out = np.zeros((n_queries, len(items)), np.float64)
        for start in range(0, len(order), self.batch_size):
            picked = order[start: start + self.batch_size]
            if direct is not None:
                out[:, picked] = _kfac.direct_scores(self.featurizer.model, self.featurizer.tracked, direct,
                                                     self._batch([items[i] for i in picked]),
                                                     summed=self.factors.summed).cpu().numpy()
                continue
            rotated = self._rotated([items[i] for i in picked])
            out[:, picked] = _kfac.pair_scores(preconditioned, rotated).cpu().numpy()
        return out


def _example_rows(db, ids: list[str] | None) -> pa.Table:
    columns = ["example_id", "text"] + (["loss_spans"] if "loss_spans" in db.dataset("examples").schema.names else [])
    rows = db.table("examples", columns=columns, filter=None if ids is None else pc.field("example_id").isin(ids))
    if ids is None:
        return rows.sort_by("example_id")
    position = {e: i for i, e in enumerate(rows.column("example_id").to_pylist())}
    missing = [e for e in ids if e not in position]
    if missing:
        raise TrackstarError(f"{len(missing)} example id(s) not in the database (first {missing[0]!r})")
    return rows.take([position[e] for e in ids])


def score_examples(db, pairs: list[tuple[str, str]], example_ids: list[str] | None = None, kind: str | None = None,
                   device: str = "cpu", batch_size: int = BATCH_SIZE, chunk: int = 2048) -> tuple[list[str], np.ndarray]:
    """(example ids, scores [len(pairs), n] float64): g_q^T (F + lambda)^-1 g_z of every
    (prompt, target) query against `example_ids` (None: every example, in id order) through
    the stored factors of `kind` (None: the fitted kind). Memory: one chunk of example texts and
    one chunk of queries (QUERY_BYTES); each example is featurized once per chunk of queries."""
    if not pairs:
        raise ParameterError("pairs", "must hold at least one (prompt, target) query")
    scorer = FactorScorer(db, kind, device, batch_size=batch_size)
    ids = example_ids if example_ids is not None else _example_rows(db, None).column("example_id").to_pylist()
    out = np.zeros((len(pairs), len(ids)), np.float64)
    step = scorer.query_chunk()
    for q in range(0, len(pairs), step):  # every example featurized once per chunk of queries
        preconditioned = scorer.queries(pairs[q: q + step])
        for i in range(0, len(ids), chunk):
            out[q: q + step, i: i + chunk] = scorer.score(preconditioned, _example_rows(db, ids[i: i + chunk]))
    return list(ids), out


def score_queries(db, query_ids: list[str], example_ids: list[str] | None = None, kind: str | None = None,
                  device: str = "cpu", batch_size: int = BATCH_SIZE) -> tuple[list[str], np.ndarray]:
    """score_examples for stored queries (their prompt and target), rows in `query_ids` order."""
    rows = db.table("queries", columns=["query_id", "prompt", "target"], filter=pc.field("query_id").isin(query_ids))
    found = {q: (p, t) for q, p, t in zip(*(rows.column(c).to_pylist() for c in ("query_id", "prompt", "target")))}
    missing = [q for q in query_ids if q not in found]
    if missing:
        raise TrackstarError(f"{len(missing)} query id(s) not in the database (first {missing[0]!r})")
    return score_examples(db, [found[q] for q in query_ids], example_ids, kind, device, batch_size)


@dataclass
class RerankedResult(TopKResult):
    """A TopKResult ranked by the second stage, with the first stage's score and rank of each
    answer: first_stage[kind][q] = [(score, rank)] aligned with the answer's ids."""

    first_stage: dict = field(default_factory=dict)
    first_method: str = ""

    def annotate(self, table: pa.Table) -> pa.Table:
        """`table` (to_arrow's rows, proponents then opponents per query) with first_score,
        first_rank (the first stage's rank among its proponents, negative: among its opponents)
        and first_method columns."""
        scores, ranks = [], []
        for kind in ("proponent", "opponent"):
            for row in self.first_stage[kind]:
                scores += [s for s, _ in row]
                ranks += [r for _, r in row]
        return (table.append_column("first_score", pa.array(scores, pa.float32()))
                .append_column("first_rank", pa.array(ranks, pa.int32()))
                .append_column("first_method", pa.array([self.first_method] * table.num_rows, pa.string())))


def rerank(db, first: TopKResult, pairs: list[tuple[str, str]], k: int, kind: str | None = None,
           device: str = "cpu", first_method: str = "") -> RerankedResult:
    """Re-score each query's first-stage proponents and opponents (the union over a chunk of
    queries, FactorScorer.query_chunk, is featurized once) and rank them by the curvature-weighted
    score: k proponents, k opponents."""
    if len(pairs) != len(first.proponent_ids):
        raise TrackstarError(f"rerank: {len(pairs)} queries for {len(first.proponent_ids)} first-stage answers")
    scorer = FactorScorer(db, kind, device)
    known: list[dict[str, tuple[float, int]]] = []  # per query: id -> (first score, first rank), signed rank for opponents
    for q in range(len(pairs)):
        seen: dict[str, tuple[float, int]] = {}
        for ids, scores, sign in ((first.opponent_ids[q], first.opponent_scores[q], -1),
                                  (first.proponent_ids[q], first.proponent_scores[q], 1)):
            for rank, (e, s) in enumerate(zip(ids, scores), 1):
                seen[e] = (float(s), rank * sign)
        known.append(seen)
    if not any(known):
        return RerankedResult([[] for _ in pairs], np.zeros((len(pairs), 0), np.float32), [[] for _ in pairs],
                              np.zeros((len(pairs), 0), np.float32), {"proponent": [[] for _ in pairs],
                                                                        "opponent": [[] for _ in pairs]}, first_method)
    best = min(k, max(len(seen) for seen in known))
    prop_ids, opp_ids, stage = [], [], {"proponent": [], "opponent": []}
    prop = np.zeros((len(pairs), best), np.float32)
    opp = np.zeros((len(pairs), best), np.float32)
    step = scorer.query_chunk()
    for start in range(0, len(pairs), step):  # bounded memory: a chunk of queries and their candidates' union
        chunk = known[start: start + step]
        union = sorted({e for seen in chunk for e in seen})
        scores = scorer.score(scorer.queries(pairs[start: start + step]), _example_rows(db, union))
        column = {e: i for i, e in enumerate(union)}
        for offset, seen in enumerate(chunk):
            q = start + offset
            ids = list(seen)
            values = scores[offset, [column[e] for e in ids]]
            order = np.argsort(-values, kind="stable")
            top, bottom = order[:k], order[::-1][:k]
            prop_ids.append([ids[i] for i in top])
            opp_ids.append([ids[i] for i in bottom])
            prop[q, :len(top)], opp[q, :len(bottom)] = values[top], values[bottom]
            stage["proponent"].append([seen[ids[i]] for i in top])
            stage["opponent"].append([seen[ids[i]] for i in bottom])
    return RerankedResult(prop_ids, prop, opp_ids, opp, stage, first_method)
