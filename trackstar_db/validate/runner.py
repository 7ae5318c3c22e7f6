"""The resumable validation loop: for each subset without a validate_runs row, train its model,
measure every query's target loss, and store the subset (losses first, then its validate_runs
row: a subset is complete once its row exists). A killed or failed validate therefore keeps its
finished subsets, and the rerun trains only the missing ones.
"""

from __future__ import annotations

import datetime as _dt
import json
import shutil
import tempfile
import time
from pathlib import Path

import pyarrow as pa
import pyarrow.compute as pc

from trackstar_db import faults
from trackstar_db.errors import ParameterError, TrackstarError
from trackstar_db.models.load import open_model
from trackstar_db.models.source import ModelSource
from trackstar_db.store.schema import arrow_schema

from .options import ValidateOptions, draw_subset
from .trainers import make_trainer

TABLES = ("validate_runs", "validate_losses", "validate_predictions")


def ensure_tables(db) -> None:
    """Create the validate_* tables (schema/validate_*.json) where an older database lacks them."""
    for name in TABLES:
        if not db.has_table(name):
            with db.writer("validate: create tables"):
                db.create_table(name, arrow_schema(name))


def _queries(db, template: str) -> pa.Table:
    rows = db.table("queries", columns=["query_id", "prompt", "target", "template"])
    if template != "all":
        rows = rows.filter(pc.equal(rows.column("template"), template))
    if rows.num_rows == 0:
        raise TrackstarError(f"{db.path}: no {template if template != 'all' else ''} queries to validate on; "
                             "run 'trackstar-db ingest facts' first (or pick another template)")
    return rows.sort_by("query_id")


def completed(db, name: str) -> dict[int, dict]:
    """subset -> its validate_runs row, for the subsets of validation `name` already stored."""
    if not db.has_table("validate_runs") or db.count("validate_runs") == 0:
        return {}
    rows = db.table("validate_runs", columns=["subset", "parameters"], filter=pc.field("validation") == name)
    return {r["subset"]: r for r in rows.to_pylist()}


def _check_same(done: dict[int, dict], parameters: dict, name: str) -> None:
    for subset, row in done.items():
        stored = json.loads(row["parameters"])
        if stored.get("identity") != parameters["identity"] or stored.get("queries") != parameters["queries"]:
            changed = sorted(k for k in set(stored.get("identity", {})) | set(parameters["identity"])
                             if stored.get("identity", {}).get(k) != parameters["identity"].get(k))
            what = ", ".join(changed) if changed else "the query set"
            raise ParameterError("name", f"{name!r}: that validation was made with other settings ({what} differ, "
                                         f"subset {subset}); rerun with the same settings to resume it, or give a new "
                                         "name", others=("name",))


def run_validation(db, options: ValidateOptions, progress: bool | None = None) -> list[int]:
    """Train and measure every subset 0..models-1 of validation `options.name` that is not stored
    yet; returns the subsets trained now. progress: a bar (None: only when stderr is a terminal)."""
    import torch  # heavy: torch
    from tqdm.auto import tqdm  # heavy: tqdm

    from trackstar_db.testbed.train import ProbeLosses  # heavy: torch

    examples = db.table("examples", columns=["example_id", "text"]).sort_by("example_id")
    if examples.num_rows < 2:
        raise TrackstarError(f"{db.path}: validate needs at least two training examples; run 'trackstar-db ingest corpus'")
    ids, texts = examples.column("example_id").to_pylist(), examples.column("text").to_pylist()
    queries = _queries(db, options.template)
    query_ids = queries.column("query_id").to_pylist()
    ensure_tables(db)
    trainer = make_trainer(db, options, len(draw_subset(len(ids), options.fraction, options.seed, 0)))
    parameters = {"identity": {**options.identity(), "trainer": trainer.parameters(), "n_corpus": len(ids)},
                  "queries": len(query_ids)}
    done = completed(db, options.name)
    _check_same(done, parameters, options.name)
    todo = [j for j in range(options.models) if j not in done]
    if not todo:
        return []
    losses_of = ProbeLosses(trainer.tokenizer, queries.column("prompt").to_pylist(),
                            queries.column("target").to_pylist(), device=options.device)
    parameters = dict(parameters, attributed_loss=attributed_loss(db, losses_of, options.device))
    keep_root = db.path / "validate" / options.name
    threads = torch.get_num_threads()
    if options.threads:
        torch.set_num_threads(options.threads)
    trained = []
    try:
        with tempfile.TemporaryDirectory(prefix="trackstar-validate-") as scratch:
            for subset in tqdm(todo, desc=f"validate {options.name}", unit="model",
                               disable=None if progress is None else not progress):
                started = time.perf_counter()
                chosen = draw_subset(len(ids), options.fraction, options.seed, subset)
                out = (keep_root if options.keep_models else Path(scratch)) / f"subset-{subset:04d}"
                if out.exists():
                    shutil.rmtree(out)
                model, _ = trainer([texts[i] for i in chosen], out, [ids[i] for i in chosen])
                losses = losses_of(model)
                del model
                if not options.keep_models:
                    shutil.rmtree(out, ignore_errors=True)
                _store(db, options, subset, [ids[i] for i in chosen], trainer.name, parameters, query_ids, losses,
                       time.perf_counter() - started)
                trained.append(subset)
                faults.point("validate.subset_stored")
    finally:
        torch.set_num_threads(threads)
    return trained


