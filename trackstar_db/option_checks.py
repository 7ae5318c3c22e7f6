"""Every option's rule, declared once and shared by the library, the CLI and the server.

A rule (Range, Choice, Pattern, Text below; any object with `problem(value) -> str | None`, such
as devices.DEVICE) says what a value may be and, when it is not, what is wrong in words that
name no parameter ("must be >= 1, not 0"). A verb's options are a dataclass
whose fields carry their rules (`ruled(...)`: the rule in the field's metadata) and check them
with `check_fields` after construction, raising ParameterError naming the field ("k must be >= 1,
not 0"); verbs that take plain arguments check each with `check(name, RULE, value)`. The CLI
declares its options with cli/types.click_type(RULE), which applies the same rule before anything runs,
and cli/common.Group prints it with the flag ("--k must be >= 1, not 0", one line); the server's
request models take their bounds from the same rules (serve/routes.py). tests/test_options.py
walks every click option and request field that has a counterpart rule and compares them.

Rules shared by several verbs are the constants below (K, FRACTION, PROPER_FRACTION, DAMPING,
RUN_NAME, IDENTIFIER, COUNT, ...); one concept, one rule: a selection keeps a fraction in (0, 1]
(FRACTION; 1 keeps everything), a validation's subsets draw a fraction in (0, 1)
(PROPER_FRACTION; 1 would give every model the same data, so no correlation). Nothing here
touches a database.
"""

from __future__ import annotations

import importlib
import math
import re
from dataclasses import MISSING, dataclass, field, fields
from pathlib import Path

from trackstar_db.defaults import MANIFEST_FILE
from trackstar_db.errors import ParameterError, TrackstarError

K_MAX = 100_000  # the most proponents (and opponents) a run or a query keeps per query
NAME_MAX = 200  # characters in a run's name (a checkpoint's or a validation's: IDENTIFIER, at most 64)
TEXT_MAX = 20_000  # characters of a one-prompt query's prompt or target (library and server alike)
RESERVED_PREFIX = "~staging~"  # store/swap.py STAGING: keys under which a swap stages new rows


# -- rules --------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Range:
    """A number in [low, high] (either end absent: unbounded; low_open/high_open: that end
    excluded); integer: an int (never a bool), else any finite float (an int too)."""

    low: float | None = None
    high: float | None = None
    integer: bool = True
    low_open: bool = False
    high_open: bool = False
    why: str = ""  # appended to a refusal, e.g. " (a correlation needs two subsets)"

    def problem(self, value) -> str | None:
        if self.integer:
            if isinstance(value, bool) or not isinstance(value, int):
                return f"must be an integer, not {value!r}"
        elif isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
            return f"must be a finite number{self._bounds()}, not {value!r}"
        if self.low is not None and self.high is not None and not self.integer:
            if not self._above_low(value) or not self._below_high(value):
                return f"must be in {self._bounds().strip()}{self.why}, not {value!r}"
            return None
        if not self._above_low(value):
            return f"must be {'>' if self.low_open else '>='} {self.low:g}{self.why}, not {value!r}"
        if not self._below_high(value):
            return f"must be {'<' if self.high_open else '<='} {self.high:,}{self.why}, not {value!r}"
        return None

    def _above_low(self, value) -> bool:
        return self.low is None or value > self.low or (value == self.low and not self.low_open)

    def _below_high(self, value) -> bool:
        return self.high is None or value < self.high or (value == self.high and not self.high_open)

    def _bounds(self) -> str:
        if self.low is not None and self.high is not None:
            return (f" {'(' if self.low_open else '['}{self.low:g}, {self.high:g}"
                    f"{')' if self.high_open else ']'}")
        if self.low is not None:
            return f" {'>' if self.low_open else '>='} {self.low:g}"
        return f" {'<' if self.high_open else '<='} {self.high:g}" if self.high is not None else ""


@dataclass(frozen=True)
class Choice:
    """One of `values` (strings)."""

    values: tuple[str, ...]

    def problem(self, value) -> str | None:
        return None if value in self.values else f"must be one of {', '.join(self.values)}, not {value!r}"


@dataclass(frozen=True)
class Pattern:
    """A string matching `regex` whole; `says` what it allows, in words."""

    regex: str
    says: str

    def problem(self, value) -> str | None:
        if not isinstance(value, str) or not re.fullmatch(self.regex, value):
            return f"must be {self.says}, not {value!r}"
        return None


