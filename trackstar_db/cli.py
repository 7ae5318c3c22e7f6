"""The trackstar-db command line: each command is a thin wrapper over one library function."""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import click

from . import __version__
from .errors import TrackstarError

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
    from .database import connect

    return connect(db)


def print_table(table, fmt: str = "table") -> None:
    from .sql import format_table

    text = format_table(table, fmt)
    click.echo(text, nl=not text.endswith("\n"))


@click.group(cls=Group, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="trackstar-db")
def main():
    """trackstar-db: which pretraining examples made a language model say something?

    A database of TrackStar gradients (LanceDB), BM25 (Tantivy) and SQL analyses (DuckDB).
    Start with 'trackstar-db demo', or: init, ingest corpus, ingest facts, ingest gradients,
    fit, retrieve, tail-patch, eval.
    """


@main.command()
@DB_ARG
@click.option("--model", "model_dir", type=click.Path(exists=True, file_okay=False, path_type=Path),
              help="Local checkpoint directory (config.json, weights, tokenizer).")
@click.option("--optimizer-state", type=click.Path(exists=True, path_type=Path),
              help="optimizer.safetensors (default: the one inside --model, if any).")
def init(db, model_dir, optimizer_state):
    """Create a database directory DB (optionally recording the model it attributes)."""
    from .database import Database

    handle = Database.create(db, model_dir, optimizer_state, exist_ok=model_dir is not None)
    click.echo(f"created {handle.path}" + (f" for model {handle.manifest['model']['fingerprint']}" if model_dir else ""))


@main.command()
@DB_ARG
def info(db):
    """Tables, row counts and the featurizer settings of DB."""
    handle = _open(db)
    click.echo(f"database {handle.path} (format {handle.manifest['format_version']})")
    model = handle.manifest.get("model")
    click.echo(f"model: {model['path']} [{model['fingerprint']}]" if model else "model: none")
    featurizer = handle.manifest.get("featurizer")
    if featurizer:
        click.echo(f"featurizer: {json.dumps(featurizer['config'])}; correction: {featurizer['correction_source']}")
    for name in handle.table_names():
        click.echo(f"  {name:<20} {handle.count(name):>10,} rows")


@main.group(cls=Group)
def ingest():
    """Load corpus files, fact files or gradients into a database."""


@ingest.command("corpus")
@DB_ARG
@click.argument("files", nargs=-1, required=True, type=click.Path(path_type=Path))
@click.option("--text-field", default="text", show_default=True, help="Field holding the example text.")
@click.option("--id-field", default=None, help="Field holding a stable id (default: sentence_id, example_id or id; else a text hash).")
@click.option("--skip-bad", is_flag=True, help="Skip bad records into DB/rejects.jsonl instead of stopping.")
@click.option("--batch-size", default=10_000, show_default=True, help="Rows per Lance commit.")
def ingest_corpus_cmd(db, files, text_field, id_field, skip_bad, batch_size):
    """Add training texts (JSON lines or Parquet) to the examples table and the BM25 index."""
    from .corpus import CorpusOptions, ingest_corpus

    report = ingest_corpus(_open(db), files, CorpusOptions(text_field, id_field, skip_bad, batch_size))
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
    from .facts import ingest_facts

    report = ingest_facts(_open(db), files, skip_bad=skip_bad)
    click.echo(f"added {report.facts:,} facts and {report.queries:,} queries "
               f"({report.already_present:,} already present, {len(report.rejected):,} rejected); "
               f"{report.ground_truth:,} ground-truth pairs")


@ingest.command("gradients")
@DB_ARG
@click.option("--split", type=click.Choice(["train", "queries"]), default="train", show_default=True)
@click.option("--device", default="auto", show_default=True, help="auto (a GPU when present), cpu, cuda or cuda:N.")
@click.option("--batch-size", default=16, show_default=True)
@click.option("--shard", default="0/1", show_default=True, help="I/N: featurize only ids with crc32(id) % N == I; 'auto' reads torchrun/Slurm ranks.")
@click.option("--dtype", type=click.Choice(["float32", "float16", "bfloat16"]), default=None,
              help="Storage dtype of the vectors (first run; default float32).")