def attributed_loss(db, losses_of, device: str) -> float | None:
    """Mean target loss of the validation's queries under the database's own (attributed) model,
    the figure the retrained models' losses are compared with (None without a loadable model)."""
    entry = db.manifest.get("model")
    if entry is None:
        return None
    model, _ = open_model(ModelSource.from_entry(entry), device)
    losses = losses_of(model)
    return float(sum(losses) / len(losses)) if losses else None


def loss_summary(db, name: str) -> dict:
    """{'retrained': mean target loss over the validation's retrained models and queries,
    'attributed': the attributed model's mean over the same queries (None where not recorded),
    'subsets': retrained models}: says whether the retrained models stand for the attributed one."""
    if not completed(db, name):
        return {"retrained": None, "attributed": None, "subsets": 0}
    losses = db.table("validate_losses", columns=["loss"], filter=pc.field("validation") == name).column("loss")
    rows = db.table("validate_runs", columns=["parameters", "created_at"], filter=pc.field("validation") == name)
    attributed = [json.loads(p).get("attributed_loss") for p in rows.sort_by("created_at").column("parameters").to_pylist()]
    attributed = [a for a in attributed if a is not None]
    return {"retrained": float(pc.mean(losses).as_py()), "attributed": attributed[-1] if attributed else None,
            "subsets": rows.num_rows}


def _store(db, options: ValidateOptions, subset: int, members: list[str], trainer: str, parameters: dict,
           query_ids: list[str], losses: list[float], seconds: float) -> None:
    bad = [q for q, v in zip(query_ids, losses) if v != v or v in (float("inf"), float("-inf"))]
    if bad:
        raise TrackstarError(f"validate: subset {subset}'s model gives a non-finite loss on query {bad[0]!r} "
                             "(diverged training?); nothing stored for it")
    now = _dt.datetime.now(_dt.timezone.utc).replace(tzinfo=None)
    with db.writer(f"validate {options.name} subset {subset}"):
        # rows a killed attempt left between its two appends (losses stored, run row not)
        db.lance_table("validate_losses").delete(
            f"validation = '{options.name}' AND subset = {int(subset)}")
        db.append("validate_losses", pa.table({"validation": [options.name] * len(query_ids),
                                               "subset": pa.array([subset] * len(query_ids), pa.int32()),
                                               "query_id": query_ids, "loss": losses}))
        faults.point("validate.losses_stored")
        db.append("validate_runs", pa.table({
            "validation": [options.name], "subset": pa.array([subset], pa.int32()),
            "seed": [options.seed], "fraction": [options.fraction], "n_examples": pa.array([len(members)], pa.int32()),
            "examples": pa.array([members], pa.list_(pa.string())), "trainer": [trainer],
            "parameters": [json.dumps(parameters, sort_keys=True)], "train_seconds": [seconds],
            "created_at": pa.array([now], pa.timestamp("us"))}))
