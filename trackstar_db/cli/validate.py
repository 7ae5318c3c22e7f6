"""`trackstar-db validate`: retrain on random subsets and score every retrieval run by its LDS."""

from __future__ import annotations

import json

import click

from . import main
from .common import DB_ARG, FORMATS, _open, print_table
from .types import DEVICE, NON_NEGATIVE, POSITIVE, PROPER_FRACTION, click_type
from trackstar_db import option_checks as rules
from trackstar_db.devices import resolve_device


@main.command()
@DB_ARG
@click.option("--models", type=click_type(rules.MODELS), default=8, show_default=True, help="Models to retrain (M), each on its own random subset.")
@click.option("--fraction", type=PROPER_FRACTION, default=0.5, show_default=True, help="Share of the training examples each subset draws.")
@click.option("--seed", type=NON_NEGATIVE, default=0, show_default=True, help="Seeds the subsets.")
@click.option("--name", type=click_type(rules.IDENTIFIER), default="lds", show_default=True,
              help="The validation's name: rerunning it resumes (trains only missing subsets); more --models extend it.")
@click.option("--train-command", default=None,
              help="Train with this command instead of the testbed trainer: {data} is a JSON lines file of the "
                   "subset (example_id, text), {out} the directory it must write a transformers checkpoint to.")
@click.option("--steps", type=POSITIVE, default=None, help="Testbed trainer: optimizer steps per model (default: the "
                                                      "database model's own training config).")
@click.option("--epochs", type=POSITIVE, default=None, help="Testbed trainer: epochs per model.")
@click.option("--schedule", type=click.Choice(["scaled", "same-steps", "base"]), default="scaled", show_default=True,
              help="Testbed trainer: the base model's epochs with its warm-up as a share of the run (scaled), its "
                   "optimizer steps (same-steps), or its config unchanged (base).")
@click.option("--template", default="prompt0", show_default=True, help="Which queries ('all' for every template).")
@click.option("--device", type=DEVICE, default="auto", show_default=True, help="auto (a GPU when present), cpu, cuda or cuda:N.")
@click.option("--keep-models", is_flag=True, help="Keep each retrained checkpoint under DB/validate/NAME/.")
@click.option("--bootstrap", type=POSITIVE, default=1000, show_default=True, help="Bootstrap draws (over queries) for the interval.")
@click.option("--format", "fmt", type=FORMATS, default="table", show_default=True)
def validate(db, models, fraction, seed, name, train_command, steps, epochs, schedule, template, device, keep_models,
             bootstrap, fmt):
    """Counterfactual check: LDS of every retrieval run (Spearman, over retrained subsets, of the
    summed scores of each subset's examples against minus the query's loss; docs/validate.md)."""
    from trackstar_db.validate.options import ValidateOptions  # heavy: numpy

    options = ValidateOptions(models=models, fraction=fraction, seed=seed, name=name, train_command=train_command,
                              steps=steps, epochs=epochs, schedule=schedule, template=template, device=resolve_device(device),
                              keep_models=keep_models)
    handle = _open(db)
    table = handle.validate(options, bootstrap=bootstrap, report=lambda line: click.echo(line, err=True))
    print_table(table, fmt)


@main.command()
@DB_ARG
@click.option("--run", "run_id", required=True, help="The retrieval run whose method ranks the examples.")
@click.option("--queries", type=POSITIVE, default=4, show_default=True, help="Queries checked (drawn with --seed).")
@click.option("--top", type=PROPER_FRACTION, default=0.1, show_default=True,
              help="Share of the corpus removed per query: its highest-scored examples.")
@click.option("--seed", type=NON_NEGATIVE, default=0, show_default=True)
@click.option("--no-random-control", is_flag=True, help="Skip the models retrained without as many random examples.")
@click.option("--schedule", type=click.Choice(["scaled", "same-steps", "base"]), default="scaled", show_default=True,
              help="How the retrained models' schedule follows the base model's (see validate).")
@click.option("--steps", type=POSITIVE, default=None, help="Testbed trainer: optimizer steps per model.")
@click.option("--template", default="prompt0", show_default=True, help="Which queries ('all' for every template).")
@click.option("--device", type=DEVICE, default="auto", show_default=True, help="auto (a GPU when present), cpu, cuda or cuda:N.")
@click.option("--bootstrap", type=POSITIVE, default=1000, show_default=True, help="Bootstrap draws (over queries).")
@click.option("--format", "fmt", type=FORMATS, default="table", show_default=True)
def qld(db, run_id, queries, top, seed, no_random_control, schedule, steps, template, device, bootstrap, fmt):
    """Counterfactual check per query (QLD): retrain without the run's top --top share of examples
    for a query and report the rise of its loss, against removing as many random ones (docs/validate.md)."""
    table = _open(db).query_loss_difference(run_id, queries, top, seed, not no_random_control, bootstrap,
                                            report=lambda line: click.echo(line, err=True), schedule=schedule,
                                            steps=steps, template=template, device=resolve_device(device))
    print_table(table, fmt)
    summary = json.loads(table.schema.metadata[b"summary"])
    line = (f"{summary['method']} ({summary['run']}), {summary['queries']} queries, top {summary['n_removed']} removed: "
            f"mean loss rise {summary['mean_rise']:+.4f} [{summary['rise_low']:+.4f}, {summary['rise_high']:+.4f}]")
    if "mean_random_rise" in summary:
        line += (f"; random {summary['mean_random_rise']:+.4f} [{summary['random_rise_low']:+.4f}, "
                 f"{summary['random_rise_high']:+.4f}]; difference {summary['mean_rise_minus_random']:+.4f} "
                 f"[{summary['rise_minus_random_low']:+.4f}, {summary['rise_minus_random_high']:+.4f}]")
    click.echo(line, err=True)