@click.option("--dim", type=int, default=None, help="Total projection dimension, 1024..65536 (first run; default 4096).")
@click.option("--seed", type=int, default=None, help="Projection seed (first run; default 0).")
@click.option("--correction", type=click.Choice(["adam-factored", "adam-exact", "adafactor", "estimated", "none"]),
              default=None, help="Optimizer second-moment correction (first run; default adam-factored).")
@click.option("--combine", type=click.Choice(["concat", "sum"]), default=None,
              help="Per-matrix projections concatenated or summed (first run; default concat).")
@click.option("--no-raw", is_flag=True, help="Do not also write the uncorrected table the ablations need.")
@click.option("--limit", type=int, default=None, help="Stop after this many new rows.")
@click.option("--commit-rows", type=int, default=2048, show_default=True, help="Rows per Lance commit.")
def ingest_gradients_cmd(db, split, device, batch_size, shard, dtype, dim, seed, correction, combine, no_raw, limit,
                         commit_rows):
    """Featurize the training examples or the queries into gradient tables (resumable)."""
    from .gradients import GradientJob, ingest_gradients, parse_shard, stored_config
    from .featurizer.config import FeaturizerConfig

    handle = _open(db)
    config = stored_config(handle)
    given = {k: v for k, v in {"dim": dim, "seed": seed, "correction": correction, "combine": combine}.items()
             if v is not None}
    config = FeaturizerConfig.from_dict({**(config.to_dict() if config else {"correction": "adam-factored"}), **given})
    stored_dtype = (handle.manifest.get("featurizer") or {}).get("dtype")
    job = GradientJob(split, batch_size, device, dtype or stored_dtype or "float32", parse_shard(shard),
                      commit_rows=commit_rows, with_raw=not no_raw, limit=limit)
    totals = ingest_gradients(handle, config, job)
    click.echo(f"featurized {totals['rows']:,} {split} rows ({totals['tokens']:,} tokens) in "
               f"{totals['seconds']:.1f} s; tables: " + ", ".join(f"{k}={v:,}" for k, v in totals["tables"].items()))


@main.command()
@DB_ARG
@click.option("--out", "out_dir", required=True, type=click.Path(file_okay=False, path_type=Path),
              help="Where to save the checkpoint, tokenizer and optimizer state.")
@click.option("--arch", type=click.Choice(["gpt2", "llama"]), default="gpt2", show_default=True)
@click.option("--epochs", type=int, default=None, help="Training epochs (default: the TrainConfig default).")
@click.option("--seed", type=int, default=0, show_default=True)
def train(db, out_dir, arch, epochs, seed):
    """Pretrain a small causal LM on DB's examples (AdamW), record it, report fact accuracy."""
    from .testbed import train_testbed

    handle = _open(db)
    overrides = {"architecture": arch, "seed": seed}
    if epochs is not None:
        overrides["epochs"] = epochs
    accuracy = train_testbed(handle, out_dir, overrides)
    if accuracy is not None:
        from .testbed import format_accuracy

        click.echo(format_accuracy(accuracy))


@main.command()
@DB_ARG
@click.option("--mix", type=click.Choice(["task", "train"]), default="task", show_default=True,
              help="task: mix R_eval of the queries into R_train (TrackStar); train: R_train only.")
@click.option("--kind", type=click.Choice(["block", "dense"]), default="block", show_default=True,
              help="Block-diagonal per tracked matrix, or one dense R.")
@click.option("--damping", type=float, default=0.1, show_default=True, help="Added to eigenvalues, times their mean.")
@click.option("--crossing-k", type=int, default=None, help="Spectrum-crossing component for lambda (default d // 64).")
@click.option("--template", default="prompt0", show_default=True, help="Queries whose gradients form R_eval.")
def fit(db, mix, kind, damping, crossing_k, template):
    """Fit the preconditioners R (train, mixed, train_raw) from the stored gradients."""
    from .fit import fit as fit_all

    for name, params in fit_all(_open(db), mix, kind, damping, crossing_k, template).items():
        click.echo(f"{name:<10} lambda={params['lambda']:.4f} k={params['k']} damping={params['damping']:g} "
                   f"n_train={params['n_train']:,} n_eval={params['n_eval']:,} kind={params['kind']}")


