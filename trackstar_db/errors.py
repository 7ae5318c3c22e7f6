"""The one exception type users see: a clear, one-line message about their input."""

import re

_RUST_SOURCE = re.compile(r",? /\S+\.rs:\d+:\d+$")  # Lance appends the Rust source line of its error


def first_line(exc: BaseException) -> str:
    """The first line of an exception's message (its type's name when empty), without the Rust
    source location Lance appends."""
    text = str(exc).strip()
    return _RUST_SOURCE.sub("", text.splitlines()[0]) if text else type(exc).__name__


class TrackstarError(ValueError):
    """Bad input or a database in the wrong state; the message names the file, line or field."""


class RecordError(TrackstarError):
    """A bad record in an input file."""

    def __init__(self, path, line: int, message: str):
        self.path, self.line, self.reason = str(path), line, message
        super().__init__(f"{path}:{line}: {message}")


class ParameterError(TrackstarError):
    """A bad argument of a library call; the message names the parameter ("k must be >= 1, not 0"),
    and the command line names its flag instead (cli/common.py: `flag`). `others`: the other
    parameters `problem` names, by name ("top excludes fraction"), which the command line also
    writes as flags ("--top excludes --fraction")."""

    def __init__(self, parameter: str, problem: str, others: tuple[str, ...] = ()):
        self.parameter, self.problem, self.others = parameter, problem, tuple(others)
        super().__init__(f"{parameter} {problem}")
