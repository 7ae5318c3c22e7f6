"""Ingest gradients on Ray: actors featurize shards, write Lance fragments; the driver commits.

    driver                                    actor i of N (one per GPU, or per CPU without)
    ------                                    --------------------------------------------
    actor 0: record settings, create tables   open the run (gradients/setup.py: the model
                                              source, featurizer, token budget), as the local
                                              worker does
    ask every actor for its next batch   -->  plan: ids of shard i/N that a table lacks
                                              (gradients/plan.py: crc32(id) % N == i)
                                              the local worker's loop (gradients/loop.py: token
                                              budget, tokenizing ahead, writing behind) into a
                                              FragmentWriter sink: buffer `commit_rows` rows,
                                              drop ids a table already holds, write them as
                                              Lance fragments (lance.fragment.write_fragments)
    commit each batch's fragments        <--  fragment metadata (JSON), per table
    (LanceDataset.commit(LanceOperation.Append))

Lance's own distributed write path: workers write data files, one process commits them, so no
two processes race on a table's manifest. Resumable like the local worker: a batch is in a table
only once its Append commit lands; fragments of a killed worker (or of a killed driver) that
were never committed are unreferenced files, and a rerun of the same command plans only the ids
still missing, so no id is featurized twice into a table. A worker that dies is reported after
the other workers finish their shards.
"""

from __future__ import annotations

import json
import os
import threading
import time

import pyarrow as pa
import torch

from trackstar_db import faults
from trackstar_db.devices import resolve_device
from trackstar_db.errors import ParameterError, TrackstarError
from trackstar_db.gradients.commit import Committer, absent
from trackstar_db.gradients.plan import count_missing
from trackstar_db.store import manifest as _manifest, schema as _schema
from trackstar_db.store.database import Store
from trackstar_db.store.gradient_table import GradientTable

from . import cluster_cpus, ray_session


class FragmentWriter(Committer):
    """gradients/commit.Committer whose flush writes Lance fragments instead of appending:
    `ready` collects (variant, [fragment metadata JSON], rows) for the driver to commit; the
    loop's writer thread adds to it, the actor's thread takes from it."""

    def __init__(self, db, tables: dict, dtype: str, commit_rows: int, storage_options: dict | None = None):
        super().__init__(db, tables, dtype, commit_rows)
        self.storage_options = storage_options
        self.ready: list[tuple[str, list[str], int]] = []
        self._lock = threading.Lock()

    def flush(self) -> None:
        import lance.fragment  # heavy: lance

        written = []  # every table's fragments of this flush, published together
        for variant, parts in self.pending.items():
            if not parts:
                continue
            dataset = self.tables[variant].dataset()
            rows = absent(self.tables[variant], pa.concat_tables(parts))
            parts.clear()
            if rows.num_rows:
                rows = _schema.conform(rows, dataset.schema)
                fragments = lance.fragment.write_fragments(rows, dataset.uri, schema=dataset.schema,
                                                           storage_options=self.storage_options)
                written.append((variant, [json.dumps(f.to_json()) for f in fragments], rows.num_rows))
        faults.point("distributed.fragments")
        with self._lock:  # the actor's take() sees all of a flush or none of it
            self.ready.extend(written)
        self.rows = 0

    def take(self) -> list:
        with self._lock:
            ready, self.ready = self.ready, []
        return ready


class GradientActor:
    """One Ray actor: featurizes shard (index, count) of the ids missing from the tables, with
    the local worker's setup (gradients/setup.py) and loop (gradients/loop.py)."""

    def __init__(self, db_path: str, config: dict, job, device: str, shard: tuple[int, int],
                 storage_options: dict | None = None):
        from trackstar_db.featurizer.config import FeaturizerConfig  # heavy: transformers
        from trackstar_db.gradients.setup import open_run  # heavy: transformers

        if not device.startswith("cuda"):
            torch.set_num_threads(1)  # one core per CPU actor
        self.db_path, self.job, self.shard, self.storage_options = db_path, job, shard, storage_options
        self.run = open_run(Store.open(db_path), FeaturizerConfig.from_dict(config), job, resolve_device(device))
        self.batches = None

    def setup(self) -> list[str]:
        """Record (or check) the featurizer settings and create the tables; on one actor only."""
        from trackstar_db.gradients.setup import create_tables, record_settings  # heavy: transformers

        db = Store.open(self.db_path)
        record_settings(db, self.run, self.job)
        return list(create_tables(db, self.run, self.job))

    def start(self) -> None:
        self.batches = self._batches()

    def next(self):
        """The next committed-to-be batch: {'fragments': [(variant, [json], rows)], 'rows', 'tokens'};
        None when the shard is done."""
        return next(self.batches, None)

    def _batches(self):
        from trackstar_db.gradients.loop import run_batches  # heavy: transformers
        from trackstar_db.gradients.setup import run_tables  # heavy: transformers

        db, job, run = Store.open(self.db_path), self.job, self.run
        tables = run_tables(db, run, job.split)  # created by setup()
        writer = FragmentWriter(db, tables, job.dtype, job.commit_rows, self.storage_options)
        rows = tokens = 0
        for batch in run_batches(db, run, job, tables, writer, self.shard):
            rows, tokens = rows + batch.rows, tokens + batch.tokens
            ready = writer.take()
            if ready:
                yield {"fragments": ready, "rows": rows, "tokens": tokens}
                rows = tokens = 0
        ready = writer.take()  # the loop has flushed the writer
        if ready or rows:
            yield {"fragments": ready, "rows": rows, "tokens": tokens}


