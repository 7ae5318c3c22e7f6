"""Commands that use a database: retrieve, tail-patch, eval, query, sql, export, import, report, demo."""

from __future__ import annotations

from pathlib import Path

import click

from trackstar_db import defaults
from trackstar_db.devices import resolve_device
from trackstar_db.errors import TrackstarError
from trackstar_db.evaluation.highlight import to_terminal
from trackstar_db.ladder import REGISTRY

from . import main
from .engine import ENGINE
from .common import DB_ARG, FORMATS, _open, print_table
from .scale import ann_flags
from .types import DEVICE, NAME, OUTPUT_DIR, OUTPUT_FILE, POSITIVE, TOP_K


def rerank_flags(command):
    """--rerank KIND and --candidates N: the second stage (retrieval/rerank.py) of query and retrieve."""
    command = click.option("--candidates", type=POSITIVE, default=defaults.CANDIDATES, show_default=True,
                           help="With --rerank: the first stage's top N (and bottom N) re-scored per query.")(command)
    return click.option("--rerank", type=click.Choice(["kfac", "ekfac"]), default=None,
                        help="Re-score the method's top candidates from full gradients through the Kronecker factors "
                             "('trackstar-db fit-factors'); the answer keeps the first stage's score and rank.")(command)


@main.command()
@DB_ARG
@click.option("--method", "methods", multiple=True, required=True,
              help="A method of the ladder (grad-dot, grad-cos, trak, opt-cos, r-train, trackstar), a baseline "
                   "(bm25, embedding, lm-embedding) or tracin-cp[-cos|-opt]; repeatable; 'all' = every ladder "
                   "rung and baseline whose needs are installed.")
@click.option("--k", type=TOP_K, default=defaults.K_RETRIEVE, show_default=True, help="Proponents (and opponents) kept per query.")
@click.option("--run", "run_id", type=NAME, default=None, help="Run name (default: the method name).")
@click.option("--template", default=defaults.TEMPLATE, show_default=True, help="Which queries ('all' for every template).")
@click.option("--device", type=DEVICE, default="auto", show_default=True, help="auto (a GPU when present), cpu, cuda or cuda:N.")
@click.option("--replace", is_flag=True, help="Overwrite an existing run of the same name.")
@ann_flags
@click.option("--query-text", type=click.Choice(["prompt+target", "prompt"]), default="prompt+target", show_default=True,
              help="What BM25 and the embedding baseline search with.")
@ENGINE
@rerank_flags
def retrieve(db, methods, k, run_id, template, device, replace, query_text, ann, engine, rerank, candidates):
    """Retrieve proponents for the database's queries with one or more methods."""
    from trackstar_db.retrieval.methods import expand, not_installed  # heavy: torch

    handle = _open(db)
    names = expand(methods)
    for left in not_installed() if "all" in methods else ():
        click.echo(f"skipping the {left.name} baseline: pip install 'trackstar-db[{left.extra}]' to add it", err=True)
    if run_id and len(names) > 1:
        raise click.BadParameter("names one run; give one --method with it", param_hint="--run")
    for name in names:
        run, rows = handle.retrieve(name, k, run_id, replace, None if template == "all" else template, device,
                                    query_text, ann, engine, rerank=rerank, candidates=candidates)
        click.echo(f"run {run}: {rows.num_rows:,} rows")


@main.command("tail-patch")
@DB_ARG
@click.option("--run", "run_ids", type=NAME, multiple=True, required=True, help="Retrieval run(s) to patch; repeatable.")
@click.option("--k", type=TOP_K, default=defaults.K_TAIL_PATCH, show_default=True, help="Top-k proponents per query (k=1, 3, 5 are read from these).")
@click.option("--queries", "max_queries", type=POSITIVE, default=None, help="Patch a deterministic sample of this many queries.")
@click.option("--device", type=DEVICE, default="auto", show_default=True, help="auto (a GPU when present), cpu, cuda or cuda:N.")
def tail_patch_cmd(db, run_ids, k, max_queries, device):
    """Influence: one optimizer step on each proponent, the change in P(target | prompt)."""
    rows = _open(db).tail_patch(run_ids, k, max_queries, device)
    click.echo(f"{rows.num_rows:,} tail-patch measurements for {', '.join(run_ids)}")


@main.command("eval")
@DB_ARG
@click.option("--format", "fmt", type=FORMATS, default="table", show_default=True)
@click.option("--by", default="method", show_default=True,
              help="method, bucket (fact frequency) or correct (does the model answer), or any metadata column of "
                   "the examples (source, domain, licence, shard...): the contribution ledger, with bootstrap intervals.")
def eval_cmd(db, fmt, by):
    """The method-by-metric table (MRR, recall@10, tail-patch), computed by queries/*.sql."""
    print_table(_open(db).evaluate(by), fmt)


@main.command()
@DB_ARG
@click.option("--prompt", required=True, help="The context, e.g. 'The capital of France is'.")
@click.option("--target", required=True, help="The continuation to attribute, e.g. 'Paris'.")
@click.option("--method", default=None, help="Default: the best method the database can serve (trackstar, "
                                               "else r-train, else opt-cos, else grad-cos).")
@click.option("--k", type=TOP_K, default=defaults.K_QUERY, show_default=True)
@click.option("--device", type=DEVICE, default="auto", show_default=True, help="auto (a GPU when present), cpu, cuda or cuda:N.")
@ann_flags
@click.option("--format", "fmt", type=click.Choice(["text", "json", "table", "csv"]), default="text", show_default=True)
@click.option("--tokens", is_flag=True, help="Also show which tokens of each hit carry its score (gradient methods; "
                                             "with --format json/table/csv: one row per token).")
