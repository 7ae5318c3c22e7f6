"""Approximate top-k for interactive latency: a rung's final train vectors in a Lance table with
LanceDB's own vector index (`trackstar-db index`, `retrieve --ann`, `query --ann`). This module
searches an index and checks that it is fresh; retrieval/ann_build.py builds one.

The exact scan (retrieval/scoring.py) keeps R on the query side so one stored table serves every
rung. An index cannot: it needs the vectors the rung actually compares. The build therefore
materialises t_train(g_z) = unit?(g_z R^p_train) (float16, [n_rows, d]) once, streaming the same
scan as exact retrieval, into the table

    ann_<method>      id: string, vector: fixed_size_list<float16, d>     (r-train -> ann_r_train)

in DB/ann/ (a LanceDB directory of its own: SQL over the database never meets the float16
column, which DuckDB cannot read) and builds a vector index on it (metric 'dot': the score of
every rung is a dot product). A query is t_query(g_q) = unit?(g_q R^p_query)
(methods.query_transform); proponents are its nearest vectors, opponents the nearest to
-t_query. Scores are dot products of the float16 vectors the table holds: Lance's own 'dot'
distance (1 - q.x) when its candidates were re-ranked on those vectors (refine_factor) or the
index is flat, else recomputed in float32 from the returned vectors (a quantised distance is
only an estimate).

Provenance: the manifest's `ann[<method>]` records the source table's version and row count and,
for rungs with R, the preconditioner key, its file's sha256 and its parameters (lambda, damping,
k, kind, table_version). A search compares them with the database as it is now and refuses a
stale index in one line saying what to run (rows appended, R refitted).

Index kinds (KINDS): ivf_rq (RaBitQ codes, the default), ivf_pq, ivf_hnsw_sq and ivf_flat (exact
within the partitions searched). The quantised kinds re-rank QUANTISED_SEARCH candidates on the
float16 vectors unless told otherwise. Why these defaults, and what each kind measured at 100K and
1M rows: docs/scale.md.
"""

from __future__ import annotations

import os
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import numpy as np
import pyarrow as pa
import torch

from trackstar_db.errors import TrackstarError
from trackstar_db.option_checks import COUNT, check_fields, ruled
from trackstar_db.store.manifest import file_digest
from trackstar_db.store.vectors import to_torch

from .methods import get_method, query_transform
from .scoring import load_preconditioner
from .topk import TopKResult

KINDS = ("ivf_rq", "ivf_pq", "ivf_hnsw_sq", "ivf_flat")
# 4-bit RaBitQ codes: the kind with the best recall for its re-ranked candidates (docs/scale.md)
DEFAULT_KIND = "ivf_rq"
# on a quantised index (ivf_rq, ivf_pq) when not given: nprobes, and how many candidates are
# re-ranked on the float16 vectors (refine_factor = candidates / k); measured in docs/scale.md
QUANTISED_SEARCH = {"ivf_rq": {"nprobes": 4, "candidates": 300}, "ivf_pq": {"nprobes": 8, "candidates": 1000}}


@dataclass
class AnnOptions:
    """Search parameters (None: LanceDB's default, except on a quantised index, ivf_rq or ivf_pq:
    QUANTISED_SEARCH, since the 4-bit codes alone rank poorly: docs/scale.md). nprobes: IVF partitions
    visited; refine_factor: re-rank refine_factor * k candidates with the full float16 vectors;
    ef: HNSW candidate list size (IVF_HNSW_*), >= k."""

    nprobes: int | None = ruled(COUNT, None)
    refine_factor: int | None = ruled(COUNT, None)
    ef: int | None = ruled(COUNT, None)

    def __post_init__(self):
        check_fields(self)


def table_name(method: str) -> str:
    return "ann_" + get_method(method).name.replace("-", "_")


