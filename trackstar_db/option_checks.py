"""Checks every option and name passes once, at the boundary, shared by the CLI and the API.

The library entry points call the functions below, which raise ParameterError naming the
parameter ("k must be >= 1, not 0"); the CLI declares its options with the click types at the end,
which apply the same rules before anything runs and say the same thing with the flag
("--k must be >= 1, not 0", one line: cli/common.Group). Nothing here touches a database.
"""

from __future__ import annotations

import math
from pathlib import Path

from trackstar_db.defaults import MANIFEST_FILE
from trackstar_db.errors import ParameterError, TrackstarError

K_MAX = 100_000  # the most proponents (and opponents) a run or a query keeps per query
NAME_MAX = 200  # characters in a run or checkpoint name
TEXT_MAX = 20_000  # characters of a one-prompt query's prompt or target (library and server alike)
RESERVED_PREFIX = "~staging~"  # store/swap.py STAGING: keys under which a swap stages new rows


def _parameter(field: str) -> str:
    """A library parameter's name, also when a caller passes its flag ('--batch-size' -> 'batch_size')."""
    return field.lstrip("-").replace("-", "_")


def count_problem(value, minimum: int = 1, maximum: int | None = None) -> str | None:
    """What is wrong with `value` as a count in [minimum, maximum], or None."""
    if isinstance(value, bool) or not isinstance(value, int):
        return f"must be an integer, not {value!r}"
    if value < minimum:
        return f"must be >= {minimum}, not {value}"
    if maximum is not None and value > maximum:
        return f"must be <= {maximum:,}, not {value}"
    return None


def count(field: str, value, minimum: int = 1, maximum: int | None = None):
    """`value` as an int within [minimum, maximum] (None passes through), else ParameterError naming `field`."""
    if value is None:
        return None
    problem = count_problem(value, minimum, maximum)
    if problem:
        raise ParameterError(_parameter(field), problem)
    return value


def fraction_problem(value, low: float = 0.0, high: float = 1.0, open_low: bool = True) -> str | None:
    """What is wrong with `value` as a float in (low, high] (or [low, high]), or None."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) \
            or value > high or value < low or (open_low and value == low):
        return f"must be in {'(' if open_low else '['}{low:g}, {high:g}], not {value!r}"
    return None


def fraction(field: str, value: float, low: float = 0.0, high: float = 1.0, open_low: bool = True) -> float:
    """A finite float in (low, high] (or [low, high] with open_low=False), else ParameterError."""
    problem = fraction_problem(value, low, high, open_low)
    if problem:
        raise ParameterError(_parameter(field), problem)
    return float(value)


def name_problem(value) -> str | None:
    """What is wrong with `value` as a run or checkpoint name, or None."""
    if not isinstance(value, str) or not value.strip():
        return f"must be a non-empty name, not {value!r}"
    if len(value) > NAME_MAX:
        return f"must be at most {NAME_MAX} characters, not {len(value)}"
    if value.startswith(RESERVED_PREFIX):
        return f"{value!r} starts with {RESERVED_PREFIX!r}, reserved for the store's staging"
    if "/" in value or "\\" in value or value in (".", "..") or any(ord(c) < 32 for c in value):
        return f"{value!r} is not a plain name (no path separators, '..' or control characters)"
    return None


def name(field: str, value: str) -> str:
    """A run or checkpoint name that may reach a path, a table name or a predicate: non-empty,
    printable, no path separator, not '.' or '..', not the store's reserved staging prefix."""
    problem = name_problem(value)
    if problem:
        raise ParameterError(_parameter(field), problem)
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
    here = Path(path).expanduser().resolve()
    for folder in (here, *here.parents):
        if (folder / MANIFEST_FILE).is_file() and (folder / "tables").is_dir():
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
            problem = name_problem(value)
            if problem:
                self.fail(problem, param, ctx)
            return value

    class Output(click.Path):
        """A file or folder to write, never inside a database directory."""

        def convert(self, value, param, ctx):
            path = super().convert(value, param, ctx)
            try:
                return outside_database(f"--{param.name.replace('_', '-')}" if param else "output", path)
            except TrackstarError as exc:
                self.fail(str(exc).partition(": ")[2], param, ctx)

    class Count(click.ParamType):
        """An integer option in [minimum, maximum], refused in the library's words."""
        name = "integer"

        def __init__(self, minimum: int, maximum: int | None = None):
            self.minimum, self.maximum = minimum, maximum

        def convert(self, value, param, ctx):
            if isinstance(value, str):
                try:
                    value = int(value.strip())
                except ValueError:
                    self.fail(f"must be an integer, not {value!r}", param, ctx)
            problem = count_problem(value, self.minimum, self.maximum)
            if problem:
                self.fail(problem, param, ctx)
            return value

    class Number(click.ParamType):
        """A float option that `problem` (value -> what is wrong, or None) accepts."""
        name = "number"

        def __init__(self, problem):
            self.problem = problem

        def convert(self, value, param, ctx):
            try:
                number = float(value)
            except (TypeError, ValueError):
                self.fail(f"must be a number, not {value!r}", param, ctx)
            problem = self.problem(number)
            if problem:
                self.fail(problem, param, ctx)
            return number

    def positive(number):
        return None if math.isfinite(number) and number > 0 else f"must be > 0, not {number}"

    return (Count(1), Count(0), Count(1, K_MAX), Name(), Number(positive), Number(fraction_problem),
            Output(dir_okay=False, path_type=Path), Output(file_okay=False, path_type=Path))


POSITIVE, NON_NEGATIVE, TOP_K, NAME, POSITIVE_FLOAT, FRACTION, OUTPUT_FILE, OUTPUT_DIR = _click_types()
