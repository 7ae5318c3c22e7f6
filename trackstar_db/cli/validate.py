"""`trackstar-db validate`: retrain on random subsets and score every retrieval run by its LDS."""

from __future__ import annotations

import click

from . import main
from .common import DB_ARG, FORMATS, _open, print_table
from trackstar_db.option_checks import NON_NEGATIVE, POSITIVE


@main.command()
@DB_ARG
@click.option("--models", type=POSITIVE, default=8, show_default=True, help="Models to retrain (M), each on its own random subset.")
@click.option("--fraction", type=click.FloatRange(0.0, 1.0, min_open=True, max_open=True), default=0.5, show_default=True, help="Share of the training examples each subset draws.")
@click.option("--seed", type=NON_NEGATIVE, default=0, show_default=True, help="Seeds the subsets.")
@click.option("--name", default="lds", show_default=True,
              help="The validation's name: rerunning it resumes (trains only missing subsets); more --models extend it.")
@click.option("--train-command", default=None,
              help="Train with this command instead of the testbed trainer: {data} is a JSON lines file of the "
                   "subset (example_id, text), {out} the directory it must write a transformers checkpoint to.")
@click.option("--steps", type=POSITIVE, default=None, help="Testbed trainer: optimizer steps per model (default: the "
                                                      "database model's own training config).")
@click.option("--epochs", type=POSITIVE, default=None, help="Testbed trainer: epochs per model.")
@click.option("--template", default="prompt0", show_default=True, help="Which queries ('all' for every template).")
@click.option("--device", default="auto", show_default=True, help="auto (a GPU when present), cpu, cuda or cuda:N.")
@click.option("--keep-models", is_flag=True, help="Keep each retrained checkpoint under DB/validate/NAME/.")
@click.option("--bootstrap", type=POSITIVE, default=1000, show_default=True, help="Bootstrap draws (over queries) for the interval.")
@click.option("--format", "fmt", type=FORMATS, default="table", show_default=True)
def validate(db, models, fraction, seed, name, train_command, steps, epochs, template, device, keep_models,
             bootstrap, fmt):
    """Counterfactual check: LDS of every retrieval run (Spearman, over retrained subsets, of the
    summed scores of each subset's examples against minus the query's loss; docs/validate.md)."""
    from trackstar_db.devices import resolve_device
    from trackstar_db.validate.options import ValidateOptions

    options = ValidateOptions(models=models, fraction=fraction, seed=seed, name=name, train_command=train_command,
                              steps=steps, epochs=epochs, template=template, device=resolve_device(device),
                              keep_models=keep_models)
    handle = _open(db)
    table = handle.validate(options, bootstrap=bootstrap, report=lambda line: click.echo(line, err=True))
    print_table(table, fmt)
