"""Verbs for attribution at scale: an ANN index of a rung's vectors (retrieval/ann_build.py) and
the cost plan of a build (cost_plan.py), which also answers without a database (`plan(None, ...)`)."""

from __future__ import annotations

from pathlib import Path

import pyarrow as pa

from trackstar_db.cost_plan import Plan, plan_table
from trackstar_db.devices import resolve_device
from trackstar_db.gradients.memory import plan_rows_for_model


def plan(db, dim: int, *, rows: int | None = None, queries: int | None = None, dtype: str = "float16",
         blocks: int | None = None, model_dir: str | Path | None = None, device_gib: float = 80.0,
         model_dtype: str = "bfloat16", max_length: int = 512) -> pa.Table:
    """Bytes on disk, RAM and time of ingest, fit, scan and index at `dim` (cost_plan.py): rows and
    queries default to what `db` holds (db None: rows must be given); model_dir adds the devices
    the model's featurizer needs (gradients/memory.py; config.json is enough)."""
    if db is not None:
        chosen = Plan.for_database(db, dim, rows, queries, dtype=dtype, blocks=blocks)
    else:
        chosen = Plan(rows=rows, dim=dim, dtype=dtype, blocks=blocks, **({"queries": queries} if queries else {}))
    extra = []
    if model_dir is not None:
        extra = plan_rows_for_model(model_dir, dim, device_gib, model_dtype, max_length)
    return plan_table(chosen, extra)


class ScaleVerbs:
    """build_index, plan (mixed into api.Database)."""

    def build_index(self, method: str, kind: str | None = None, *, num_partitions: int | None = None,
                    num_sub_vectors: int | None = None, device: str = "cpu", progress: bool | None = None) -> dict:
        """Materialise `method`'s unit vectors (float16) in ann_<method> with a LanceDB vector index of
        `kind` (None: retrieval/ann.py's default), for `ann=` in retrieve, query and select; returns
        its manifest entry (with seconds)."""
        from trackstar_db.retrieval.ann_build import build_index  # heavy: torch, lancedb

        return build_index(self, method, *([kind] if kind else []), num_partitions=num_partitions,
                           num_sub_vectors=num_sub_vectors, device=resolve_device(device), progress=progress)

    def plan(self, dim: int, **settings) -> pa.Table:
        """The cost plan for this database at `dim` (module-level `plan`, whose keywords it takes)."""
        return plan(self, dim, **settings)