@main.command()
@DB_ARG
@click.option("--method", "methods", multiple=True, required=True,
              help="grad-dot, grad-cos, trak, opt-cos, r-train, trackstar, bm25 or embedding; repeatable; "
                   "'all' (every method whose needs are installed).")
@click.option("--k", default=100, show_default=True, help="Proponents (and opponents) kept per query.")
@click.option("--run", "run_id", default=None, help="Run name (default: the method name).")
@click.option("--template", default="prompt0", show_default=True, help="Which queries ('all' for every template).")
@click.option("--device", default="auto", show_default=True, help="auto (a GPU when present), cpu, cuda or cuda:N.")
@click.option("--replace", is_flag=True, help="Overwrite an existing run of the same name.")
@click.option("--query-text", type=click.Choice(["prompt+target", "prompt"]), default="prompt+target", show_default=True,
              help="What BM25 and the embedding baseline search with.")
def retrieve(db, methods, k, run_id, template, device, replace, query_text):
    """Retrieve proponents for the database's queries with one or more methods."""
    from .retrieve import ALL_METHODS, RetrieveOptions, retrieve as run_retrieval

    handle = _open(db)
    from .retrieval import embedding

    everything = [m for m in ALL_METHODS if m != "embedding" or embedding.available()]
    if "all" in methods and len(everything) < len(ALL_METHODS):
        click.echo("skipping the embedding baseline: pip install 'trackstar-db[embedding]' to add it", err=True)
    names = [m for name in methods for m in (everything if name == "all" else [name])]
    if run_id and len(names) > 1:
        raise TrackstarError("--run names one run; give one --method with it")
    from .gradients import auto_device

    options = RetrieveOptions(k=k, template=None if template == "all" else template, device=auto_device(device),
                              query_text=query_text)
    for name in names:
        run, rows = run_retrieval(handle, name, options, run_id, replace)
        click.echo(f"run {run}: {rows.num_rows:,} rows")


@main.command("tail-patch")
@DB_ARG
@click.option("--run", "run_ids", multiple=True, required=True, help="Retrieval run(s) to patch; repeatable.")
@click.option("--k", default=10, show_default=True, help="Top-k proponents per query (k=1, 3, 5 are read from these).")
@click.option("--queries", "max_queries", type=int, default=None, help="Patch a deterministic sample of this many queries.")
@click.option("--device", default="auto", show_default=True, help="auto (a GPU when present), cpu, cuda or cuda:N.")
def tail_patch_cmd(db, run_ids, k, max_queries, device):
    """Influence: one optimizer step on each proponent, the change in P(target | prompt)."""
    from .tail_patch_runs import tail_patch_runs

    from .gradients import auto_device

    rows = tail_patch_runs(_open(db), list(run_ids), k, max_queries, auto_device(device))
    click.echo(f"{rows.num_rows:,} tail-patch measurements for {', '.join(run_ids)}")


@main.command("eval")
@DB_ARG
@click.option("--format", "fmt", type=FORMATS, default="table", show_default=True)
@click.option("--by", type=click.Choice(["method", "bucket", "correct"]), default="method", show_default=True,
              help="Split by fact frequency bucket or by whether the model answers correctly.")
def eval_cmd(db, fmt, by):
    """The method-by-metric table (MRR, recall@10, tail-patch), computed by queries/*.sql."""
    from .analysis import evaluation

    print_table(evaluation(_open(db), by), fmt)


