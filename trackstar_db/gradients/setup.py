"""What a gradient run opens before its loop: the checkpoint, the featurizer, the recorded
settings, the tables and the token budget. Shared by the local worker (worker.py) and the Ray
actor (distributed/ingest.py), so both featurize with the same recipe.

- `open_run(db, config, job)`: the checkpoint job names (attached if it is a path), the
  featurizer of its ModelSource (through `load`, gradients/loader.database_featurizer unless a
  caller brings its own), the context cap and the token budget (memory.py: planned for the device
  when job.batch_tokens is 'auto').
- `record_settings(db, run, job)`: write the featurizer settings into the manifest, or refuse a
  run whose settings differ; `create_tables(db, run, job)`: the run's gradient tables.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

from trackstar_db.errors import TrackstarError
from trackstar_db.featurizer.config import FeaturizerConfig
from trackstar_db.models.context import token_limit
from trackstar_db.store import checkpoints, manifest as _manifest
from trackstar_db.store.gradient_table import GradientTable

from .loader import database_featurizer, resolved_config
from .memory import plan_batch_tokens


@dataclass
class FeaturizeRun:
    """featurizer, tokenizer; checkpoint: the attached name, None for the final one; cap: tokens
    an encoding keeps (the manifest's context_cap); batch_tokens: the budget (None: batch_size rows)."""

    featurizer: object
    tokenizer: object
    config: FeaturizerConfig
    checkpoint: str | None
    cap: int | None
    batch_tokens: int | None

    @property
    def max_length(self) -> int:
        return self.config.max_length


def checkpoint_name(db, job) -> str | None:
    """The attached checkpoint job.checkpoint names (attaching a path), None for the final one."""
    if checkpoints.is_default(job.checkpoint):
        return None
    if db.manifest.get("featurizer") is None:
        raise TrackstarError(f"{db.path}: featurize the final checkpoint first ('trackstar-db ingest gradients "
                             f"{db.path} --split train'): its run fixes the settings every checkpoint shares")
    name = checkpoints.attach(db, job.checkpoint)
    return None if checkpoints.is_default(name) else name


def open_run(db, config: FeaturizerConfig | dict | None, job, device: str | None = None,
             load: Callable = database_featurizer) -> FeaturizeRun:
    """Everything a run of `job` needs before its first batch (see the module docstring).
    `load(db, config, checkpoint, device, uncorrected, model_dtype, estimate_sample, batch_size, prepare)`
    -> (featurizer, tokenizer): the model side, replaceable; job.sharded (gradients/sharded.py)
    shards the model through `prepare`."""
    checkpoint = checkpoint_name(db, job)
    if not isinstance(config, FeaturizerConfig):
        config = resolved_config(db, config)
    prepare = job.sharded.prepare if getattr(job, "sharded", None) is not None else None
    featurizer, tokenizer = load(db, config, checkpoint, device or job.device, job.uncorrected, job.model_dtype,
                                 job.estimate_sample, job.batch_size, prepare)
    cap = token_limit(tokenizer, config.max_length)
    if job.batch_tokens == "auto":
        batch_tokens = plan_batch_tokens(featurizer, cap or config.max_length).batch_tokens
    else:
        batch_tokens = None if job.batch_tokens is None else int(job.batch_tokens)
    return FeaturizeRun(featurizer, tokenizer, config, checkpoint, cap, batch_tokens)


def record_settings(db, run: FeaturizeRun, job) -> None:
    """Write the featurizer settings into the manifest, or check them against it; context_cap
    (tokens kept per encoding) follows from the model and is recorded. An attached checkpoint's
    run is checked against the settings (its correction source, its own optimizer state, goes
    into its checkpoint entry) and records nothing else."""
    featurizer, checkpoint, context_cap = run.featurizer, run.checkpoint, run.cap
    given = dict(featurizer.manifest(), dtype=job.dtype)
    model_dtype = str(featurizer.model_dtype).removeprefix("torch.")
    if model_dtype != "float32":  # absent = float32, so databases written before stay valid
        given["model_dtype"] = model_dtype
    own = ("context_cap", "coverage", "correction_source") if checkpoint else ("context_cap", "coverage")

    def same(stored: dict) -> None:  # context_cap and coverage follow the model: recorded, never compared
        settings = [{k: v for k, v in d.items() if k not in own} for d in (stored, given)]
        _manifest.check_same(f"{db.path}: featurizer", *settings)

    if checkpoint:
        same(db.manifest["featurizer"])
        source = given["correction_source"]
        if db.manifest["checkpoints"][checkpoint].get("correction_source") != source:
            db.update_manifest(lambda m: m["checkpoints"][checkpoint].__setitem__("correction_source", source))
        return

    def record(manifest: dict) -> None:  # applied to the manifest as stored now, under the lock
        if manifest.get("featurizer") is None:
            manifest["featurizer"] = dict(given, context_cap=context_cap)
        else:
            same(manifest["featurizer"])
            manifest["featurizer"]["context_cap"] = context_cap
            manifest["featurizer"]["coverage"] = given["coverage"]

    stored = db.manifest.get("featurizer")
    if stored is not None:  # refuse other settings before taking the lock
        same(stored)
    if stored is None or stored.get("context_cap") != context_cap or stored.get("coverage") != given["coverage"]:
        db.update_manifest(record)


def run_tables(db, run: FeaturizeRun, split: str) -> dict:
    """variant -> GradientTable the run writes (its checkpoint's tables of `split`)."""
    return {variant: GradientTable(db, split, variant, run.checkpoint) for variant in run.featurizer.variants}


def create_tables(db, run: FeaturizeRun, job) -> dict:
    """run_tables, created (and recorded in the manifest) when missing."""
    tables = run_tables(db, run, job.split)
    for table in tables.values():
        table.create(run.featurizer.layout.dim, job.dtype)
    return tables
