"""The gradient ingest worker: featurize examples or queries into gradient tables.

    plan (plan.py)        which ids of the split lack a row, in this shard, streamed in chunks
    tokenize (pipeline.py, a thread ahead of the model)  encode, batch by a token budget with
                          length bucketing (--batch-tokens; --batch-size caps the rows), pin
    featurize (here)      batches through the Featurizer -> {variant: [batch, dim]} vectors
    commit (commit.py, on pipeline.Writer's thread behind the model)  rows buffered and
                          appended, one Lance commit per `commit_rows`

The token budget is planned (memory.py): the largest that fits the device, or the CPU default.
The model loads in the checkpoint's dtype (--model-dtype auto: config.json's torch_dtype/dtype,
float32 when absent); a model dtype other than float32 is recorded with the settings, so
vectors of different model precisions are never mixed. `pipeline=False` runs the same steps
one after the other on the caller's thread (the synchronous reference).

Tables: grads_{split}_corrected (the optimizer-corrected vectors) and, unless switched off,
grads_{split}_uncorrected (the plain projection the first ladder rungs need); with correction
'none' only the uncorrected one. Resumable and idempotent: each Lance append is atomic and a run
featurizes only the ids a table lacks, so a killed run started again ends with exactly one row
per id. A run whose settings differ from the manifest is refused.

Checkpoints (`checkpoint=NAME`, `ingest gradients --checkpoint NAME`): the same run on another
checkpoint of the model (store/checkpoints.py attaches it: a directory in the model's
checkpoints/ or a path), into that checkpoint's tables grads_{split}_{variant}__NAME
(store/gradient_table.py), with the database's projection settings and the checkpoint's own
optimizer state; the final checkpoint's run fixes those settings, so it comes first.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from pathlib import Path

from tqdm.auto import tqdm

from trackstar_db.devices import resolve_device
from trackstar_db.errors import TrackstarError
from trackstar_db.featurizer.config import FeaturizerConfig
from trackstar_db.featurizer.task import DEFAULT as DEFAULT_TASK, Task
from trackstar_db.featurizer.tokenize import pad_id, token_limit
from trackstar_db.store import manifest as _manifest
from trackstar_db.store import checkpoints as _checkpoints
from trackstar_db.store import vectors as _vectors
from trackstar_db.store.gradient_table import SPLITS, GradientTable

from .commit import Committer
from .loader import load_featurizer, resolved_config
from .memory import plan_batch_tokens
from .pipeline import Writer, ahead, make_batches
from .plan import count_missing, missing

MODEL_DTYPES = ("auto", "float32", "bfloat16", "float16")


@dataclass
class GradientJob:
    split: str = "train"
    batch_size: int = 16
    device: str = "auto"
    dtype: str = "float32"
    shard: tuple[int, int] = (0, 1)
    commit_rows: int = 2048
    uncorrected: bool = True  # also write the uncorrected table the first ladder rungs need
    estimate_sample: int = 512  # training examples used when correction == "estimated"
    limit: int | None = None  # stop after this many new rows (tests, quick looks)
    batch_tokens: int | str | None = "auto"  # rows x padded width per batch; "auto": planned; None: batch_size rows
    model_dtype: str = "auto"  # the checkpoint's (config.json), float32 when it says nothing
    pipeline: bool = True  # tokenize ahead and write behind on threads; False: all on this thread
    queue_depth: int = 4  # batches waiting in each queue of the pipeline
    checkpoint: str | None = None  # an attached checkpoint's name (or a path to attach); None: the final one
    sharded: object | None = None  # sharded.ShardedModel: the model's parameters sharded across processes

    def __post_init__(self):
        if self.split not in SPLITS:
            raise TrackstarError(f"--split must be one of {', '.join(SPLITS)}, not {self.split!r}")
        index, count = self.shard
        if not (count >= 1 and 0 <= index < count):
            raise TrackstarError(f"--shard {index}/{count}: need 0 <= I < N")
        if self.batch_tokens != "auto" and self.batch_tokens is not None and int(self.batch_tokens) < 1:
            raise TrackstarError(f"--batch-tokens must be 'auto' or >= 1, not {self.batch_tokens}")
        if self.model_dtype not in MODEL_DTYPES:
            raise TrackstarError(f"--model-dtype must be one of {', '.join(MODEL_DTYPES)}, not {self.model_dtype!r}")
        for name in ("batch_size", "commit_rows", "estimate_sample", "queue_depth"):
            if getattr(self, name) < 1:
                raise TrackstarError(f"--{name.replace('_', '-')} must be >= 1, not {getattr(self, name)}")
        if self.limit is not None and self.limit < 1:
            raise TrackstarError(f"--limit must be >= 1, not {self.limit}")
        self.device = resolve_device(self.device)
        if self.dtype not in _vectors.DTYPES:
            raise TrackstarError(f"--dtype must be one of {', '.join(_vectors.DTYPES)}, not {self.dtype!r}")


def _record_settings(db, featurizer, job: GradientJob, context_cap: int | None = None,
                     checkpoint: str | None = None) -> None:
    """Write the featurizer settings into the manifest, or check them against it; context_cap
    (tokens kept per encoding, tokenize.token_limit) follows from the model and is recorded.
    An attached checkpoint's run is checked against the settings (its correction source, its own
    optimizer state, goes into its checkpoint entry) and records nothing else."""
    given = dict(featurizer.manifest(), dtype=job.dtype)
    model_dtype = str(featurizer.model_dtype).removeprefix("torch.")
    if model_dtype != "float32":  # absent = float32, so databases written before stay valid
        given["model_dtype"] = model_dtype
    own = ("context_cap", "correction_source") if checkpoint else ("context_cap",)

    def same(stored: dict) -> None:  # context_cap follows the model: recorded, never compared
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

    stored = db.manifest.get("featurizer")
    if stored is not None:  # refuse other settings before taking the lock
        same(stored)
    if stored is None or stored.get("context_cap") != context_cap:
        db.update_manifest(record)


def _encode(tokenizer, split: str, chunk, max_length: int, task: Task = DEFAULT_TASK) -> list:
    """A plan chunk's rows encoded under the task (a training example's loss mask rides in its
    loss_spans column, which plan.missing carries when the examples table has it)."""
    if split == "train":
        texts = chunk.column("text").to_pylist()
        spans = chunk.column("loss_spans").to_pylist() if "loss_spans" in chunk.column_names else [None] * len(texts)
        return [task.encode_example(tokenizer, text, span, max_length) for text, span in zip(texts, spans)]
    return [task.encode_query(tokenizer, p, t, max_length)
            for p, t in zip(chunk.column("prompt").to_pylist(), chunk.column("target").to_pylist())]


def checkpoint_dtype(model_dir: str | Path) -> str:
    """The dtype a checkpoint's config.json records (torch_dtype or dtype), float32 when absent;
    for a PEFT adapter, its base model's."""
    from trackstar_db.store.adapters import base_path, is_adapter

    path = Path(base_path(model_dir) if is_adapter(model_dir) else model_dir) / "config.json"
    try:
        config = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise TrackstarError(f"{path}: cannot read the checkpoint's config ({exc})") from None
    value = config.get("torch_dtype") or config.get("dtype") or "float32"
    value = str(value).removeprefix("torch.")
    if value not in MODEL_DTYPES[1:]:
        raise TrackstarError(f"{path}: field 'torch_dtype' is {value!r}; give --model-dtype "
                             f"({', '.join(MODEL_DTYPES[1:])})")
    return value


