"""validate: LDS against a brute-force Spearman on planted datamodels, the sign convention on
real retrained tiny models, resuming after a kill, and the user's train command."""

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pyarrow as pa
import pytest
from scipy.stats import spearmanr

from trackstar_db.validate.lds import lds_per_query, lds_table
from trackstar_db.validate.options import ValidateOptions, draw_subset

REPO = Path(__file__).resolve().parents[1]


def _tables(members: np.ndarray, losses: np.ndarray, runs: dict[str, np.ndarray]) -> dict:
    """validate_runs / validate_losses / retrievals for subsets `members` [M, N] (bool), losses [M, Q]
    and runs name -> scores [Q, N] (NaN: not retrieved)."""
    n_models, n = members.shape
    ids = [f"e{i:03d}" for i in range(n)]
    validate_runs = pa.table({
        "validation": ["v"] * n_models, "subset": pa.array(range(n_models), pa.int32()),
        "examples": pa.array([[ids[i] for i in np.flatnonzero(row)] for row in members], pa.list_(pa.string())),
        "parameters": [json.dumps({"identity": {"n_corpus": n}})] * n_models})
    validate_losses = pa.table({
        "validation": ["v"] * losses.size, "subset": pa.array(np.repeat(np.arange(n_models), losses.shape[1]), pa.int32()),
        "query_id": [f"q{q}" for _ in range(n_models) for q in range(losses.shape[1])], "loss": losses.ravel()})
    rows = []
    for run, scores in runs.items():
        for q in range(scores.shape[0]):
            order = [i for i in np.argsort(-np.nan_to_num(scores[q], nan=-np.inf)) if not np.isnan(scores[q, i])]
            rows += [dict(run_id=run, query_id=f"q{q}", method=run, kind="proponent", rank=r + 1,
                          example_id=ids[i], score=float(scores[q, i])) for r, i in enumerate(order)]
    return {"validate_runs": validate_runs, "validate_losses": validate_losses, "retrievals": pa.Table.from_pylist(rows)}


def _reference(members: np.ndarray, losses: np.ndarray, scores: np.ndarray) -> np.ndarray:
    """Brute force: per query, scipy's Spearman of the subset sums and minus the loss (0 when undefined)."""
    sums = members.astype(float) @ np.nan_to_num(scores, nan=0.0).T  # [M, Q]
    out = []
    for q in range(losses.shape[1]):
        constant = np.ptp(sums[:, q]) == 0 or np.ptp(losses[:, q]) == 0
        rho = np.nan if constant else spearmanr(sums[:, q], -losses[:, q]).statistic
        out.append(0.0 if np.isnan(rho) else rho)
    return np.array(out)


def test_lds_sql_matches_brute_force_on_a_planted_linear_datamodel():
    rng = np.random.default_rng(0)
    n, n_models, n_queries = 60, 40, 6
    theta = rng.normal(size=(n_queries, n))            # effect of each example on each query's loss
    members = np.array([np.isin(np.arange(n), draw_subset(n, 0.5, 7, j)) for j in range(n_models)])
    losses = 3.0 - members @ theta.T * 0.1 + rng.normal(scale=0.01, size=(n_models, n_queries))
    shuffled = np.array([rng.permutation(row) for row in theta])
    truncated = np.where(theta >= np.sort(theta, axis=1)[:, [-5]], theta, np.nan)  # top-5 only: ties at 0
    runs = {"exact": theta, "flipped": -theta, "shuffled": shuffled, "top5": truncated,
            "constant": np.ones_like(theta)}
    tables = _tables(members, losses, runs)
    per_query = lds_per_query(tables).to_pylist()
    for run, scores in runs.items():
        mine = sorted((r for r in per_query if r["run_id"] == run), key=lambda r: int(r["query_id"][1:]))
        assert [r["n_subsets"] for r in mine] == [n_models] * n_queries
        np.testing.assert_allclose([r["lds"] for r in mine], _reference(members, losses, scores), atol=1e-9, err_msg=run)
    lds = {r["run_id"]: r for r in lds_table(tables, bootstrap=200).to_pylist()}
    assert lds["exact"]["lds"] > 0.95 and lds["flipped"]["lds"] < -0.95
    assert abs(lds["shuffled"]["lds"]) < 0.2
    assert lds["constant"]["lds"] == 0.0 and lds["constant"]["n_undefined"] == n_queries
    assert not lds["exact"]["partial"] and lds["exact"]["n_scored"] == n
    assert lds["top5"]["partial"] and lds["top5"]["n_scored"] == 5  # a top-k LDS says it is one
    assert lds["exact"]["lds_low"] <= lds["exact"]["lds"] <= lds["exact"]["lds_high"]
    assert lds["shuffled"]["lds_high"] - lds["shuffled"]["lds_low"] > 0


