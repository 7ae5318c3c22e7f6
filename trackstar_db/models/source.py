"""ModelSource: the model a database attributes, as one piece of plain data.

    path             the checkpoint directory (or a PEFT adapter's directory, over a local base)
    name             which checkpoint: 'final' (the manifest's model) or an attached one's name
    fingerprint      the directory's fingerprint when recorded (checked before loading)
    tokenizer        where the tokenizer is (default: the checkpoint, or the adapter's base)
    dtype            the weights' dtype: 'auto' (config.json's torch_dtype/dtype, float32 when
                     absent), 'float32', 'bfloat16' or 'float16'
    optimizer_state  the optimizer's state file, its kind ('adamw', ...) and learning rate

Where a source comes from: store/checkpoints.source(db, name) (the recorded model or an attached
checkpoint), kept(model_dir) (the checkpoints a training run kept). Where it becomes a model:
models/load.open_model, the only place; the context the model reads is then fixed by
models/context.py. Nothing heavy is imported here.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, replace
from pathlib import Path

from trackstar_db.errors import TrackstarError

from . import adapters as _adapters
from . import directory as _directory

FINAL = "final"
MODEL_DTYPES = ("auto", "float32", "bfloat16", "float16")


def checkpoint_dtype(model_dir: str | Path) -> str:
    """The dtype a checkpoint's config.json records (torch_dtype or dtype), float32 when absent;
    for a PEFT adapter, its base model's."""
    model_dir = Path(model_dir)
    path = (_adapters.base_path(model_dir) if _adapters.is_adapter(model_dir) else model_dir) / "config.json"
    try:
        config = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise TrackstarError(f"{path}: cannot read the checkpoint's config ({exc})") from None
    value = str(config.get("torch_dtype") or config.get("dtype") or "float32").removeprefix("torch.")
    if value not in MODEL_DTYPES[1:]:
        raise TrackstarError(f"{path}: field 'torch_dtype' is {value!r}; give the model dtype explicitly "
                             f"({', '.join(MODEL_DTYPES[1:])})")
    return value


@dataclass(frozen=True)
class ModelSource:
    path: Path
    name: str = FINAL
    fingerprint: str | None = None
    tokenizer: Path | None = None
    dtype: str = "auto"
    optimizer_state: Path | None = None
    optimizer: str | None = None
    lr: float | None = None

    def __post_init__(self):
        object.__setattr__(self, "path", Path(self.path))
        for field in ("tokenizer", "optimizer_state"):
            if getattr(self, field) is not None:
                object.__setattr__(self, field, Path(getattr(self, field)))
        if self.dtype not in MODEL_DTYPES:
            raise TrackstarError(f"model dtype must be one of {', '.join(MODEL_DTYPES)}, not {self.dtype!r}")

    @classmethod
    def from_entry(cls, entry: dict, name: str = FINAL) -> "ModelSource":
        """A source from a manifest entry (the 'model' entry, or one of 'checkpoints')."""
        return cls(path=Path(entry["path"]), name=name, fingerprint=entry.get("fingerprint"),
                   tokenizer=entry.get("tokenizer"), optimizer_state=entry.get("optimizer_state"),
                   optimizer=entry.get("optimizer"), lr=entry.get("optimizer_lr"))

    @property
    def is_default(self) -> bool:
        return self.name == FINAL

    @property
    def adapter(self) -> bool:
        """Whether the path is a PEFT adapter over a local base (models/adapters.py)."""
        return _adapters.is_adapter(self.path)

    def tokenizer_path(self) -> Path:
        if self.adapter:
            return _adapters.tokenizer_path(self.path)
        return self.tokenizer or self.path

    def weights_dtype(self) -> str:
        """The dtype the weights load in: `dtype`, or the checkpoint's own for 'auto'."""
        return checkpoint_dtype(self.path) if self.dtype == "auto" else self.dtype

    def with_dtype(self, dtype: str | None) -> "ModelSource":
        return self if dtype is None else replace(self, dtype=dtype)

    def check(self) -> "ModelSource":
        """The directory exists and, when a fingerprint is recorded, still has it; else a one-line error."""
        if not self.path.is_dir():
            what = "model directory recorded in the manifest" if self.is_default else f"directory of checkpoint {self.name!r}"
            raise TrackstarError(f"{self.path}: {what} is missing")
        if self.fingerprint is not None:
            if _directory.fingerprint(self.path) != self.fingerprint:
                raise TrackstarError(f"{self.path}: checkpoint changed since it was recorded (fingerprint mismatch)")
        return self
