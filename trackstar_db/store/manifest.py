"""The database manifest: format version, model fingerprint and the featurizer settings.

manifest.json at the top of the database directory is written atomically (temp file, fsync,
rename); changes go through Database.update_manifest, which re-reads it under the writer lock.
Everything that makes stored vectors comparable lives here, and writers check it: a gradient
table written with other settings is refused, never silently mixed.

"task" (featurizer/task.py) is the loss the database attributes and the tracked modules:
{"examples": "all" | "completion" | "chat", "queries": "target", "modules": null | [patterns]}.
ingest corpus writes it; a manifest without it (every database written before it existed) is
the default task, loss on every token, so nothing needs migrating.
"""

from __future__ import annotations

import datetime as _dt
import hashlib
import json
import os
from pathlib import Path

from trackstar_db import __version__
from trackstar_db.errors import TrackstarError

FORMAT = "trackstar-db"
FORMAT_VERSION = 2  # 2: gradient tables named grads_{split}_{corrected|uncorrected}; R keyed by table
FILENAME = "manifest.json"
_SAMPLE = 16 << 20  # bytes hashed at each end of a weight file


def new_manifest() -> dict:
    return {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "created_at": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "code_version": __version__,
        "model": None,
        "gradient_tables": {},
        "preconditioners": {},
    }


def read(db_path: Path, migrate_ok: bool = False) -> dict:
    path = Path(db_path) / FILENAME
    if not path.is_file():
        raise TrackstarError(f"{db_path}: not a trackstar-db database (no {FILENAME}); create one with 'trackstar-db init'")
    manifest = read_json(path, "manifest")
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        raise TrackstarError(f"{path}: not a trackstar-db manifest")
    version = manifest.get("format_version")
    if version == 1 and migrate_ok:
        return manifest
    if version == 1:
        raise TrackstarError(f"{path}: database format 1 (trackstar-db 0.1); run 'trackstar-db migrate {db_path}' "
                             "to rename its gradient tables (then 'trackstar-db fit' again)")
    if version != FORMAT_VERSION:
        raise TrackstarError(
            f"{path}: database format version {version}, this trackstar-db {__version__} reads version {FORMAT_VERSION}"
        )
    return manifest


def read_json(path: Path, what: str):
    """The JSON value in `path`, or one line naming the file and what is wrong with it."""
    try:
        return json.loads(Path(path).read_text(encoding="utf-8"))
    except json.JSONDecodeError as exc:
        raise TrackstarError(f"{path}: corrupt {what} ({exc.msg} at line {exc.lineno})") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise TrackstarError(f"{path}: unreadable {what} ({exc})") from None


def write(db_path: Path, manifest: dict) -> None:
    write_atomic(Path(db_path) / FILENAME, json.dumps(manifest, indent=2, sort_keys=True) + "\n")


def write_atomic(path: Path, text: str) -> None:
    """Replace `path` by `text` as one step: a temp file, complete on disk, renamed over it."""
    tmp = path.with_suffix(f".tmp{os.getpid()}")
    try:
        with open(tmp, "w", encoding="utf-8") as handle:
            handle.write(text)
            handle.flush()
            os.fsync(handle.fileno())
    except BaseException:  # a full disk: no partial temp file is left behind
        tmp.unlink(missing_ok=True)
        raise
    os.replace(tmp, path)


def file_digest(path: Path) -> str:
    """sha256 of a file; for files over 32 MiB, of its size and its first and last 16 MiB."""
    digest = hashlib.sha256()
    size = path.stat().st_size
    with path.open("rb") as handle:
        if size <= 2 * _SAMPLE:
            for chunk in iter(lambda: handle.read(1 << 20), b""):
                digest.update(chunk)
        else:
            digest.update(str(size).encode())
            digest.update(handle.read(_SAMPLE))
            handle.seek(size - _SAMPLE)
            digest.update(handle.read(_SAMPLE))
    return digest.hexdigest()


def model_fingerprint(model_dir: str | Path) -> str:
    """Fingerprint of a local checkpoint: its config and weight files (not the optimizer state)."""
    model_dir = Path(model_dir)
    config, base = model_dir / "config.json", ""
    if not config.is_file() and (model_dir / "adapter_config.json").is_file():  # PEFT adapter: it and its base
        from trackstar_db.models.adapters import base_path

        config, base = model_dir / "adapter_config.json", model_fingerprint(base_path(model_dir))
    if not config.is_file():
        raise TrackstarError(f"{model_dir}: not a model directory (no config.json)")
    weights = sorted(model_dir.glob("*.safetensors")) + sorted(model_dir.glob("*.bin"))
    weights = [w for w in weights if w.name != "optimizer.safetensors"]
    if not weights:
        raise TrackstarError(f"{model_dir}: no weight files (*.safetensors or *.bin)")
    digest = hashlib.sha256(config.read_bytes() + base.encode())
    for weight in weights:
        digest.update(weight.name.encode())
        digest.update(file_digest(weight).encode())
    return digest.hexdigest()[:16]


def _flat(settings: dict, prefix: str = "") -> dict:
    out = {}
    for key, value in settings.items():
        if isinstance(value, dict):
            out.update(_flat(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = value
    return out


def check_same(what: str, stored: dict, given: dict) -> None:
    """Refuse to mix vectors from different settings; name the first (nested) field that differs."""
    stored, given = _flat(stored), _flat(given)
    for key in sorted(set(stored) | set(given)):
        if stored.get(key) != given.get(key):
            raise TrackstarError(
                f"{what}: setting {key!r} is {given.get(key)!r} but the database holds {stored.get(key)!r}; "
                "featurize into a new database to use other settings"
            )
