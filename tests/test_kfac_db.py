"""fit-factors on a database, the second stage (query/retrieve --rerank, the kfac/ekfac methods)
and the projected rungs (kfac-proj, ekfac-proj), checked against direct computations."""

from __future__ import annotations

import numpy as np
import pyarrow.compute as pc
import pytest
import torch

from databases import run_cli


@pytest.fixture(scope="module")
def db(tiny_db_template, tmp_path_factory):
    from databases import with_gradients

    db = with_gradients(tiny_db_template, tmp_path_factory.mktemp("kfac"))
    run_cli("fit-factors", db.path, "--kind", "ekfac", "--device", "cpu", "--fisher", "empirical")
    return db.__class__.open(db.path)


def _pair(db):
    row = db.table("queries", columns=["query_id", "prompt", "target"]).slice(0, 1).to_pylist()[0]
    return row["query_id"], row["prompt"], row["target"]


def test_manifest_records_what_the_factors_were_fitted_on(db):
    entry = db.manifest["factors"]
    assert entry["kind"] == "ekfac" and entry["damping"] == 0.1
    assert entry["n_examples"] == db.count("examples") == entry["fitted_on"]["examples"]
    assert set(entry["projected"]) == {"kfac", "ekfac"}
    for name in [entry["file"]] + [p["file"] for p in entry["projected"].values()]:
        assert (db.path / "preconditioners" / name).is_file()
    assert not (db.path / "preconditioners" / "factors.partial.safetensors").exists()


def test_factors_equal_a_direct_fit_of_the_examples(db):
    """The stored covariances are those of the examples' factors (of each example's summed token
    loss, as the manifest records), summed here independently."""
    from trackstar_db.featurizer.tokenize import collate, pad_id
    from trackstar_db.featurizer.tracked import per_example_backward
    from trackstar_db.gradients.factors import load_factors
    from trackstar_db.retrieval.rerank import _model

    factors = load_factors(db)
    featurizer, tokenizer = _model(db, "cpu")
    name = next(m for m in featurizer.tracked if m.uses[0][1] == "conv1d")  # a dense side on both ends
    texts = db.table("examples", columns=["example_id", "text"]).sort_by("example_id").column("text").to_pylist()
    sums, tokens = [0, 0], 0
    for text in texts:  # one example at a time: no padding
        batch = collate([featurizer.task.encode_example(tokenizer, text, None, featurizer.config.max_length)],
                        pad_id(tokenizer))

        def take(n, x_r, x_c):
            nonlocal tokens
            if n == name.name:
                sums[0] = sums[0] + x_r[0].double().T @ x_r[0].double()
                sums[1] = sums[1] + x_c[0].double().T @ x_c[0].double()
                tokens += x_c.shape[1]
        per_example_backward(featurizer.model, featurizer.tracked, batch, take, summed=True)
    assert db.manifest["factors"]["tokens"] == tokens and db.manifest["factors"]["token_loss"] == "sum"
    assert factors.summed
    row, col = factors.sides[name.name]
    torch.testing.assert_close(row.matrix(), sums[0] / tokens, rtol=1e-5, atol=1e-9)
    torch.testing.assert_close(col.matrix(), sums[1] / tokens, rtol=1e-5, atol=1e-9)


