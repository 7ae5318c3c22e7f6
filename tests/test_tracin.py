"""TracIn-CP: one checkpoint is grad-dot times its learning rate; several are the explicit sum."""

import numpy as np
import pytest
import torch

TEXTS = [f"the cat number {i} sat on the mat {i % 7} today" for i in range(48)]
QUERIES = [("the cat number 3 sat on the mat", "3"), ("the cat number 10 sat on", "the")]


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    """A tiny model trained 12 steps, keeping 2 intermediate checkpoints."""
    from trackstar_db.testbed.train import TrainConfig, train_model

    out = tmp_path_factory.mktemp("tracin") / "model"
    config = TrainConfig(n_layer=1, d_model=16, n_head=2, batch_size=8, max_steps=12, warmup=2, lr=3e-3, final_lr=1e-3)
    train_model(TEXTS, out, config, progress=False, checkpoints=2)
    return out


def direct_dot(path, config, variant="uncorrected"):
    """[queries, texts] projected-gradient dot products at one checkpoint, one example per batch."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from trackstar_db.featurizer.per_example import Featurizer
    from trackstar_db.featurizer.tokenize import collate, encode_query, encode_text

    model = AutoModelForCausalLM.from_pretrained(str(path)).eval()
    tokenizer = AutoTokenizer.from_pretrained(str(path))
    featurizer = Featurizer(model, config, None)

    def vec(item):
        return featurizer.featurize(collate([item])).vectors[variant][0].double()

    z = torch.stack([vec(encode_text(tokenizer, t, 32)) for t in TEXTS])
    q = torch.stack([vec(encode_query(tokenizer, p, t, 32)) for p, t in QUERIES])
    return (q @ z.T).numpy()


def test_checkpoints_are_kept_with_their_learning_rates(run_dir):
    from trackstar_db.store.checkpoints import kept as checkpoints
    from trackstar_db.testbed.train import TrainConfig, lr_factor

    points = checkpoints(run_dir)
    assert [p.name for p in points] == ["step-000004", "step-000008", "final"]
    config = TrainConfig(n_layer=1, d_model=16, n_head=2, batch_size=8, max_steps=12, warmup=2, lr=3e-3, final_lr=1e-3)
    for point, step in zip(points, (4, 8, 12)):  # the lr of the step after the checkpoint
        assert point.lr == pytest.approx(config.lr * lr_factor(step, 12, config))


def test_one_checkpoint_is_grad_dot_times_lr_and_several_the_explicit_sum(run_dir):
    from trackstar_db.featurizer.config import FeaturizerConfig
    from trackstar_db.retrieval.tracin_cp import scores
    from trackstar_db.store.checkpoints import kept as checkpoints

    config = FeaturizerConfig(dim=1024, correction="none", max_length=32)
    points = checkpoints(run_dir)
    dots = [direct_dot(p.path, config) for p in points]
    for point, dot in zip(points, dots):
        got = scores([point], TEXTS, QUERIES, config, "tracin-cp").numpy()
        np.testing.assert_allclose(got, point.lr * dot, rtol=1e-4, atol=1e-9)
    two = scores(points[:2], TEXTS, QUERIES, config, "tracin-cp").numpy()
    np.testing.assert_allclose(two, points[0].lr * dots[0] + points[1].lr * dots[1], rtol=1e-4, atol=1e-9)
    every = scores(points, TEXTS, QUERIES, config, "tracin-cp").numpy()
    np.testing.assert_allclose(every, sum(p.lr * d for p, d in zip(points, dots)), rtol=1e-4, atol=1e-9)
    assert not np.allclose(dots[0], dots[-1])  # the checkpoints differ


def test_unit_norm_variants_are_bounded_and_corrected_differs(run_dir):
    from trackstar_db.featurizer.config import FeaturizerConfig
    from trackstar_db.retrieval.tracin_cp import scores
    from trackstar_db.store.checkpoints import kept as checkpoints

    config = FeaturizerConfig(dim=1024, correction="auto", max_length=32)
    points = checkpoints(run_dir)
    bound = sum(p.lr for p in points)
    cos = scores(points, TEXTS, QUERIES, config, "tracin-cp-cos").numpy()
    opt = scores(points, TEXTS, QUERIES, config, "tracin-cp-opt").numpy()
    assert np.abs(cos).max() <= bound * (1 + 1e-6) and np.abs(opt).max() <= bound * (1 + 1e-6)
    assert not np.allclose(cos, opt)
    with pytest.raises(Exception, match="unknown TracIn-CP method"):
        scores(points, TEXTS, QUERIES, config, "tracin")


def test_keeping_checkpoints_does_not_change_training(run_dir, tmp_path):
    from safetensors.torch import load_file

    from trackstar_db.testbed.train import TrainConfig, train_model

    config = TrainConfig(n_layer=1, d_model=16, n_head=2, batch_size=8, max_steps=12, warmup=2, lr=3e-3, final_lr=1e-3)
    train_model(TEXTS, tmp_path / "plain", config, progress=False)
    assert not (tmp_path / "plain" / "checkpoints").exists()
    plain, kept = load_file(tmp_path / "plain" / "model.safetensors"), load_file(run_dir / "model.safetensors")
    assert plain.keys() == kept.keys() and all(torch.equal(plain[k], kept[k]) for k in plain)


def test_stored_tracin_cp_run_is_the_grad_dot_run_times_lr(tiny_db):
    """On a database whose model kept no intermediate checkpoint, tracin-cp = lr x grad-dot, ranks included."""
    from click.testing import CliRunner

    from trackstar_db.cli import main
    from trackstar_db.gradients.worker import GradientJob, ingest_gradients
    from trackstar_db.retrieval.methods import expand
    from trackstar_db.store.checkpoints import kept as checkpoints

    for split in ("train", "queries"):
        ingest_gradients(tiny_db, {"dim": 1024}, GradientJob(split, batch_size=32), progress=False)
    result = CliRunner().invoke(main, ["retrieve", str(tiny_db.path), "--method", "grad-dot", "--method", "tracin-cp",
                                       "--k", "5", "--device", "cpu"])
    assert result.exit_code == 0, result.output
    (point,) = checkpoints(tiny_db.model_info()["path"])
    rows = {m: tiny_db.sql(f"SELECT query_id, kind, rank, example_id, score FROM retrievals WHERE method = '{m}' "
                           "ORDER BY query_id, kind, rank").to_pydict() for m in ("grad-dot", "tracin-cp")}
    assert rows["grad-dot"]["query_id"] == rows["tracin-cp"]["query_id"] and len(rows["grad-dot"]["rank"]) > 0
    np.testing.assert_allclose(np.array(rows["tracin-cp"]["score"]), point.lr * np.array(rows["grad-dot"]["score"]),
                               rtol=2e-3, atol=1e-6 * point.lr)
    # the same examples, except where a score ties with a neighbour (duplicate texts) or sits at the cut
    score, ids = np.array(rows["grad-dot"]["score"]), rows["grad-dot"]["example_id"]
    checked = 0
    for i in range(len(ids)):
        neighbours = [j for j in (i - 1, i + 1) if 0 <= j < len(ids) and rows["grad-dot"]["query_id"][j] ==
                      rows["grad-dot"]["query_id"][i] and rows["grad-dot"]["kind"][j] == rows["grad-dot"]["kind"][i]]
        if rows["grad-dot"]["rank"][i] < 5 and all(abs(score[i] - score[j]) > 1e-2 * abs(score[i]) for j in neighbours):
            assert rows["tracin-cp"]["example_id"][i] == ids[i]
            checked += 1
    assert checked > len(ids) // 4
    assert "tracin-cp" not in expand(["all"])


@pytest.mark.slow
def test_train_keeps_checkpoints_and_retrieve_scores_over_them(tiny_db, tmp_path):
    """As a user types it: train --checkpoints 2, then retrieve --method tracin-cp-cos over the three checkpoints."""
    from click.testing import CliRunner

    from trackstar_db.cli import main
    from trackstar_db.store.checkpoints import kept as checkpoints

    runner = CliRunner()
    out = tmp_path / "retrained"
    result = runner.invoke(main, ["train", str(tiny_db.path), "--out", str(out), "--epochs", "1", "--checkpoints", "2"])
    assert result.exit_code == 0, result.output
    points = checkpoints(out)
    assert len(points) == 3 and points[-1].name == "final" and all(p.lr > 0 for p in points)
    result = runner.invoke(main, ["retrieve", str(tiny_db.path), "--method", "tracin-cp-cos", "--k", "3", "--device", "cpu"])
    assert result.exit_code == 0, result.output
    scores = tiny_db.sql("SELECT kind, score FROM retrievals WHERE method = 'tracin-cp-cos'").to_pydict()
    assert len(scores["score"]) > 0 and max(abs(s) for s in scores["score"]) <= sum(p.lr for p in points) * (1 + 1e-5)
    result = runner.invoke(main, ["train", str(tiny_db.path), "--out", str(tmp_path / "x"), "--checkpoints", "-1"])
    assert result.exit_code == 2 and result.output.strip() == "Error: --checkpoints must be >= 0, not -1"


def db_with_checkpoints(db, out, attach: bool = True):
    """db's examples trained again keeping 2 intermediate checkpoints; the final one's gradients
    stored (dim 1024) and, with `attach`, each kept checkpoint's too. Returns the checkpoints."""
    from trackstar_db.gradients.worker import GradientJob, ingest_gradients
    from trackstar_db.store.checkpoints import kept as checkpoints
    from trackstar_db.testbed.train import TrainConfig, train_model

    texts = db.table("examples", columns=["text"]).column("text").to_pylist()
    config = TrainConfig(n_layer=1, d_model=32, n_head=2, max_length=32, batch_size=32, max_steps=12, warmup=2,
                         lr=3e-3, final_lr=1e-3)
    train_model(texts, out, config, progress=False, checkpoints=2)
    db.set_model(out)
    points = checkpoints(out)
    for point in [points[-1]] + points[:-1] * attach:  # the final one first: it fixes the settings
        name = None if point.name == "final" else point.name
        for split in ("train", "queries"):
            ingest_gradients(db, {"dim": 1024}, GradientJob(split, batch_size=16, checkpoint=name), progress=False)
    return points


