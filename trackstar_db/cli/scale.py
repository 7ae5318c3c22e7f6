"""Commands for attribution at scale: index (an ANN index of a rung's final vectors) and plan
(bytes, RAM and time of a build before it runs). `ann_flags` adds --ann and its search
parameters to retrieve and query (cli/use.py)."""

from __future__ import annotations

import functools

import click

from trackstar_db.errors import TrackstarError

from . import main
from .common import DB_ARG, FORMATS, _open, print_table
from .types import DEVICE, POSITIVE, POSITIVE_FLOAT


def ann_flags(command):
    """--ann, --nprobes, --refine-factor, --ef -> one `ann` argument (AnnOptions or None)."""

    @click.option("--ann", "use_ann", is_flag=True,
                  help="Approximate top-k from the method's index ('trackstar-db index'); the run is named METHOD-ann.")
    @click.option("--nprobes", type=POSITIVE, default=None, help="With --ann: IVF partitions searched (default: 4 on ivf_rq, 8 on ivf_pq, else LanceDB's).")
    @click.option("--refine-factor", type=POSITIVE, default=None,
                  help="With --ann: re-rank this many times k candidates on the full vectors "
                       "(ivf_rq, ivf_pq; default: 300 candidates on ivf_rq, 1,000 on ivf_pq).")
    @click.option("--ef", type=POSITIVE, default=None, help="With --ann: HNSW candidate list size (>= k).")
    @functools.wraps(command)
    def wrapper(*args, use_ann, nprobes, refine_factor, ef, **kwargs):
        if not use_ann and (nprobes or refine_factor or ef):
            raise TrackstarError("--nprobes, --refine-factor and --ef need --ann")
        ann = None
        if use_ann:
            from trackstar_db.retrieval.ann import AnnOptions  # heavy: torch

            ann = AnnOptions(nprobes, refine_factor, ef)
        return command(*args, ann=ann, **kwargs)

    return wrapper


@main.command()
@DB_ARG
@click.option("--method", required=True, help="The rung whose final vectors are indexed (e.g. trackstar).")
@click.option("--kind", type=click.Choice(["ivf_rq", "ivf_pq", "ivf_hnsw_sq", "ivf_flat"]), default="ivf_rq",
              show_default=True, help="LanceDB index type (retrieval/ann.py KINDS; measured figures: docs/scale.md).")
@click.option("--partitions", "num_partitions", type=POSITIVE, default=None, help="IVF partitions (default sqrt(rows)/5).")
@click.option("--sub-vectors", "num_sub_vectors", type=POSITIVE, default=None, help="IVF-PQ sub-vectors (default d/16).")
@click.option("--device", type=DEVICE, default="cpu", show_default=True, help="Where R is applied to the stored rows.")
def index(db, method, kind, num_partitions, num_sub_vectors, device):
    """Materialise a rung's unit vectors (float16) in ann_<method> with a vector index, for --ann."""
    entry = _open(db).build_index(method, kind, num_partitions=num_partitions, num_sub_vectors=num_sub_vectors,
                                  device=device)
    click.echo(f"{entry['table']}: {entry['source']['rows']:,} vectors of {entry['dim']} ({kind}) in "
               f"{entry['write_seconds'] + entry['index_seconds']:.1f} s, from {entry['source']['table']} "
               f"version {entry['source']['table_version']}")


@main.command()
@click.argument("db", required=False, type=click.Path(file_okay=False))
@click.option("--dim", type=POSITIVE, required=True, help="Projected dimensions per vector.")
@click.option("--dtype", type=click.Choice(["float32", "float16", "bfloat16"]), default="float16", show_default=True)
@click.option("--rows", type=POSITIVE, default=None, help="Training examples (default: the examples in DB).")
@click.option("--queries", type=POSITIVE, default=None, help="Queries (default: those in DB, else 1,000).")
@click.option("--blocks", type=POSITIVE, default=None, help="Blocks of the block-diagonal R (default: d / 1,024).")
@click.option("--format", "fmt", type=FORMATS, default="table", show_default=True)
@click.option("--model", "model_dir", type=click.Path(exists=True, file_okay=False), default=None,
              help="A model directory (config.json is enough): add the devices its featurizer needs at --dim.")
@click.option("--device-gib", type=POSITIVE_FLOAT, default=80.0, show_default=True, help="With --model: memory of one device.")
@click.option("--model-dtype", type=click.Choice(["float32", "bfloat16", "float16"]), default="bfloat16",
              show_default=True, help="With --model: the weights' dtype.")
@click.option("--max-length", type=POSITIVE, default=512, show_default=True, help="With --model: tokens per example.")
def plan(db, dim, dtype, rows, queries, blocks, fmt, model_dir, device_gib, model_dtype, max_length):
    """Bytes on disk, RAM and time of ingest, fit, scan and index before building (DB optional)."""
    from trackstar_db.verbs.scale import plan as plan_without_database  # heavy: pyarrow

    if db is None and rows is None:
        raise click.UsageError("give --rows N (or a DB holding examples)")
    settings = dict(rows=rows, queries=queries, dtype=dtype, blocks=blocks, model_dir=model_dir, device_gib=device_gib,
                    model_dtype=model_dtype, max_length=max_length)
    print_table(_open(db).plan(dim, **settings) if db is not None else plan_without_database(None, dim, **settings),
                fmt)