def test_rerank_scores_equal_score_examples(db):
    """query --rerank re-orders the first stage's candidates by g_q (F + lambda)^-1 g_z, the same
    numbers as scoring those candidates directly, and keeps the first stage's scores."""
    _, prompt, target = _pair(db)
    rows = db.query(prompt, target, k=5, method="trackstar", rerank="ekfac", candidates=20)
    assert {"first_score", "first_rank", "first_method"} <= set(rows.column_names)
    assert set(rows.column("method").to_pylist()) == {"ekfac"}
    assert set(rows.column("first_method").to_pylist()) == {"trackstar"}
    first = db.query(prompt, target, k=20, method="trackstar")
    first_props = first.filter(pc.field("kind") == "proponent")
    first_opps = first.filter(pc.field("kind") == "opponent")
    candidates = sorted(set(first_props.column("example_id").to_pylist()) | set(first_opps.column("example_id").to_pylist()))
    ids, scores = db.factor_scores([(prompt, target)], candidates, kind="ekfac")
    expected = sorted(zip(scores[0], ids), reverse=True)[:5]
    props = rows.filter(pc.field("kind") == "proponent")
    np.testing.assert_allclose(props.column("score").to_numpy(), [s for s, _ in expected], rtol=1e-4)
    # the same examples; duplicate texts in the world tie exactly, and ties may come in either order
    assert set(props.column("example_id").to_pylist()) == {e for _, e in expected}
    # the first-stage columns are the first stage's own numbers
    by_id = dict(zip(first_props.column("example_id").to_pylist(), first_props.column("score").to_pylist()))
    for e, s, r in zip(props.column("example_id").to_pylist(), props.column("first_score").to_pylist(),
                       props.column("first_rank").to_pylist()):
        if r > 0:
            assert by_id[e] == pytest.approx(s, rel=1e-5)
    opps = rows.filter(pc.field("kind") == "opponent")
    assert opps.column("score").to_pylist() == sorted(opps.column("score").to_pylist())


def test_kfac_and_ekfac_methods_and_retrieve_rerank(db):
    run, rows = db.retrieve("trackstar", k=5, rerank="kfac", candidates=10, replace=True)
    assert run == "trackstar-kfac" and set(rows.column("method").to_pylist()) == {"kfac"}
    assert "first_score" in rows.column_names
    stored = db.table("retrievals", filter=pc.field("run_id") == run)
    assert stored.num_rows == rows.num_rows
    params = db.sql(f"SELECT parameters FROM runs WHERE run_id = '{run}'").column(0).to_pylist()[0]
    assert "trackstar" in str(params) and "candidates" in str(params)
    run2, rows2 = db.retrieve("kfac", k=5, candidates=10, replace=True)  # the method: best rung + rerank
    assert run2 == "kfac"
    key = ["query_id", "kind", "rank", "example_id"]
    assert rows2.select(key).sort_by([(c, "ascending") for c in key]).equals(
        rows.select(key).sort_by([(c, "ascending") for c in key]))
    summary = db.evaluate()
    assert {"kfac"} <= set(summary.column("method").to_pylist())


def test_projected_rungs_whiten_with_the_projected_curvature(db):
    """kfac-proj's score is g_z . g_q F_p^-1 with F_p = kron of the projected factors (damped), on
    the uncorrected vectors: equal to the direct product with the stored preconditioner."""
    from trackstar_db.gradients.factors import load_projected
    from trackstar_db.retrieval.runners import stored_query_vectors
    from trackstar_db.retrieval.methods import lookup

    run, rows = db.retrieve("kfac-proj", k=3, replace=True)
    spec = lookup("kfac-proj").spec
    query_ids = sorted(set(rows.column("query_id").to_pylist()))[:2]
    g_q = stored_query_vectors(db, spec, query_ids).double()
    train = db.gradient_table("train", corrected=False)
    table = train.dataset().to_table(columns=["id", "vector"])
    from trackstar_db.store.vectors import to_torch

    x = to_torch(table.column("vector"), train.dtype).double()
    pre = load_projected(db, "kfac")
    inverse = pre.power(-1.0)
    q = torch.cat([g_q[:, o:o + s] @ m for (o, s), m in zip(pre.spans, inverse)], 1)
    scores = q @ x.T
    ids = table.column("id").to_pylist()
    for i, qid in enumerate(query_ids):
        top = rows.filter((pc.field("query_id") == qid) & (pc.field("kind") == "proponent"))
        best = torch.argsort(scores[i], descending=True)[:3].tolist()
        assert top.column("example_id").to_pylist() == [ids[j] for j in best]
    for name in ("kfac-proj", "ekfac-proj"):
        run_cli("retrieve", db.path, "--method", name, "--k", 3, "--replace")