# Lance's caches of opened index partitions and file metadata, shared by every ANN dataset this
# process opens: without it each search (a fresh dataset at the latest version) reads its
# partitions again (the cost is in docs/scale.md). Bounded: INDEX_CACHE_BYTES.
INDEX_CACHE_BYTES = 1 << 30
_SESSION = None


def open_table(db, method: str):
    """The Lance dataset of method's index (refused when missing; not checked for staleness).
    Read with Lance alone: a search never imports LanceDB."""
    global _SESSION
    import lance  # heavy: lance

    path = db.path / "ann" / f"{table_name(method)}.lance"
    if not (path / "_versions").is_dir():
        raise TrackstarError(f"{db.path}: no ANN index for {method}; run 'trackstar-db index {db.path} --method {method}'")
    if _SESSION is None:
        _SESSION = lance.Session(index_cache_size_bytes=INDEX_CACHE_BYTES)
    return lance.dataset(str(path), session=_SESSION)


_DIGESTS: dict[tuple, str] = {}  # (path, inode, size, mtime) -> sha256, so a warm query does not rehash R


def _digest(path) -> str:
    stat = path.stat()
    key = (str(path), stat.st_ino, stat.st_size, stat.st_mtime_ns)
    if key not in _DIGESTS:
        _DIGESTS.clear()
        _DIGESTS[key] = file_digest(path)
    return _DIGESTS[key]


def source_version(db, method: str) -> dict:
    """What an index of `method` is built from, as the database holds it now."""
    spec = get_method(method)
    table = db.gradient_table("train", corrected=spec.table == "corrected").require()
    dataset = table.dataset()  # opened once: a search checks this on every call
    out = {"table": table.name, "table_version": dataset.version, "rows": dataset.count_rows()}
    if spec.preconditioner:
        key = table.preconditioner_key(spec.preconditioner)
        path = table.preconditioner_path(spec.preconditioner)
        entry = db.manifest.get("preconditioners", {}).get(key)
        if entry is None or not path.is_file():
            raise TrackstarError(f"no {spec.preconditioner!r} preconditioner for {table.name}; run 'trackstar-db fit {db.path}'")
        params = {name: entry.get(name) for name in ("lambda", "damping", "k", "kind", "table_version")}
        out.update(preconditioner=key, r_sha256=_digest(path), r_params=params)
    return out


def require_index(db, method: str) -> dict:
    """The manifest entry of method's index, refused when missing or stale."""
    entry = db.manifest.get("ann", {}).get(method)
    hint = f"run 'trackstar-db index {db.path} --method {method}'"
    if entry is None:
        raise TrackstarError(f"{db.path}: no ANN index for {method}; {hint}")
    now, then = source_version(db, method), entry["source"]
    for key, what in (("table_version", "version"), ("rows", "rows"), ("r_sha256", "R file"), ("r_params", "R")):
        if now.get(key) != then.get(key):
            changed = f"{what} {then.get(key)} -> {now.get(key)}" if key in ("table_version", "rows") else f"{what} refitted"
            raise TrackstarError(f"{entry['table']} is stale ({then['table']} {changed} since it was built); {hint}")
    return entry


SEARCH_BATCH = 64  # query vectors per Lance call (each call returns SEARCH_BATCH x k hits)


def search_ann(db, method: str, g_q: torch.Tensor, k: int, options: AnnOptions | None = None,
               mean: bool = False) -> TopKResult:
    """Approximate top-k proponents and opponents of raw query gradients g_q [nq, d]; with
    `mean`, of one query: the mean of their t_query vectors (select's aggregate).

    The index is read with Lance directly (LanceDB's query builder is slower: docs/scale.md)
    and the 2 x nq searches (t_query, -t_query) go to
    Lance at most SEARCH_BATCH vectors per call, the calls spread over the machine's cores."""
    spec = get_method(method)
    preconditioners = {}
    if spec.preconditioner:
        table = db.gradient_table("train", corrected=spec.table == "corrected")
        preconditioners[spec.preconditioner] = load_preconditioner(table, spec.preconditioner)
    q = query_transform(spec, preconditioners)(g_q.float().cpu())
    return search_vectors(db, method, q.mean(dim=0, keepdim=True) if mean else q, k, options)


