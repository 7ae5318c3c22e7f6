"""What every command shares: the error-to-one-line group, opening a database, printing tables."""

from __future__ import annotations

import errno
import json
import os
import re
from pathlib import Path

import click

from trackstar_db.distributed.objectstore import upload_on_close
from trackstar_db.errors import ParameterError, TrackstarError
from trackstar_db.errors import first_line as _first_line

DB_ARG = click.argument("db", type=click.Path(file_okay=False, path_type=Path))
FORMATS = click.Choice(["table", "json", "csv"])
_DISK_FULL = ("disk full (no space left on device); nothing half-written is kept: free space and run the command "
              "again")


FLAGS = {"run_id": "--run", "max_queries": "--queries", "out_dir": "--out",
         "architecture": "--arch", "num_partitions": "--partitions", "num_sub_vectors": "--sub-vectors"}  # parameters whose flag is not --name-with-dashes


def flag(parameter: str) -> str:
    """The command-line flag of a library parameter."""
    return FLAGS.get(parameter, "--" + parameter.replace("_", "-"))


def flags_in(problem: str, parameters) -> str:
    """`problem` with each of `parameters` named by its flag (whole words only)."""
    for parameter in parameters:
        problem = re.sub(rf"(?<![\w-]){re.escape(parameter)}(?![\w-])", flag(parameter), problem)
    return problem


def one_line(exc: BaseException) -> str | None:
    """The one line a user sees for `exc`, naming the file where the error knows it; None for
    an error that is a bug in trackstar-db (its traceback is more useful than a line)."""
    module = type(exc).__module__ or ""
    if isinstance(exc, ParameterError):
        return f"{flag(exc.parameter)} {flags_in(exc.problem, exc.others)}"
    if isinstance(exc, OSError):
        where = f"{exc.filename}: " if getattr(exc, "filename", None) else ""
        if exc.errno == errno.ENOSPC:
            return f"{where}{_DISK_FULL}"
        if exc.errno is not None and exc.strerror:
            return f"{where}{exc.strerror}"
        if "os error 28" in str(exc) or "No space left" in str(exc):  # Lance's IO error of a full disk
            return f"{where}{_DISK_FULL}"
        return f"{where}{one_line(RuntimeError(_first_line(exc)))}"  # Lance/LanceDB: OSError, path inside
    if getattr(exc, "whole_line", False):  # a line that names its own cause (a failed rank, then why)
        return _first_line(exc)
    if "os error 28" in str(exc) or "No space left on device" in str(exc):  # safetensors, Tantivy
        return _DISK_FULL
    if isinstance(exc, json.JSONDecodeError):
        return f"invalid JSON: {exc.msg} (line {exc.lineno}, column {exc.colno})"
    if isinstance(exc, KeyError) and not isinstance(exc, TrackstarError):
        return f"missing entry {exc.args[0]!r}" if exc.args else "missing entry"
    if type(exc).__name__ == "SafetensorError" or module.startswith("safetensors"):
        return f"safetensors file: {_first_line(exc)}"
    if module.startswith(("duckdb", "_duckdb")):
        return f"SQL: {_first_line(exc)}"
    if isinstance(exc, RecursionError):
        return "input nested too deeply to read"
    if isinstance(exc, (OverflowError, MemoryError)):
        return f"{type(exc).__name__}: {_first_line(exc)}"
    if isinstance(exc, (ValueError, RuntimeError)) or module.startswith(("lance", "pyarrow", "tantivy")):
        return _lance_hint(_first_line(exc), module)  # the Rust side of Lance, LanceDB and Tantivy
    return None


def _lance_hint(line: str, module: str) -> str:
    """`line`, pointing to `check` where Lance failed to read a table."""
    if "LanceError" in line or module.startswith("lance"):
        return line + " (a damaged table? 'trackstar-db check DB' names it and its repair)"
    return line


class OptionError(click.ClickException):
    """A bad option or usage: one line (no usage block), exit status 2 as click gives usage errors."""
    exit_code = 2


class Group(click.Group):
    """Turns bad input, damage and OS errors into one clear line (TRACKSTAR_DEBUG=1 keeps the traceback)."""

    def invoke(self, ctx):
        try:
            return super().invoke(ctx)
        except click.exceptions.BadParameter as exc:  # one line in the library's words, with the flag
            where = exc.param.opts[0] if exc.param is not None and exc.param.opts else (exc.param_hint or "")
            raise OptionError(f"{where} {exc.message}".strip()) from None
        except click.exceptions.UsageError as exc:  # a missing or unknown option: one line too
            raise OptionError(exc.format_message()) from None
        except (click.exceptions.ClickException, click.exceptions.Exit, click.exceptions.Abort):
            raise
        except Exception as exc:
            message = None if os.environ.get("TRACKSTAR_DEBUG") else one_line(exc)
            if message is None:
                raise
            raise click.ClickException(message) from None


def _open(db: Path):
    from trackstar_db.api import connect  # heavy: pyarrow

    handle = connect(db)  # the one door: a directory or s3://bucket/db
    context = click.get_current_context(silent=True)
    if handle.remote is not None and context is not None:
        upload_on_close(handle)
    return handle  # each read verb takes its own read view (store/read_view.py): no list of read commands here


def print_table(table, fmt: str = "table") -> None:
    from trackstar_db.evaluation.sql import format_table  # heavy: duckdb

    text = format_table(table, fmt)
    click.echo(text, nl=not text.endswith("\n"))
