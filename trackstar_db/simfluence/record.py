"""Record short training runs for Simfluence: each step's batch and every probe's loss.

Every run starts from the same model (a fresh initialisation from the testbed config's seed, or
the database's checkpoint with --init checkpoint), trains on its own random subset of the
examples in its own random order (both drawn from the run's order seed), and records after each
step the batch's example ids and the target loss of the probe queries (a fixed, deterministic
sample of the prompt0 queries). One run is appended to sim_runs, sim_steps, sim_batches and
sim_trajectories when it completes, so an interrupted recording keeps its finished runs.
"""

from __future__ import annotations

import datetime as _dt
import hashlib
import json
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from trackstar_db import defaults
from trackstar_db.errors import ParameterError, TrackstarError
from trackstar_db.models.load import open_tokenizer
from trackstar_db.option_checks import COUNT, FRACTION, NON_NEGATIVE, NON_NEGATIVE_NUMBER, POSITIVE_NUMBER, Choice, check_fields, ruled
from trackstar_db.progress import bar
from trackstar_db.store.checkpoints import source

from .data import ensure_tables


@dataclass
class RecordOptions:
    runs: int = ruled(COUNT, 8)
    steps: int = ruled(COUNT, 100)
    subset: float = ruled(FRACTION, 0.5)  # fraction of the examples each run draws
    probes: int = ruled(COUNT, 64)  # prompt0 queries whose loss is recorded (deterministic sample)
    batch_size: int = ruled(COUNT, 64)
    lr: float = ruled(POSITIVE_NUMBER, 3e-3)
    final_lr: float = ruled(NON_NEGATIVE_NUMBER, 3e-4)
    warmup: int = ruled(NON_NEGATIVE, 10)
    seed: int = ruled(NON_NEGATIVE, 0)  # order seeds are seed*100003 + run number
    init: str = ruled(Choice(("scratch", "checkpoint")), "scratch")  # 'scratch': the testbed config's initialisation
    threads: int | None = ruled(COUNT, None)

    def __post_init__(self):
        check_fields(self)


def probe_queries(db, n: int) -> pa.Table:
    """The probes: n prompt0 queries, the same for a given database (sorted by a hash of the id)."""
    rows = db.table("queries", columns=["query_id", "prompt", "target"], filter=pc.field("template") == defaults.TEMPLATE)
    if rows.num_rows == 0:
        raise TrackstarError(f"{db.path}: no prompt0 queries to probe; run 'trackstar-db ingest facts' first")
    keys = [hashlib.sha1(q.encode()).hexdigest() for q in rows.column("query_id").to_pylist()]
    order = sorted(range(rows.num_rows), key=keys.__getitem__)[:n]
    return rows.take(sorted(order, key=lambda i: rows.column("query_id")[i].as_py()))


def training_setup(db, options: RecordOptions):
    """(TrainConfig, tokenizer, init checkpoint dir or None) for the runs."""
    from trackstar_db.testbed.train import TrainConfig  # heavy: torch

    config = TrainConfig()
    model = db.manifest.get("model")
    if model is None:
        if options.init == "checkpoint":
            raise ParameterError("init", f"'checkpoint' needs a recorded model in {db.path}; run 'trackstar-db train' first")
        from trackstar_db.testbed.vocab import build_tokenizer  # heavy: transformers

        texts = db.table("examples", columns=["text"]).column("text").to_pylist()
        return config, build_tokenizer(texts, model_max_length=config.max_length), None
    info_path = Path(model["path"]) / "train_info.json"
    if info_path.is_file():  # the testbed's own checkpoint: reuse its architecture
        saved = json.loads(info_path.read_text(encoding="utf-8"))["config"]
        config = TrainConfig(**{k: v for k, v in saved.items() if k in TrainConfig.__dataclass_fields__})
    elif options.init == "scratch":
        raise TrackstarError(f"{info_path}: missing; init 'scratch' rebuilds the testbed architecture from it "
                             "(init 'checkpoint' starts from another model)")
    tokenizer = open_tokenizer(source(db))
    return config, tokenizer, (model["path"] if options.init == "checkpoint" else None)


