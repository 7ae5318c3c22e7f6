"""A synthetic gradient database for scale benchmarks and tests: no model, no texts, real write path.

`synthetic_database(path, n_rows, dim, dtype)` creates a database whose four gradient tables
(grads_{train,queries}_{corrected,uncorrected}) are written through GradientTable.create and
Database.append, like the worker's Committer, in batches of `batch_rows`, plus `n_queries`
prompt0 rows in `queries`. The manifest gets a synthetic 'featurizer' entry with a concat
layout of `n_blocks` equal blocks, so gradients/fit.py fits block-diagonal R on it.

Vectors [n, d] are clustered and anisotropic, so whitening by R changes rankings: row i is
(centre[i % n_clusters] + noise) * scale, scale[j] = (1 + j % block) ** -0.5 per block, with
query rows drawn from the same centres. Generated batch by batch from a seed (never held whole).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pyarrow as pa
import torch
from tqdm.auto import tqdm

from trackstar_db import defaults
from trackstar_db.store import vectors as _vectors
from trackstar_db.store.database import Store


def _rows(seed: int, start: int, count: int, dim: int, centres: torch.Tensor, scale: torch.Tensor, noise: float):
    g = torch.Generator().manual_seed(seed * 1_000_003 + start)
    which = torch.arange(start, start + count) % len(centres)
    x = centres[which] + noise * torch.randn(count, dim, generator=g)
    return x * scale


def synthetic_database(path: str | Path, n_rows: int, dim: int = defaults.DIM, dtype: str = "float16", *,
                       n_queries: int = 64, n_blocks: int = 8, n_clusters: int = 256, noise: float = 1.0,
                       batch_rows: int = 16384, seed: int = 0, progress: bool = False):
    """Create the database at `path` (must not exist) and return its storage handle (store/database.py:
    Store; `trackstar_db.connect(path)` opens it with every verb)."""
    if dim % n_blocks:
        raise ValueError(f"dim {dim} is not a multiple of n_blocks {n_blocks}")
    db = Store.create(path)
    block = dim // n_blocks
    k_r = max(d for d in range(1, int(block ** 0.5) + 1) if block % d == 0)
    layout = {"dim": dim, "blocks": [{"name": f"synthetic.{b}", "offset": b * block, "size": block,
                                      "k_r": k_r, "k_c": block // k_r} for b in range(n_blocks)]}
    config = {"dim": dim, "seed": seed, "combine": "concat", "correction": "adam-factored", "eps": 1e-8,
              "max_length": 512}
    entry = {"config": config, "layout": layout, "dtype": dtype, "correction_source": "synthetic"}
    db.update_manifest(lambda manifest: manifest.__setitem__("featurizer", entry))
    g = torch.Generator().manual_seed(seed)
    centres = torch.randn(n_clusters, dim, generator=g)
    scales = {"corrected": (1.0 + torch.arange(dim) % block) ** -0.5,
              "uncorrected": (1.0 + torch.arange(dim) % block) ** -1.0}
    query_rows = pa.table({"query_id": [f"q{i:06d}:prompt0" for i in range(n_queries)],
                           "fact_id": [f"q{i:06d}" for i in range(n_queries)],
                           "prompt": [f"synthetic prompt {i}" for i in range(n_queries)],
                           "target": ["x"] * n_queries, "template": [defaults.TEMPLATE] * n_queries})
    db.append("queries", query_rows)
    for split, count, prefix in (("train", n_rows, "e"), ("queries", n_queries, "q")):
        for variant, scale in scales.items():
            table = db.gradient_table(split, corrected=variant == "corrected")
            table.create(dim, dtype)
            with tqdm(total=count, desc=f"write {table.name}", unit=" rows", disable=not progress) as bar:
                for start in range(0, count, batch_rows):
                    size = min(batch_rows, count - start)
                    x = _rows(seed + (7 if split == "queries" else 0), start, size, dim, centres, scale, noise)
                    ids = [f"{prefix}{i:09d}" if split == "train" else f"q{i:06d}:prompt0"
                           for i in range(start, start + size)]
                    db.append(table.name, pa.table({
                        "id": pa.array(ids, pa.string()),
                        "vector": _vectors.to_arrow(x, dtype),
                        "norm": pa.array(x.norm(dim=1).numpy(), pa.float32()),
                        "loss": pa.array(np.ones(size, np.float32)),
                        "n_tokens": pa.array(np.full(size, 16, np.int32)),
                    }))
                    bar.update(size)
    return db