@main.command()
@DB_ARG
@click.option("--prompt", required=True, help="The context, e.g. 'The capital of France is'.")
@click.option("--target", required=True, help="The continuation to attribute, e.g. 'Paris'.")
@click.option("--method", default="trackstar", show_default=True)
@click.option("--k", default=10, show_default=True)
@click.option("--device", default="auto", show_default=True, help="auto (a GPU when present), cpu, cuda or cuda:N.")
@click.option("--format", "fmt", type=click.Choice(["text", "json", "table", "csv"]), default="text", show_default=True)
def query(db, prompt, target, method, k, device, fmt):
    """Attribute one prompt and target: proponents and opponents with their texts."""
    from .highlight import to_terminal

    from .gradients import auto_device

    rows = _open(db).query(prompt, target, k=k, method=method, device=auto_device(device))
    if fmt != "text":
        print_table(rows, fmt)
        return
    for kind in ("proponent", "opponent"):
        picked = [r for r in rows.to_pylist() if r["kind"] == kind]
        if picked:
            click.secho(f"{kind}s of {target!r} after {prompt!r} ({method}):", bold=True)
        for r in picked:
            click.echo(f"{r['rank']:>4}  {r['score']:+.4f}  {r['example_id']:<14} {to_terminal(r['text'], [prompt, target])}")


@main.command()
@DB_ARG
@click.argument("statement")
@click.option("--format", "fmt", type=click.Choice(["table", "csv", "json", "parquet"]), default="table", show_default=True)
@click.option("--out", type=click.Path(dir_okay=False, path_type=Path), default=None, help="Write to a file (needed for parquet).")
@click.option("--vectors", is_flag=True, help="Expose the vector columns of gradient tables.")
def sql(db, statement, fmt, out, vectors):
    """Run one read-only SQL statement (DuckDB) over the database's tables."""
    from .sql import write_table

    result = _open(db).sql(statement, vectors=vectors)
    if out is not None:
        write_table(result, fmt, out)
        click.echo(f"wrote {result.num_rows:,} rows to {out}")
    elif fmt == "parquet":
        raise TrackstarError("--format parquet needs --out FILE")
    else:
        print_table(result, fmt)


@main.command("export")
@DB_ARG
@click.option("--run", "run_id", required=True, help="The retrieval run to export.")
@click.option("--out", required=True, type=click.Path(dir_okay=False, path_type=Path), help="JSON lines file to write.")
def export_cmd(db, run_id, out):
    """Write a run in the authors' viewer format (JSON lines), for their public viewer."""
    from .exchange import export_run

    handle = _open(db)
    click.echo(f"wrote {export_run(handle, run_id, out)}")


@main.command("import")
@DB_ARG
@click.argument("file", type=click.Path(exists=True, dir_okay=False, path_type=Path))
@click.option("--method", required=True, help="Method name to record (e.g. bm25, trackstar-published).")
@click.option("--run", "run_id", default=None, help="Run name (default: the method name).")
def import_cmd(db, file, method, run_id):
    """Load a results file in the authors' viewer format as a retrieval run."""
    from .exchange import import_run

    count = import_run(_open(db), file, method, run_id or method)
    click.echo(f"imported {count:,} retrieval rows as run {run_id or method}")


@main.command()
@DB_ARG
@click.option("--out", "out_dir", required=True, type=click.Path(file_okay=False, path_type=Path))
@click.option("--compare", nargs=2, default=None, help="Two runs shown side by side (default: trackstar and bm25).")
@click.option("--samples", default=8, show_default=True, help="Queries shown side by side.")
def report(db, out_dir, compare, samples):
    """Write a static HTML report (table, plots, side-by-side proponents)."""
    from .analysis import write_db_report

    click.echo(f"wrote {write_db_report(_open(db), out_dir, compare, samples)}")


@main.command()
@click.option("--workdir", type=click.Path(file_okay=False, path_type=Path), default=Path("trackstar-demo"),
              show_default=True, help="Where the world, model and database go.")
@click.option("--size", type=click.Choice(["demo", "tiny"]), default="demo", show_default=True)
@click.option("--seed", type=int, default=0, show_default=True)
@click.option("--format", "fmt", type=FORMATS, default="table", show_default=True)
def demo(workdir, size, seed, fmt):
    """Build the demo fact world, train a model on it, run every method and print the table."""
    from .demo import run_demo

    summary = run_demo(workdir, size=size, seed=seed)
    print_table(summary, fmt)


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