def _commit(tables: dict, fragments: list, storage_options: dict | None) -> None:
    """One Append commit per table (variant -> GradientTable) of the fragments a worker wrote
    (corrected first, like the local Committer, so a rerun after a kill between the two re-plans the id)."""
    import lance  # heavy: lance
    from lance.fragment import FragmentMetadata  # heavy: lance

    for variant, metadata, _ in fragments:
        dataset = tables[variant].dataset()
        operation = lance.LanceOperation.Append([FragmentMetadata.from_json(m) for m in metadata])
        lance.LanceDataset.commit(dataset.uri, operation, read_version=dataset.version,
                                  storage_options=storage_options)


def ingest_gradients(db, config, job, *, device: str | None = None, workers: int | None = None,
                     progress: bool = True, storage_options: dict | None = None) -> dict:
    """gradients.worker.ingest_gradients on Ray actors. `device`: what each actor uses ('cuda':
    one actor per GPU of the cluster; default job.device); `workers`: the number of actors."""
    from tqdm.auto import tqdm  # heavy: tqdm

    from trackstar_db.featurizer.config import FeaturizerConfig  # heavy: transformers
    from trackstar_db.gradients.loader import resolved_config  # heavy: transformers
    from trackstar_db.gradients.setup import checkpoint_name  # heavy: transformers

    if job.limit is not None or job.shard != (0, 1):
        raise ParameterError("engine", "'ray' plans its own shards; drop limit and shard", others=("limit", "shard"))
    ray = ray_session()
    device = device or job.device
    config = config if isinstance(config, FeaturizerConfig) else resolved_config(db, config)
    checkpoint = checkpoint_name(db, job)  # attached here, once: the actors find it recorded
    gpus = device.startswith("cuda") or (device == "auto" and ray.cluster_resources().get("GPU", 0) > 0)
    count = workers or (int(ray.cluster_resources().get("GPU", 0)) if gpus else cluster_cpus(ray))
    if count < 1:
        raise ParameterError("device", f"{device}: the Ray cluster has no GPU")
    env = {"TRACKSTAR_FAULT": os.environ["TRACKSTAR_FAULT"]} if os.environ.get("TRACKSTAR_FAULT") else {}
    actor_class = ray.remote(num_gpus=1 if gpus else 0, num_cpus=0 if gpus else 1, max_restarts=0)(GradientActor)
    options = {"runtime_env": {"env_vars": env}} if env else {}
    actors = [actor_class.options(**options).remote(str(db.path), config.to_dict(), job, device, (i, count),
                                                     storage_options) for i in range(count)]
    start = time.perf_counter()
    try:
        variants = ray.get(actors[0].setup.remote())
        db.manifest = _manifest.read(db.path)  # what actor 0 recorded, for the caller's handle too
        tables = {v: GradientTable(db, job.split, v, checkpoint) for v in variants}
        total = count_missing(db, job.split, list(tables.values())) if progress else None
        ray.get([actor.start.remote() for actor in actors])
        totals, failures = {"rows": 0, "tokens": 0}, []
        pending = {actor.next.remote(): actor for actor in actors}
        with tqdm(total=total, desc=f"gradients {job.split} (ray x{count})", unit=" ex", disable=not progress) as bar:
            while pending:
                (ref,), _ = ray.wait(list(pending), num_returns=1)
                actor = pending.pop(ref)
                try:
                    batch = ray.get(ref)
                except ray.exceptions.RayActorError as exc:
                    failures.append(str(exc).strip().splitlines()[0])
                    continue
                except ray.exceptions.RayTaskError as exc:
                    cause = getattr(exc, "cause", None) or exc
                    raise TrackstarError(f"Ray worker: {str(cause).strip().splitlines()[0]}") from None
                if batch is None:
                    continue
                _commit(tables, batch["fragments"], storage_options)
                totals["rows"] += batch["rows"]
                totals["tokens"] += batch["tokens"]
                bar.update(batch["rows"])
                pending[actor.next.remote()] = actor
    finally:
        for actor in actors:
            ray.kill(actor)
    if failures:
        raise TrackstarError(f"{len(failures)} of {count} Ray workers died ({failures[0]}); "
                             f"{totals['rows']:,} rows were committed; run the same command again for the rest")
    if totals["rows"]:
        for table in tables.values():  # merge the many small fragments, as an unsharded local run does
            db.lance_table(table.name).optimize()
    totals["seconds"] = time.perf_counter() - start
    totals["tables"] = {table.name: table.count() for table in tables.values()}
    return totals
