"""Commands that build a database: init, info, ingest corpus|facts|gradients, train, fit."""

from __future__ import annotations

import json
import warnings
from pathlib import Path

import click

from trackstar_db import defaults

from . import main
from .engine import ENGINE
from .common import DB_ARG, Group, _open
from .types import DAMPING, DEVICE, FRACTION, NON_NEGATIVE, OUTPUT_DIR, POSITIVE, click_type
from trackstar_db import option_checks as rules
from trackstar_db.distributed.objectstore import object_uri, open_for_command
from trackstar_db.store.migrate import migrate as run_migrate


@main.command()
@DB_ARG
@click.option("--model", "model_dir", type=click.Path(exists=True, file_okay=False, path_type=Path),
              help="Local checkpoint directory (config.json, weights, tokenizer).")
@click.option("--optimizer-state", type=click.Path(exists=True, path_type=Path),
              help="optimizer.safetensors (default: the one inside --model, if any).")
@click.option("--tables", "tables_uri", default=None,
              help="Keep the tables at this object-store URI (s3://bucket/db/tables; AWS_* environment) instead of DB/tables.")
@click.option("--checkpoint", "checkpoint_refs", multiple=True,
              help="Also attach this checkpoint (a directory in the model's checkpoints/, or a path); repeatable.")
def init(db, model_dir, optimizer_state, tables_uri, checkpoint_refs):
    """Create a database directory DB (optionally recording the model it attributes)."""
    from trackstar_db.api import Database  # heavy: pyarrow

    if object_uri(db):  # s3://bucket/db: tables at s3://bucket/db/tables, the rest through a local cache
        handle = open_for_command(object_uri(db), create=True, model_dir=model_dir, handle=Database)
    else:
        handle = Database.create(db, model_dir, optimizer_state, exist_ok=model_dir is not None or bool(checkpoint_refs),
                                 tables_uri=tables_uri)
    click.echo(f"created {handle.path}" + (f" for model {handle.manifest['model']['fingerprint']}" if model_dir else ""))
    for ref in checkpoint_refs:
        name = handle.attach(ref)
        click.echo(f"attached checkpoint {name}" + (f" ({handle.manifest['checkpoints'][name]['path']})"
                                                     if name in handle.manifest.get("checkpoints", {}) else ""))


@main.command()
@DB_ARG
def info(db):
    """Tables, row counts and the featurizer settings of DB."""
    facts = _open(db).info()
    click.echo(f"database {facts['path']} (format {facts['format_version']})")
    model, featurizer = facts["model"], facts["featurizer"]
    click.echo(f"model: {model['path']} [{model['fingerprint']}]" if model else "model: none")
    if featurizer:
        click.echo(f"featurizer: {json.dumps(featurizer['config'])}; correction: {featurizer['correction_source']}")
        if featurizer.get("coverage"):
            click.echo(_coverage_line(featurizer))
    for name, rows in facts["tables"].items():
        click.echo(f"  {name:<20} {rows:>10,} rows")
    if facts["checkpoints"]:
        click.echo("checkpoints (TracIn-CP sums over these):")
    for name, point in facts["checkpoints"].items():
        lr = point["lr"]
        click.echo(f"  {name:<20} lr={'?' if lr is None else f'{lr:.3g}'} {point['path']}; "
                   f"tables: {', '.join(point['tables']) or 'none'}")


@main.group(cls=Group)
def ingest():
    """Load corpus files, fact files or gradients into a database."""


@ingest.command("corpus")
@DB_ARG
@click.argument("files", nargs=-1, required=True, type=click.Path(path_type=Path))
@click.option("--text-field", default="text", show_default=True, help="Field holding the example text.")
@click.option("--id-field", default=None, help="Field holding a stable id (default: sentence_id, example_id or id; else a text hash).")
@click.option("--skip-bad", is_flag=True, help="Skip bad records into DB/rejects.jsonl instead of stopping.")
@click.option("--batch-size", type=POSITIVE, default=defaults.CORPUS_COMMIT_ROWS, show_default=True, help="Rows per Lance commit.")
@click.option("--prompt-field", default=None, help="With --completion-field: examples whose loss is on the completion only.")
@click.option("--completion-field", default=None, help="Field holding the completion (the tokens whose loss is attributed).")
@click.option("--messages-field", default=None,
              help="Chat records: field holding the role/content messages; loss on the assistant turns.")
