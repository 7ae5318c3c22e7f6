"""Fit the preconditioners R from stored gradient tables (`trackstar-db fit`).

What is fitted comes from the ladder (trackstar_db/ladder.py): for every rung that uses
R, its mix ('train' or 'mixed') on the training table of its variant:

    grads_train_corrected.train     R_train of the corrected gradients     (r-train)
    grads_train_corrected.mixed     lambda R_eval + (1 - lambda) R_train   (trackstar)
    grads_train_uncorrected.train   R_train of the uncorrected gradients   (trak)

R_eval comes from the query gradients of one template. With `mix='train'`, or a database
without queries, no mixed R is fitted and the reason is returned. After R, one more pass
stores the whitened row norms the unit-normalised rungs need (retrieval/scoring.py), with the
table version they belong to. Block-diagonal over the layout's blocks unless kind='dense'.
The same pass stores, for R_train of every table, the norms self-influence reads
(selection/self_influence.py): |g R^-1/2| (its square is g R^-1 g) and the plain |g|.
"""

from __future__ import annotations

import datetime as _dt
import os
import time
from dataclasses import dataclass, field

import pyarrow.compute as pc
import torch

from trackstar_db import defaults
from trackstar_db import faults
from trackstar_db.content import digest as content_digest, file_sha256, write_bytes
from trackstar_db.errors import ParameterError, TrackstarError
from trackstar_db.featurizer.config import Layout
from trackstar_db.featurizer.preconditioner import (DEFAULT_DAMPING, DEFAULT_SHRINKAGE, GramAccumulator,
                                                    check_shrinkage, fit_preconditioner)
from trackstar_db.ladder import LADDER
from trackstar_db.option_checks import COUNT, DAMPING, Choice, check_fields, ruled
from trackstar_db.store import manifest as _manifest
from trackstar_db.store.vectors import BATCH_BYTES, scan_progress

RETIRE_SECONDS = 3600.0  # a replaced R file stays this long for readers that pinned the manifest naming it

MIXES = ("task", "train")
KINDS = ("block", "dense")  # R block-diagonal over the layout's blocks, or one dense matrix
SELF_INFLUENCE_POWERS = (-0.5, 0.0)  # g R^-1 g = |g R^-1/2|^2 and |g|^2, stored with R_train


@dataclass
class FitReport:
    """preconditioners: {table.mix: parameters}; notes: why an asked-for R was not fitted."""

    preconditioners: dict[str, dict]
    notes: list[str] = field(default_factory=list)


def needed() -> dict[tuple[str, str], set[float]]:
    """(variant, mix) -> the train powers whose whitened row norms the ladder needs."""
    out: dict[tuple[str, str], set[float]] = {}
    for spec in LADDER:
        if spec.preconditioner:
            powers = out.setdefault((spec.table, spec.preconditioner), set())
            if spec.unit_norm and spec.train_power != 0:
                powers.add(spec.train_power)
            if spec.preconditioner == "train":
                powers.update(SELF_INFLUENCE_POWERS)
    return out


def _query_ids(db, template: str | None) -> set[str] | None:
    if template is None:
        return None
    rows = db.table("queries", columns=["query_id"], filter=pc.field("template") == template)
    return set(rows.column("query_id").to_pylist())