def record_runs(db, options: RecordOptions, progress: bool | None = None) -> list[str]:
    """Record `options.runs` new runs (numbered after any already recorded); returns their ids."""
    import torch  # heavy: torch

    from trackstar_db.testbed.train import ProbeLosses, train_recorded  # heavy: torch

    with db.writer("simfluence record"):
        ensure_tables(db)
    config, tokenizer, init_dir = training_setup(db, options)
    config = replace(config, max_steps=options.steps, batch_size=options.batch_size, lr=options.lr,
                     final_lr=options.final_lr, warmup=min(options.warmup, options.steps), device="cpu",
                     threads=options.threads)
    examples = db.table("examples", columns=["example_id", "text"]).sort_by("example_id")
    ids, texts = examples.column("example_id").to_pylist(), examples.column("text").to_pylist()
    if not ids:
        raise TrackstarError(f"{db.path}: no examples; run 'trackstar-db ingest corpus' first")
    probes = probe_queries(db, options.probes)
    probe_ids = probes.column("query_id").to_pylist()
    losses_of = ProbeLosses(tokenizer, probes.column("prompt").to_pylist(), probes.column("target").to_pylist())
    existing = db.ids("sim_runs", "run_id")
    first = 1 + max([int(r.split("-")[-1]) for r in existing if r.split("-")[-1].isdigit()] or [-1])
    threads = torch.get_num_threads()
    if options.threads:
        torch.set_num_threads(options.threads)
    done = []
    try:
        for number in bar(range(first, first + options.runs), desc="simfluence runs", progress=progress):
            run_id = f"sim-{number:03d}"
            order_seed = options.seed * 100003 + number
            rng = np.random.default_rng(order_seed)
            chosen = np.sort(rng.choice(len(ids), max(1, round(options.subset * len(ids))), replace=False))
            log = _RunLog(run_id, [ids[i] for i in chosen], probe_ids, losses_of)
            train_recorded([texts[i] for i in chosen], config, tokenizer, order_seed, log, init_dir)
            parameters = {**{k: v for k, v in asdict(options).items() if k not in ("runs", "threads")},
                          "model_config": asdict(config)}
            _append(db, log, order_seed, len(chosen), options.steps, parameters)
            done.append(run_id)
    finally:
        torch.set_num_threads(threads)
    return done


class _RunLog:
    """The step callback: collects steps, batches and probe losses of one run."""

    def __init__(self, run_id, subset_ids, probe_ids, losses_of):
        self.run_id, self.subset_ids, self.probe_ids, self.losses_of = run_id, subset_ids, probe_ids, losses_of
        self.steps, self.batches, self.trajectory = [], [], []

    def __call__(self, step, indices, loss, lr, model, optimizer=None):
        if step > 0:
            self.steps.append((step, lr, loss, len(indices)))
            self.batches += [(step, self.subset_ids[i]) for i in indices]
        self.trajectory += [(step, q, v) for q, v in zip(self.probe_ids, self.losses_of(model))]


def _append(db, log: _RunLog, order_seed: int, n_examples: int, steps: int, parameters: dict) -> None:
    """One recorded run's rows, written under the writer lock (committed, so pinned reads see them)."""
    with db.writer("simfluence record"):
        _append_rows(db, log, order_seed, n_examples, steps, parameters)


def _append_rows(db, log: _RunLog, order_seed: int, n_examples: int, steps: int, parameters: dict) -> None:
    run = log.run_id
    for name in ("sim_steps", "sim_batches", "sim_trajectories"):  # rows left by a killed earlier attempt
        db.delete_rows(name, "run_id", run)
    step, lr, loss, size = zip(*log.steps)
    db.append("sim_steps", pa.table({"run_id": [run] * len(step), "step": step, "lr": lr, "train_loss": loss,
                                     "batch_size": size}))
    b_step, b_example = zip(*log.batches)
    db.append("sim_batches", pa.table({"run_id": [run] * len(b_step), "step": b_step, "example_id": b_example}))
    t_step, t_query, t_loss = zip(*log.trajectory)
    db.append("sim_trajectories", pa.table({"run_id": [run] * len(t_step), "step": t_step, "query_id": t_query,
                                            "loss": t_loss}))
    now = _dt.datetime.now(_dt.timezone.utc).replace(tzinfo=None)
    db.append("sim_runs", pa.table({"run_id": [run], "order_seed": [order_seed], "n_examples": [n_examples],
                                    "steps": [steps], "parameters": [json.dumps(parameters, sort_keys=True)],
                                    "created_at": pa.array([now], pa.timestamp("us"))}))
