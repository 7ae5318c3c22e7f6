"""Every example's score for the validated queries, so the LDS does not depend on a run's k.

A stored run keeps only its top k (and bottom k) per query; summing those over a subset counts
every other example as 0, so its LDS changes with k. Here validate asks the run's method itself,
through the registry and its runner (retrieval/runners.py, the scoring path of stored runs and
one-prompt queries alike), for the score of every training example against each validated
query, sums them over each retrained subset and stores those predictions
(`validate_predictions`, one row per run, validation, query and subset), stamped with the run's
created_at so a run replaced since is not scored from stale rows (queries/lds_per_query.sql then
falls back to the stored top-k and marks it partial).

A second stage (`SecondStage`: e.g. a rerank through Kronecker factors) re-scores each query's
top `candidates` of the first stage (None: every example) with its own function
score(db, query_ids, example_ids_per_query) -> one float array per query. Its predictions are
stored as run "RUN+NAME" with n_scored = the examples it re-scored per query (the others count
0), so an LDS over fewer than every example says so (`partial`).

Memory: [queries, examples] float64 scores, computed QUERY_CHUNK_CELLS at a time.
"""

from __future__ import annotations

import datetime as _dt
import json
from dataclasses import dataclass
from typing import Callable, Sequence

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from trackstar_db.errors import TrackstarError
from .runner import ensure_tables
from trackstar_db.ladder import REGISTRY, lookup

QUERY_CHUNK_CELLS = 1 << 22  # query x example scores held at once by one runner call


@dataclass(frozen=True)
class SecondStage:
    """A scorer run after a method's scan: score(db, query_ids, example_ids) with example_ids one
    list per query returns one array of scores per query (same order). candidates: how many of
    each query's top first-stage examples it re-scores (None: every example); runs: the run ids
    it applies to (None: every run of a gradient method)."""

    name: str
    score: Callable[..., Sequence[np.ndarray]]
    candidates: int | None = None
    runs: tuple[str, ...] | None = None

    def applies_to(self, run_id: str, method: str) -> bool:
        if self.runs is not None:
            return run_id in self.runs
        entry = REGISTRY.get(method)
        return entry is not None and entry.spec is not None


@dataclass
class FullScores:
    """scores [nq, n] of every example (example_ids, sorted) for query_ids; n_scored [nq]: examples
    the final stage scored (the rest are 0); stage: what scored them."""

    query_ids: list[str]
    example_ids: list[str]
    scores: np.ndarray
    n_scored: np.ndarray
    stage: str

    def predictions(self, members: np.ndarray) -> np.ndarray:
        """[nq, M] summed scores of each subset's examples (members [M, n] bool over example_ids)."""
        return self.scores @ members.T.astype(np.float64)


def example_ids(db) -> list[str]:
    return sorted(db.table("examples", columns=["example_id"]).column("example_id").to_pylist())


