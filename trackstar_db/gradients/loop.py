"""The featurize loop, one for every ingest engine: planned chunks in, rows out to a sink.

    planned_chunks   the ids of a split (in a shard) that the tables lack, encoded, in chunks
    run_batches      both for one run (gradients/setup.FeaturizeRun) and job: what the local
                     worker and the Ray actor call
    featurize_chunks token-budget batches (pipeline.make_batches), tokenized ahead on a thread
                     (pipeline.ahead) when pipelined, through the featurizer, handed to
                     `sink.add(ids, FeaturizeOutput)` behind the model (pipeline.Writer), then
                     `sink.flush()` once the last batch is in

The sink decides where rows go: gradients/commit.Committer appends to the local tables, the Ray
actor's FragmentWriter (distributed/ingest.py) writes Lance fragments for its driver to commit.
Anything with `featurize(tensors, non_blocking)` can stand for the featurizer.
"""

from __future__ import annotations

from typing import Iterable, Iterator, Protocol

from trackstar_db.featurizer.task import DEFAULT as DEFAULT_TASK
from trackstar_db.featurizer.task import Task
from trackstar_db.featurizer.tokenize import pad_id

from .pipeline import Batch, Writer, ahead, make_batches


class Sink(Protocol):
    def add(self, ids: list[str], out) -> None: ...

    def flush(self) -> None: ...


def encode_rows(tokenizer, split: str, chunk, max_length: int, task: Task = DEFAULT_TASK) -> list:
    """The encodings of a chunk of the examples ('train': text, and its loss_spans column when
    plan.missing carries one) or queries (prompt, target) table, under `task` (featurizer/task.py)."""
    if split == "train":
        texts = chunk.column("text").to_pylist()
        spans = chunk.column("loss_spans").to_pylist() if "loss_spans" in chunk.column_names else [None] * len(texts)
        return [task.encode_example(tokenizer, text, span, max_length) for text, span in zip(texts, spans)]
    return [task.encode_query(tokenizer, p, t, max_length)
            for p, t in zip(chunk.column("prompt").to_pylist(), chunk.column("target").to_pylist())]


def planned_chunks(db, split: str, tables: list, shard: tuple[int, int], tokenizer, max_length: int,
                   limit: int | None = None, task: Task = DEFAULT_TASK):
    """(ids, encoded items) of every chunk of the plan (gradients/plan.missing), up to `limit` rows."""
    from .plan import missing  # heavy: pyarrow

    produced = 0
    for chunk in missing(db, split, tables, shard):
        if limit is not None:
            chunk = chunk.slice(0, limit - produced)
        produced += chunk.num_rows
        yield chunk.column("id").to_pylist(), encode_rows(tokenizer, split, chunk, max_length, task)
        if limit is not None and produced >= limit:
            return


def featurize_chunks(featurizer, chunks: Iterable, sink: Sink, *, pad: int, batch_tokens: int | None,
                     batch_size: int, pipeline: bool = True, queue_depth: int = 4, steps=None) -> Iterator[Batch]:
    """Featurize every chunk into `sink`; yields each Batch once it is on its way to the sink
    (written behind the model when `pipeline`, at once otherwise). The sink is flushed after
    the last batch; an error stops the tokenizer thread and the writer. `steps`: batches ->
    batches on the featurizing thread (sharded.ShardedModel.lockstep keeps ranks in step)."""
    pin = pipeline and getattr(getattr(featurizer, "device", None), "type", "cpu") == "cuda"
    batches = make_batches(chunks, batch_tokens, batch_size, pad, pin=pin)
    if pipeline:
        batches = ahead(batches, queue_depth)
    if steps is not None:
        batches = steps(batches)
    try:
        with Writer(lambda ids, out: sink.add(ids, out.wait()), queue_depth, threaded=pipeline) as writer:
            for batch in batches:
                writer.put(batch.ids, featurizer.featurize(batch.tensors, non_blocking=pipeline))
                yield batch
    finally:
        batches.close()  # stops the tokenizer thread (and the plan's DuckDB scan) on an error too
    sink.flush()


def run_batches(db, run, job, tables: dict, sink: Sink, shard: tuple[int, int] | None = None) -> Iterator[Batch]:
    """featurize_chunks over the plan of `job` (its split, `shard` or job.shard, job.limit) for
    `run` (featurizer, tokenizer, max_length, batch_tokens) into `sink`."""
    chunks = planned_chunks(db, job.split, list(tables.values()), shard or job.shard, run.tokenizer, run.max_length,
                            job.limit, getattr(run.featurizer, "task", DEFAULT_TASK))
    sharded = getattr(job, "sharded", None)  # every rank featurizes in step (FSDP gathers)
    steps = (lambda batches: sharded.lockstep(batches, run.featurizer)) if sharded is not None else None
    return featurize_chunks(run.featurizer, chunks, sink, pad=pad_id(run.tokenizer), batch_tokens=run.batch_tokens,
                            batch_size=job.batch_size, pipeline=job.pipeline, queue_depth=job.queue_depth, steps=steps)
