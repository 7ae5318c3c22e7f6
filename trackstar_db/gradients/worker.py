"""The gradient ingest worker: featurize examples or queries into gradient tables.

    open (setup.py)       the checkpoint's ModelSource, the featurizer (loader.py), the
                          settings recorded in the manifest, the tables, the token budget
    plan (plan.py)        which ids of the split lack a row, in this shard, streamed in chunks
    loop (loop.py)        encode, batch by a token budget with length bucketing (--batch-tokens;
                          --batch-size caps the rows) on a thread ahead of the model, featurize,
                          hand the rows to the sink behind it; the same loop the Ray actor runs
    commit (commit.py, the local sink)  rows buffered and appended, one Lance commit per
                          `commit_rows`

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
checkpoints/ or a path, and describes it as a ModelSource), into that checkpoint's tables grads_{split}_{variant}__NAME
(store/gradient_table.py), with the database's projection settings and the checkpoint's own
optimizer state; the final checkpoint's run fixes those settings, so it comes first.
"""

from __future__ import annotations

import dataclasses
import time
from contextlib import closing
from dataclasses import dataclass

from tqdm.auto import tqdm

from trackstar_db import defaults
from trackstar_db.devices import DEVICE, resolve_device
from trackstar_db.featurizer.config import FeaturizerConfig
from trackstar_db.models.source import MODEL_DTYPES
from trackstar_db.option_checks import COUNT, Choice, check, check_fields, ruled
from trackstar_db.store import vectors as _vectors
from trackstar_db.store.gradient_table import SPLITS

from .commit import Committer
from .loader import ESTIMATE_SAMPLE
from .loop import run_batches
from .plan import check_shard, count_missing
from .setup import create_tables, open_run, record_settings
from .sharded import RankWatch, ShardedModel, process_group


@dataclass
class GradientJob:
    split: str = ruled(Choice(SPLITS), "train")
    batch_size: int = ruled(COUNT, 16)
    device: str = ruled(DEVICE, "auto")
    dtype: str = ruled(Choice(_vectors.DTYPES), "float32")
    shard: tuple[int, int] = (0, 1)
    commit_rows: int = ruled(COUNT, defaults.COMMIT_ROWS)
    uncorrected: bool = True  # also write the uncorrected table the first ladder rungs need
    estimate_sample: int = ruled(COUNT, ESTIMATE_SAMPLE)  # training examples used when correction == "estimated"
    limit: int | None = ruled(COUNT, None)  # stop after this many new rows (tests, quick looks)
    batch_tokens: int | str | None = "auto"  # rows x padded width per batch; "auto": planned; None: batch_size rows
    model_dtype: str = ruled(Choice(MODEL_DTYPES), "auto")  # the checkpoint's (config.json), float32 when it says nothing
    pipeline: bool = True  # tokenize ahead and write behind on threads; False: all on this thread
    queue_depth: int = ruled(COUNT, 4)  # batches waiting in each queue of the pipeline
    checkpoint: str | None = None  # an attached checkpoint's name (or a path to attach); None: the final one
    sharded: object | None = None  # sharded.ShardedModel: the model's parameters sharded across processes

    def __post_init__(self):
        check_fields(self)
        check_shard(self.shard)
        if self.batch_tokens != "auto" and self.batch_tokens is not None:
            check("batch_tokens", COUNT, int(self.batch_tokens))
        self.device = resolve_device(self.device)


def ingest_gradients(db, config: FeaturizerConfig | dict | None, job: GradientJob, progress: bool = True) -> dict:
    """Featurize every id of job.split (in job.shard) that its tables lack. Returns counts,
    speed and the token budget used.

    config: full settings, or a dict of the given ones (None entries = not given), resolved
    against the stored settings and the checkpoint (featurizer.settings.resolve)."""
    run = open_run(db, config, job)
    record_settings(db, run, job)
    tables = create_tables(db, run, job)
    total = count_missing(db, job.split, list(tables.values())) if progress else None
    if total is not None and job.limit is not None:
        total = min(total, job.limit)
    committer = Committer(db, tables, job.dtype, job.commit_rows)
    totals = {"rows": 0, "tokens": 0, "seconds": 0.0, "batches": 0, "batch_tokens": run.batch_tokens}
    start = time.perf_counter()
    desc = f"gradients {job.split}" + (f" {run.checkpoint}" if run.checkpoint else "")
    with tqdm(total=total, desc=desc, unit=" ex", disable=not progress) as bar, \
            closing(run_batches(db, run, job, tables, committer)) as batches:  # an error stops the threads
        for batch in batches:
            totals["rows"] += batch.rows
            totals["batches"] += 1
            totals["tokens"] += batch.tokens
            bar.update(batch.rows)
            bar.set_postfix_str(f"{totals['tokens'] / (time.perf_counter() - start):,.0f} tok/s")
    if job.shard == (0, 1) and totals["rows"]:
        with db.writer(f"optimize {job.split} gradients"):  # a commit like any other: readers see it whole
            for table in tables.values():  # merge the per-commit fragments; shards leave it to the last run
                db.lance_table(table.name).optimize()
    totals["seconds"] = time.perf_counter() - start
    totals["tables"] = {table.name: table.count() for table in tables.values()}
    return totals


def ingest_sharded(db, config, job, progress: bool = True) -> dict:
    """ingest_gradients with the model sharded over the launcher's processes: job.shard becomes
    (rank, world) and job.device this rank's device. Returns this rank's totals."""
    with process_group(job.device) as rank, RankWatch(rank) as watch:
        job = dataclasses.replace(job, shard=rank.shard, device=str(rank.device), sharded=ShardedModel(rank))
        try:
            totals = ingest_gradients(db, config, job, progress=progress and rank.rank == 0)
        except BaseException as exc:  # one line naming the rank that failed first, and its cause
            failure = watch.report(exc)
            if failure is not None:
                raise failure from None
            raise
        totals.update(rank=rank.rank, world=rank.world, dummy_steps=job.sharded.stepper.dummy_steps
                      if job.sharded.stepper else 0)
        return totals
