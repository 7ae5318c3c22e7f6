"""validate's LDS over every example: the same for a run retrieved with k = 10 as with k = every
example; its stored predictions equal subset sums of brute-force scores from the stored vectors;
a second stage re-scores candidates and says how many; a replaced run is not scored from stale rows."""

import numpy as np
import pytest
from databases import copy_db

from trackstar_db.featurizer.config import FeaturizerConfig
from trackstar_db.gradients.fit import fit
from trackstar_db.gradients.worker import GradientJob, ingest_gradients
from trackstar_db.retrieval.runs import RetrieveOptions, retrieve
from trackstar_db.store.vectors import to_torch
from trackstar_db.validate.lds import lds_table
from trackstar_db.validate.scores import SecondStage

MODELS = 4


@pytest.fixture(scope="module")
def validated(tmp_path_factory, tiny_db_template):
    """The tiny database with gradients, R and a 4-model validation (2 steps each, cheap)."""
    root = tmp_path_factory.mktemp("validate-scores")
    db = copy_db(tiny_db_template, root)
    for split in ("train", "queries"):
        ingest_gradients(db, FeaturizerConfig(dim=1024, correction="adam-factored"), GradientJob(split, batch_size=32),
                         progress=False)
    fit(db)
    db.validate(models=MODELS, steps=2, bootstrap=10)
    return root


@pytest.fixture
def db(validated, tmp_path):
    return copy_db(validated, tmp_path)


def _rows(table, run):
    return {r["run_id"]: r for r in table.to_pylist()}[run]


@pytest.mark.parametrize("method", ["grad-dot", "trackstar", "bm25"])
def test_lds_of_k10_equals_lds_of_every_example(db, method):
    n = db.count("examples")
    retrieve(db, method, RetrieveOptions(k=10), run_id="small")
    retrieve(db, method, RetrieveOptions(k=n), run_id="whole")
    before = lds_table(db, "lds", bootstrap=10)  # not yet scored: the top-10 run's LDS is partial
    assert _rows(before, "small")["partial"] and _rows(before, "small")["n_scored"] < n
    after = db.validate(models=MODELS, steps=2, bootstrap=10)  # nothing to train: scores both runs
    small, whole = _rows(after, "small"), _rows(after, "whole")
    assert small["lds"] == pytest.approx(whole["lds"], abs=1e-12)
    assert not small["partial"] and small["n_scored"] == whole["n_scored"] == n
    assert small["n_queries"] == whole["n_queries"] > 0
    summary = {r["run_id"]: r for r in db.evaluate().to_pylist()}
    assert summary["small"]["lds"] == pytest.approx(summary["whole"]["lds"]) and summary["small"]["lds_partial"] is False


def test_predictions_are_subset_sums_of_brute_force_scores(db):
    """grad-dot's predictions against members @ (G g_q) computed from the whole stored tables."""
    retrieve(db, "grad-dot", RetrieveOptions(k=3), run_id="dot")
    db.validate(models=MODELS, steps=2, bootstrap=10)
    name = "grads_{}_uncorrected"
    train = db.table(name.format("train"), columns=["id", "vector"])
    queries = db.table(name.format("queries"), columns=["id", "vector"])
    dtype = db.manifest["gradient_tables"][name.format("train")]["dtype"]
    g = to_torch(train.column("vector"), dtype).double().numpy()
    q = to_torch(queries.column("vector"), dtype).double().numpy()
    scores = dict(zip(queries.column("id").to_pylist(), q @ g.T))  # query -> [n] in train order
    column = {e: i for i, e in enumerate(train.column("id").to_pylist())}
    members = {r["subset"]: [column[e] for e in r["examples"]] for r in db.table("validate_runs").to_pylist()}
    rows = [r for r in db.table("validate_predictions").to_pylist() if r["run_id"] == "dot"]
    assert len(rows) == MODELS * len({r["query_id"] for r in rows}) > 0
    for r in rows:
        expected = scores[r["query_id"]][members[r["subset"]]].sum()
        assert r["prediction"] == pytest.approx(expected, rel=1e-4, abs=1e-4 * np.abs(scores[r["query_id"]]).sum())