def _stream(table, keep: set[str] | None = None, batch_size: int = defaults.STREAM_BATCH_ROWS, label: str = "R"):
    """[batch, d] float32 vectors of a gradient table, optionally only the ids in `keep`. A batch
    holds at most the scan's BATCH_BYTES of float32 (4,096 rows at d = 4,096, 256 at 65,536):
    the Gram update widens it to float64 and Lance reads several batches ahead."""
    batch_size = max(1, min(batch_size, BATCH_BYTES // (4 * table.dim)))
    for ids, x in scan_progress(table.batches(batch_size=batch_size), table.count(), f"{label} {table.name}"):
        if keep is not None:
            x = x[torch.tensor([i in keep for i in ids], dtype=torch.bool)]
        if len(x):
            yield x


def _summed(source, blocks) -> GramAccumulator:
    """The g g^T sums of a stream of batches (or the sums another engine already made)."""
    if isinstance(source, GramAccumulator):
        return source
    acc = GramAccumulator(blocks)
    for x in source:
        acc.update(x)
    return acc


@dataclass(frozen=True)
class FitOptions:
    """fit's options (see `fit`), checked by their rules; crossing_k: lambda's spectrum-crossing
    component (None: d // 64), also below the database's dim (checked in `fit`)."""

    mix: str = ruled(Choice(MIXES), "task")
    kind: str = ruled(Choice(KINDS), "block")
    damping: float = ruled(DAMPING, DEFAULT_DAMPING)
    crossing_k: int | None = ruled(COUNT, None)
    shrinkage: object = DEFAULT_SHRINKAGE

    def __post_init__(self):
        check_fields(self)
        try:
            check_shrinkage(self.shrinkage)
        except ValueError as exc:
            raise ParameterError("shrinkage", str(exc).removeprefix("shrinkage ")) from None


def _check_options(mix: str, damping: float, k: int | None, shrinkage=DEFAULT_SHRINKAGE, kind: str = "block") -> None:
    FitOptions(mix=mix, kind=kind, damping=damping, crossing_k=k, shrinkage=shrinkage)


def damping_bound(pre) -> float | None:
    """The largest damping that still preconditions in float32 (the dtype vectors are scored in):
    beyond max(s) / (mean(s) eps32) the shift damping mean(s) exceeds every eigenvalue by more
    than float32 resolves, so R^p is a multiple of the identity to working precision and its
    negative powers only run into underflow (a query's whitened norm becomes 0). None for a zero R."""
    values = torch.cat([v.clamp(min=0) for v in pre.eigvals])
    mean = float(values.sum()) / pre.dim
    if not mean > 0:
        return None
    return float(values.max()) / (mean * torch.finfo(torch.float32).eps)


def _check_damping(pre, damping: float, table: str) -> None:
    bound = damping_bound(pre)
    if bound is not None and damping > bound:
        raise ParameterError("damping", f"must be at most {bound:.3g} for {table} (largest eigenvalue / (mean "
                                        f"eigenvalue x float32 epsilon): beyond it R^p is the identity to float32 "
                                        f"precision and its powers underflow), not {damping:g}")


class LocalPasses:
    """The two passes fit makes over a training table, in this process. Another engine passes an
    object with the same two functions (trackstar_db.distributed.fit: Ray tasks over fragment ranges)."""

    @staticmethod
    def gram(table, spans):
        """g g^T over the table: a stream of batches (fit sums them) or the sums themselves."""
        return _stream(table)

    @staticmethod
    def row_norms(table, pre, powers) -> dict:
        """{power: [n_rows] |g R^power|} in the table's scan order."""
        parts = {p: [] for p in powers}
        with torch.inference_mode():
            for x in _stream(table, label="norms"):
                for p in powers:
                    parts[p].append(pre.norms(x, p))
        return {p: torch.cat(v) for p, v in parts.items()}


def fit(db, mix: str = "task", kind: str = "block", damping: float = DEFAULT_DAMPING, k: int | None = None,
        template: str | None = defaults.TEMPLATE, passes=LocalPasses,
        shrinkage=DEFAULT_SHRINKAGE) -> FitReport:
    """Fit every preconditioner the stored tables allow. `passes`: who reads the training tables
    (LocalPasses; trackstar_db.distributed.fit sums over Ray tasks). shrinkage: each block's
    estimate toward its mean eigenvalue: 'prior' (rho = size / (n + size) per block, the default),
    'ledoit-wolf', 'none' or a fixed rho in [0, 1] (featurizer/preconditioner.py; docs/method.md)."""
    _check_options(mix, damping, k, shrinkage, kind)
    featurizer = db.manifest.get("featurizer")
    if not featurizer:
        raise TrackstarError(f"{db.path}: no gradients yet; run 'trackstar-db ingest gradients' first")
    layout = Layout.from_dict(featurizer["layout"])
    if k is not None and k >= layout.dim:  # lambda reads component k of spectra of d eigenvalues
        raise ParameterError("crossing_k", f"must be below {layout.dim:,} (R has {layout.dim:,} eigenvalues at this "
                                           f"database's dim), not {k:,}")
    spans = layout.spans() if featurizer["config"]["combine"] == "concat" else None
    keep = _query_ids(db, template) if mix == "task" else None
    fitted, notes, staged = {}, [], []
    grams: dict[str, GramAccumulator] = {}  # R_train's sums, shared by the train and mixed R of a table
    for (variant, which), powers in needed().items():
        train = db.gradient_table("train", corrected=variant == "corrected")
        if not train.exists():
            continue
        queries = None
        if which == "mixed":
            if mix != "task":
                continue
            table = db.gradient_table("queries", corrected=variant == "corrected")
            if not table.exists() or not keep:
                what = "query gradients" if keep else f"queries with template {template!r}"
                notes.append(f"no {what}: fitted R_train only (trackstar falls back to r-train); "
                             f"ingest facts and 'ingest gradients --split queries' for the task R")
                continue
            queries = _stream(table, keep)
        version = train.version()
        if train.name not in grams:
            blocks = [(0, layout.dim)] if kind == "dense" or spans is None else [tuple(s) for s in spans]
            grams[train.name] = _summed(passes.gram(train, blocks), blocks)
        try:
            pre = fit_preconditioner(grams[train.name], queries, dim=layout.dim, spans=spans, kind=kind,
                                     damping=damping, k=k, shrinkage=shrinkage)
        except ValueError as exc:  # the crossing rule finds both spectra zero at component k
            if "component k" not in str(exc):
                raise
            raise ParameterError("crossing_k", f"{k}: {str(exc).split(': ', 1)[1]} of {train.name} and its "
                                               "queries; give a smaller one") from None
        _check_damping(pre, damping, train.name)
        pre.params["table_version"] = version
        if powers:
            pre.row_norms = passes.row_norms(train, pre, powers)
        staged.append((train, which, pre, dict(pre.params, template=template if queries is not None else None)))
    if not staged:
        raise TrackstarError(f"{db.path}: no gradient tables to fit (found: {', '.join(db.table_names())})")
    # write-then-swap: every new file is complete before one journaled step (Database.swap_files)
    # moves them into place and points the manifest at them; a kill in that step is rolled forward.
    # New files are named by their content (content.py: canonical bytes, their sha256), so a
    # reader pinned to the old manifest keeps its R files (retired, removed by a later fit once
    # RETIRE_SECONDS have passed), a rerun names its files as a clean run does, and a file already
    # present under its name is not written again
    renames = []
    try:
        for train, which, pre, params in staged:
            data = pre.to_bytes()
            digest = content_digest(data)
            path = train.preconditioner_path(which, digest)
            fitted[train.preconditioner_key(which)] = dict(params, file=path.name, sha256=digest)
            if path.is_file() and file_sha256(path) == digest:
                continue  # the same content under its name: nothing to write
            tmp = path.parent / f"{train.preconditioner_key(which)}.tmp"
            tmp.parent.mkdir(exist_ok=True)
            renames.append((tmp.name, path.name))
            write_bytes(tmp, data)
    except BaseException:  # a full disk: the partial files go, the fitted ones stay as they were
        for tmp, _ in renames:
            (db.path / "preconditioners" / tmp).unlink(missing_ok=True)
        raise
    faults.point("fit.after_files")
    with db.writer("fit"):
        # an R from an earlier fit must not serve a rung: the entries are replaced, not merged
        manifest = _manifest.read(db.path)
        retired, expired = _retire(manifest, fitted, db.path / "preconditioners")
        if renames or expired or manifest.get("preconditioners") != fitted \
                or (manifest.get("retired_preconditioners") or []) != retired:
            db.swap_files("fit", "preconditioners", renames,
                          {"preconditioners": fitted, "retired_preconditioners": retired},
                          unlink=expired, fault="fit")
        # else: an identical refit, every file and the manifest already as fitted: nothing rewritten
    return FitReport(fitted, notes)


def _retire(manifest: dict, fitted: dict, folder) -> tuple[list[str], list[str]]:
    """([R files readers may still use], [files old enough to remove]). A file is retired when a
    fit stops naming it; its mtime is set then and it is removed once RETIRE_SECONDS
    (TRACKSTAR_RETIRE_SECONDS) later. The manifest lists names only, sorted, so a rerun writes
    the manifest a clean fit writes (a manifest of an older trackstar-db maps names to the time)."""
    grace = float(os.environ.get("TRACKSTAR_RETIRE_SECONDS", RETIRE_SECONDS))
    now = time.time()
    keep = {entry["file"] for entry in fitted.values()}
    previous = manifest.get("retired_preconditioners") or []
    retired, expired = set(), []
    for name in previous:
        path = folder / name
        if name in keep or not path.is_file():
            continue
        since = (_dt.datetime.fromisoformat(previous[name]).timestamp() if isinstance(previous, dict)
                 else path.stat().st_mtime)
        if now - since > grace:
            expired.append(name)
        else:
            retired.add(name)
    for key, entry in (manifest.get("preconditioners") or {}).items():
        name = entry.get("file", f"{key}.safetensors")
        if name not in keep and name not in retired and (folder / name).is_file():
            os.utime(folder / name)  # retired now: the grace period starts
            retired.add(name)
    return sorted(retired), sorted(expired)
