"""Locate the data files the package reads at run time: schema/*.json, queries/*.sql and
benchmarks/rates.json (the cost plan's measured rates).

In a wheel they live under trackstar_db/_data/ (force-included by pyproject.toml); in a source
checkout or editable install they are the top-level schema/, queries/ and benchmarks/ folders. Both are
read through the same two functions, so code never cares which one it runs from.
"""

from __future__ import annotations

from pathlib import Path

_PACKAGE_DIR = Path(__file__).resolve().parent


def data_dir(kind: str) -> Path:
    """Folder of `kind` ('schema', 'queries' or 'benchmarks'), from an install or a checkout."""
    for candidate in (_PACKAGE_DIR / "_data" / kind, _PACKAGE_DIR.parent / kind):
        if candidate.is_dir():
            return candidate
    raise FileNotFoundError(f"trackstar-db data folder {kind!r} not found next to {_PACKAGE_DIR}")


def read_text(kind: str, name: str) -> str:
    """Text of one data file, e.g. read_text('queries', 'mrr.sql')."""
    path = data_dir(kind) / name
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such {kind} file")
    return path.read_text(encoding="utf-8")
