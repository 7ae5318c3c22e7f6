"""Run one retrieval method over the database's queries into the retrievals table.

Methods: the gradient ladder (grad-dot, grad-cos, trak, opt-cos, r-train, trackstar; see
retrieval/methods.py), bm25 (Tantivy) and embedding (all-MiniLM-L6-v2, when installed).
Gradient rungs read stored vectors and apply R and unit norm on the fly, batch by batch:
the uncorrected rungs need grads_*_raw tables, the corrected ones grads_train/grads_queries,
r-train needs the 'train' preconditioner, trackstar 'mixed', trak 'train_raw'.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import pyarrow as pa
import pyarrow.compute as pc

from .bm25 import BM25Index
from .errors import TrackstarError
from .fit import preconditioners_for
from .retrieval import embedding
from .retrieval.methods import METHODS, get_method, query_transform, train_transform
from .retrieval.topk import scan_progress, search, vector_batches
from .vectors import to_torch

BASELINES = ("bm25", "embedding")
ALL_METHODS = tuple(METHODS) + BASELINES


@dataclass
class RetrieveOptions:
    k: int = 100
    template: str | None = "prompt0"  # which queries; None = all
    device: str = "cpu"
    batch_rows: int = 65536
    query_text: str = "prompt+target"  # what BM25 and embedding see: 'prompt+target' or 'prompt'


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
    if mode != "prompt+target":
        raise TrackstarError(f"query text must be 'prompt+target' or 'prompt', not {mode!r}")
    return [embedding.query_text(p, t) for p, t in zip(prompts, targets)]


def gradient_tables(db, table: str) -> tuple[str, str]:
    suffix = "_raw" if table == "uncorrected" else ""
    names = (f"grads_train{suffix}", f"grads_queries{suffix}")
    for name, split in zip(names, ("train", "queries")):
        if not db.has_table(name):
            hint = ""
            if not suffix and db.has_table(f"{name}_raw"):
                hint = " (this database was featurized with --correction none; the corrected rungs need a correction)"
            raise TrackstarError(f"table {name} is missing: run 'trackstar-db ingest gradients {db.path} "
                                 f"--split {split}'{hint}")
    return names


def _gradient_run(db, method: str, options: RetrieveOptions, query_rows: pa.Table):
    spec = get_method(method)
    train_table, query_table = gradient_tables(db, spec.table)
    preconditioners = preconditioners_for(db, spec)
    wanted = query_rows.column("query_id").to_pylist()
    stored = db.table(query_table, columns=["id", "vector"])
    position = {qid: i for i, qid in enumerate(stored.column("id").to_pylist())}
    missing = [q for q in wanted if q not in position]
    if missing:
        raise TrackstarError(f"{len(missing)} queries have no gradient (first {missing[0]!r}); "
                             f"run 'trackstar-db ingest gradients {db.path} --split queries'")
    dtype = db.manifest["gradient_tables"][query_table]["dtype"]
    q = to_torch(stored.column("vector").take([position[x] for x in wanted]), dtype, options.device)
    q = query_transform(spec, preconditioners)(q)
    batches = vector_batches(db.dataset(train_table), dtype=db.manifest["gradient_tables"][train_table]["dtype"],
                             batch_size=options.batch_rows, device=options.device)
    return search(q, scan_progress(batches, db.count(train_table), method), options.k,
                  transform=train_transform(spec, preconditioners))


def example_embeddings(db, device: str = "cpu"):
    """(ids, embeddings) batches of every example text, for the embedding baseline
    (embedding.embed names the missing package when it is not installed)."""
    texts = ((b.column("example_id").to_pylist(), b.column("text").to_pylist())
             for b in db.dataset("examples").to_batches(columns=["example_id", "text"], batch_size=4096))
    return embedding.embed_batches(texts, device=device)


def _embedding_run(db, options: RetrieveOptions, texts: list[str]):
    batches = scan_progress(example_embeddings(db, options.device), db.count("examples"), "embedding")
    return search(embedding.embed(texts, device=options.device), batches, options.k, opponents=False)


def retrieve(db, method: str, options: RetrieveOptions | None = None, run_id: str | None = None,
             replace: bool = False) -> tuple[str, pa.Table]:
    """Retrieve proponents (and opponents, for gradient methods) of the queries; store and return them."""
    options = options or RetrieveOptions()
    if method not in ALL_METHODS:
        raise TrackstarError(f"unknown method {method!r}; methods: {', '.join(ALL_METHODS)}")
    run_id = run_id or method
    if run_id in db.ids("runs", "run_id") and not replace:
        raise TrackstarError(f"run {run_id!r} exists; pick another --run name or pass --replace")
    query_rows = _queries(db, options.template)
    query_ids = query_rows.column("query_id").to_pylist()
    if method == "bm25":
        rows = BM25Index(db.path).retrieve(query_ids, _query_texts(query_rows, options.query_text), options.k, run_id)
    elif method == "embedding":
        rows = _embedding_run(db, options, _query_texts(query_rows, options.query_text)).to_arrow(
            query_ids, run_id, method)
    else:
        rows = _gradient_run(db, method, options, query_rows).to_arrow(query_ids, run_id, method)
    # Only now that the new rows exist are the old ones (and any orphans of a killed run) dropped.
    for table in ("retrievals", "tail_patch", "runs"):
        db.delete_rows(table, "run_id", run_id)
    db.append("retrievals", rows)
    parameters = asdict(options)
    if method in METHODS:
        parameters["preconditioners"] = db.manifest.get("preconditioners", {})
    db.record_run(run_id, method, parameters)
    return run_id, rows
