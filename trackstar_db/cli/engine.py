"""The --engine option of ingest gradients, fit and retrieve (local | ray: trackstar_db/distributed),
and what each engine hands the library: fit's `passes`, retrieve's `scorer`."""

from __future__ import annotations

import click

ENGINE = click.option("--engine", type=click.Choice(["local", "ray"]), default="local", show_default=True,
                      help="local: this process; ray: Ray workers (joins RAY_ADDRESS's cluster, else starts one; "
                           "pip install 'trackstar-db[ray]').")


def engine_arguments(engine: str, command: str) -> dict:
    """Keyword arguments that run `command` ('fit' or 'retrieve') on `engine`."""
    if engine == "local":
        return {}
    if command == "fit":
        from trackstar_db.distributed import fit as ray_fit

        return {"passes": ray_fit}
    from trackstar_db.distributed.scan import score_table

    return {"scorer": score_table}