def brute_force(db, points, query_ids, n_texts, variant="uncorrected"):
    """sum over checkpoints of lr x the dot products of vectors featurized one example at a time
    (the first n_texts examples)."""
    from trackstar_db.featurizer.config import FeaturizerConfig
    from trackstar_db.featurizer.tokenize import collate, encode_query, encode_text
    from trackstar_db.retrieval.tracin_cp import checkpoint_featurizer

    config = FeaturizerConfig.from_dict(db.manifest["featurizer"]["config"])
    texts = db.table("examples", columns=["text"]).column("text").to_pylist()[:n_texts]
    rows = {r["query_id"]: r for r in db.table("queries").to_pylist()}
    total = 0
    for point in points:
        featurizer, tokenizer = checkpoint_featurizer(point, config, variant, "cpu")
        cut = featurizer.config.max_length
        items = [encode_text(tokenizer, t, cut) for t in texts]
        items += [encode_query(tokenizer, rows[i]["prompt"], rows[i]["target"], cut) for i in query_ids]
        vectors = torch.stack([featurizer.featurize(collate([item])).vectors[variant][0].double() for item in items])
        z, q = vectors[:len(texts)], vectors[len(texts):]
        total = total + point.lr * (q @ z.T).numpy()
    return total


def test_stored_checkpoint_tables_equal_the_in_memory_sum_and_brute_force(tiny_db, tmp_path):
    from trackstar_db.retrieval.tracin_cp import _points, scores, stored_scores

    points = db_with_checkpoints(tiny_db, tmp_path / "kept")
    assert sorted(tiny_db.manifest["checkpoints"]) == ["step-000004", "step-000008"]
    assert tiny_db.count("grads_train_corrected__step-000004") == tiny_db.count("examples")
    mode, summed = _points(tiny_db, "tracin-cp")
    assert mode == "stored" and [(p.name, p.lr) for p in summed] == [(p.name, p.lr) for p in points]
    ids = tiny_db.table("examples", columns=["example_id"]).column("example_id").to_pylist()
    texts = tiny_db.table("examples", columns=["text"]).column("text").to_pylist()
    queries = tiny_db.table("queries").slice(0, 6).to_pylist()
    query_ids = [r["query_id"] for r in queries]
    from trackstar_db.featurizer.config import FeaturizerConfig

    config = FeaturizerConfig.from_dict(tiny_db.manifest["featurizer"]["config"])
    for method in ("tracin-cp", "tracin-cp-cos", "tracin-cp-opt"):
        got = stored_scores(tiny_db, points, ids, query_ids, method, batch_rows=50).numpy()
        memory = scores(points, texts, [(r["prompt"], r["target"]) for r in queries], config, method).numpy()
        np.testing.assert_allclose(got, memory, rtol=2e-3, atol=1e-6 * np.abs(memory).max())
    explicit = brute_force(tiny_db, points, query_ids, 40)
    got = stored_scores(tiny_db, points, ids, query_ids, "tracin-cp").numpy()
    np.testing.assert_allclose(got[:, :40], explicit, rtol=2e-3, atol=1e-6 * np.abs(explicit).max())
    final_only = stored_scores(tiny_db, points[-1:], ids, query_ids, "tracin-cp").numpy()
    assert not np.allclose(got, final_only, rtol=1e-2)  # the intermediate checkpoints count


