"""The --engine option of ingest gradients, fit and retrieve (local | ray: trackstar_db/distributed);
the Database verbs take it as `engine=` and hand each engine what it needs."""

from __future__ import annotations

import click

from trackstar_db.errors import TrackstarError
from trackstar_db.option_checks import require_extra


def _engine_installed(ctx, param, value):
    """--engine ray without Ray: say which extra to install before anything runs."""
    if value == "ray":
        try:
            require_extra("ray", "ray")
        except TrackstarError as exc:
            raise click.BadParameter(str(exc), ctx, param) from None
    return value


ENGINE = click.option("--engine", type=click.Choice(["local", "ray"]), default="local", show_default=True,
                      callback=_engine_installed,
                      help="local: this process; ray: Ray workers (joins RAY_ADDRESS's cluster, else starts one; "
                           "pip install 'trackstar-db[ray]').")
