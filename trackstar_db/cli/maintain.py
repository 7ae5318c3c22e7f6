"""Commands that look after a database: check (find damage) and rebuild-bm25."""

from __future__ import annotations

import click

from . import main
from .common import DB_ARG, FORMATS, _open, print_table


@main.command()
@DB_ARG
@click.option("--format", "fmt", type=FORMATS, default="table", show_default=True)
def check(db, fmt):
    """Read every table, file and id of DB; print each problem with what repairs it (exit 1 if any)."""
    problems = _open(db).check()
    if problems.num_rows == 0:
        rows = int((problems.schema.metadata or {}).get(b"rows_read", b"0"))
        click.echo(f"{db}: no problems found ({rows:,} rows read)")
        return
    if fmt == "table":
        for row in problems.to_pylist():
            click.echo(f"{row['table']}: {row['problem']}; repair: {row['repair']}")
    else:
        print_table(problems, fmt)
    raise SystemExit(1)


@main.command("rebuild-bm25")
@DB_ARG
def rebuild_bm25(db):
    """Make the BM25 index hold exactly the stored examples (after a deleted or damaged bm25/)."""
    result = _open(db).rebuild_bm25()
    click.echo(f"BM25 index: {result['changed']:,} documents changed; {result['documents']:,} documents")