def test_attaching_checkpoints_leaves_the_final_tables_and_runs_unchanged(tiny_db, tmp_path):
    from click.testing import CliRunner
    from stored_vectors import vectors_by_id

    from trackstar_db.cli import main

    db_with_checkpoints(tiny_db, tmp_path / "kept", attach=False)
    runner = CliRunner()
    args = ["--k", "5", "--device", "cpu"]
    assert runner.invoke(main, ["retrieve", str(tiny_db.path), "--method", "grad-dot", "--method", "tracin-cp", *args]
                         ).exit_code == 0
    sql = "SELECT method, query_id, kind, rank, example_id, score FROM retrievals ORDER BY ALL"
    before = {n: vectors_by_id(tiny_db, n)[:2] for n in tiny_db.manifest["gradient_tables"]}
    runs, settings = tiny_db.sql(sql), dict(tiny_db.manifest["featurizer"])
    for name in ("step-000004", "step-000008"):  # attach by name, then featurize; queries last
        assert runner.invoke(main, ["init", str(tiny_db.path), "--checkpoint", name]).exit_code == 0
        for split in ("train", "queries"):
            result = runner.invoke(main, ["ingest", "gradients", str(tiny_db.path), "--split", split,
                                          "--checkpoint", name, "--device", "cpu"])
            assert result.exit_code == 0, result.output
    for name, (ids, vectors) in before.items():
        now_ids, now = vectors_by_id(tiny_db, name)[:2]
        assert now_ids == ids and torch.equal(now, vectors)
    assert tiny_db.manifest["featurizer"] == settings
    assert runner.invoke(main, ["retrieve", str(tiny_db.path), "--method", "grad-dot", "--replace", *args]).exit_code == 0
    assert tiny_db.sql(sql.replace("FROM retrievals", "FROM retrievals WHERE method = 'grad-dot'")) == \
        runs.filter(runs.column("method").to_numpy(False) == "grad-dot")
    # tracin-cp now sums over the stored tables: other scores than the final checkpoint's alone
    result = runner.invoke(main, ["retrieve", str(tiny_db.path), "--method", "tracin-cp", "--replace", *args])
    assert result.exit_code == 0, result.output
    after = tiny_db.sql("SELECT score FROM retrievals WHERE method = 'tracin-cp' ORDER BY ALL").column("score")
    assert after != runs.filter(runs.column("method").to_numpy(False) == "tracin-cp").column("score")
    info = runner.invoke(main, ["info", str(tiny_db.path)]).output
    assert "step-000008" in info and "grads_queries_uncorrected__step-000008" in info
    check = runner.invoke(main, ["check", str(tiny_db.path)])
    assert check.exit_code == 0, check.output


def test_a_checkpoint_without_its_tables_is_refused_with_the_command(tiny_db, tmp_path):
    from trackstar_db.errors import TrackstarError
    from trackstar_db.gradients.worker import GradientJob, ingest_gradients
    from trackstar_db.retrieval.tracin_cp import top_k_stored

    db_with_checkpoints(tiny_db, tmp_path / "kept", attach=False)
    ingest_gradients(tiny_db, None, GradientJob("train", checkpoint="step-000004"), progress=False)
    with pytest.raises(TrackstarError, match="--split queries --checkpoint step-000004"):
        top_k_stored(tiny_db, ["x"], 3, "tracin-cp")
    with pytest.raises(TrackstarError, match="neither a directory"):
        ingest_gradients(tiny_db, None, GradientJob("train", checkpoint="step-9"), progress=False)
