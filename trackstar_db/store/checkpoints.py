"""The checkpoints of one database: the final one (the recorded model, the default) and any
others attached by name, e.g. the intermediate checkpoints TracIn-CP sums over.

    manifest["checkpoints"][name] = {path, fingerprint, optimizer_state, optimizer,
                                     optimizer_step, optimizer_lr}

`attach(db, ref)` records one: `ref` names a directory in the model's checkpoints/ folder
(`trackstar-db train --checkpoints N` keeps step-NNNNNN there) or is a path to a checkpoint
directory; its name is the directory's name. The final checkpoint is never attached: it is the
manifest's `model`, and its name `final` selects the default tables (store/gradient_table.py).
`source(db, name)` describes either one as a models.source.ModelSource (path, fingerprint,
optimizer state, learning rate), the description every model user opens through
models/load.open_model; `kept(model_dir)` and `stored(db)` list the ones TracIn-CP sums over.
"""

from __future__ import annotations

import re
from dataclasses import replace
from pathlib import Path

from trackstar_db.errors import ParameterError, TrackstarError
from trackstar_db.models import directory
from trackstar_db.models.source import FINAL as DEFAULT
from trackstar_db.models.source import ModelSource
from trackstar_db.option_checks import IDENTIFIER

NAME = re.compile(IDENTIFIER.regex)  # a checkpoint's name: also the suffix of its table names


def check_name(name: str) -> str:
    """A checkpoint name usable in a table name (option_checks.IDENTIFIER), else ParameterError."""
    problem = IDENTIFIER.problem(name)
    if problem:
        raise ParameterError("checkpoint", problem)
    return name


def is_default(name: str | None) -> bool:
    return name is None or name == DEFAULT


def with_optimizer(point: ModelSource) -> ModelSource:
    """`point` with the optimizer state of its directory (file, kind, learning rate) filled in;
    TracIn-CP needs each checkpoint's learning rate."""
    from trackstar_db.featurizer import optimizer_state  # heavy: torch

    state_file = point.optimizer_state or optimizer_state.find(point.path)
    if state_file is None:
        raise TrackstarError(f"{point.path / optimizer_state.FILENAME}: missing; TracIn-CP needs each checkpoint's "
                             "learning rate")
    described = optimizer_state.describe(state_file)  # safetensors: the metadata only
    return replace(point, optimizer_state=Path(state_file), optimizer=described["optimizer"],
                   lr=float(described["optimizer_lr"]))


def kept(model_dir: str | Path) -> list[ModelSource]:
    """The intermediate checkpoints a run kept (model_dir/checkpoints/step-*, step order), then the final one."""
    model_dir = Path(model_dir)
    paths = sorted((model_dir / "checkpoints").glob("step-*")) + [model_dir]
    return [with_optimizer(ModelSource(path, DEFAULT if path == model_dir else path.name)) for path in paths]


def attached(db) -> dict[str, dict]:
    """name -> manifest entry of every attached (non-default) checkpoint, in name order."""
    return dict(sorted((db.manifest.get("checkpoints") or {}).items()))


def stored(db) -> list[ModelSource]:
    """The attached checkpoints (name order) and the final one, as TracIn-CP sums them."""
    points = [ModelSource.from_entry(e, name) for name, e in attached(db).items()]
    return points + [with_optimizer(source(db))]


def source(db, name: str | None = None) -> ModelSource:
    """The description of checkpoint `name` of db's model: the recorded model for None or
    'final', else an attached checkpoint (its directory checked to exist)."""
    if is_default(name):
        return ModelSource.from_entry(db.model_info())
    point = ModelSource.from_entry(entry(db, name), name)
    if not point.path.is_dir():
        raise TrackstarError(f"{point.path}: directory of checkpoint {name!r} is missing")
    return point


def entry(db, name: str) -> dict:
    try:
        return attached(db)[name]
    except KeyError:
        raise TrackstarError(f"checkpoint {name!r} is not attached to {db.path}; run 'trackstar-db ingest gradients "
                             f"{db.path} --split train --checkpoint {name}'") from None


def resolve(db, ref: str | Path) -> tuple[str, Path]:
    """(name, directory) of a checkpoint reference: a directory in the model's checkpoints/, or a path."""
    model_dir = Path(db.model_info()["path"])
    plain = "/" not in str(ref) and "\\" not in str(ref) and str(ref) not in ("", ".", "..")  # a name, not a path
    inside = model_dir / "checkpoints" / str(ref)
    path = inside if plain and inside.is_dir() else Path(ref)
    if not path.is_dir():
        raise TrackstarError(f"checkpoint {ref!r}: neither a directory in {model_dir / 'checkpoints'} nor a path to one")
    path = path.resolve()
    if not (path / "config.json").is_file() and not (path / "adapter_config.json").is_file():
        raise TrackstarError(f"checkpoint {ref!r}: {path} holds no checkpoint (no config.json)")
    if path == model_dir.resolve():
        return DEFAULT, path
    return check_name(path.name), path


def attach(db, ref: str | Path) -> str:
    """Record a checkpoint (directory, fingerprint, optimizer state and learning rate); return its name.
    The same checkpoint again is a no-op; other weights under a name whose tables exist are refused."""
    from trackstar_db.featurizer import optimizer_state  # heavy: torch

    name, path = resolve(db, ref)
    if is_default(name):
        return DEFAULT
    fingerprint = directory.fingerprint(path)
    current = attached(db).get(name)
    if current is not None and current["fingerprint"] == fingerprint and current["path"] == str(path):
        return name
    has_tables = any(e.get("checkpoint") == name for e in db.manifest.get("gradient_tables", {}).values())
    if current is not None and has_tables:
        raise TrackstarError(f"{path}: checkpoint {name!r} is attached as {current['path']} [{current['fingerprint']}], "
                             "whose gradients this database holds")
    state = optimizer_state.find(path)
    if state is None:
        raise TrackstarError(f"{path}: no optimizer state (optimizer.safetensors or optimizer.pt); a checkpoint needs "
                             "its learning rate")
    described = optimizer_state.describe(state)
    if described.get("optimizer_lr") is None:
        raise TrackstarError(f"{state}: records no learning rate")
    record = {"path": str(path), "fingerprint": fingerprint, "optimizer_state": str(Path(state).resolve()), **described}
    db.update_manifest(lambda manifest: manifest.setdefault("checkpoints", {}).__setitem__(name, record))
    return name