def search_vectors(db, method: str, q: torch.Tensor, k: int, options: AnnOptions | None = None) -> TopKResult:
    """search_ann for query vectors already transformed, t_query(g_q) [nq, d] (or any vector in
    that space, e.g. the mean of a task's: selection/select.py)."""
    options = options or AnnOptions()
    entry = require_index(db, method)
    q = q.float().cpu().numpy().astype(np.float32)
    if q.shape[1] != entry["dim"]:
        raise TrackstarError(f"{entry['table']}: vectors have dim {entry['dim']}, the query {q.shape[1]}")
    if entry["kind"] in QUANTISED_SEARCH:  # a quantised distance is only an estimate: re-rank
        default = QUANTISED_SEARCH[entry["kind"]]
        options = AnnOptions(options.nprobes or default["nprobes"],
                             options.refine_factor or -(-default["candidates"] // k), options.ef)
    # re-ranked on the full vectors (refine_factor) or flat: Lance's distances are exact, and
    # fetching 8 KB per hit to recompute them is not needed
    exact_distances = bool(options.refine_factor) or entry["kind"] == "ivf_flat"
    nearest = {"column": "vector", "k": k, "nprobes": options.nprobes, "refine_factor": options.refine_factor,
               "ef": options.ef}
    nearest = {key: value for key, value in nearest.items() if value is not None}
    columns = ["id", "_distance"] if exact_distances else ["id", "vector", "_distance"]
    dataset = open_table(db, method)
    signed = np.concatenate([q, -q])  # rows 0..nq-1: proponents; nq..2nq-1: opponents
    # calls run on every core (Lance releases the GIL): one query's two searches side by side
    workers = max(1, min(os.cpu_count() or 1, len(signed)))
    size = min(SEARCH_BATCH, -(-len(signed) // workers))
    starts = range(0, len(signed), size)

    def search(first: int) -> pa.Table:
        chunk = signed[first: first + size]
        return dataset.to_table(columns=columns, nearest=dict(nearest, q=chunk if len(chunk) > 1 else chunk[0]))

    ids: list[list[str]] = []
    scores = np.zeros((len(signed), k), np.float32)
    with ThreadPoolExecutor(workers) as pool:
        for first, hits in zip(starts, pool.map(search, starts)):
            which = hits.column("query_index").to_numpy() if "query_index" in hits.column_names else np.zeros(hits.num_rows, int)
            for row, vector in enumerate(signed[first: first + size]):
                sign = 1.0 if first + row < len(q) else -1.0
                row_ids, row_scores = _ranked(hits.filter(pa.array(which == row)), vector * sign, sign, exact_distances)
                ids.append(row_ids)
                scores[first + row, :len(row_ids)] = row_scores
    nq = len(q)
    return TopKResult(ids[:nq], scores[:nq], ids[nq:], scores[nq:])


def _ranked(hits: pa.Table, query: np.ndarray, sign: float, exact_distances: bool) -> tuple[list[str], np.ndarray]:
    """One search's ids and float32 scores (query . stored float16 vector), best first for `sign`:
    from Lance's 'dot' distance 1 - (sign query) . x when it is exact, else recomputed."""
    if exact_distances:
        found = hits.sort_by("_distance")
        return found.column("id").to_pylist(), sign * (1.0 - found.column("_distance").to_numpy().astype(np.float32))
    if hits.num_rows == 0:
        return [], np.zeros(0, np.float32)

    x = to_torch(hits.column("vector"), "float16").numpy()
    scores = x @ query.astype(np.float32)
    order = np.argsort(-sign * scores, kind="stable")
    ids = hits.column("id").to_pylist()
    return [ids[i] for i in order], scores[order]
