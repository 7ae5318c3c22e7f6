"""What every command shares: the error-to-one-line group, opening a database, printing tables."""

from __future__ import annotations

import os
from pathlib import Path

import click

from trackstar_db.errors import TrackstarError

DB_ARG = click.argument("db", type=click.Path(file_okay=False, path_type=Path))
FORMATS = click.Choice(["table", "json", "csv"])


class Group(click.Group):
    """Turns bad input into one clear line (set TRACKSTAR_DEBUG=1 for the traceback)."""

    def invoke(self, ctx):
        try:
            return super().invoke(ctx)
        except (TrackstarError, ValueError, FileNotFoundError, KeyError) as exc:
            if os.environ.get("TRACKSTAR_DEBUG"):
                raise
            message = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            raise click.ClickException(message) from None


def _open(db: Path):
    from trackstar_db.store.database import connect

    return connect(db)


def print_table(table, fmt: str = "table") -> None:
    from trackstar_db.evaluation.sql import format_table

    text = format_table(table, fmt)
    click.echo(text, nl=not text.endswith("\n"))
