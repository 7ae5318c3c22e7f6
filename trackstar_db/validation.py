"""Checks every option and name passes once, at the boundary, shared by the CLI and the API.

The CLI declares its options with the click types below (a bad value is a one-line usage error
before anything runs); the library entry points call the same functions, so `Database` users
get the same refusals as TrackstarError. Nothing here touches a database.
"""

from __future__ import annotations

import math
from pathlib import Path

from trackstar_db.errors import TrackstarError

K_MAX = 100_000  # the most proponents (and opponents) a run or a query keeps per query
NAME_MAX = 200  # characters in a run or checkpoint name
RESERVED_PREFIX = "~staging~"  # store/swap.py STAGING: keys under which a swap stages new rows


def count(field: str, value, minimum: int = 1, maximum: int | None = None):
    """`value` as an int within [minimum, maximum] (None passes through), else TrackstarError naming `field`."""
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int):
        raise TrackstarError(f"{field}: expected an integer, got {value!r}")
    if value < minimum or (maximum is not None and value > maximum):
        bound = f">= {minimum}" if maximum is None else f"between {minimum} and {maximum:,}"
        raise TrackstarError(f"{field}: {value} is not {bound}")
    return value


def fraction(field: str, value: float, low: float = 0.0, high: float = 1.0, open_low: bool = True) -> float:
    """A finite float in (low, high] (or [low, high] with open_low=False)."""
    if not isinstance(value, (int, float)) or not math.isfinite(value) or value > high or value < low \
            or (open_low and value == low):
        raise TrackstarError(f"{field}: {value!r} is not in {'(' if open_low else '['}{low:g}, {high:g}]")
    return float(value)


def name(field: str, value: str) -> str:
    """A run or checkpoint name that may reach a path, a table name or a predicate: non-empty,
    printable, no path separator, not '.' or '..', not the store's reserved staging prefix."""
    if not isinstance(value, str) or not value.strip():
        raise TrackstarError(f"{field}: a name must be a non-empty string, got {value!r}")
    if len(value) > NAME_MAX:
        raise TrackstarError(f"{field}: a name is at most {NAME_MAX} characters, got {len(value)}")
    if value.startswith(RESERVED_PREFIX):
        raise TrackstarError(f"{field}: {value!r} starts with {RESERVED_PREFIX!r}, reserved for the store's staging")
    if "/" in value or "\\" in value or value in (".", "..") or any(ord(c) < 32 for c in value):
        raise TrackstarError(f"{field}: {value!r} is not a plain name (no path separators, '..' or control characters)")
    return value


def require_extra(module: str, extra: str) -> None:
    """Import `module` now; when it is missing, say which optional extra installs it."""
    import importlib

    try:
        importlib.import_module(module)
    except ImportError:
        raise TrackstarError(f"{module} is not installed: pip install 'trackstar-db[{extra}]'") from None


def database_root(path: str | Path) -> Path | None:
    """The trackstar-db database directory holding `path` (itself or a parent), or None."""
    from trackstar_db.store.manifest import FILENAME

    here = Path(path).expanduser().resolve()
    for folder in (here, *here.parents):
        if (folder / FILENAME).is_file() and (folder / "tables").is_dir():
            return folder
    return None


def outside_database(field: str, path: str | Path) -> Path:
    """Refuse an output path inside a database directory: only the store writes there."""
    root = database_root(path)
    if root is not None:
        raise TrackstarError(f"{field}: {path} is inside the database {root}; only trackstar-db's store writes "
                             "there - write the output elsewhere")
    return Path(path)


def holds_model(folder: str | Path) -> bool:
    """Whether `folder` already holds a checkpoint (a config and weights)."""
    folder = Path(folder)
    return (folder / "config.json").is_file() or any(folder.glob("*.safetensors")) or any(folder.glob("*.bin"))


# -- click types: the CLI's declarations of the same rules -----------------------------------
def _click_types():
    import click

    class Name(click.ParamType):
        name = "name"

        def convert(self, value, param, ctx):
            try:
                return name(f"--{param.name.replace('_', '-')}" if param else "name", value)
            except TrackstarError as exc:
                self.fail(str(exc).partition(": ")[2], param, ctx)

    class Output(click.Path):
        """A file or folder to write, never inside a database directory."""

        def convert(self, value, param, ctx):
            path = super().convert(value, param, ctx)
            try:
                return outside_database(f"--{param.name.replace('_', '-')}" if param else "output", path)
            except TrackstarError as exc:
                self.fail(str(exc).partition(": ")[2], param, ctx)

    return (click.IntRange(min=1), click.IntRange(min=0), click.IntRange(1, K_MAX), Name(),
            click.FloatRange(min=0.0, min_open=True), Output(dir_okay=False, path_type=Path),
            Output(file_okay=False, path_type=Path))


POSITIVE, NON_NEGATIVE, TOP_K, NAME, POSITIVE_FLOAT, OUTPUT_FILE, OUTPUT_DIR = _click_types()
