"""The gradient ingest worker: featurize examples or queries into LanceDB gradient tables.

Tables (one featurizer configuration per database, recorded in the manifest):
    grads_train,   grads_queries      optimizer-corrected projected gradients
    grads_train_raw, grads_queries_raw  the same projection without the correction (ablations)

Resumable and idempotent: rows are keyed by id and committed in batches (each Lance append is
atomic), and a run featurizes only the ids a table lacks, so a killed run started again ends
with exactly one row per id. Shards (--shard I/N) split ids by crc32(id) % N; separate
processes append to the same tables. A run whose settings differ from the manifest is refused.
"""

from __future__ import annotations

import os
import time
import zlib
from dataclasses import dataclass

import pyarrow as pa
import torch
from tqdm.auto import tqdm

from . import manifest as _manifest
from . import optimizer_state as _optimizer_state
from . import vectors as _vectors
from .errors import TrackstarError
from .featurizer.config import FeaturizerConfig
from .featurizer.per_example import Featurizer
from .featurizer.second_moment import build_second_moment
from .schema import gradient_schema
from .tokenize import collate, encode_query, encode_text, pad_id

SPLITS = ("train", "queries")


@dataclass
class GradientJob:
    split: str = "train"
    batch_size: int = 16
    device: str = "cpu"
    dtype: str = "float32"
    shard: tuple[int, int] = (0, 1)
    commit_rows: int = 2048
    with_raw: bool = True  # also write the uncorrected table the ablation ladder needs
    estimate_sample: int = 512  # training examples used when correction == "estimated"
    limit: int | None = None  # stop after this many new rows (tests, quick looks)

    def __post_init__(self):
        if self.split not in SPLITS:
            raise TrackstarError(f"--split must be one of {', '.join(SPLITS)}, not {self.split!r}")
        index, count = self.shard
        if not (count >= 1 and 0 <= index < count):
            raise TrackstarError(f"--shard {index}/{count}: need 0 <= I < N")
        self.device = auto_device(self.device)
        if self.device.startswith("cuda") and not torch.cuda.is_available():
            raise TrackstarError(f"--device {self.device}: no CUDA GPU is available here")
        if self.dtype not in _vectors.DTYPES:
            raise TrackstarError(f"--dtype must be one of {', '.join(_vectors.DTYPES)}, not {self.dtype!r}")


def table_name(split: str, raw: bool = False) -> str:
    return f"grads_{split}" + ("_raw" if raw else "")


def parse_shard(text: str) -> tuple[int, int]:
    """'I/N', or 'auto': from torchrun (RANK, WORLD_SIZE) or Slurm (SLURM_PROCID, SLURM_NTASKS)."""
    if text == "auto":
        for rank, size in (("RANK", "WORLD_SIZE"), ("SLURM_PROCID", "SLURM_NTASKS")):
            if rank in os.environ and size in os.environ:
                return int(os.environ[rank]), int(os.environ[size])
        return 0, 1
    try:
        index, count = (int(part) for part in text.split("/"))
    except ValueError:
        raise TrackstarError(f"--shard {text!r}: expected I/N, e.g. 0/4") from None
    return index, count


def auto_device(device: str) -> str:
    """'auto': a GPU when one is present; 'cuda' under a multi-process launcher means this
    process's GPU (LOCAL_RANK)."""
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cuda" and "LOCAL_RANK" in os.environ:
        return f"cuda:{os.environ['LOCAL_RANK']}"
    return device


def in_shard(item_id: str, shard: tuple[int, int]) -> bool:
    return zlib.crc32(item_id.encode("utf-8")) % shard[1] == shard[0]


def stored_config(db) -> FeaturizerConfig | None:
    entry = db.manifest.get("featurizer")
    return FeaturizerConfig.from_dict(entry["config"]) if entry else None


def training_texts(db, limit: int | None = None) -> tuple[list[str], list[str]]:
    """(ids, texts) of the examples table, sorted by id (a deterministic order for sampling)."""
    rows = db.table("examples", columns=["example_id", "text"]).sort_by("example_id")
    if limit is not None:
        rows = rows.slice(0, limit)
    return rows.column("example_id").to_pylist(), rows.column("text").to_pylist()


def load_featurizer(db, config: FeaturizerConfig, device: str = "cpu", with_raw: bool = False,
                    estimate_sample: int = 512, batch_size: int = 16):
    """(Featurizer, tokenizer) for the database's model, with the second moment config asks for."""
    model, tokenizer = db.load_model(device)
    state = None
    if config.correction in ("adam-exact", "adam-factored", "adafactor"):
        path = db.model_info().get("optimizer_state")
        if not path:
            raise TrackstarError(f"correction {config.correction!r} needs the optimizer state; "
                                 "give --optimizer-state to init, or use --correction estimated")
        state = _optimizer_state.load(path)
    sample = None
    if config.correction == "estimated":
        _, texts = training_texts(db, estimate_sample)
        if not texts:
            raise TrackstarError("correction 'estimated' needs training examples; ingest the corpus first")
        items = [encode_text(tokenizer, t, config.max_length) for t in texts]
        sample = [collate(items[i:i + batch_size], pad_id(tokenizer)) for i in range(0, len(items), batch_size)]
    moment = build_second_moment(config, model, state, sample, device)
    return Featurizer(model, config, moment, device, also_uncorrected=with_raw), tokenizer