@click.option("--verify", is_flag=True, help="Measure each proponent's tail-patch effect now (one optimizer step on "
                                             "it, the change of P(target)) and label it 'moves the model' or not.")
@rerank_flags
@click.option("--control-target", default=None, help="Contrast: attribute loss(target) - loss(this target) after the "
                                                     "same prompt, i.e. why the target rather than this (gradient methods).")
def query(db, prompt, target, method, k, device, fmt, ann, tokens, verify, rerank, candidates, control_target):
    """Attribute one prompt and target: proponents and opponents with their texts, and evidence:
    whether each states the answer (target, subject, verbatim span, BM25) and, with --verify,
    whether it moves the model (docs/validate.md)."""
    import pyarrow.compute as pc  # heavy: pyarrow

    from trackstar_db.retrieval.evidence import evidence_line  # heavy: pyarrow
    from trackstar_db.retrieval.tokens import hit_tokens, strongest  # heavy: torch

    if tokens and (rerank or getattr(REGISTRY.get(method), "needs_factors", False)):
        raise click.BadParameter("splits a ladder rung's score over tokens, not a Kronecker-factored one",
                                 param_hint="--tokens")
    if tokens and control_target is not None:
        raise click.BadParameter("token contributions are of one target; drop --tokens", param_hint="--control-target")
    handle = _open(db)
    rows = handle.query(prompt, target, k=k, method=method, device=resolve_device(device), ann=ann, verify=verify,
                        rerank=rerank, candidates=candidates, control_target=control_target)
    per_hit = hit_tokens(handle, prompt, target, rows, resolve_device(device)) if tokens else None
    if fmt != "text":
        print_table(per_hit if tokens else rows, fmt)
        return
    for kind in ("proponent", "opponent"):
        picked = [r for r in rows.to_pylist() if r["kind"] == kind]
        if picked:
            versus = f" rather than {control_target!r}" if control_target is not None else ""
            click.secho(f"{kind}s of {target!r}{versus} after {prompt!r} (method: {picked[0]['method']}):", bold=True)
        for r in picked:
            first = f"  ({r['first_method']} {r['first_score']:+.4f} #{r['first_rank']})" if "first_score" in r else ""
            click.echo(f"{r['rank']:>4}  {r['score']:+.4f}  {r['example_id']:<14} {to_terminal(r['text'], [prompt, target])}"
                       f"{first}")
            click.echo(" " * 6 + evidence_line(r))
            if tokens:
                mine = per_hit.filter((pc.field("kind") == kind) & (pc.field("rank") == r["rank"]))
                click.echo(" " * 6 + "tokens: " + "  ".join(f"{t}({c:+.4f})" for t, c in strongest(mine, 6)))


@main.command()
@DB_ARG
@click.argument("statement")
@click.option("--format", "fmt", type=click.Choice(["table", "csv", "json", "parquet"]), default="table", show_default=True)
@click.option("--out", type=OUTPUT_FILE, default=None, help="Write to a file (needed for parquet).")
@click.option("--vectors", is_flag=True, help="Expose the vector columns of gradient tables.")
def sql(db, statement, fmt, out, vectors):
    """Run one read-only SQL statement (DuckDB) over the database's tables."""
    from trackstar_db.evaluation.sql import write_table  # heavy: duckdb

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
@click.option("--run", "run_id", type=NAME, required=True, help="The retrieval run to export.")
@click.option("--out", required=True, type=OUTPUT_FILE, help="JSON lines file to write.")
def export_cmd(db, run_id, out):
    """Write a run in the authors' viewer format (JSON lines), for their public viewer."""
    click.echo(f"wrote {_open(db).export_run(run_id, out)}")


@main.command("import")
@DB_ARG
@click.argument("file", type=click.Path(exists=True, dir_okay=False, path_type=Path))
@click.option("--method", type=NAME, required=True, help="Method name to record (e.g. bm25, trackstar-published).")
@click.option("--run", "run_id", type=NAME, default=None, help="Run name (default: the method name).")
def import_cmd(db, file, method, run_id):
    """Load a results file in the authors' viewer format as a retrieval run."""
    count = _open(db).import_run(file, method, run_id)
    click.echo(f"imported {count:,} retrieval rows as run {run_id or method}")


@main.command()
@DB_ARG
@click.option("--out", "out_dir", required=True, type=OUTPUT_DIR)
@click.option("--compare", nargs=2, default=None, help="Show only these two runs on the query pages (default: every run).")
@click.option("--samples", type=POSITIVE, default=40, show_default=True, help="Queries given a page in the explorer (a seeded sample).")
def report(db, out_dir, compare, samples):
    """Write a static HTML report (table, plots, side-by-side proponents)."""
    click.echo(f"wrote {_open(db).write_report(out_dir, compare, samples)}")


@main.command()
@click.option("--workdir", type=click.Path(file_okay=False, path_type=Path), default=Path("trackstar-demo"),
              show_default=True, help="Where the world, model and database go.")
@click.option("--size", type=click.Choice(["demo", "tiny"]), default="demo", show_default=True)
@click.option("--seed", type=int, default=0, show_default=True)
@click.option("--format", "fmt", type=FORMATS, default="table", show_default=True)
@click.option("--full", is_flag=True, help="Also keep checkpoints for TracIn-CP (stored per checkpoint) and run "
              "Simfluence (record, held-out eval, report plot): several minutes more.")
def demo(workdir, size, seed, fmt, full):
    """Build the demo fact world, train a model on it, run every method and print the table."""
    from trackstar_db.demo import run_demo  # heavy: torch

    summary = run_demo(workdir, size=size, seed=seed, full=full)
    print_table(summary, fmt)
