"""Ad-hoc attribution: one prompt and target, its gradient computed on the fly.

Used by `trackstar-db query` and `Database.query`. The answer is an Arrow table with columns
kind ('proponent' | 'opponent'), rank, example_id, score, text.
"""

from __future__ import annotations

import pyarrow as pa
import pyarrow.compute as pc

from .bm25 import BM25Index
from .errors import TrackstarError
from .fit import preconditioners_for
from .gradients import load_featurizer, stored_config
from .retrieval import embedding
from .retrieval.methods import get_method, query_transform, train_transform
from .retrieval.topk import search, vector_batches
from .retrieve import ALL_METHODS, gradient_tables, example_embeddings
from .tokenize import collate, encode_query, pad_id


def _featurizer(db, raw: bool, device: str):
    """A featurizer for the stored settings, cached on the database handle between calls."""
    cache = db.featurizers
    if (raw, device) not in cache:
        config = stored_config(db)
        if config is None:
            raise TrackstarError(f"{db.path}: no gradients stored yet; run 'trackstar-db ingest gradients'")
        cache[(raw, device)] = load_featurizer(db, config, device, with_raw=raw and config.correction != "none")
    return cache[(raw, device)]


def _gradient_hits(db, method: str, prompt: str, target: str, k: int, device: str):
    spec = get_method(method)
    train_table, _ = gradient_tables(db, spec.table)
    featurizer, tokenizer = _featurizer(db, spec.table == "uncorrected", device)
    out = featurizer.featurize(collate([encode_query(tokenizer, prompt, target)], pad_id(tokenizer)))
    key = "uncorrected" if "uncorrected" in out.vectors and spec.table == "uncorrected" else "corrected"
    preconditioners = preconditioners_for(db, spec)
    q = query_transform(spec, preconditioners)(out.vectors[key].to(device))
    dtype = db.manifest["gradient_tables"][train_table]["dtype"]
    result = search(q, vector_batches(db.dataset(train_table), dtype=dtype, device=device), k,
                    transform=train_transform(spec, preconditioners))
    return result.to_arrow(["adhoc"], "adhoc", method)


def attribute(db, prompt: str, target: str, method: str = "trackstar", k: int = 10, device: str = "cpu") -> pa.Table:
    """Proponents (and opponents, for gradient methods) of `target` given `prompt`, with their texts."""
    if not prompt.strip() or not target.strip():
        raise TrackstarError("both --prompt and --target must be non-empty")
    if method not in ALL_METHODS:
        raise TrackstarError(f"unknown method {method!r}; methods: {', '.join(ALL_METHODS)}")
    if db.count("examples") == 0:
        raise TrackstarError(f"{db.path}: the database has no examples")
    text = embedding.query_text(prompt, target)
    if method == "bm25":
        hits = BM25Index(db.path).search(text, k)
        rows = pa.table({"kind": ["proponent"] * len(hits), "rank": list(range(1, len(hits) + 1)),
                         "example_id": [h[0] for h in hits], "score": pa.array([h[1] for h in hits], pa.float32())})
    elif method == "embedding":
        batches = example_embeddings(db, device)
        rows = search(embedding.embed([text], device=device), batches, k, opponents=False).to_arrow(
            ["adhoc"], "adhoc", method)
    else:
        rows = _gradient_hits(db, method, prompt, target, k, device)
    rows = rows.select(["kind", "rank", "example_id", "score"])
    ids = rows.column("example_id").to_pylist()
    if not ids:
        return rows.append_column("text", pa.array([], pa.string()))
    texts = db.table("examples", columns=["example_id", "text"], filter=pc.field("example_id").isin(sorted(set(ids))))
    lookup = dict(zip(texts.column("example_id").to_pylist(), texts.column("text").to_pylist()))
    return rows.append_column("text", pa.array([lookup.get(i) for i in ids], pa.string()))