def _record_settings(db, featurizer: Featurizer, job: GradientJob) -> None:
    """Write the featurizer settings into the manifest, or check them against it."""
    given = dict(featurizer.manifest(), dtype=job.dtype)
    stored = db.manifest.get("featurizer")
    if stored is None:
        db.manifest["featurizer"] = given
        db.save_manifest()
    else:
        _manifest.check_same(f"{db.path}: featurizer", stored, given)


def _open_table(db, name: str, dim: int, dtype: str, split: str, raw: bool):
    if not db.has_table(name):
        db.create_table(name, gradient_schema(dim, dtype))
        db.manifest["gradient_tables"][name] = {"split": split, "corrected": not raw, "dim": dim, "dtype": dtype}
        db.save_manifest()


def _items(db, split: str) -> tuple[list[str], list]:
    if split == "train":
        return training_texts(db)
    rows = db.table("queries", columns=["query_id", "prompt", "target"])
    pairs = list(zip(rows.column("prompt").to_pylist(), rows.column("target").to_pylist()))
    return rows.column("query_id").to_pylist(), pairs


def _check_vectors(ids: list[str], vectors: torch.Tensor) -> torch.Tensor:
    norms = vectors.norm(dim=1)
    bad = (~torch.isfinite(norms)) | (norms == 0)
    if bad.any():
        row = int(bad.nonzero()[0])
        raise TrackstarError(f"gradient of {ids[row]!r} has norm {norms[row].item()}; "
                             "it would be a NaN row in the index (empty text or overflow?)")
    return norms


def ingest_gradients(db, config: FeaturizerConfig | None, job: GradientJob, progress: bool = True) -> dict:
    """Featurize every id of job.split (in job.shard) that its tables lack. Returns counts and speed."""
    config = config or stored_config(db)
    if config is None:
        raise TrackstarError("no featurizer settings in the manifest yet: give --dim/--correction on the first run")
    featurizer, tokenizer = load_featurizer(db, config, job.device, job.with_raw, job.estimate_sample, job.batch_size)
    _record_settings(db, featurizer, job)
    dim = featurizer.layout.dim
    variants = {"corrected": table_name(job.split)}
    if "uncorrected" in featurizer.variants:
        variants["uncorrected"] = table_name(job.split, raw=True)
    elif config.correction == "none":
        variants = {"corrected": table_name(job.split, raw=True)}  # no correction: only the raw table
    for variant, name in variants.items():
        _open_table(db, name, dim, job.dtype, job.split, raw=name.endswith("_raw"))

    ids, payloads = _items(db, job.split)
    done = {name: db.ids(name, "id") for name in variants.values()}
    todo = [i for i, item_id in enumerate(ids)
            if in_shard(item_id, job.shard) and any(item_id not in d for d in done.values())]
    todo.sort(key=lambda i: (-len(str(payloads[i])), ids[i]))  # long first: less padding per batch
    if job.limit is not None:
        todo = todo[:job.limit]

    pending: dict[str, list[pa.Table]] = {name: [] for name in variants.values()}
    pending_rows = 0
    totals = {"rows": 0, "tokens": 0, "seconds": 0.0}

    def commit():
        nonlocal pending_rows
        for name, parts in pending.items():
            if parts:
                db.append(name, pa.concat_tables(parts))
                parts.clear()
        pending_rows = 0

    start = time.perf_counter()
    bar = tqdm(total=len(todo), desc=f"gradients {job.split}", unit=" ex", disable=not progress)
    for offset in range(0, len(todo), job.batch_size):
        chunk = todo[offset:offset + job.batch_size]
        batch_ids = [ids[i] for i in chunk]
        if job.split == "train":
            items = [encode_text(tokenizer, payloads[i], config.max_length) for i in chunk]
        else:
            items = [encode_query(tokenizer, *payloads[i], max_length=config.max_length) for i in chunk]
        out = featurizer.featurize(collate(items, pad_id(tokenizer)))
        for variant, name in variants.items():
            keep = [r for r, item_id in enumerate(batch_ids) if item_id not in done[name]]
            if not keep:
                continue
            vectors = out.vectors[variant][keep]
            norms = _check_vectors([batch_ids[r] for r in keep], vectors)
            pending[name].append(pa.table({
                "id": [batch_ids[r] for r in keep],
                "vector": _vectors.to_arrow(vectors, job.dtype),
                "norm": pa.array(norms.numpy(), pa.float32()),
                "loss": pa.array(out.loss[keep].numpy(), pa.float32()),
                "n_tokens": pa.array(out.n_tokens[keep].numpy().astype("int32")),
            }))
        pending_rows += len(chunk)
        totals["rows"] += len(chunk)
        totals["tokens"] += int(out.n_tokens.sum())
        if pending_rows >= job.commit_rows:
            commit()
        elapsed = time.perf_counter() - start
        bar.update(len(chunk))
        bar.set_postfix_str(f"{totals['tokens'] / elapsed:,.0f} tok/s")
    commit()
    bar.close()
    if job.shard == (0, 1) and totals["rows"]:
        for name in variants.values():  # merge the per-commit fragments; shards leave it to the last run
            db.lance_table(name).optimize()
    totals["seconds"] = time.perf_counter() - start
    totals["tables"] = {name: db.count(name) for name in variants.values()}
    return totals
