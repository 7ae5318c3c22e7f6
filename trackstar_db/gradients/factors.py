"""Fit the Kronecker-factored curvature (K-FAC / EK-FAC) from the training examples
(`trackstar-db fit-factors`, `Database.fit_factors`).

A featurize-like pass over the examples (all, or a seeded share: crc32("seed/id") below the
fraction), in example-id order, on the database's final model and task (featurizer/kfac.py):

    pass 1  token covariances C_r, C_c of every tracked matrix     (both kinds)
            -> float64 eigendecompositions Q_r, s_r, Q_c, s_c
    pass 2  mean over examples of (Q_r^T G_i Q_c)^2                (EK-FAC only)

Both passes take the gradients of each example's summed token loss (kfac.TOKEN_LOSS) with, by
default, labels drawn from the model's own prediction at each position (`fisher="sampled"`: the
true Fisher, as kronfluence fits by default; a generator seeded by the seed and the batch's
place, so a refit or a resumed fit draws the same), or the data's labels (`"empirical"`). On the
tiny world of benchmarks/bench_lds_kfac.py the sampled labels lift the LDS of kfac and ekfac
from 0.705 / 0.700 to 0.744 / 0.746 (RESULTS.md).

Stored beside R (DB/preconditioners/, safetensors named by content):
    factors.<kind>.<sha16>.safetensors                         the factors (kfac.KroneckerFactors)
    grads_train_uncorrected.<kind>-proj.<sha16>.safetensors    the projected-space curvature of the
        uncorrected table's layout (kfac.projected_blocks) as a block preconditioner (featurizer/
        preconditioner.py), damped per block; the kfac-proj / ekfac-proj rungs whiten with it
and recorded in the manifest under "factors": the kind, damping, files and sha256, and what they
were fitted on (examples, share and seed, tokens, model path, settings, the labels (fisher), the
examples table version).

Kill-safe and resumable like `fit`: the sums so far are saved every `save_every` examples to
preconditioners/factors.partial.safetensors (temp file, then rename) with the options they belong to;
a rerun with the same options and data resumes after the saved examples, another run starts
over. The final files are complete before one journaled swap (Database.swap_files) moves them
into place and points the manifest at them. Files of an earlier fit are removed by that swap.

Limits: a dense side holds [n, n] float64 (a 4,096-wide side: 128 MB) and its eigh is O(n^3);
sides wider than max_dense are diagonal. EK-FAC holds [rows, cols] float64 per matrix (the
model's size in float64) and pass 2 forms [batch, rows, cols] rotated gradients per matrix.
For a 7B model that is the model twice over in host memory: fit a share, track fewer modules
(the task's module patterns), or use the projected rungs only.
"""

from __future__ import annotations

import hashlib
import json
import os
import zlib
from dataclasses import dataclass, replace
from pathlib import Path

import duckdb
import torch
from safetensors import safe_open
from safetensors.torch import save_file
from tqdm.auto import tqdm

from trackstar_db import defaults, faults
from trackstar_db.content import file_sha256
from trackstar_db.errors import TrackstarError
from trackstar_db.featurizer import kfac as _kfac
from trackstar_db.featurizer.config import Layout
from trackstar_db.featurizer.preconditioner import Preconditioner
from trackstar_db.featurizer.projection import projection_matrix
from trackstar_db.featurizer.task import IGNORE
from trackstar_db.featurizer.tokenize import collate, pad_id
from trackstar_db.featurizer.tracked import per_example_backward
from trackstar_db.option_checks import COUNT, DAMPING, FRACTION, Choice, check_fields, ruled
from trackstar_db.progress import quiet_transformers, wanted
from trackstar_db.store import manifest as _manifest
from trackstar_db.store.checkpoints import source

from .loader import database_featurizer, stored_config

PARTIAL = "factors.partial.safetensors"
SAVE_EVERY = 2048  # examples between saves of the partial sums
PROJECTED_TABLE = "grads_train_uncorrected"  # the table the projected rungs whiten


@dataclass
class FactorReport:
    """entry: the manifest's "factors" record; resumed: examples skipped thanks to a partial save."""

    entry: dict
    resumed: int = 0
    notes: list[str] | None = None


@dataclass(frozen=True)
class FactorOptions:
    """fit-factors' options (see `fit_factors`), checked by their rules."""

    kind: str = ruled(Choice(_kfac.KINDS), "ekfac")
    fisher: str = ruled(Choice(defaults.FISHERS), defaults.FISHER)
    damping: float = ruled(DAMPING, _kfac.DEFAULT_DAMPING)
    fraction: float = ruled(FRACTION, 1.0)
    seed: int = 0
    batch_size: int = ruled(COUNT, 16)
    max_dense: int = ruled(COUNT, _kfac.MAX_DENSE_SIDE)

    def __post_init__(self):
        check_fields(self)