def test_cli_query_rerank_and_errors(db):
    _, prompt, target = _pair(db)
    out = run_cli("query", db.path, "--prompt", prompt, "--target", target, "--rerank", "ekfac", "--candidates", 15,
                  "--k", 3, "--device", "cpu").output
    assert "method: ekfac" in out and "trackstar" in out
    bad = run_cli("query", db.path, "--prompt", prompt, "--target", target, "--rerank", "nope", ok=False)
    assert bad.exit_code == 2 and "--rerank" in bad.output
    bad = run_cli("query", db.path, "--prompt", prompt, "--target", target, "--rerank", "kfac",
                  "--candidates", 0, ok=False)
    assert bad.exit_code == 2 and "--candidates" in bad.output
    out = run_cli("retrieve", db.path, "--method", "grad-cos", "--rerank", "ekfac", "--candidates", 10, "--k", 3,
                  "--device", "cpu").output
    assert out.strip().startswith("run grad-cos-ekfac:")
    listed = run_cli("eval", db.path, "--format", "csv").output
    assert "grad-cos-ekfac" in listed


def test_no_factors_is_one_line_naming_the_command(tiny_db_template, tmp_path):
    from databases import with_gradients

    from trackstar_db.errors import TrackstarError

    db = with_gradients(tiny_db_template, tmp_path)
    with pytest.raises(TrackstarError, match="fit-factors"):
        db.retrieve("kfac-proj", k=3)
    _, prompt, target = _pair(db)
    with pytest.raises(TrackstarError, match="fit-factors"):
        db.query(prompt, target, rerank="kfac")


def test_fit_resumes_after_a_kill_to_the_same_factors(tiny_db_template, tmp_path, monkeypatch):
    """A kill after a partial save, then a rerun: it resumes and fits what one uninterrupted run fits."""
    from databases import copy_db

    from trackstar_db.gradients import factors as fitting
    from trackstar_db.gradients.factors import fit_factors

    db = copy_db(tiny_db_template, tmp_path)
    from trackstar_db.featurizer.config import FeaturizerConfig
    from trackstar_db.gradients.worker import GradientJob, ingest_gradients

    ingest_gradients(db, FeaturizerConfig(dim=1024, correction="none"), GradientJob("train", batch_size=32,
                                                                                       device="cpu"), progress=False)

    class Killed(Exception):
        pass

    calls = {"n": 0}
    kill_at = db.count("examples") // 64 + 1  # the first save of the eigenvalue-correction pass

    def point(name):
        if name == "factors.after_partial":
            calls["n"] += 1
            if calls["n"] == kill_at:
                raise Killed

    monkeypatch.setattr(fitting.faults, "point", point)
    with pytest.raises(Killed):
        fit_factors(db, "ekfac", batch_size=8, save_every=64)
    assert (db.path / "preconditioners" / fitting.PARTIAL).is_file() and "factors" not in db.manifest
    from safetensors import safe_open

    with safe_open(str(db.path / "preconditioners" / fitting.PARTIAL), framework="pt") as handle:
        assert handle.metadata()["phase"] == "correction" and int(handle.metadata()["done"]) == 64
    monkeypatch.setattr(fitting.faults, "point", lambda name: None)
    resumed = fit_factors(db, "ekfac", batch_size=8, save_every=64)
    assert resumed.resumed == 64
    one = fitting.load_factors(db.__class__.open(db.path))
    fresh = copy_db(tiny_db_template, tmp_path / "fresh")
    ingest_gradients(fresh, FeaturizerConfig(dim=1024, correction="none"), GradientJob("train", batch_size=32,
                                                                                          device="cpu"), progress=False)
    fit_factors(fresh, "ekfac", batch_size=8)
    other = fitting.load_factors(fresh.__class__.open(fresh.path))
    assert one.params["n_examples"] == other.params["n_examples"] == db.count("examples")
    for name in one.sides:
        torch.testing.assert_close(one.eigenvalues(name, "ekfac"), other.eigenvalues(name, "ekfac"), rtol=1e-4, atol=1e-10)
        torch.testing.assert_close(one.eigenvalues(name, "kfac"), other.eigenvalues(name, "kfac"))