@click.option("--chat-template", type=click.Path(exists=True, dir_okay=False, path_type=Path), default=None,
              help="Jinja chat template file to use instead of the tokenizer's own.")
def ingest_corpus_cmd(db, files, text_field, id_field, skip_bad, batch_size, prompt_field, completion_field,
                      messages_field, chat_template):
    """Add training examples (JSON lines, Parquet, Arrow, or a directory of them or from
    datasets.save_to_disk) to the examples table and the BM25 index."""
    report = _open(db).ingest_corpus(files, text_field, id_field, skip_bad, batch_size, prompt_field=prompt_field,
                                     completion_field=completion_field, messages_field=messages_field,
                                     chat_template=chat_template)
    click.echo(f"added {report.added:,} examples ({report.already_present:,} already present, "
               f"{len(report.rejected):,} rejected)")
    for error in report.rejected[:5]:
        click.echo(f"  rejected {error}", err=True)


@ingest.command("facts")
@DB_ARG
@click.argument("files", nargs=-1, required=True, type=click.Path(path_type=Path))
@click.option("--skip-bad", is_flag=True, help="Skip bad records instead of stopping.")
def ingest_facts_cmd(db, files, skip_bad):
    """Add facts (the T-REx facts format) and their queries; rebuild ground truth."""
    report = _open(db).ingest_facts(files, skip_bad=skip_bad)
    click.echo(f"added {report.facts:,} facts and {report.queries:,} queries "
               f"({report.already_present:,} already present, {len(report.rejected):,} rejected); "
               f"{report.ground_truth:,} ground-truth pairs")


@ingest.command("gradients")
@DB_ARG
@click.option("--split", type=click.Choice(["train", "queries"]), default="train", show_default=True)
@click.option("--device", type=DEVICE, default="auto", show_default=True, help="auto (a GPU when present), cpu, cuda or cuda:N.")
@click.option("--batch-size", type=POSITIVE, default=16, show_default=True, help="Most rows per batch.")
@click.option("--batch-tokens", default="auto", show_default=True,
              help="Rows x padded width per batch (length-bucketed); auto: the largest that fits the device.")
@click.option("--model-dtype", type=click.Choice(["auto", "float32", "bfloat16", "float16"]), default="auto",
              show_default=True, help="Weights' dtype; auto: the checkpoint's (config.json), float32 when absent.")
@click.option("--no-pipeline", is_flag=True, help="Tokenize, featurize and write one after the other on one thread.")
@click.option("--shard", default="0/1", show_default=True, help="I/N: featurize only ids with crc32(id) % N == I; 'auto' reads torchrun/Slurm ranks.")
@click.option("--dtype", type=click.Choice(["float32", "float16", "bfloat16"]), default=None,
              help="Storage dtype of the vectors (first run; default float32).")
@click.option("--dim", type=click_type(rules.DIM), default=None, help=f"Total projection dimension, up to 65536 and the tracked entries; a warning below 256 (first run; default {defaults.DIM}).")
@click.option("--seed", type=NON_NEGATIVE, default=None, help="Projection seed (first run; default 0).")
@click.option("--correction", type=click.Choice(["auto", "adam-factored", "adam-exact", "adafactor", "estimated", "none"]),
              default=None, help="Optimizer second-moment correction (first run; default auto: the optimizer state's "
                                 "own when the checkpoint has one, else estimated from a sample).")
@click.option("--combine", type=click.Choice(["concat", "sum"]), default=None,
              help="Per-matrix projections concatenated or summed (first run; default concat).")
@click.option("--no-uncorrected", is_flag=True, help="Do not also write the uncorrected table the first rungs need.")
@click.option("--limit", type=POSITIVE, default=None, help="Stop after this many new rows.")
@click.option("--commit-rows", type=POSITIVE, default=defaults.COMMIT_ROWS, show_default=True, help="Rows per Lance commit.")
@click.option("--checkpoint", default=None, help="Featurize this checkpoint instead of the final one (a directory in "
              "the model's checkpoints/, e.g. step-000425, or a path): attached by name, into its own tables.")
@click.option("--shard-model", is_flag=True, help="Shard the model's parameters across the torchrun/Slurm "
              "processes (FSDP2), for a model too large for one device; each process featurizes its ids.")