@dataclass(frozen=True)
class Text:
    """A text with more than white space, at most `high` characters."""

    high: int

    def problem(self, value) -> str | None:
        if not isinstance(value, str) or not value.strip():
            return "must be non-empty"
        if len(value) > self.high:
            return f"must be at most {self.high:,} characters, not {len(value):,}"
        return None


class _RunName:
    """A run's name (it may reach a path, a table name or a predicate): non-empty, printable, no
    path separator, not '.' or '..', at most NAME_MAX characters, not the staging prefix."""

    def problem(self, value) -> str | None:
        return name_problem(value)

    def __repr__(self) -> str:
        return "RUN_NAME"


K = Range(1, K_MAX)  # proponents (and opponents) kept per query: retrieve, query, self-influence, serve
COUNT = Range(1)  # a positive count: batch sizes, rows, models, steps, probes, ANN search widths
NON_NEGATIVE = Range(0)  # seeds, buckets, checkpoints to save
FRACTION = Range(0.0, 1.0, integer=False, low_open=True)  # a share kept or sampled: (0, 1]
# a proper share, some but not all: validate's subsets (1 would give every model the same data), qld's
# removed top, Simfluence's held-out runs: (0, 1)
PROPER_FRACTION = Range(0.0, 1.0, integer=False, low_open=True, high_open=True)
NON_NEGATIVE_NUMBER = Range(0.0, integer=False)  # finite, >= 0: a ridge penalty, a final learning rate
DAMPING = NON_NEGATIVE_NUMBER  # an eigenvalue shift, times their mean
POSITIVE_NUMBER = Range(0.0, integer=False, low_open=True)  # learning rates, GiB
DIM = Range(1, 2**16)  # a projection's width (the featurizer: also at most the tracked matrices' entries)
TEXT = Text(TEXT_MAX)  # a one-prompt query's prompt, target or control target
IDENTIFIER = Pattern(r"[A-Za-z0-9][A-Za-z0-9_-]{0,63}", "letters, digits, '-' and '_' (starting with a letter "
                     "or digit, at most 64 characters)")  # a checkpoint's or a validation's name: a table suffix
RUN_NAME = _RunName()
MODELS = Range(2, why=" (a correlation needs two subsets)")  # validate's retrained models


def field_bounds(rule: Range) -> dict:
    """A Range as the keyword arguments of a pydantic Field (ge/gt, le/lt): the server's request models."""
    bounds = {}
    if rule.low is not None:
        bounds["gt" if rule.low_open else "ge"] = rule.low
    if rule.high is not None:
        bounds["lt" if rule.high_open else "le"] = rule.high
    return bounds


def length_bounds(rule: Text) -> dict:
    """A Text rule as the keyword arguments of a pydantic string Field."""
    return {"min_length": 1, "max_length": rule.high}


def ruled(rule, default=MISSING, **kwargs):
    """A dataclass field whose value `rule` checks (`check_fields`)."""
    return field(default=default, metadata={"rule": rule}, **kwargs)


def rule_of(cls, name: str):
    """The rule on field `name` of the options dataclass `cls` (KeyError when it has none)."""
    for item in fields(cls):
        if item.name == name and "rule" in item.metadata:
            return item.metadata["rule"]
    raise KeyError(f"{cls.__name__}.{name} has no rule")


def rules_of(cls) -> dict:
    """{field name: rule} of every ruled field of the options dataclass `cls`."""
    return {item.name: item.metadata["rule"] for item in fields(cls) if "rule" in item.metadata}


def check(parameter: str, rule, value):
    """`value` when `rule` allows it (None passes: an option not given), else ParameterError naming `parameter`."""
    if value is not None:
        problem = rule.problem(value)
        if problem:
            raise ParameterError(parameter, problem)
    return value


def check_fields(options) -> None:
    """Check every ruled field of the dataclass instance `options` (call from __post_init__)."""
    for name, rule in rules_of(type(options)).items():
        check(name, rule, getattr(options, name))


def _parameter(field: str) -> str:
    """A library parameter's name, also when a caller passes its flag ('--batch-size' -> 'batch_size')."""
    return field.lstrip("-").replace("-", "_")


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
