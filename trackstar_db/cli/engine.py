"""The --engine option of ingest gradients, fit and retrieve (local | ray: trackstar_db/distributed);
the Database verbs take it as `engine=` and hand each engine what it needs."""

from __future__ import annotations

import click

ENGINE = click.option("--engine", type=click.Choice(["local", "ray"]), default="local", show_default=True,
                      help="local: this process; ray: Ray workers (joins RAY_ADDRESS's cluster, else starts one; "
                           "pip install 'trackstar-db[ray]').")