def test_draw_subset_is_seeded_and_sized():
    a, b = draw_subset(101, 0.5, 3, 0), draw_subset(101, 0.5, 3, 1)
    assert len(a) == 50 and np.array_equal(a, draw_subset(101, 0.5, 3, 0)) and not np.array_equal(a, b)
    assert np.all(np.diff(a) > 0)


@pytest.mark.parametrize("bad, message", [(dict(models=1), "^models must be >= 2"),
                                         (dict(fraction=1.0), r"^fraction must be in \(0, 1\)"),
                                         (dict(name="a b"), "^name must be"), (dict(train_command="x {out}"), "{data}")])
def test_bad_options_name_the_option(bad, message):
    from trackstar_db.errors import TrackstarError

    with pytest.raises(TrackstarError, match=message):
        ValidateOptions(**bad)


def _store_run(db, run_id: str, scores: dict[str, dict[str, float]]) -> None:
    """A retrieval run of the given scores (query_id -> example_id -> score), every example listed."""
    import datetime as dt

    rows = [dict(run_id=run_id, query_id=q, method=run_id, kind="proponent", rank=r + 1, example_id=e, score=s)
            for q, by_example in scores.items()
            for r, (e, s) in enumerate(sorted(by_example.items(), key=lambda kv: -kv[1]))]
    with db.writer("store a test run"):  # committed like any writer's rows, so pinned reads see them
        db.append("retrievals", pa.Table.from_pylist(rows))
        db.append("runs", pa.table({"run_id": [run_id], "method": [run_id], "parameters": ["{}"],
                                    "created_at": pa.array([dt.datetime(2026, 1, 1)], pa.timestamp("us")),
                                    "code_version": ["test"]}))


def test_fitted_datamodel_on_retrained_tiny_models_scores_one_and_its_negation_minus_one(tiny_db):
    """Real retrained models: the least-squares datamodel of their measured losses (the exact
    in-sample fit when M < N) must score LDS 1 through the stored tables, its negation -1."""
    db = tiny_db
    db.validate(models=5, steps=4, template="prompt0", bootstrap=50)
    runs = db.table("validate_runs").to_pylist()
    losses = db.table("validate_losses").to_pylist()
    ids = sorted(db.table("examples", columns=["example_id"]).column("example_id").to_pylist())
    queries = sorted({r["query_id"] for r in losses})
    x = np.array([[e in set(r["examples"]) for e in ids] for r in sorted(runs, key=lambda r: r["subset"])], float)
    loss = {(r["subset"], r["query_id"]): r["loss"] for r in losses}
    y = np.array([[-loss[(j, q)] for q in queries] for j in range(len(runs))])  # [M, Q]
    theta = np.linalg.lstsq(x, y, rcond=None)[0]                              # [N, Q]
    _store_run(db, "datamodel", {q: dict(zip(ids, theta[:, i])) for i, q in enumerate(queries)})
    _store_run(db, "negated", {q: dict(zip(ids, -theta[:, i])) for i, q in enumerate(queries)})
    table = {r["run_id"]: r for r in db.validate(models=5, steps=4, bootstrap=50).to_pylist()}
    assert table["datamodel"]["n_queries"] == len(queries) and table["datamodel"]["n_subsets"] == 5
    assert table["datamodel"]["lds"] == pytest.approx(1.0) and table["negated"]["lds"] == pytest.approx(-1.0)
    summary = {r["run_id"]: r["lds"] for r in db.evaluate().to_pylist()}
    assert summary["datamodel"] == pytest.approx(1.0)
    from trackstar_db.report.analysis import write_db_report

    page = write_db_report(db, db.path.parent / "report", n_samples=2, tokens=False).read_text()
    assert 'id="lds"' in page and "<th>LDS</th>" in page and page.count("<svg") >= 2


