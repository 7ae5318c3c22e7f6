"""`trackstar-db simfluence record|fit|simulate|eval`: Simfluence-Linear over recorded training runs."""

from __future__ import annotations

from pathlib import Path

import click

from . import main
from .common import DB_ARG, FORMATS, Group, _open, print_table
from .types import FRACTION, NAME, NON_NEGATIVE, POSITIVE, POSITIVE_FLOAT, PROPER_FRACTION, click_type
from trackstar_db import option_checks as rules


@main.group(cls=Group)
def simfluence():
    """Simulate training runs (Simfluence): record runs, fit per-example effects, simulate, evaluate."""


@simfluence.command()
@DB_ARG
@click.option("--runs", type=POSITIVE, default=8, show_default=True, help="Short training runs to record (added to any recorded).")
@click.option("--steps", type=POSITIVE, default=100, show_default=True, help="Optimizer steps per run.")
@click.option("--subset", type=FRACTION, default=0.5, show_default=True, help="Fraction of the examples each run trains on.")
@click.option("--probes", type=POSITIVE, default=64, show_default=True, help="prompt0 queries whose loss is recorded every step.")
@click.option("--batch-size", type=POSITIVE, default=64, show_default=True)
@click.option("--lr", type=POSITIVE_FLOAT, default=3e-3, show_default=True, help="Peak learning rate (linear warm-up, cosine down to --final-lr).")
@click.option("--final-lr", type=click_type(rules.NON_NEGATIVE_NUMBER), default=3e-4, show_default=True)
@click.option("--warmup", type=NON_NEGATIVE, default=10, show_default=True, help="Linear warm-up steps.")
@click.option("--init", type=click.Choice(["scratch", "checkpoint"]), default="scratch", show_default=True,
              help="scratch: the testbed model's initialisation (same in every run); checkpoint: the database's model.")
@click.option("--seed", type=NON_NEGATIVE, default=0, show_default=True, help="Seeds the runs' subsets and orders.")
def record(db, runs, steps, subset, probes, batch_size, lr, final_lr, warmup, init, seed):
    """Train short runs on random subsets and orders; record batches and probe losses (sim_* tables)."""
    done = _open(db).simfluence_record(runs=runs, steps=steps, subset=subset, probes=probes, batch_size=batch_size,
                                       lr=lr, final_lr=final_lr, warmup=warmup, init=init, seed=seed)
    click.echo(f"recorded {len(done)} runs ({done[0]} .. {done[-1]}) of {steps} steps, {probes} probes")


@simfluence.command()
@DB_ARG
@click.option("--ridge", type=POSITIVE_FLOAT, default=1.0, show_default=True, help="Ridge penalty on the per-example effects.")
@click.option("--run", "run_ids", type=NAME, multiple=True, help="Fit on these recorded runs only (default: all); repeatable.")
def fit(db, ridge, run_ids):
    """Fit Simfluence-Linear and its additive special case per probe; store them in sim_coefficients."""
    fitted = _open(db).simfluence_fit(ridge, run_ids=list(run_ids) or None)
    sim = fitted["linear"]
    click.echo(f"fitted {len(sim.query_ids)} probes x {len(sim.example_ids):,} examples "
               f"({', '.join(fitted)}; ridge {ridge}) into sim_coefficients")


@simfluence.command()
@DB_ARG
@click.option("--curriculum", required=True, type=click.Path(dir_okay=False, path_type=Path),
              help="JSON lines, one batch per line: a list of example ids (or {\"example_ids\": [...]}).")
@click.option("--query", "query_ids", multiple=True, help="Probe query id(s) (default: every fitted probe).")
@click.option("--model", type=click.Choice(["linear", "additive"]), default="linear", show_default=True)
@click.option("--format", "fmt", type=FORMATS, default="table", show_default=True)
def simulate(db, curriculum, query_ids, model, fmt):
    """Predict the probes' loss after every step of a new curriculum (step 0 = before training)."""
    print_table(_open(db).simulate(curriculum, model, list(query_ids) or None), fmt)


@simfluence.command("eval")
@DB_ARG
@click.option("--holdout", type=PROPER_FRACTION, default=0.25, show_default=True, help="Fraction of the recorded runs held out (the last ones).")
@click.option("--ridge", type=POSITIVE_FLOAT, default=1.0, show_default=True)
@click.option("--format", "fmt", type=FORMATS, default="table", show_default=True)
def eval_cmd(db, holdout, ridge, fmt):
    """Held-out runs: all-steps MSE and Spearman of final losses, linear vs additive (TracIn) vs constant."""
    print_table(_open(db).simfluence_evaluate(holdout, ridge), fmt)