def _chunks(db, job: GradientJob, tables: list, tokenizer, max_length: int, task: Task = DEFAULT_TASK):
    """(ids, encoded items) of every chunk of the plan, up to job.limit rows."""
    produced = 0
    for chunk in missing(db, job.split, tables, job.shard):
        if job.limit is not None:
            chunk = chunk.slice(0, job.limit - produced)
        produced += chunk.num_rows
        yield chunk.column("id").to_pylist(), _encode(tokenizer, job.split, chunk, max_length, task)
        if job.limit is not None and produced >= job.limit:
            return


def _checkpoint_source(db, job: GradientJob):
    """(the database or a view of it whose model is job.checkpoint, the attached name or None)."""
    if _checkpoints.is_default(job.checkpoint):
        return db, None
    if db.manifest.get("featurizer") is None:
        raise TrackstarError(f"{db.path}: featurize the final checkpoint first ('trackstar-db ingest gradients "
                             f"{db.path} --split train'): its run fixes the settings every checkpoint shares")
    name = _checkpoints.attach(db, job.checkpoint)
    return (db, None) if _checkpoints.is_default(name) else (_checkpoints.CheckpointView(db, name), name)


def ingest_gradients(db, config: FeaturizerConfig | dict | None, job: GradientJob, progress: bool = True) -> dict:
    """Featurize every id of job.split (in job.shard) that its tables lack. Returns counts,
    speed and the token budget used.

    config: full settings, or a dict of the given ones (None entries = not given), resolved
    against the stored settings and the checkpoint (featurizer.settings.resolve)."""
    source, checkpoint = _checkpoint_source(db, job)
    if not isinstance(config, FeaturizerConfig):
        config = resolved_config(db, config)
    model_dtype = job.model_dtype
    if model_dtype == "auto":
        model_dtype = checkpoint_dtype(source.model_info()["path"])
    featurizer, tokenizer = load_featurizer(source, config, job.device, job.uncorrected, job.estimate_sample,
                                            job.batch_size, model_dtype=model_dtype,
                                            prepare=job.sharded.prepare if job.sharded else None)
    cap = token_limit(tokenizer, config.max_length)
    _record_settings(db, featurizer, job, cap, checkpoint)
    tables = {variant: GradientTable(db, job.split, variant, checkpoint) for variant in featurizer.variants}
    for table in tables.values():
        table.create(featurizer.layout.dim, job.dtype)
    if job.batch_tokens == "auto":
        plan = plan_batch_tokens(featurizer, cap or config.max_length)
        batch_tokens = plan.batch_tokens
    else:
        batch_tokens = None if job.batch_tokens is None else int(job.batch_tokens)

    total = count_missing(db, job.split, list(tables.values())) if progress else None
    if total is not None and job.limit is not None:
        total = min(total, job.limit)
    committer = Committer(db, tables, job.dtype, job.commit_rows)
    totals = {"rows": 0, "tokens": 0, "seconds": 0.0, "batches": 0, "batch_tokens": batch_tokens}
    pin = job.pipeline and featurizer.device.type == "cuda"
    batches = make_batches(_chunks(db, job, list(tables.values()), tokenizer, config.max_length, featurizer.task),
                           batch_tokens, job.batch_size, pad_id(tokenizer), pin=pin)
    if job.pipeline:
        batches = ahead(batches, job.queue_depth)
    if job.sharded is not None:  # every rank featurizes in step (FSDP gathers), on this thread
        batches = job.sharded.lockstep(batches, featurizer)
    start = time.perf_counter()
    try:
        with tqdm(total=total, desc=f"gradients {job.split}" + (f" {checkpoint}" if checkpoint else ""), unit=" ex", disable=not progress) as bar, \
                Writer(lambda ids, out: committer.add(ids, out.wait()), job.queue_depth, threaded=job.pipeline) as writer:
            for batch in batches:
                out = featurizer.featurize(batch.tensors, non_blocking=job.pipeline)
                writer.put(batch.ids, out)
                totals["rows"] += batch.rows
                totals["batches"] += 1
                totals["tokens"] += int(batch.tensors["attention_mask"].sum())  # input tokens, padding excluded
                bar.update(batch.rows)
                bar.set_postfix_str(f"{totals['tokens'] / (time.perf_counter() - start):,.0f} tok/s")
    finally:
        batches.close()  # stops the tokenizer thread (and the plan's DuckDB scan) on an error too
    committer.flush()
    if job.shard == (0, 1) and totals["rows"]:
        for table in tables.values():  # merge the per-commit fragments; shards leave it to the last run
            db.lance_table(table.name).optimize()
    totals["seconds"] = time.perf_counter() - start
    totals["tables"] = {table.name: table.count() for table in tables.values()}
    return totals