def test_a_replaced_run_is_rescored_not_read_from_stale_rows(db):
    retrieve(db, "grad-dot", RetrieveOptions(k=5), run_id="run")
    db.validate(models=MODELS, steps=2, bootstrap=10)
    first = _rows(lds_table(db, "lds", bootstrap=10), "run")
    retrieve(db, "grad-cos", RetrieveOptions(k=5), run_id="run", replace=True)  # same id, another method
    stale = _rows(lds_table(db, "lds", bootstrap=10), "run")
    assert stale["partial"] and stale["method"] == "grad-cos"  # the old predictions are not used
    fresh = _rows(db.validate(models=MODELS, steps=2, bootstrap=10), "run")
    assert not fresh["partial"] and fresh["method"] == "grad-cos" and first["method"] == "grad-dot"


def test_second_stage_rescores_candidates_and_says_how_many(db):
    """A planted second stage (score = 1 for each candidate) makes each prediction the number of
    the query's top candidates inside the subset; candidates=None re-scores every example."""
    retrieve(db, "grad-cos", RetrieveOptions(k=5), run_id="cos")
    calls = []

    def ones(database, query_ids, example_ids):
        calls.append([len(ids) for ids in example_ids])
        return [np.ones(len(ids)) for ids in example_ids]

    n = db.count("examples")
    table = db.validate(models=MODELS, steps=2, bootstrap=10, second_stage=SecondStage("ones", ones, candidates=7))
    staged = _rows(table, "cos+ones")
    assert staged["method"] == "grad-cos+ones" and staged["partial"] and staged["n_scored"] == 7
    assert calls and all(c == 7 for row in calls for c in row)
    top = {}  # the candidates: each query's 7 best grad-cos examples over every example
    from trackstar_db.validate.scores import score_every_example

    rows = [r for r in db.table("validate_predictions").to_pylist() if r["run_id"] == "cos+ones"]
    query_ids = sorted({r["query_id"] for r in rows})
    full = score_every_example(db, "grad-cos", query_ids, [""] * len(query_ids))
    for i, qid in enumerate(query_ids):
        top[qid] = {full.example_ids[j] for j in np.argsort(-full.scores[i], kind="stable")[:7]}
    members = {r["subset"]: set(r["examples"]) for r in db.table("validate_runs").to_pylist()}
    for r in rows:
        assert r["prediction"] == len(top[r["query_id"]] & members[r["subset"]])
    every = db.validate(models=MODELS, steps=2, bootstrap=10, second_stage=SecondStage("all", ones))
    assert not _rows(every, "cos+all")["partial"] and _rows(every, "cos+all")["n_scored"] == n


def test_a_run_retrieved_before_a_refit_is_not_scored_with_the_new_r(db):
    """Its stored top-k describes the old R: validate says so and leaves its LDS partial."""
    retrieve(db, "trackstar", RetrieveOptions(k=5), run_id="old")
    fit(db, shrinkage="none")
    lines = []
    row = _rows(db.validate(models=MODELS, steps=2, bootstrap=10, report=lines.append), "old")
    assert row["partial"] and any("old: R was refitted" in line for line in lines)
    retrieve(db, "trackstar", RetrieveOptions(k=5), run_id="old", replace=True)
    assert not _rows(db.validate(models=MODELS, steps=2, bootstrap=10), "old")["partial"]


def test_a_second_stage_method_scores_every_example_not_its_candidates(db, monkeypatch):
    """validate asks ekfac (the method) for every example's exact second-stage score, whatever a
    request's default candidates: the same numbers as rerank.score_examples over every example."""
    import dataclasses

    from trackstar_db.retrieval import runners
    from trackstar_db.retrieval.rerank import score_examples
    from trackstar_db.validate.scores import example_ids, score_every_example

    @dataclasses.dataclass
    class FewCandidates(runners.Request):  # a request that, left to its default, re-scores 5 of them
        candidates: int = 5

    monkeypatch.setattr(runners, "Request", FewCandidates)
    db.fit_factors("ekfac", progress=False)
    queries = db.table("queries", columns=["query_id", "prompt", "target"]).sort_by("query_id").slice(0, 3)
    examples = example_ids(db)
    full = score_every_example(db, "ekfac", queries.column("query_id").to_pylist(),
                               queries.column("prompt").to_pylist(), examples=examples)
    assert (full.n_scored == len(examples)).all() and len(examples) > 2 * 5
    pairs = list(zip(queries.column("prompt").to_pylist(), queries.column("target").to_pylist()))
    ids, direct = score_examples(db, pairs, examples, "ekfac")
    assert ids == examples
    np.testing.assert_allclose(full.scores, direct, rtol=1e-4, atol=1e-6 * np.abs(direct).max())