def _check(kind: str, fisher: str, damping: float, fraction: float, batch_size: int, max_dense: int) -> None:
    FactorOptions(kind=kind, fisher=fisher, damping=damping, fraction=fraction, batch_size=batch_size,
                  max_dense=max_dense)


def in_share(example_id: str, fraction: float, seed: int) -> bool:
    """Whether `example_id` is in the seeded share `fraction` of the examples."""
    return fraction >= 1 or zlib.crc32(f"{seed}/{example_id}".encode()) < fraction * 2**32


def _examples(db, fraction: float, seed: int, chunk_rows: int = 4096):
    """(ids, texts, spans) chunks of the examples in id order, only those in the share."""
    dataset = db.dataset("examples")
    spans = "loss_spans" in dataset.schema.names
    con = duckdb.connect()
    try:
        con.register("examples", dataset)
        columns = "example_id, text" + (", loss_spans" if spans else "")
        reader = con.sql(f"SELECT {columns} FROM examples ORDER BY example_id").to_arrow_reader(batch_size=chunk_rows)
        for batch in reader:
            ids = batch.column("example_id").to_pylist()
            keep = [i for i, e in enumerate(ids) if in_share(e, fraction, seed)]
            texts = batch.column("text").to_pylist()
            span = batch.column("loss_spans").to_pylist() if spans else [None] * len(ids)
            yield [ids[i] for i in keep], [texts[i] for i in keep], [span[i] for i in keep]
    finally:
        con.close()


def _batches(db, featurizer, tokenizer, fraction: float, seed: int, batch_size: int, skip: int = 0):
    """(n examples, collated batch) of the share, after the first `skip` examples."""
    task, max_length, pad = featurizer.task, featurizer.config.max_length, pad_id(tokenizer)
    seen = 0
    for ids, texts, spans in _examples(db, fraction, seed):
        for start in range(0, len(ids), batch_size):
            n = len(ids[start: start + batch_size])
            seen += n
            if seen <= skip:
                continue
            items = [task.encode_example(tokenizer, t, s, max_length)
                     for t, s in zip(texts[start: start + batch_size], spans[start: start + batch_size])]
            yield n, collate(items, pad)


def _relabel(fisher: str, seed: int):
    """The labels the factors' gradients take, as a relabel(logits, labels) for
    tracked.per_example_backward: 'sampled' (the true Fisher) draws each label token from the
    model's own prediction at that position (the same forward's logits; the pass runs the model in
    eval mode), with a generator seeded by `seed`, so a refit or a resumed fit draws the same;
    'empirical' keeps the data's (None)."""
    if fisher == "empirical":
        return None

    def draw(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        logits = logits[:, :-1].float()
        generator = torch.Generator(device=logits.device).manual_seed(seed)
        drawn = torch.multinomial(torch.softmax(logits.reshape(-1, logits.shape[-1]), -1), 1,
                                  generator=generator).view(logits.shape[:2])
        out = labels.clone()
        out[:, 1:] = torch.where(out[:, 1:] != IGNORE, drawn, out[:, 1:])
        return out

    return draw


def _save_partial(folder: Path, key: str, phase: str, done: int, tensors: dict) -> None:
    tmp = folder / (PARTIAL + ".tmp")
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(tmp),
              metadata={"key": key, "phase": phase, "done": str(done)})
    os.replace(tmp, folder / PARTIAL)


def _load_partial(folder: Path, key: str) -> tuple[str, int, dict] | None:
    path = folder / PARTIAL
    if not path.is_file():
        return None
    try:
        with safe_open(str(path), framework="pt") as handle:
            meta = handle.metadata() or {}
            if meta.get("key") != key:
                return None
            return meta["phase"], int(meta["done"]), {k: handle.get_tensor(k) for k in handle.keys()}
    except Exception:  # a damaged partial file: start over
        return None


def _draw_seed(seed: int, phase: int, done: int) -> int:
    """The sampled labels' seed of the batch after `done` examples of pass `phase` (0, 1)."""
    return (seed * 2 + phase) * 1_000_003 + done


def _bar(total: int | None, desc: str, progress: bool | None):
    return tqdm(total=total, desc=desc, unit=" ex", disable=not wanted(progress))