@ENGINE
def ingest_gradients_cmd(db, split, device, batch_size, batch_tokens, model_dtype, no_pipeline, shard, dtype, dim, seed,
                         correction, combine, no_uncorrected, limit, commit_rows, checkpoint, engine, shard_model):
    """Featurize the training examples or the queries into gradient tables (resumable)."""
    from trackstar_db.gradients.plan import parse_shard  # heavy: pyarrow

    handle = _open(db)
    from trackstar_db.featurizer.config import FeaturizerWarning  # heavy: torch

    with warnings.catch_warnings(record=True) as caught:  # the featurizer's warnings: one line each
        warnings.simplefilter("always", FeaturizerWarning)
        totals = handle.ingest_gradients(split, dim=dim, seed=seed, correction=correction, combine=combine, dtype=dtype,
                                         engine=engine, shard_model=shard_model, batch_size=batch_size, device=device,
                                         shard=parse_shard(shard), commit_rows=commit_rows, uncorrected=not no_uncorrected,
                                         limit=limit, batch_tokens=_batch_tokens(batch_tokens), model_dtype=model_dtype,
                                         pipeline=not no_pipeline, checkpoint=checkpoint)
    ours = [str(w.message) for w in caught if issubclass(w.category, FeaturizerWarning)]
    for w in caught:
        if not issubclass(w.category, FeaturizerWarning):  # anyone else's, as Python shows them
            warnings.showwarning(w.message, w.category, w.filename, w.lineno)
    for line in dict.fromkeys(ours):  # the library's `dim` is the command's --dim
        click.echo(f"warning: {'--' + line if line.startswith('dim ') else line}", err=True)
    click.echo(f"featurized {totals['rows']:,} {split} rows ({totals['tokens']:,} tokens) in "
               f"{totals['seconds']:.1f} s; correction: {handle.manifest['featurizer']['config']['correction']}; "
               "tables: " + ", ".join(f"{k}={v:,}" for k, v in totals["tables"].items()))
    if handle.manifest["featurizer"].get("coverage"):
        click.echo(_coverage_line(handle.manifest["featurizer"]))


def _coverage_line(featurizer: dict) -> str:
    """'tracked: 99.4% of the model's 47,520 trainable parameters (13 matrices)[; not tracked: ...]'."""
    cover = featurizer["coverage"]
    line = (f"tracked: {cover['share']:.1%} of the model's {cover['parameters']:,} trainable parameters "
            f"({len(featurizer.get('tracked', []))} matrices)")
    missed = cover.get("untracked_matrices") or []
    return line + (f"; not tracked: {', '.join(missed[:6])}{' ...' if len(missed) > 6 else ''}" if missed else "")


def _batch_tokens(text: str):
    if text == "auto":
        return text
    try:
        return int(text)
    except ValueError:
        raise click.BadParameter(f"{text!r}: 'auto' or a number of tokens", param_hint="--batch-tokens") from None


@main.command()
@DB_ARG
@click.option("--out", "out_dir", required=True, type=OUTPUT_DIR,
              help="Where to save the checkpoint, tokenizer and optimizer state.")
@click.option("--overwrite", is_flag=True, help="Replace the model --out already holds (refused without it).")
@click.option("--arch", type=click.Choice(["gpt2", "llama"]), default="gpt2", show_default=True)
@click.option("--epochs", type=POSITIVE, default=None, help="Training epochs (default: the TrainConfig default).")
@click.option("--seed", type=int, default=0, show_default=True)
@click.option("--checkpoints", type=NON_NEGATIVE, default=0, show_default=True,
              help="Also keep this many evenly spaced intermediate checkpoints (OUT/checkpoints/), for tracin-cp.")
def train(db, out_dir, arch, epochs, seed, checkpoints, overwrite):
    """Pretrain a small causal LM on DB's examples (AdamW), record it, report fact accuracy."""
    accuracy = _open(db).train(out_dir, architecture=arch, epochs=epochs, seed=seed, checkpoints=checkpoints,
                               overwrite=overwrite)
    if accuracy is not None:
        from trackstar_db.testbed.model import format_accuracy  # heavy: torch

        click.echo(format_accuracy(accuracy))


@main.command()
@DB_ARG
@click.option("--mix", type=click.Choice(["task", "train"]), default="task", show_default=True,
              help="task: mix R_eval of the queries into R_train (TrackStar); train: R_train only.")