def _cli(db_path, *args, env=None):
    return subprocess.run([sys.executable, "-m", "trackstar_db.cli", "validate", str(db_path), *args],
                          capture_output=True, text=True, env={**os.environ, "PYTHONPATH": str(REPO), **(env or {})})


@pytest.mark.parametrize("fault", ["validate.subset_stored:2", "validate.losses_stored:3"])
def test_killed_validate_reruns_only_the_missing_subsets(tiny_db, monkeypatch, fault):
    from trackstar_db import connect
    from trackstar_db.validate import trainers

    killed = _cli(tiny_db.path, "--models", "4", "--steps", "3", env={"TRACKSTAR_FAULT": fault})
    assert killed.returncode in (-9, 137), killed.stderr
    db = connect(tiny_db.path)
    stored = sorted(db.table("validate_runs").column("subset").to_pylist())
    assert stored == [0, 1]  # killed after the second subset's row, or before the third's
    calls = []
    original = trainers.TestbedTrainer.__call__

    def counting(self, texts, out, ids=()):
        calls.append(len(texts))
        return original(self, texts, out, ids)

    monkeypatch.setattr(trainers.TestbedTrainer, "__call__", counting)
    db.validate(models=4, steps=3, bootstrap=10)
    assert len(calls) == 2
    n_queries = db.count("queries") // 3
    assert sorted(db.table("validate_runs").column("subset").to_pylist()) == [0, 1, 2, 3]
    losses = db.table("validate_losses")
    assert losses.num_rows == 4 * n_queries  # the killed attempt's orphan losses were replaced, not doubled
    db.validate(models=4, steps=3, bootstrap=10)
    assert len(calls) == 2  # nothing left to train


def test_other_settings_under_the_same_name_are_refused(tiny_db):
    from trackstar_db.errors import TrackstarError

    tiny_db.validate(models=2, steps=2, bootstrap=10)
    with pytest.raises(TrackstarError, match="fraction differ"):
        tiny_db.validate(models=3, steps=2, fraction=0.25)
    assert tiny_db.count("validate_runs") == 2


@pytest.mark.slow
def test_train_command_and_cli_output(tiny_db, tmp_path):
    """A user's train command (here: one that copies the recorded model, so every subset's loss is
    the same and every correlation undefined) through the CLI as a user types it."""
    script = tmp_path / "train.py"
    script.write_text("import json, shutil, sys\n"
                      "data, out, model = sys.argv[1], sys.argv[2], sys.argv[3]\n"
                      "assert all(json.loads(line)['text'] for line in open(data))\n"
                      "shutil.copytree(model, out, dirs_exist_ok=True)\n")
    model = tiny_db.manifest["model"]["path"]
    from trackstar_db.retrieval.runs import RetrieveOptions, retrieve

    retrieve(tiny_db, "bm25", RetrieveOptions(k=50))
    done = _cli(tiny_db.path, "--models", "2", "--format", "json",
                "--train-command", f"{sys.executable} {script} {{data}} {{out}} {model}")
    assert done.returncode == 0, done.stderr
    row = json.loads(done.stdout.splitlines()[0])
    assert row["run_id"] == "bm25" and row["lds"] == 0.0 and row["n_undefined"] == row["n_queries"] > 0
    trainer = json.loads(tiny_db.table("validate_runs").column("parameters")[0].as_py())["identity"]["trainer"]
    assert "command" in trainer
    failing = _cli(tiny_db.path, "--name", "bad", "--models", "2", "--train-command", f"{sys.executable} -c "
                   "'import sys; sys.exit(\"no GPU here\")' {data} {out}")
    assert failing.returncode == 1 and "exited with 1: no GPU here" in failing.stderr


def test_schedule_scales_with_the_subset():
    """The base run made 120 steps (12 per epoch over 354 examples, 10 epochs, warm-up 50): a half
    subset keeps the epochs (60 steps) and the warm-up's share (25), 'same-steps' keeps 120 steps
    and the 50-step warm-up, 'base' keeps the config; --steps keeps the warm-up's share of it."""
    from trackstar_db.testbed.train import TrainConfig, lr_factor
    from trackstar_db.validate.trainers import schedule_for

    base = TrainConfig(epochs=10, batch_size=32, warmup=50)
    scaled = schedule_for(base, 120, 354, 177, ValidateOptions())
    assert (scaled.max_steps, scaled.warmup, scaled.epochs) == (60, 25, 10)
    assert lr_factor(scaled.max_steps - 1, scaled.max_steps, scaled) == pytest.approx(base.final_lr / base.lr)
    same = schedule_for(base, 120, 354, 177, ValidateOptions(schedule="same-steps"))
    assert (same.max_steps, same.warmup, same.epochs) == (120, 50, 20)
    assert schedule_for(base, 120, 354, 177, ValidateOptions(schedule="base")) == base
    assert schedule_for(base, 120, 354, 177, ValidateOptions(steps=12)).warmup == 5
    cut = TrainConfig(epochs=20, batch_size=32, warmup=5, max_steps=30)  # a base stopped by max_steps
    assert schedule_for(cut, 30, 354, 177, ValidateOptions()).max_steps == 15
    with pytest.raises(Exception, match="^schedule must be one of"):
        ValidateOptions(schedule="fast")