def test_select_rerank_keeps_the_best_mean_second_stage_scores(db, tmp_path):
    from trackstar_db.selection.select import Task, task_queries

    chosen = db.select(Task(), top=5, method="trackstar", rerank="ekfac", candidates=12)
    rows = chosen.rows
    assert chosen.method == "trackstar-ekfac" and rows.num_rows == 5 and "first_score" in rows.column_names
    first = db.select(Task(), top=12, method="trackstar").rows
    queries = task_queries(db, Task())
    pairs = list(zip(queries.column("prompt").to_pylist(), queries.column("target").to_pylist()))
    ids, scores = db.factor_scores(pairs, first.column("example_id").to_pylist(), kind="ekfac")
    mean = scores.mean(axis=0)
    expected = [ids[i] for i in np.argsort(-mean, kind="stable")[:5]]
    assert rows.column("example_id").to_pylist() == expected
    out = run_cli("select", db.path, "--top", 3, "--method", "trackstar", "--rerank", "kfac", "--candidates", 8,
                  "--out", tmp_path / "sel.jsonl").output
    assert "trackstar-kfac" in out and (tmp_path / "sel.jsonl").read_text().count("\n") == 3


def test_query_chunks_give_the_same_answers(db, monkeypatch):
    """Queries preconditioned a few at a time (a large model's memory bound) score as all at once."""
    from trackstar_db.retrieval import rerank

    queries = db.table("queries", columns=["prompt", "target"]).slice(0, 5).to_pylist()
    pairs = [(q["prompt"], q["target"]) for q in queries]
    examples = db.table("examples", columns=["example_id"]).column("example_id").to_pylist()[:30]
    ids, whole = rerank.score_examples(db, pairs, examples)
    params = sum(m.rows * m.cols for m in rerank._model(db, "cpu")[0].tracked)
    monkeypatch.setattr(rerank, "QUERY_BYTES", 2 * 4 * params)  # two queries a chunk
    _, chunked = rerank.score_examples(db, pairs, examples, chunk=7)
    np.testing.assert_allclose(chunked, whole, rtol=1e-3, atol=1e-6 * np.abs(whole).max())  # padding: float32 noise
    assert ids == examples


def test_fit_factors_errors_name_the_flag_or_the_missing_step(tiny_db):
    bad = run_cli("fit-factors", tiny_db.path, "--kind", "dense", ok=False)
    assert bad.exit_code == 2 and "--kind" in bad.output
    bad = run_cli("fit-factors", tiny_db.path, "--fraction", 0, ok=False)
    assert bad.exit_code == 2 and "--fraction" in bad.output
    missing = run_cli("fit-factors", tiny_db.path, "--device", "cpu", ok=False)
    assert missing.exit_code == 1 and "ingest gradients" in missing.output and len(missing.output.strip().splitlines()) == 1
    from trackstar_db.errors import ParameterError
    from trackstar_db.gradients.factors import fit_factors

    with pytest.raises(ParameterError, match="damping"):
        fit_factors(tiny_db, damping=float("nan"))


def test_a_projected_rung_is_a_first_stage_and_a_second_stage_is_not(db):
    from trackstar_db.errors import ParameterError

    _, prompt, target = _pair(db)
    rows = db.query(prompt, target, k=3, method="kfac-proj", rerank="ekfac", candidates=10)
    assert set(rows.column("first_method").to_pylist()) == {"kfac-proj"}
    with pytest.raises(ParameterError, match="rerank"):
        db.query(prompt, target, method="ekfac", rerank="kfac")


