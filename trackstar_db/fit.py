"""Fit the preconditioners R from stored gradient tables (`trackstar-db fit`).

Writes DB/preconditioners/<name>.safetensors and records its parameters in the manifest:
    train      R_train of the corrected training gradients           (r-train)
    mixed      lambda R_eval + (1 - lambda) R_train, R_eval from the  (trackstar)
               corrected gradients of the task's queries
    train_raw  R_train of the uncorrected training gradients          (trak)
Block-diagonal over the featurizer layout's blocks (combine=concat) unless kind='dense'.
"""

from __future__ import annotations

from pathlib import Path

import pyarrow.compute as pc
import torch

from .errors import TrackstarError
from .featurizer.config import Layout
from .featurizer.preconditioner import DEFAULT_DAMPING, Preconditioner, fit_preconditioner
from .retrieval.topk import scan_progress, vector_batches

NAMES = {"train": ("grads_train", None), "mixed": ("grads_train", "grads_queries"),
         "train_raw": ("grads_train_raw", None)}


def preconditioner_path(db, name: str) -> Path:
    return db.path / "preconditioners" / f"{name}.safetensors"


def load_preconditioner(db, name: str) -> Preconditioner:
    path = preconditioner_path(db, name)
    if not path.is_file():
        raise TrackstarError(f"no {name!r} preconditioner in {db.path}; run 'trackstar-db fit {db.path}'")
    return Preconditioner.load(path)


def preconditioners_for(db, spec) -> dict[str, Preconditioner]:
    """The fitted R a ladder rung needs, keyed as retrieval.methods expects ('train' | 'mixed').

    Rungs on the uncorrected table use R_train of the uncorrected gradients ('train_raw')."""
    if not spec.preconditioner:
        return {}
    name = "train_raw" if spec.table == "uncorrected" else spec.preconditioner
    return {spec.preconditioner: load_preconditioner(db, name)}


def query_ids_of_template(db, template: str | None) -> set[str] | None:
    if template is None:
        return None
    rows = db.table("queries", columns=["query_id"], filter=pc.field("template") == template)
    ids = set(rows.column("query_id").to_pylist())
    if not ids:
        raise TrackstarError(f"no queries with template {template!r}")
    return ids


def stream(db, table: str, keep: set[str] | None = None, batch_size: int = 8192):
    """[batch, d] float32 vectors of a gradient table, optionally only the ids in `keep`."""
    dtype = db.manifest["gradient_tables"][table]["dtype"]
    batches = vector_batches(db.dataset(table), dtype=dtype, batch_size=batch_size)
    for ids, x in scan_progress(batches, db.count(table), f"R from {table}"):
        if keep is not None:
            mask = torch.tensor([i in keep for i in ids], dtype=torch.bool)
            x = x[mask]
        if len(x):
            yield x


def fit(db, mix: str = "task", kind: str = "block", damping: float = DEFAULT_DAMPING, k: int | None = None,
        template: str | None = "prompt0") -> dict[str, dict]:
    """Fit every preconditioner the stored tables allow; returns {name: parameters}."""
    featurizer = db.manifest.get("featurizer")
    if not featurizer:
        raise TrackstarError(f"{db.path}: no gradients yet; run 'trackstar-db ingest gradients' first")
    if mix not in ("task", "train"):
        raise TrackstarError(f"--mix must be 'task' or 'train', not {mix!r}")
    layout = Layout.from_dict(featurizer["layout"])
    spans = layout.spans() if featurizer["config"]["combine"] == "concat" else None
    keep = query_ids_of_template(db, template)
    fitted = {}
    for name, (train_table, query_table) in NAMES.items():
        if not db.has_table(train_table) or (query_table and (mix != "task" or not db.has_table(query_table))):
            continue
        queries = stream(db, query_table, keep) if query_table else None
        pre = fit_preconditioner(stream(db, train_table), queries, dim=layout.dim, spans=spans,
                                 kind=kind, damping=damping, k=k)
        path = preconditioner_path(db, name)
        path.parent.mkdir(exist_ok=True)
        pre.save(path)
        fitted[name] = dict(pre.params, template=template if query_table else None, file=str(path.name))
    if not fitted:
        raise TrackstarError(f"{db.path}: no gradient tables to fit (found: {', '.join(db.table_names())})")
    for name in set(NAMES) - set(fitted):  # an R from an earlier fit would silently serve a rung
        preconditioner_path(db, name).unlink(missing_ok=True)
    db.manifest["preconditioners"] = fitted
    db.save_manifest()
    return fitted