def test_both_losses_are_reported_and_the_attributed_one_is_measured(tiny_db):
    from trackstar_db.models.load import open_model
    from trackstar_db.models.source import ModelSource
    from trackstar_db.testbed.train import ProbeLosses
    from trackstar_db.validate.runner import loss_summary

    lines = []
    tiny_db.validate(models=2, steps=3, bootstrap=10, report=lines.append)
    assert any(line.startswith("mean target loss: retrained models") and "attributed model" in line for line in lines)
    summary = loss_summary(tiny_db, "lds")
    queries = tiny_db.table("queries").filter(pa.compute.equal(tiny_db.table("queries").column("template"), "prompt0"))
    model, tokenizer = open_model(ModelSource.from_entry(tiny_db.manifest["model"]))
    losses = ProbeLosses(tokenizer, queries.column("prompt").to_pylist(), queries.column("target").to_pylist())(model)
    assert summary["attributed"] == pytest.approx(np.mean(losses), rel=1e-6)
    assert summary["retrained"] == pytest.approx(np.mean(tiny_db.table("validate_losses").column("loss").to_numpy()))
    assert summary["subsets"] == 2


def test_qld_removes_the_top_scored_examples_and_a_random_control(tiny_db, monkeypatch):
    """QLD with a BM25 run: the model of each query is trained without exactly that query's top
    10% by BM25 over every example; the control without as many random ones; rises add up."""
    import json

    from trackstar_db.retrieval.runs import RetrieveOptions, retrieve
    from trackstar_db.validate import trainers
    from trackstar_db.validate.scores import score_every_example

    retrieve(tiny_db, "bm25", RetrieveOptions(k=5))
    trained = []
    original = trainers.TestbedTrainer.__call__

    def recording(self, texts, out, ids=()):
        trained.append((out.name, set(ids)))
        return original(self, texts, out, ids)

    monkeypatch.setattr(trainers.TestbedTrainer, "__call__", recording)
    table = tiny_db.query_loss_difference("bm25", queries=2, top=0.1, steps=2, bootstrap=50)
    n = tiny_db.count("examples")
    removed = round(0.1 * n)
    assert [name for name, _ in trained] == ["full", "top-0", "random-0", "top-1", "random-1"]
    assert len(trained[0][1]) == n and all(len(ids) == n - removed for _, ids in trained[1:])
    everyone = trained[0][1]
    rows = table.to_pylist()
    queries = tiny_db.table("queries", columns=["query_id", "prompt", "target"]).to_pylist()
    by_id = {q["query_id"]: q for q in queries}
    from trackstar_db.retrieval.embedding import query_text

    full = score_every_example(tiny_db, "bm25", [r["query_id"] for r in rows],
                               [query_text(by_id[r["query_id"]]["prompt"], by_id[r["query_id"]]["target"]) for r in rows])
    for i, row in enumerate(rows):
        top = {full.example_ids[j] for j in np.argsort(-full.scores[i], kind="stable")[:removed]}
        assert everyone - trained[1 + 2 * i][1] == top
        assert everyone - trained[2 + 2 * i][1] != top
        assert row["rise"] == pytest.approx(row["loss_removed"] - row["loss_full"])
        assert row["random_rise"] == pytest.approx(row["loss_random"] - row["loss_full"])
    summary = json.loads(table.schema.metadata[b"summary"])
    assert summary["mean_rise"] == pytest.approx(np.mean([r["rise"] for r in rows]))
    assert summary["rise_low"] <= summary["mean_rise"] <= summary["rise_high"] and summary["n_removed"] == removed