def test_a_batch_of_asks_equals_each_ask_alone(db):
    """attribute_many (the server's batches): second-stage asks of one k share one re-scoring pass,
    mixed with first-stage and contrastive asks, and each answer equals attribute() alone."""
    from trackstar_db.retrieval.adhoc import Ask

    rows = db.table("queries", columns=["prompt", "target"]).slice(0, 3).to_pylist()
    pairs = [(r["prompt"], r["target"]) for r in rows]
    asks = [Ask(*pairs[0], "ekfac", 3), Ask(*pairs[1], "ekfac", 3), Ask(*pairs[2], "kfac", 4),
            Ask(*pairs[0], "grad-cos", 5), Ask(*pairs[1], "grad-cos", 2, control_target=pairs[2][1] + " x")]
    attributor = db.prompt_attributor("cpu")
    together = attributor.attribute_many(asks)
    for ask, answer in zip(asks, together):
        alone = attributor.attribute(ask.prompt, ask.target, ask.method, ask.k, control_target=ask.control_target)
        assert answer.column_names == alone.column_names, ask
        assert answer.column("example_id").to_pylist() == alone.column("example_id").to_pylist(), ask
        assert answer.column("kind").to_pylist() == alone.column("kind").to_pylist(), ask
        np.testing.assert_allclose(answer.column("score").to_numpy(), alone.column("score").to_numpy(), rtol=1e-4,
                                   atol=1e-6)
        if ask.method in ("kfac", "ekfac"):
            assert answer.column("first_rank").to_pylist() == alone.column("first_rank").to_pylist()
            assert set(answer.column("method").to_pylist()) == {ask.method}


def test_sampled_labels_are_drawn_from_the_model_and_drawn_alike_by_a_refit(db, tmp_path):
    """fisher='sampled' (the default): the factors' gradients take labels drawn from the model's
    prediction (label positions only; the rest as they were), seeded, so two fits on copies of one
    database write the same file; they differ from the empirical (data-label) factors."""
    import shutil

    from trackstar_db import connect
    from trackstar_db.featurizer.task import IGNORE
    from trackstar_db.featurizer.tokenize import collate, pad_id
    from trackstar_db.featurizer.tracked import per_example_backward
    from trackstar_db.gradients.factors import _relabel
    from trackstar_db.retrieval.rerank import _model

    featurizer, tokenizer = _model(db, "cpu")
    texts = db.table("examples", columns=["text"]).column("text").to_pylist()[:8]
    batch = collate([featurizer.task.encode_example(tokenizer, t, None, featurizer.config.max_length) for t in texts],
                    pad_id(tokenizer))
    def labelled(seed: int) -> dict:  # the batch as the fit's pass labels it (the same forward draws)
        seen = []
        draw = _relabel("sampled", seed)
        per_example_backward(featurizer.model, featurizer.tracked, batch, lambda *a: None,
                             relabel=lambda logits, labels: seen.append(draw(logits, labels)) or seen[-1])
        return {**batch, "labels": seen[0]}

    featurizer.model.train()  # as a model another caller left training: the draws must not see dropout
    try:
        drawn, again = (labelled(5) for _ in range(2))
        assert featurizer.model.training
    finally:
        featurizer.model.eval()
    assert _relabel("empirical", 5) is None
    assert torch.equal(drawn["labels"], again["labels"])  # seeded
    ignored = batch["labels"] == IGNORE
    assert torch.equal(drawn["labels"][ignored], batch["labels"][ignored])
    assert not torch.equal(drawn["labels"], batch["labels"]) and (drawn["labels"][~ignored] >= 0).all()
    with torch.no_grad():  # every drawn token has probability > 0 under the model at its position
        probs = torch.softmax(featurizer.model(input_ids=batch["input_ids"],
                                               attention_mask=batch["attention_mask"]).logits[:, :-1].float(), -1)
    label = drawn["labels"][:, 1:]
    keep = label != IGNORE
    assert (probs.gather(-1, label.clamp(min=0)[..., None])[..., 0][keep] > 0).all()

    files = []
    for name in ("a", "b"):
        shutil.copytree(db.path, tmp_path / name)
        entry = connect(tmp_path / name).fit_factors("kfac", progress=False).entry
        assert entry["fitted_on"]["fisher"] == "sampled"
        files.append(entry["file"])
    assert files[0] == files[1]  # named by content: the same draws, the same tensors
    empirical = connect(tmp_path / "a").fit_factors("kfac", progress=False, fisher="empirical").entry
    assert empirical["file"] != files[0] and empirical["fitted_on"]["fisher"] == "empirical"
