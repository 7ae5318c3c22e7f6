"""The gradient ingest worker: featurize examples or queries into gradient tables.

    plan (plan.py)        which ids of the split lack a row, in this shard, streamed in chunks
    featurize (here)      batches through the Featurizer -> {variant: [batch, dim]} vectors
    commit (commit.py)    rows buffered and appended, one Lance commit per `commit_rows`

Tables: grads_{split}_corrected (the optimizer-corrected vectors) and, unless switched off,
grads_{split}_uncorrected (the plain projection the first ladder rungs need); with correction
'none' only the uncorrected one. Resumable and idempotent: each Lance append is atomic and a run
featurizes only the ids a table lacks, so a killed run started again ends with exactly one row
per id. A run whose settings differ from the manifest is refused.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

from tqdm.auto import tqdm

from trackstar_db.devices import resolve_device
from trackstar_db.errors import TrackstarError
from trackstar_db.featurizer.config import FeaturizerConfig
from trackstar_db.featurizer.tokenize import collate, encode_query, encode_text, pad_id, token_limit
from trackstar_db.store import manifest as _manifest
from trackstar_db.store import vectors as _vectors
from trackstar_db.store.gradient_table import SPLITS

from .commit import Committer
from .loader import load_featurizer, resolved_config
from .plan import count_missing, missing


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

    def __post_init__(self):
        if self.split not in SPLITS:
            raise TrackstarError(f"--split must be one of {', '.join(SPLITS)}, not {self.split!r}")
        index, count = self.shard
        if not (count >= 1 and 0 <= index < count):
            raise TrackstarError(f"--shard {index}/{count}: need 0 <= I < N")
        for name in ("batch_size", "commit_rows", "estimate_sample"):
            if getattr(self, name) < 1:
                raise TrackstarError(f"--{name.replace('_', '-')} must be >= 1, not {getattr(self, name)}")
        if self.limit is not None and self.limit < 1:
            raise TrackstarError(f"--limit must be >= 1, not {self.limit}")
        self.device = resolve_device(self.device)
        if self.dtype not in _vectors.DTYPES:
            raise TrackstarError(f"--dtype must be one of {', '.join(_vectors.DTYPES)}, not {self.dtype!r}")


def _record_settings(db, featurizer, job: GradientJob, context_cap: int | None = None) -> None:
    """Write the featurizer settings into the manifest, or check them against it; context_cap
    (tokens kept per encoding, tokenize.token_limit) follows from the model and is recorded."""
    given = dict(featurizer.manifest(), dtype=job.dtype)
    stored = db.manifest.get("featurizer")
    if stored is None:
        db.manifest["featurizer"] = stored = given
    else:
        _manifest.check_same(f"{db.path}: featurizer", {k: v for k, v in stored.items() if k != "context_cap"}, given)
    if stored.get("context_cap") != context_cap:
        stored["context_cap"] = context_cap
        db.update_manifest(lambda manifest: manifest.setdefault("featurizer", stored).update(context_cap=context_cap))


def _encode(tokenizer, split: str, chunk, max_length: int) -> list:
    if split == "train":
        return [encode_text(tokenizer, text, max_length) for text in chunk.column("text").to_pylist()]
    return [encode_query(tokenizer, p, t, max_length=max_length)
            for p, t in zip(chunk.column("prompt").to_pylist(), chunk.column("target").to_pylist())]


def ingest_gradients(db, config: FeaturizerConfig | dict | None, job: GradientJob, progress: bool = True) -> dict:
    """Featurize every id of job.split (in job.shard) that its tables lack. Returns counts and speed.

    config: full settings, or a dict of the given ones (None entries = not given), resolved
    against the stored settings and the checkpoint (featurizer.settings.resolve)."""
    if not isinstance(config, FeaturizerConfig):
        config = resolved_config(db, config)
    featurizer, tokenizer = load_featurizer(db, config, job.device, job.uncorrected, job.estimate_sample,
                                            job.batch_size)
    _record_settings(db, featurizer, job, token_limit(tokenizer, config.max_length))
    tables = {variant: db.gradient_table(job.split, corrected=variant == "corrected")
              for variant in featurizer.variants}
    for table in tables.values():
        table.create(featurizer.layout.dim, job.dtype)

    total = count_missing(db, job.split, list(tables.values())) if progress else None
    if total is not None and job.limit is not None:
        total = min(total, job.limit)
    committer = Committer(db, tables, job.dtype, job.commit_rows)
    totals = {"rows": 0, "tokens": 0, "seconds": 0.0}
    start = time.perf_counter()
    with tqdm(total=total, desc=f"gradients {job.split}", unit=" ex", disable=not progress) as bar:
        for chunk in missing(db, job.split, list(tables.values()), job.shard):
            if job.limit is not None:
                chunk = chunk.slice(0, job.limit - totals["rows"])
            items = _encode(tokenizer, job.split, chunk, config.max_length)
            ids = chunk.column("id").to_pylist()
            for offset in range(0, len(ids), job.batch_size):
                batch_ids = ids[offset: offset + job.batch_size]
                out = featurizer.featurize(collate(items[offset: offset + job.batch_size], pad_id(tokenizer)))
                committer.add(batch_ids, out)
                totals["rows"] += len(batch_ids)
                totals["tokens"] += int(out.n_tokens.sum())
                bar.update(len(batch_ids))
                bar.set_postfix_str(f"{totals['tokens'] / (time.perf_counter() - start):,.0f} tok/s")
            if job.limit is not None and totals["rows"] >= job.limit:
                break
    committer.flush()
    if job.shard == (0, 1) and totals["rows"]:
        for table in tables.values():  # merge the per-commit fragments; shards leave it to the last run
            db.lance_table(table.name).optimize()
    totals["seconds"] = time.perf_counter() - start
    totals["tables"] = {table.name: table.count() for table in tables.values()}
    return totals

