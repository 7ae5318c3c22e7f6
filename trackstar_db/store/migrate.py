"""Bring a database written by an earlier release to the current format, in place.

Format 1 -> 2: gradient tables grads_{split} / grads_{split}_raw are renamed to
grads_{split}_corrected / grads_{split}_uncorrected (a Lance table is a directory; its files
name each other relatively, so a rename keeps it whole). Format 1 preconditioners hold no row
norms and are keyed by rung, so they are removed: run `trackstar-db fit` again.
"""

from __future__ import annotations

import shutil
from pathlib import Path

from trackstar_db.errors import TrackstarError

from . import manifest as _manifest

RENAMES = {"grads_train": "grads_train_corrected", "grads_train_raw": "grads_train_uncorrected",
           "grads_queries": "grads_queries_corrected", "grads_queries_raw": "grads_queries_uncorrected"}


def migrate(path: str | Path) -> list[str]:
    """Migrate the database at `path`; returns what was done, one line each."""
    path = Path(path)
    manifest = _manifest.read(path, migrate_ok=True)
    if manifest["format_version"] == _manifest.FORMAT_VERSION:
        return [f"{path}: already format {_manifest.FORMAT_VERSION}"]
    done = []
    tables = path / "tables"
    entries = {}
    for old, entry in manifest.get("gradient_tables", {}).items():
        new = RENAMES.get(old)
        if new is None:
            raise TrackstarError(f"{path}: unknown gradient table {old!r} in a format 1 manifest")
        source, target = tables / f"{old}.lance", tables / f"{new}.lance"
        if source.exists() and not target.exists():
            source.rename(target)
            done.append(f"renamed {old} -> {new}")
        split, variant = new.split("_")[1], new.split("_")[2]
        entries[new] = {"split": split, "variant": variant, "dim": entry["dim"], "dtype": entry["dtype"]}
    if (path / "preconditioners").is_dir():
        shutil.rmtree(path / "preconditioners")
        done.append("removed format 1 preconditioners: run 'trackstar-db fit' again")
    manifest.update(gradient_tables=entries, preconditioners={}, format_version=_manifest.FORMAT_VERSION)
    _manifest.write(path, manifest)
    done.append(f"{path}: now format {_manifest.FORMAT_VERSION}")
    return done
