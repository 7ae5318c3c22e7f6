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
import json
from pathlib import Path

from trackstar_db.defaults import MANIFEST_FILE
from trackstar_db.errors import TrackstarError
from trackstar_db.files import file_digest, read_json, write_atomic  # noqa: F401  (the store's names for them)
from trackstar_db.version import __version__

FORMAT = "trackstar-db"
FORMAT_VERSION = 2  # 2: gradient tables named grads_{split}_{corrected|uncorrected}; R keyed by table
FILENAME = MANIFEST_FILE


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




def write(db_path: Path, manifest: dict) -> None:
    write_atomic(Path(db_path) / FILENAME, json.dumps(manifest, indent=2, sort_keys=True) + "\n")








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
