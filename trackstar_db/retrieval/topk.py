"""Exact streaming top-k: score every stored vector against a set of queries, keep the best k.

`search(queries [nq, d], batches, k)` consumes an iterator of (ids, vectors [nb, d]) batches
(e.g. the record batches of a Lance gradient table, see `vector_batches`), scores each batch by
one matrix product (scores [nq, nb] = Q X^T, float32, on Q's device: the GPU when Q is on cuda)
and merges it into a running top-k, so memory is O(nq * k + nb * d), never O(corpus).

Proponents are the k highest scores, opponents the k lowest. Tie-break (deterministic): among
equal scores the example that came first in the stream wins (lower position = better rank),
for proponents and opponents alike, independent of how the stream is split into batches.
Non-finite scores are an error (they come from non-finite stored vectors).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Iterable, Sequence

import numpy as np
import pyarrow as pa
import torch

from trackstar_db.errors import TrackstarError
from trackstar_db.store import schema as _schema

Transform = Callable[[torch.Tensor], torch.Tensor]  # [b, d] -> [b, d], must not modify its input


class RunningTopK:
    """The k best scores per query seen so far (largest, or smallest for opponents), with their
    stream positions: values [nq, <=k] sorted best first; positions [nq, <=k] (int64, 0-based).
    """

    def __init__(self, n_queries: int, k: int, device: torch.device, largest: bool = True):
        if k < 1:
            raise TrackstarError(f"top-k: k must be >= 1, not {k}")
        self.k, self.largest = k, largest
        self.values = torch.empty((n_queries, 0), dtype=torch.float32, device=device)
        self.positions = torch.empty((n_queries, 0), dtype=torch.long, device=device)

    def update(self, scores: torch.Tensor, offset: int) -> None:
        """Merge scores [nq, nb] of stream positions offset .. offset+nb-1."""
        kk = min(self.k, scores.shape[1])
        values, index = torch.topk(scores, min(kk + 1, scores.shape[1]), dim=1, largest=self.largest)
        if not bool(torch.isfinite(values).all()):  # NaN and +-inf sort first: they show here
            raise ValueError(int(torch.nonzero(~torch.isfinite(scores).all(dim=0))[0]))
        if values.shape[1] > kk and bool((values[:, kk - 1] == values[:, kk]).any()):
            # a tie at the cut: topk may pick any of the tied columns, a stable sort the first ones
            values, index = torch.sort(scores, dim=1, descending=self.largest, stable=True)
        values, index = values[:, :kk], index[:, :kk]
        index, order = torch.sort(index, dim=1)  # position order first ...
        values = torch.cat([self.values, values.gather(1, order)], dim=1)  # ... earlier batches first ...
        positions = torch.cat([self.positions, index + offset], dim=1)
        values, order = torch.sort(values, dim=1, descending=self.largest, stable=True)  # ... kept by stability
        self.values = values[:, : self.k]
        self.positions = positions.gather(1, order)[:, : self.k]


@dataclass
class TopKResult:
    """Proponents/opponents per query: ids [nq][<=k] and scores [nq, <=k], best first."""

    proponent_ids: list[list[str]]
    proponent_scores: np.ndarray
    opponent_ids: list[list[str]]
    opponent_scores: np.ndarray

    @classmethod
    def from_hits(cls, hits: Sequence[Sequence[tuple[str, float]]], k: int) -> "TopKResult":
        """From per-query (id, score) lists best first (BM25), without opponents."""
        scores = np.zeros((len(hits), k), np.float32)
        for row, pairs in enumerate(hits):
            scores[row, :len(pairs)] = [score for _, score in pairs]
        return cls([[i for i, _ in pairs] for pairs in hits], scores, [[] for _ in hits],
                   np.zeros((len(hits), 0), np.float32))

    def to_arrow(self, query_ids: Sequence[str], run_id: str, method: str) -> pa.Table:
        """Rows of the retrievals table (schema/retrievals.json), proponents then opponents."""
        if len(query_ids) != len(self.proponent_ids):
            raise TrackstarError(f"top-k: {len(query_ids)} query ids for {len(self.proponent_ids)} queries")
        columns: dict[str, list] = {name: [] for name in ("query_id", "kind", "rank", "example_id")}
        scores = []
        for kind, ids, values in (("proponent", self.proponent_ids, self.proponent_scores),
                                  ("opponent", self.opponent_ids, self.opponent_scores)):
            for row, query_id in enumerate(query_ids):
                n = len(ids[row])
                columns["query_id"] += [query_id] * n
                columns["kind"] += [kind] * n
                columns["rank"] += range(1, n + 1)
                columns["example_id"] += ids[row]
                scores.append(values[row, :n])
        n_rows = len(columns["rank"])
        table = pa.table({
            "run_id": pa.array([run_id] * n_rows, pa.string()),
            "method": pa.array([method] * n_rows, pa.string()),
            **{name: pa.array(values) for name, values in columns.items()},
            "score": pa.array(np.concatenate(scores) if scores else np.zeros(0, np.float32), pa.float32()),
        })
        return _schema.conform(table, _schema.arrow_schema("retrievals"))


def search(queries: torch.Tensor, batches: Iterable[tuple[Sequence[str], torch.Tensor]], k: int, *,
           transform: Transform | None = None, opponents: bool = True) -> TopKResult:
    """Exact top-k proponents (and opponents) of each query over a stream of vector batches.

    queries [nq, d] (already transformed: see retrieval.methods.query_transform); batches yield
    (ids [nb], X [nb, d]) of any float dtype on any device; X is moved to the queries' device,
    cast to float32 and passed through `transform` before scoring. Returns at most k per kind
    (fewer when the corpus is smaller).
    """
    if queries.dim() != 2:
        raise TrackstarError(f"top-k: queries must be [n_queries, dim], not {list(queries.shape)}")
    queries = queries.float()
    device = queries.device
    best = RunningTopK(len(queries), k, device)
    worst = RunningTopK(len(queries), k, device, largest=False) if opponents else None
    names: dict[int, str] = {}  # stream position -> id, only for positions still in a top-k
    offset = 0
    with torch.inference_mode():
        for ids, x in batches:
            if len(ids) != len(x):
                raise TrackstarError(f"top-k: batch at position {offset} has {len(ids)} ids for {len(x)} vectors")
            if len(ids) == 0:
                continue
            x = x.to(device=device, dtype=torch.float32, non_blocking=True)
            if transform is not None:
                try:
                    x = transform(x)
                except ValueError as exc:
                    raise TrackstarError(f"batch starting at example {ids[0]!r}: {exc}") from None
            if x.shape[1] != queries.shape[1]:
                raise TrackstarError(f"top-k: vectors have dim {x.shape[1]}, queries {queries.shape[1]}")
            scores = queries @ x.T  # [nq, nb]
            try:
                for state in (best, worst) if worst is not None else (best,):
                    state.update(scores, offset)
            except ValueError as exc:  # update names the column of a non-finite score
                raise TrackstarError(f"top-k: non-finite score for example {ids[exc.args[0]]!r}") from None
            names.update(zip(range(offset, offset + len(ids)), ids))
            offset += len(ids)
            keep = set(best.positions.flatten().tolist())
            if worst is not None:
                keep |= set(worst.positions.flatten().tolist())
            names = {p: names[p] for p in keep}
    worst = worst or RunningTopK(len(queries), k, device, largest=False)

    def ids_of(state: RunningTopK) -> list[list[str]]:
        return [[names[p] for p in row] for row in state.positions.tolist()]

    return TopKResult(ids_of(best), best.values.cpu().numpy(),
                      ids_of(worst), worst.values.cpu().numpy())
