"""A gradient table: one home for its name, width, dtype, record batches and the R fitted on it.

Naming rule (the only place it is written):

    grads_{split}_{variant}                 the final checkpoint (the default)
    grads_{split}_{variant}__{checkpoint}   an attached checkpoint (store/checkpoints.py), e.g.
                                            grads_train_corrected__step-000425
    split: train | queries;  variant: corrected | uncorrected

'corrected' vectors carry the optimizer's 1/sqrt(V) correction, 'uncorrected' ones do not
(the first rungs of the ablation ladder and `--correction none` write them). The manifest's
`gradient_tables[name]` records {split, variant, dim, dtype} (and `checkpoint` for an attached
one; every checkpoint shares the database's projection settings). Preconditioners are fitted on a
training table and live next to it, one file per mix:

    preconditioners/grads_train_corrected.train.safetensors    R_train
    preconditioners/grads_train_corrected.mixed.safetensors    lambda R_eval + (1 - lambda) R_train
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

from trackstar_db import defaults, faults
from trackstar_db.content import file_sha256
from trackstar_db.errors import TrackstarError

from . import checkpoints as _checkpoints
from .lock import default_timeout

SPLITS = ("train", "queries")
VARIANTS = ("corrected", "uncorrected")
MIXES = ("train", "mixed")
_NAME = re.compile(rf"grads_({'|'.join(SPLITS)})_({'|'.join(VARIANTS)})(?:__({_checkpoints.NAME.pattern}))?")


def table_name(split: str, variant: str, checkpoint: str | None = None) -> str:
    if split not in SPLITS:
        raise TrackstarError(f"gradient split must be one of {', '.join(SPLITS)}, not {split!r}")
    if variant not in VARIANTS:
        raise TrackstarError(f"gradient variant must be one of {', '.join(VARIANTS)}, not {variant!r}")
    if _checkpoints.is_default(checkpoint):
        return f"grads_{split}_{variant}"
    return f"grads_{split}_{variant}__{_checkpoints.check_name(checkpoint)}"


def parse_table_name(name: str) -> tuple[str, str, str | None] | None:
    """(split, variant, checkpoint or None for the default) of a gradient table's name, else None."""
    match = _NAME.fullmatch(name)
    return match.groups() if match else None


def is_gradient_table(name: str) -> bool:
    return parse_table_name(name) is not None


@dataclass(frozen=True)
class GradientTable:
    """Handle on grads_{split}_{variant}[__{checkpoint}] of one database (the table may not exist yet)."""

    db: object
    split: str
    variant: str
    checkpoint: str | None = None  # None or 'final': the database's model

    @property
    def name(self) -> str:
        return table_name(self.split, self.variant, self.checkpoint)

    @property
    def is_default(self) -> bool:
        return _checkpoints.is_default(self.checkpoint)

    def exists(self) -> bool:
        return self.name in self.db.manifest.get("gradient_tables", {}) and self.db.has_table(self.name)

    def require(self) -> "GradientTable":
        """This table, or a one-line error saying what to run."""
        if not self.exists():
            hint = ""
            other = GradientTable(self.db, self.split, "uncorrected", self.checkpoint)
            if self.variant == "corrected" and other.exists():
                hint = " (this database was featurized with --correction none; the corrected rungs need a correction)"
            where = "" if self.is_default else f" --checkpoint {self.checkpoint}"
            raise TrackstarError(f"table {self.name} is missing: run 'trackstar-db ingest gradients {self.db.path} "
                                 f"--split {self.split}{where}'{hint}")
        return self

    @property
    def entry(self) -> dict:
        try:
            return self.db.manifest["gradient_tables"][self.name]
        except KeyError:
            self.require()
            raise

    @property
    def dim(self) -> int:
        return int(self.entry["dim"])

    @property
    def dtype(self) -> str:
        return self.entry["dtype"]

    def create(self, dim: int, dtype: str) -> None:
        """Create the Lance table (if needed) and record it in the manifest."""
        from . import schema as _schema  # heavy: pyarrow

        entry = {"split": self.split, "variant": self.variant, "dim": dim, "dtype": dtype}
        if not self.is_default:
            entry["checkpoint"] = self.checkpoint

        # part of a gradient ingest, which may start while other shards commit: it waits as a flush does
        with self.db.writer(f"create {self.name}", timeout=max(default_timeout(), 600.0)):
            self.db.create_table(self.name, _schema.gradient_schema(dim, dtype))
            faults.point("gradients.after_create_table")
            if self.db.manifest["gradient_tables"].get(self.name) != entry:
                self.db.update_manifest(lambda manifest: manifest["gradient_tables"].__setitem__(self.name, entry))

    def count(self) -> int:
        return self.db.count(self.name)

    def version(self) -> int:
        return self.db.version(self.name)

    def dataset(self):
        return self.db.dataset(self.name)

    def batches(self, batch_size: int = defaults.SCAN_BATCH_ROWS, device="cpu", columns: tuple[str, ...] = ()) -> Iterator:
        """(ids, vectors [nb, d] float32 on `device`) batches in the table's scan order; with
        `columns`, (ids, vectors, {column: numpy array}) (e.g. the stored 'norm')."""
        from .vectors import vector_batches  # heavy: pyarrow

        return vector_batches(self.dataset(), dtype=self.dtype, batch_size=batch_size, device=device,
                              extra_columns=columns)

    # -- the preconditioners fitted on this (training) table -------------------------------
    def preconditioner_path(self, mix: str, digest: str | None = None) -> Path:
        """The R file the manifest names for `mix` (a reader's pinned manifest names the file its
        snapshot was fitted with); with `digest`, the name a new fit writes its file under."""
        if mix not in MIXES:
            raise TrackstarError(f"preconditioner mix must be one of {', '.join(MIXES)}, not {mix!r}")
        folder = self.db.path / "preconditioners"
        if digest is not None:  # named by content: a refit never overwrites a file a reader may be using
            return folder / f"{self.name}.{mix}.{digest[:16]}.safetensors"
        entry = self.db.manifest.get("preconditioners", {}).get(self.preconditioner_key(mix)) or {}
        return folder / entry.get("file", f"{self.name}.{mix}.safetensors")

    def preconditioner_key(self, mix: str) -> str:
        return f"{self.name}.{mix}"

    def load_preconditioner(self, mix: str):
        from trackstar_db.featurizer.preconditioner import Preconditioner  # heavy: torch

        path = self.preconditioner_path(mix)
        if self.preconditioner_key(mix) not in self.db.manifest.get("preconditioners", {}) or not path.is_file():
            raise TrackstarError(f"no {mix!r} preconditioner for {self.name} in {self.db.path}; "
                                 f"run 'trackstar-db fit {self.db.path}'")
        recorded = self.db.manifest["preconditioners"][self.preconditioner_key(mix)].get("sha256")
        if recorded is not None:  # recorded at fit: a swapped or damaged file is refused, not used
            if file_sha256(path) != recorded:
                raise TrackstarError(f"{path}: not the file fitted (sha256 differs); run 'trackstar-db fit {self.db.path}'")
        try:
            return Preconditioner.load(path)
        except Exception as exc:  # a truncated or foreign file: one line naming it
            raise TrackstarError(f"{path}: unreadable preconditioner ({exc}); run 'trackstar-db fit {self.db.path}'") from None
