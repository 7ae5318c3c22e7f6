"""The trackstar-db command line: each command is a thin wrapper over one library function.

Commands live in build.py (init, info, ingest, train, fit) and use.py (retrieve, tail-patch,
eval, query, sql, export, import, report, demo); heavy libraries are imported inside the
commands, so `trackstar-db --help` stays fast.
"""

from __future__ import annotations

import click

from trackstar_db import __version__

from .common import Group


@click.group(cls=Group, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="trackstar-db")
def main():
    """trackstar-db: which pretraining examples made a language model say something?

    A database of TrackStar gradients (LanceDB), BM25 (Tantivy) and SQL analyses (DuckDB).
    Start with 'trackstar-db demo', or: init, ingest corpus, ingest facts, ingest gradients,
    fit, retrieve, tail-patch, eval.
    """


from . import build, maintain, scale, select, serve, simfluence, use, validate  # noqa: E402,F401  (registers the commands)