def score_every_example(db, method: str, query_ids: list[str], texts: list[str], *, device: str = "cpu",
                        examples: list[str] | None = None) -> FullScores:
    """Every example's score under `method` for `query_ids` (texts: what the text methods search
    with), from the method's runner with k = every example (and a second-stage method, kfac /
    ekfac, with every example its candidate: their exact scores, not the first stage's top N);
    examples it does not return (BM25: no shared word) score 0, which is their score."""
    from trackstar_db.retrieval import runners  # heavy: torch

    entry = lookup(method)
    examples = examples if examples is not None else example_ids(db)
    column = {e: i for i, e in enumerate(examples)}
    scores = np.zeros((len(query_ids), len(examples)), np.float64)
    chunk = max(1, QUERY_CHUNK_CELLS // max(1, len(examples)))
    pairs = _pairs(db, query_ids)  # what a second-stage method featurizes
    for a in range(0, len(query_ids), chunk):
        request = runners.Request(query_ids[a: a + chunk], texts[a: a + chunk], len(examples), device,
                                  pairs=pairs[a: a + chunk], candidates=len(examples))
        result = runners.run(db, entry, request)
        for row, (ids, values) in enumerate(zip(result.proponent_ids, result.proponent_scores)):
            where = [column.get(e, -1) for e in ids]
            keep = [i for i, c in enumerate(where) if c >= 0]
            scores[a + row, [where[i] for i in keep]] = np.asarray(values[: len(ids)], np.float64)[keep]
    return FullScores(list(query_ids), examples, scores, np.full(len(query_ids), len(examples)), method)


def rescore(first: FullScores, db, stage: SecondStage) -> FullScores:
    """`stage` applied to each query's top `stage.candidates` of `first` (every example when None);
    the examples it did not re-score count 0."""
    n = len(first.example_ids)
    take = n if stage.candidates is None else min(stage.candidates, n)
    order = np.argsort(-first.scores, axis=1, kind="stable")[:, :take]
    chosen = [[first.example_ids[i] for i in row] for row in order]
    new = stage.score(db, first.query_ids, chosen)
    if len(new) != len(first.query_ids):
        raise TrackstarError(f"second stage {stage.name}: {len(new)} score rows for {len(first.query_ids)} queries")
    scores = np.zeros_like(first.scores)
    for row, (columns, values) in enumerate(zip(order, new)):
        values = np.asarray(values, np.float64)
        if values.shape != (len(columns),) or not np.isfinite(values).all():
            raise TrackstarError(f"second stage {stage.name}: query {first.query_ids[row]!r} got "
                                 f"{values.shape[0] if values.ndim else 0} scores for {len(columns)} examples, "
                                 "or a non-finite one")
        scores[row, columns] = values
    return FullScores(first.query_ids, first.example_ids, scores, np.full(len(first.query_ids), take),
                      f"{first.stage}+{stage.name}")


def _members(db, validation: str, examples: list[str]) -> tuple[list[int], np.ndarray]:
    rows = db.table("validate_runs", columns=["subset", "examples"],
                    filter=pc.field("validation") == validation).sort_by("subset")
    column = {e: i for i, e in enumerate(examples)}
    members = np.zeros((rows.num_rows, len(examples)), bool)
    for j, chosen in enumerate(rows.column("examples").to_pylist()):
        members[j, [column[e] for e in chosen if e in column]] = True
    return rows.column("subset").to_pylist(), members


def _stored(db, validation: str) -> dict[str, tuple]:
    """run_id -> (source run's created_at, subsets) of the predictions stored for `validation`."""
    if not db.has_table("validate_predictions") or db.count("validate_predictions") == 0:
        return {}
    rows = db.table("validate_predictions", columns=["run_id", "run_created_at", "subset"],
                    filter=pc.field("validation") == validation)
    out: dict[str, tuple] = {}
    for run, created, subset in zip(*(rows.column(c).to_pylist() for c in ("run_id", "run_created_at", "subset"))):
        seen = out.setdefault(run, (created, set()))
        seen[1].add(subset)
    return out


def _pairs(db, query_ids: list[str]) -> list[tuple[str, str]]:
    """(prompt, target) of each query, in the order of `query_ids`."""
    rows = db.table("queries", columns=["query_id", "prompt", "target"], filter=pc.field("query_id").isin(query_ids))
    of = {q: (p, t) for q, p, t in zip(*(rows.column(c).to_pylist() for c in ("query_id", "prompt", "target")))}
    return [of[q] for q in query_ids]


def _texts(db, run_parameters: str, query_ids: list[str]) -> list[str]:
    from trackstar_db.retrieval.runs import _query_texts  # heavy: torch

    mode = json.loads(run_parameters or "{}").get("query_text", "prompt+target")
    rows = db.table("queries", columns=["query_id", "prompt", "target"], filter=pc.field("query_id").isin(query_ids))
    position = {q: i for i, q in enumerate(rows.column("query_id").to_pylist())}
    return _query_texts(rows.take([position[q] for q in query_ids]), mode)


def refit_since(db, method: str, run_parameters: str) -> bool:
    """True when `method` uses an R refitted since the run was retrieved (its stored top-k then
    describes another R than the one validate would score with)."""
    entry = REGISTRY.get(method)
    if entry is None or entry.spec is None or entry.spec.preconditioner is None:
        return False
    key = db.gradient_table("train", corrected=entry.spec.table == "corrected").preconditioner_key(
        entry.spec.preconditioner)
    then = (json.loads(run_parameters or "{}").get("preconditioners") or {}).get(key, {}).get("sha256")
    now = (db.manifest.get("preconditioners") or {}).get(key, {}).get("sha256")
    return then != now


def score_runs(db, validation: str, *, device: str = "cpu", second_stage: SecondStage | None = None,
               report: Callable[[str], None] | None = None) -> list[str]:
    """Store predictions over every example for each retrieval run (and, with `second_stage`, each
    run it applies to re-scored) whose stored ones are missing, stale or miss a subset; returns
    the run ids scored now. A run whose method cannot score here (not in the registry, its extra
    or tables missing) keeps its stored top-k LDS, marked partial, and `report` says why."""
    examples = example_ids(db)
    subsets, members = _members(db, validation, examples)
    if not subsets:
        return []
    validated = set(db.table("validate_losses", columns=["query_id"],
                             filter=pc.field("validation") == validation).column("query_id").to_pylist())
    stored = _stored(db, validation)
    runs = db.table("runs", columns=["run_id", "method", "parameters", "created_at"])
    scored = []
    for run_id, method, parameters, created in zip(*(runs.column(c).to_pylist()
                                                     for c in ("run_id", "method", "parameters", "created_at"))):
        targets = [(run_id, None)]
        if second_stage is not None and second_stage.applies_to(run_id, method):
            targets.append((f"{run_id}+{second_stage.name}", second_stage))
        todo = [(name, stage) for name, stage in targets
                if stored.get(name, (None, set()))[0] != created or not set(subsets) <= stored[name][1]]
        if not todo:
            continue
        query_ids = sorted(validated & set(db.table("retrievals", columns=["query_id"], filter=pc.field("run_id") == run_id)
                                           .column("query_id").unique().to_pylist()))
        if not query_ids:
            continue
        if refit_since(db, method, parameters):
            if report is not None:
                report(f"run {run_id}: R was refitted since it was retrieved; LDS from its stored top-k only "
                       f"(partial): retrieve it again to score every example")
            continue
        try:
            first = score_every_example(db, method, query_ids, _texts(db, parameters, query_ids), device=device,
                                        examples=examples)
        except TrackstarError as exc:
            if report is not None:
                report(f"run {run_id}: LDS from its stored top-k only (partial): {str(exc).splitlines()[0]}")
            continue
        for name, stage in todo:
            full = first if stage is None else rescore(first, db, stage)
            ensure_tables(db)
            _store(db, validation, name, run_id, method if stage is None else f"{method}+{stage.name}", created,
                   full, subsets, members)
            scored.append(name)
    return scored


def _store(db, validation: str, run_id: str, source: str, method: str, created, full: FullScores,
           subsets: list[int], members: np.ndarray) -> None:
    predicted = full.predictions(members)  # [nq, M]
    nq, m = predicted.shape
    table = pa.table({
        "validation": [validation] * (nq * m), "run_id": [run_id] * (nq * m), "source_run_id": [source] * (nq * m),
        "method": [method] * (nq * m), "query_id": np.repeat(full.query_ids, m).tolist(),
        "subset": pa.array(np.tile(subsets, nq), pa.int32()), "prediction": predicted.ravel(),
        "n_scored": pa.array(np.repeat(full.n_scored, m), pa.int64()),
        "n_examples": pa.array([len(full.example_ids)] * (nq * m), pa.int64()),
        "run_created_at": pa.array([created] * (nq * m), pa.timestamp("us")),
        "scored_at": pa.array([_dt.datetime.now(_dt.timezone.utc).replace(tzinfo=None)] * (nq * m), pa.timestamp("us"))})
    quoted = run_id.replace("'", "''")
    with db.writer(f"validate {validation}: predictions of {run_id}"):
        db.lance_table("validate_predictions").delete(f"validation = '{validation}' AND run_id = '{quoted}'")
        db.append("validate_predictions", table)
