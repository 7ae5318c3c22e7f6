"""Approximate top-k for interactive latency: a rung's final train vectors in a Lance table with
LanceDB's own vector index (`trackstar-db index`, `retrieve --ann`, `query --ann`).

The exact scan (retrieval/scoring.py) keeps R on the query side so one stored table serves every
rung. An index cannot: it needs the vectors the rung actually compares. `build_index` therefore
materialises t_train(g_z) = unit?(g_z R^p_train) (float16, [n_rows, d]) once, streaming the same
scan as exact retrieval, into the table

    ann_<method>      id: string, vector: fixed_size_list<float16, d>     (r-train -> ann_r_train)

in DB/ann/ (a LanceDB directory of its own: SQL over the database never meets the float16
column, which DuckDB cannot read) and builds a vector index on it (metric 'dot': the score of
every rung is a dot product). A query
is t_query(g_q) = unit?(g_q R^p_query) (methods.query_transform); proponents are its nearest
vectors, opponents the nearest to -t_query. Scores are recomputed in float32 from the returned
float16 vectors, so an ANN run's scores are dot products of the same vectors the index holds.

Provenance: the manifest's `ann[<method>]` records the source table's version and row count and,
for rungs with R, the preconditioner key, its file's sha256 and its parameters (lambda, damping,
k, kind, table_version). A search compares them with the database as it is now and refuses a
stale index in one line saying what to run (rows appended, R refitted).

Index kinds (KINDS): ivf_hnsw_sq (default; recall@100 0.96 at 5K x 1,024 but only 0.82 at
100K x 4,096 with 2.6 s per query on the loaded 2-core machine: docs/scale.md), ivf_pq (smaller;
needs refine_factor for recall; not benchmarked) and ivf_flat (exact within the partitions searched).
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass

import numpy as np
import pyarrow as pa
import torch

from trackstar_db.errors import TrackstarError

from .methods import get_method, query_transform
from .topk import TopKResult

KINDS = {"ivf_hnsw_sq": "IVF_HNSW_SQ", "ivf_pq": "IVF_PQ", "ivf_flat": "IVF_FLAT"}
DEFAULT_KIND = "ivf_hnsw_sq"


@dataclass
class AnnOptions:
    """Search parameters (None: LanceDB's default). nprobes: IVF partitions visited;
    refine_factor: re-rank refine_factor * k candidates with the full float16 vectors (PQ);
    ef: HNSW candidate list size (IVF_HNSW_*), >= k."""

    nprobes: int | None = None
    refine_factor: int | None = None
    ef: int | None = None

    def __post_init__(self):
        for name in ("nprobes", "refine_factor", "ef"):
            value = getattr(self, name)
            if value is not None and value < 1:
                raise TrackstarError(f"--{name.replace('_', '-')} must be >= 1, not {value}")


def table_name(method: str) -> str:
    return "ann_" + get_method(method).name.replace("-", "_")


def connection(db):
    """The LanceDB directory DB/ann/ holding the ANN tables."""
    import lancedb

    return lancedb.connect(str(db.path / "ann"))


def open_table(db, method: str):
    """The LanceDB table of method's index (refused when missing; not checked for staleness)."""
    conn, name = connection(db), table_name(method)
    if name not in conn.list_tables().tables:
        raise TrackstarError(f"{db.path}: no ANN index for {method}; run 'trackstar-db index {db.path} --method {method}'")
    return conn.open_table(name)


def _set_manifest(db, change) -> None:
    if hasattr(db, "update_manifest"):
        db.update_manifest(change)
    else:
        change(db.manifest)
        db.save_manifest()


_DIGESTS: dict[tuple, str] = {}  # (path, inode, size, mtime) -> sha256, so a warm query does not rehash R


def _digest(path) -> str:
    from trackstar_db.store.manifest import _file_digest

    stat = path.stat()
    key = (str(path), stat.st_ino, stat.st_size, stat.st_mtime_ns)
    if key not in _DIGESTS:
        _DIGESTS.clear()
        _DIGESTS[key] = _file_digest(path)
    return _DIGESTS[key]


def source_version(db, method: str) -> dict:
    """What an index of `method` is built from, as the database holds it now."""
    spec = get_method(method)
    table = db.gradient_table("train", corrected=spec.table == "corrected").require()
    out = {"table": table.name, "table_version": table.version(), "rows": table.count()}
    if spec.preconditioner:
        key = table.preconditioner_key(spec.preconditioner)
        path = table.preconditioner_path(spec.preconditioner)
        entry = db.manifest.get("preconditioners", {}).get(key)
        if entry is None or not path.is_file():
            raise TrackstarError(f"no {spec.preconditioner!r} preconditioner for {table.name}; run 'trackstar-db fit {db.path}'")
        params = {name: entry.get(name) for name in ("lambda", "damping", "k", "kind", "table_version")}
        out.update(preconditioner=key, r_sha256=_digest(path), r_params=params)
    return out


def _default_partitions(rows: int, kind: str) -> int:
    """IVF partitions: sqrt(rows) for the flat and PQ kinds; for HNSW inside each partition, one
    per 16,384 rows (a graph searches a big partition well; few partitions keep nprobes small)."""
    if kind == "ivf_hnsw_sq":
        return max(1, rows // 16384)
    return max(1, min(4096, int(math.sqrt(rows))))


def build_index(db, method: str, kind: str = DEFAULT_KIND, *, num_partitions: int | None = None,
                num_sub_vectors: int | None = None, m: int = 20, ef_construction: int = 300,
                batch_rows: int = 8192, device="cpu", progress: bool = True) -> dict:
    """Materialise `method`'s final unit vectors into ann_<method>, index them, record provenance.
    Returns the manifest entry (with build seconds). Memory: one scanned batch at a time."""
    from trackstar_db.store import vectors as _vectors
    from trackstar_db.store.vectors import scan_progress

    from .scoring import prepare, scan

    if kind not in KINDS:
        raise TrackstarError(f"--kind must be one of {', '.join(KINDS)}, not {kind!r}")
    spec = get_method(method)
    source = source_version(db, method)
    scoring = prepare(db, spec)  # refuses stale row norms before anything is written
    if source["rows"] < 2:
        raise TrackstarError(f"{source['table']}: {source['rows']} rows; an index needs at least 2")
    dim, name = scoring.table.dim, table_name(method)
    schema = pa.schema([("id", pa.string()), ("vector", _vectors.arrow_type(dim, "float16"))])

    def batches():
        stream = scan(scoring, device, batch_rows)
        if progress:
            stream = scan_progress(stream, source["rows"], f"index {method}")
        for ids, x in stream:
            if spec.train_power != 0:  # (g / n_z) R^p = unit(g R^p): n_z is the whitened norm
                x = scoring.preconditioner.apply(x, spec.train_power)
            yield pa.record_batch([pa.array(ids, pa.string()), _vectors.to_arrow(x, "float16")], schema=schema)

    start = time.perf_counter()
    reader = pa.RecordBatchReader.from_batches(schema, batches())
    table = connection(db).create_table(name, data=reader, schema=schema, mode="overwrite")
    written = time.perf_counter()
    options = {"num_partitions": num_partitions or _default_partitions(source["rows"], kind)}
    if kind == "ivf_pq":
        options["num_sub_vectors"] = num_sub_vectors or max(1, dim // 16)
    if kind == "ivf_hnsw_sq":
        options.update(m=m, ef_construction=ef_construction)
    table.create_index(metric="dot", vector_column_name="vector", index_type=KINDS[kind], replace=True, **options)
    entry = {"table": name, "kind": kind, "params": options, "source": source, "dim": dim,
             "write_seconds": round(written - start, 3), "index_seconds": round(time.perf_counter() - written, 3)}
    _set_manifest(db, lambda manifest: manifest.setdefault("ann", {}).__setitem__(method, entry))
    return entry


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


def search_ann(db, method: str, g_q: torch.Tensor, k: int, options: AnnOptions | None = None) -> TopKResult:
    """Approximate top-k proponents and opponents of raw query gradients g_q [nq, d]."""
    options = options or AnnOptions()
    spec = get_method(method)
    entry = require_index(db, method)
    preconditioners = {}
    if spec.preconditioner:
        from .scoring import load_preconditioner

        table = db.gradient_table("train", corrected=spec.table == "corrected")
        preconditioners[spec.preconditioner] = load_preconditioner(table, spec.preconditioner)
    q = query_transform(spec, preconditioners)(g_q.float().cpu()).numpy()
    if q.shape[1] != entry["dim"]:
        raise TrackstarError(f"{entry['table']}: vectors have dim {entry['dim']}, the query {q.shape[1]}")
    table = open_table(db, method)
    found = {"proponent": ([], np.zeros((len(q), k), np.float32)), "opponent": ([], np.zeros((len(q), k), np.float32))}
    for row, vector in enumerate(q):
        for kind, sign in (("proponent", 1.0), ("opponent", -1.0)):
            builder = table.search(sign * vector, vector_column_name="vector").distance_type("dot").limit(k)
            if options.nprobes:
                builder = builder.nprobes(options.nprobes)
            if options.refine_factor:
                builder = builder.refine_factor(options.refine_factor)
            if options.ef:
                builder = builder.ef(options.ef)
            hits = builder.select(["id", "vector", "_distance"]).to_arrow()
            ids, scores = _rescored(hits, vector, sign)
            found[kind][0].append(ids)
            found[kind][1][row, :len(ids)] = scores
    return TopKResult(found["proponent"][0], found["proponent"][1], found["opponent"][0], found["opponent"][1])


def _rescored(hits: pa.Table, query: np.ndarray, sign: float) -> tuple[list[str], np.ndarray]:
    """Ids and float32 scores (query . stored float16 vector), best first for `sign`."""
    if hits.num_rows == 0:
        return [], np.zeros(0, np.float32)
    from trackstar_db.store.vectors import to_torch

    x = to_torch(hits.column("vector"), "float16").numpy()
    scores = x @ query.astype(np.float32)
    order = np.argsort(-sign * scores, kind="stable")
    ids = hits.column("id").to_pylist()
    return [ids[i] for i in order], scores[order]
