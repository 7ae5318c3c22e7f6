"""Contrastive one-prompt queries (query --control-target): loss(target) - loss(control) against a
brute-force difference of two single-target queries; refused where it means nothing."""

import numpy as np
import pytest
from databases import run_cli, with_gradients

from trackstar_db.errors import ParameterError


@pytest.fixture(scope="module")
def db(tmp_path_factory, tiny_db_template):
    return with_gradients(tiny_db_template, tmp_path_factory.mktemp("contrastive"))


@pytest.fixture(scope="module")
def pair(db):
    """A stored query's prompt and target, and another fact's target as the control."""
    rows = db.table("queries", columns=["prompt", "target", "template"]).to_pylist()
    rows = [r for r in rows if r["template"] == "prompt0"]
    control = next(r["target"] for r in rows if r["target"] != rows[0]["target"])
    return rows[0]["prompt"], rows[0]["target"], control


def _scores(table, kind="proponent"):
    return {r["example_id"]: r["score"] for r in table.to_pylist() if r["kind"] == kind}


def test_grad_dot_contrast_is_the_difference_of_two_queries(db, pair):
    """grad-dot is linear in the query gradient: every example's contrastive score must equal its
    score for the target minus its score for the control, each from its own ordinary query."""
    prompt, target, control = pair
    n = db.count("examples")
    both = _scores(db.query(prompt, target, k=n, method="grad-dot", control_target=control))
    alone = _scores(db.query(prompt, target, k=n, method="grad-dot"))
    other = _scores(db.query(prompt, control, k=n, method="grad-dot"))
    assert len(both) == len(alone) == len(other) == n
    want = np.array([alone[e] - other[e] for e in sorted(alone)])
    got = np.array([both[e] for e in sorted(alone)])
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-5 * np.abs(want).max())
    assert not np.allclose(got, np.array([alone[e] for e in sorted(alone)]))  # the control changed the answer


def test_trackstar_contrast_scores_the_gradient_difference(db, pair):
    """A unit-norm rung with R: the answer equals the scan of grad(target) - grad(control), each
    gradient featurized alone (batch of one), through the runner."""
    from trackstar_db.ladder import lookup
    from trackstar_db.retrieval import runners

    prompt, target, control = pair
    attributor = db.prompt_attributor()
    vector = attributor.gradient(prompt, target, "corrected") - attributor.gradient(prompt, control, "corrected")
    want = runners.run(db, lookup("trackstar"), runners.Request(["q"], [""], 10, query_vectors=vector))
    got = db.query(prompt, target, k=10, method="trackstar", control_target=control)
    assert [r["example_id"] for r in got.to_pylist() if r["kind"] == "proponent"] == want.proponent_ids[0]
    np.testing.assert_allclose(list(_scores(got).values()), want.proponent_scores[0], rtol=1e-4, atol=1e-6)
    assert list(_scores(got, "opponent")) == want.opponent_ids[0]


def test_contrast_is_refused_where_it_means_nothing(db, pair):
    prompt, target, _ = pair
    with pytest.raises(ParameterError, match="control_target .*gradient method"):
        db.query(prompt, target, method="bm25", control_target="Paris")
    with pytest.raises(ParameterError, match="control_target"):
        db.query(prompt, target, method="grad-dot", control_target=target)
    done = run_cli("query", db.path, "--prompt", prompt, "--target", target, "--control-target", "x", "--tokens",
                   ok=False)
    assert done.exit_code == 2 and "--control-target" in done.output and len(done.output.strip().splitlines()) == 1


def test_cli_contrast_as_a_user_types_it(db, pair):
    prompt, target, control = pair
    done = run_cli("query", db.path, "--prompt", prompt, "--target", target, "--control-target", control,
                   "--method", "grad-cos", "--k", "3")
    assert f"rather than {control!r}" in done.output and "proponents" in done.output