def fit_factors(db, kind: str = "ekfac", damping: float = _kfac.DEFAULT_DAMPING, fraction: float = 1.0,
                seed: int = 0, batch_size: int = 16, device: str = "cpu", max_dense: int = _kfac.MAX_DENSE_SIDE,
                save_every: int = SAVE_EVERY, progress: bool | None = None,
                fisher: str = defaults.FISHER) -> FactorReport:
    """Fit and store the curvature of `kind` (see the module docstring); returns the manifest entry.
    fisher: the labels of the gradients the factors are fitted on, 'sampled' from the model (the
    true Fisher, kronfluence's default) or the data's ('empirical')."""
    _check(kind, fisher, damping, fraction, batch_size, max_dense)
    config = stored_config(db)
    if config is None:
        raise TrackstarError(f"{db.path}: no gradients yet; run 'trackstar-db ingest gradients {db.path}' first")
    n_examples = db.count("examples")
    if n_examples == 0:
        raise TrackstarError(f"{db.path}: the database has no examples")
    with quiet_transformers(progress):
        featurizer, tokenizer = database_featurizer(db, replace(config, correction="none"), device=device)
    tracked, model = featurizer.tracked, featurizer.model
    fitted_on = {"examples": n_examples, "examples_version": db.lance_table("examples").version,
                 "fraction": fraction, "seed": seed, "model": str(source(db).path),
                 "max_length": config.max_length, "tracked": [m.name for m in tracked], "max_dense": max_dense,
                 "fisher": fisher}
    key = hashlib.sha256(json.dumps({"kind": kind, **fitted_on}, sort_keys=True).encode()).hexdigest()
    folder = db.path / "preconditioners"
    folder.mkdir(exist_ok=True)
    partial = _load_partial(folder, key)
    covariance = _kfac.CovarianceAccumulator(tracked, max_dense)
    correction = _kfac.EigenCorrection({m.name: (m.rows, m.cols) for m in tracked}) if kind == "ekfac" else None
    phase, done, resumed = "covariance", 0, 0
    if partial is not None:
        phase, done, tensors = partial
        resumed = done
        covariance.load_state(tensors)
        if phase == "correction":
            correction.load_state(tensors)
    share = None if fraction < 1 else n_examples
    if phase == "covariance":
        with _bar(share, "factors: covariances", progress) as bar:
            bar.update(done)
            for n, batch in _batches(db, featurizer, tokenizer, fraction, seed, batch_size, skip=done):
                batch = {k: v.to(featurizer.device) for k, v in batch.items()}
                mask = batch["attention_mask"]
                per_example_backward(model, tracked, batch,
                                     lambda name, x_r, x_c: covariance.update(name, x_r, x_c, mask),
                                     summed=_kfac.TOKEN_LOSS == "sum",
                                     relabel=_relabel(fisher, _draw_seed(seed, 0, done)))
                done += n
                bar.update(n)
                if done // save_every != (done - n) // save_every:
                    _save_partial(folder, key, "covariance", done, covariance.state())
                    faults.point("factors.after_partial")
        n_share, phase, done = done, "correction", 0
        if correction is not None:
            _save_partial(folder, key, "correction", 0, {**covariance.state(), **correction.state()})
    tokens = min(covariance.tokens[m.name] // len(m.uses) for m in tracked)  # each use sees every token
    params = {"kind": kind, "damping": damping, "tokens": tokens, "token_loss": _kfac.TOKEN_LOSS}
    factors = _kfac.factors_from(covariance.covariances(), params)
    if correction is not None:
        with _bar(share, "factors: eigenvalue correction", progress) as bar:
            bar.update(done)
            for n, batch in _batches(db, featurizer, tokenizer, fraction, seed, batch_size, skip=done):
                rotated, _ = _kfac.rotated_batch(model, tracked, factors, {k: v.to(featurizer.device)
                                                                           for k, v in batch.items()},
                                                 relabel=_relabel(fisher, _draw_seed(seed, 1, done)))
                correction.update(rotated)
                done += n
                bar.update(n)
                if done // save_every != (done - n) // save_every:
                    _save_partial(folder, key, "correction", done, {**covariance.state(), **correction.state()})
                    faults.point("factors.after_partial")
        factors.corrected = {name: values.float() for name, values in correction.means().items()}
        n_share = correction.n
    factors.params.update(n_examples=int(n_share), fitted_on=fitted_on)
    return _store(db, factors, config, folder, resumed)


def _store(db, factors: _kfac.KroneckerFactors, config, folder: Path, resumed: int) -> FactorReport:
    """Write the factors and the projected blocks under content names, then swap them in."""
    kind = factors.kind
    staged: list[tuple[Path, str]] = []  # (temp file, final name)
    notes = []
    try:
        tmp = folder / f"factors.{kind}.tmp"
        factors.save(tmp)
        digest = file_sha256(tmp)
        staged.append((tmp, f"factors.{kind}.{digest[:16]}.safetensors"))
        entry = {"kind": kind, "damping": factors.damping, "file": staged[-1][1], "sha256": digest,
                 "n_examples": factors.params["n_examples"], "tokens": factors.params["tokens"],
                 "token_loss": factors.params.get("token_loss", "mean"), "fitted_on": factors.params["fitted_on"],
                 "projected": {}}
        table = db.gradient_table("train", corrected=False)
        if table.exists():
            layout = Layout.from_dict(db.manifest["featurizer"]["layout"])
            project = lambda name, side, k, n: projection_matrix(config.seed, name, side, k, n)  # noqa: E731
            for which in ("kfac", "ekfac")[: 2 if kind == "ekfac" else 1]:
                spans, matrices = _kfac.projected_blocks(factors, layout, project, which)
                pre = Preconditioner.from_matrices(spans, matrices, damping=0.0, kind="block",
                                                   n_train=factors.params["n_examples"], table_version=table.version())
                tmp = folder / f"{PROJECTED_TABLE}.{which}-proj.tmp"
                pre.save(tmp)
                digest = file_sha256(tmp)
                staged.append((tmp, f"{PROJECTED_TABLE}.{which}-proj.{digest[:16]}.safetensors"))
                entry["projected"][which] = {"file": staged[-1][1], "sha256": digest, "table": table.name,
                                             "table_version": table.version()}
        else:
            notes.append(f"no {table.name} table: the projected rungs (kfac-proj, ekfac-proj) need "
                         f"'trackstar-db ingest gradients' with the uncorrected table")
    except BaseException:
        for tmp, _ in staged:
            tmp.unlink(missing_ok=True)
        raise
    faults.point("factors.after_files")
    with db.writer("fit-factors"):
        old = _manifest.read(db.path).get("factors") or {}
        keep = {final for _, final in staged}
        stale = [f for f in [old.get("file")] + [p.get("file") for p in (old.get("projected") or {}).values()]
                 if f and f not in keep]
        db.swap_files("fit-factors", "preconditioners", [(t.name, final) for t, final in staged],
                      {"factors": entry}, unlink=stale + [PARTIAL], fault="factors")
    return FactorReport(entry, resumed, notes)


def load_factors(db) -> _kfac.KroneckerFactors:
    """The stored factors (checked against their recorded sha256), kept while the file is unchanged."""
    entry = db.manifest.get("factors")
    if not entry:
        raise TrackstarError(f"{db.path}: no Kronecker factors; run 'trackstar-db fit-factors {db.path}'")
    return _checked(db, entry, _LOADED, 1, _kfac.KroneckerFactors.load)


def load_projected(db, which: str):
    """The projected-space preconditioner of `which` ('kfac' | 'ekfac') for the uncorrected table."""
    entry = (db.manifest.get("factors") or {}).get("projected", {}).get(which)
    if not entry:
        fitted = (db.manifest.get("factors") or {}).get("kind")
        hint = "fit-factors --kind ekfac" if fitted == "kfac" and which == "ekfac" else "fit-factors"
        raise TrackstarError(f"{db.path}: no projected {which} curvature; run 'trackstar-db {hint} {db.path}'")
    return _checked(db, entry, _LOADED_PROJECTED, 4, Preconditioner.load)


def _checked(db, entry: dict, loaded: dict, keep: int, load):
    """The file `entry` names, loaded by `load` once its sha256 matches the recorded one; `loaded`
    keeps the last `keep` files of a warm process (the oldest goes first)."""
    path = db.path / "preconditioners" / entry["file"]
    key = (str(path), entry["sha256"])
    if key not in loaded:
        if not path.is_file() or file_sha256(path) != entry["sha256"]:
            raise TrackstarError(f"{path}: missing or not the file fitted (sha256 differs); "
                                 f"run 'trackstar-db fit-factors {db.path}'")
        while len(loaded) >= keep:
            loaded.pop(next(iter(loaded)))
        loaded[key] = load(path)
    return loaded[key]


_LOADED: dict[tuple, _kfac.KroneckerFactors] = {}  # a warm process's factors (the last file)
_LOADED_PROJECTED: dict[tuple, object] = {}  # and projected blocks (the last four files)
