"""Building an ANN index (`trackstar-db index`): a rung's final unit vectors materialised as
float16 in DB/ann/ann_<method>.lance and LanceDB's vector index built on them, under the
database's writer lock, with the provenance that retrieval/ann.py checks before every search.
What the kinds and their defaults measured: docs/scale.md."""

from __future__ import annotations

import math
import time
from dataclasses import dataclass
from datetime import timedelta

import pyarrow as pa

from trackstar_db import defaults
from trackstar_db.errors import TrackstarError
from trackstar_db.option_checks import COUNT, Choice, check_fields, ruled
from trackstar_db.store import vectors as _vectors
from trackstar_db.store.vectors import scan_progress

from .ann import DEFAULT_KIND, KINDS, open_table, source_version, table_name
from .methods import get_method
from .scoring import prepare, scan

RQ_BITS, PQ_BITS = 4, 4  # PQ: the 8-bit codebook training did not finish in 13 minutes here
# k-means of the IVF (and PQ) training: iterations and sampled rows per partition (LanceDB's
# defaults 50 and 256 made the build of 100K x 4,096 float16 take longer than an hour here)
MAX_ITERATIONS, SAMPLE_RATE = 20, 64


def connection(db):
    """The LanceDB directory DB/ann/ holding the ANN tables."""
    import lancedb  # heavy: lancedb

    return lancedb.connect(str(db.path / "ann"))


def _default_partitions(rows: int, kind: str) -> int:
    """IVF partitions: sqrt(rows) / 5 for the flat and quantised kinds (LanceDB's k-means over
    float16 costs partitions^2; docs/scale.md); for HNSW
    inside each partition, one per 16,384 rows (a graph searches a big partition well)."""
    if kind == "ivf_hnsw_sq":
        return max(1, rows // 16384)
    return max(1, min(4096, int(math.sqrt(rows)) // 5))


def _index_config(kind: str, dim: int, rows: int, num_partitions, num_sub_vectors, m, ef_construction,
                  max_iterations, sample_rate):
    """LanceDB's index config object for `kind` (metric 'dot') and its parameters as recorded."""
    from lancedb import index as _index  # heavy: lancedb

    params = {"num_partitions": num_partitions or _default_partitions(rows, kind),
              "max_iterations": max_iterations, "sample_rate": sample_rate}
    if kind == "ivf_pq":
        params.update(num_sub_vectors=num_sub_vectors or max(1, dim // 16), num_bits=PQ_BITS)
    if kind == "ivf_rq":
        params.update(num_bits=RQ_BITS)
    if kind == "ivf_hnsw_sq":
        params.update(m=m, ef_construction=ef_construction)
    config = {"ivf_pq": _index.IvfPq, "ivf_rq": _index.IvfRq, "ivf_hnsw_sq": _index.HnswSq,
              "ivf_flat": _index.IvfFlat}[kind]
    return config(distance_type="dot", **params), params


def _materialise(db, method: str, source: dict, scoring, batch_rows: int, device, progress: bool | None):
    """Write t_train(g_z) of every stored row into ann_<method>; the LanceDB table."""
    spec = get_method(method)
    schema = pa.schema([("id", pa.string()), ("vector", _vectors.arrow_type(scoring.table.dim, "float16"))])

    def batches():
        stream = scan(scoring, device, batch_rows)
        if progress is not False:
            stream = scan_progress(stream, source["rows"], f"index {method}", progress)
        for ids, x in stream:
            if spec.train_power != 0:  # (g / n_z) R^p = unit(g R^p): n_z is the whitened norm
                x = scoring.preconditioner.apply(x, spec.train_power)
            yield pa.record_batch([pa.array(ids, pa.string()), _vectors.to_arrow(x, "float16")], schema=schema)

    reader = pa.RecordBatchReader.from_batches(schema, batches())
    return connection(db).create_table(table_name(method), data=reader, schema=schema, mode="overwrite")


@dataclass(frozen=True)
class IndexOptions:
    """The index's build parameters (see build_index), checked by their rules."""

    kind: str = ruled(Choice(KINDS), DEFAULT_KIND)
    num_partitions: int | None = ruled(COUNT, None)
    num_sub_vectors: int | None = ruled(COUNT, None)
    m: int = ruled(COUNT, 20)
    ef_construction: int = ruled(COUNT, 300)
    max_iterations: int = ruled(COUNT, MAX_ITERATIONS)
    sample_rate: int = ruled(COUNT, SAMPLE_RATE)
    batch_rows: int = ruled(COUNT, defaults.STREAM_BATCH_ROWS)

    def __post_init__(self):
        check_fields(self)


def build_index(db, method: str, kind: str = DEFAULT_KIND, *, num_partitions: int | None = None,
                num_sub_vectors: int | None = None, m: int = 20, ef_construction: int = 300,
                max_iterations: int = MAX_ITERATIONS, sample_rate: int = SAMPLE_RATE, batch_rows: int = defaults.STREAM_BATCH_ROWS,
                device="cpu", progress: bool | None = None, reuse_vectors: bool = False) -> dict:
    """Materialise `method`'s final unit vectors into ann_<method>, index them, record provenance.
    Returns the manifest entry (with build seconds). Memory: one scanned batch at a time.
    reuse_vectors: keep ann_<method>'s vectors when the recorded index was built from the
    database as it is now (same source, every row there) and only rebuild the index (another
    kind or parameters)."""
    IndexOptions(kind, num_partitions, num_sub_vectors, m, ef_construction, max_iterations, sample_rate, batch_rows)
    # one writer of DB/ann and the manifest at a time (store/lock.py), as fit holds it
    with db.writer(f"index {method}"):
        spec = get_method(method)
        source = source_version(db, method)
        scoring = prepare(db, spec)  # refuses stale row norms before anything is written
        if source["rows"] < 2:
            raise TrackstarError(f"{source['table']}: {source['rows']} rows; an index needs at least 2")
        dim, name = scoring.table.dim, table_name(method)
        start = time.perf_counter()
        old = db.manifest.get("ann", {}).get(method)
        table, ann = None, connection(db)
        if reuse_vectors and old is not None and old["source"] == source and name in ann.list_tables().tables:
            table = ann.open_table(name)
            table = table if table.count_rows() == source["rows"] else None
        if table is None:
            table = _materialise(db, method, source, scoring, batch_rows, device, progress)
        written = time.perf_counter()
        config, params = _index_config(kind, dim, source["rows"], num_partitions, num_sub_vectors, m, ef_construction,
                                       max_iterations, sample_rate)
        table.create_index("vector", config=config, replace=True)
        # a new materialisation (an overwrite) or a replaced index leaves the old version's files
        # behind (rows x d x 2 bytes per rebuild), and a killed build its unreferenced files; searches
        # read the latest version only, and no other build writes while this one holds the lock
        open_table(db, method).cleanup_old_versions(older_than=timedelta(0), delete_unverified=True)
        entry = {"table": name, "kind": kind, "params": params, "source": source, "dim": dim,
                 "write_seconds": round(written - start, 3), "index_seconds": round(time.perf_counter() - written, 3)}
        db.update_manifest(lambda manifest: manifest.setdefault("ann", {}).__setitem__(method, entry))
        return entry