@click.option("--kind", type=click.Choice(["block", "dense"]), default="block", show_default=True,
              help="Block-diagonal per tracked matrix, or one dense R.")
@click.option("--damping", type=DAMPING, default=defaults.DAMPING, show_default=True, help="Added to eigenvalues, times their mean.")
@click.option("--crossing-k", type=POSITIVE, default=None, help="Spectrum-crossing component for lambda (default d // 64).")
@click.option("--template", default=defaults.TEMPLATE, show_default=True, help="Queries whose gradients form R_eval.")
@ENGINE
@click.option("--shrinkage", default="prior", show_default=True,
              help="Each block of R toward its mean eigenvalue: prior (size / (n + size), from the block's size and "
                   "its n vectors), ledoit-wolf, none, or a fixed share in [0, 1] (docs/method.md).")
def fit(db, mix, kind, damping, crossing_k, template, engine, shrinkage):
    """Fit the preconditioners R (R_train, and the task-mixed R) from the stored gradients."""
    if shrinkage not in ("prior", "ledoit-wolf", "none"):
        try:
            shrinkage = float(shrinkage)
        except ValueError:
            raise click.BadParameter(f"must be prior, ledoit-wolf, none or a number in [0, 1], not {shrinkage!r}",
                                     param_hint="--shrinkage") from None
    report = _open(db).fit(mix, kind, damping, crossing_k, template, engine, shrinkage=shrinkage)
    for note in report.notes:
        click.echo(f"note: {note}", err=True)
    for name, params in report.preconditioners.items():
        click.echo(f"{name:<32} lambda={params['lambda']:.4f} k={params['k']} damping={params['damping']:g} "
                   f"n_train={params['n_train']:,} n_eval={params['n_eval']:,} kind={params['kind']}"
                   + (f" shrinkage={params['shrinkage']} mean rho={sum(params['rho_train']) / len(params['rho_train']):.3f}"
                      if params.get("rho_train") else ""))


@main.command("fit-factors")
@DB_ARG
@click.option("--kind", type=click.Choice(["kfac", "ekfac"]), default="ekfac", show_default=True,
              help="kfac: the Kronecker factors' eigenvalues; ekfac: one more pass for the eigenvalue correction.")
@click.option("--fisher", type=click.Choice(list(defaults.FISHERS)), default=defaults.FISHER, show_default=True,
              help="The labels of the gradients fitted on: sampled from the model's own predictions (seeded; the "
                   "true Fisher) or the data's (the empirical Fisher).")
@click.option("--damping", type=DAMPING, default=0.1, show_default=True,
              help="lambda = DAMPING x the mean eigenvalue of each matrix.")
@click.option("--fraction", type=FRACTION, default=1.0, show_default=True,
              help="The seeded share of the training examples fitted on.")
@click.option("--seed", type=int, default=0, show_default=True, help="Seed of the share.")
@click.option("--batch-size", type=POSITIVE, default=16, show_default=True)
@click.option("--device", type=DEVICE, default="auto", show_default=True, help="auto (a GPU when present), cpu, cuda or cuda:N.")
def fit_factors_cmd(db, kind, fisher, damping, fraction, seed, batch_size, device):
    """Fit the Kronecker-factored curvature (K-FAC / EK-FAC) of the tracked matrices from the training
    examples, for the kfac-proj / ekfac-proj rungs and the --rerank second stage (resumable)."""
    report = _open(db).fit_factors(kind, damping, fraction, seed, batch_size, device, fisher=fisher)
    entry = report.entry
    for note in report.notes or []:
        click.echo(f"note: {note}", err=True)
    resumed = f" (resumed after {report.resumed:,})" if report.resumed else ""
    fisher = entry["fitted_on"].get("fisher", "empirical")  # factors fitted before the choice used the data's labels
    click.echo(f"{entry['kind']} factors of {len(entry['fitted_on']['tracked'])} matrices from {entry['n_examples']:,} "
               f"examples{resumed}, {entry['tokens']:,} tokens ({fisher} Fisher); "
               f"damping={entry['damping']:g} x mean eigenvalue; projected: {', '.join(entry['projected']) or 'none'}")


@main.command()
@DB_ARG
def migrate(db):
    """Bring a database written by an earlier trackstar-db to the current format, in place."""
    for line in run_migrate(db):
        click.echo(line)
