"""Per-token attribution: the parts of a proponent's projected gradient, and of its score, sum exactly."""


import pytest
import torch
from databases import copy_db

from tests.tiny_models import make_model, random_batch
from trackstar_db.errors import TrackstarError
from trackstar_db.featurizer.config import FeaturizerConfig
from trackstar_db.featurizer.per_example import Featurizer
from trackstar_db.featurizer.per_token import per_token_vectors, token_scores
from trackstar_db.gradients.fit import fit
from trackstar_db.gradients.worker import GradientJob, ingest_gradients


def _one(batch, i):
    n = int(batch["attention_mask"][i].sum())
    return {k: v[i: i + 1, :n] for k, v in batch.items()}


@pytest.mark.parametrize("family", ["gpt2", "llama"])
def test_parts_sum_to_the_featurizer_vector(family):
    torch.manual_seed(0)
    model = make_model(family)
    featurizer = Featurizer(model, FeaturizerConfig(dim=1024, correction="none"))
    batch = random_batch(4, seed=1, query_fraction=0.5)
    whole = featurizer.featurize(batch).vectors["uncorrected"]
    for i in range(4):
        example = _one(batch, i)
        parts = per_token_vectors(featurizer, example)["uncorrected"]
        assert parts.shape == (example["input_ids"].shape[1], featurizer.layout.dim)
        torch.testing.assert_close(parts.sum(0), whole[i], rtol=1e-4, atol=1e-5 * float(whole[i].abs().max()))
        # the last position predicts nothing and (causal model) feeds no later loss: its part is 0
        assert float(parts[-1].abs().max()) == 0.0
        assert int((parts.abs().sum(1) > 0).sum()) >= 2  # the split is not all on one token
        q = torch.randn(featurizer.layout.dim, generator=torch.Generator().manual_seed(i))
        scores = token_scores(parts, q, norm=3.0)
        assert abs(float(scores.sum()) - float(whole[i].double() @ q.double()) / 3.0) < 1e-4 * float(scores.abs().sum())


def test_one_example_only():
    featurizer = Featurizer(make_model("gpt2"), FeaturizerConfig(dim=1024, correction="none"))
    with pytest.raises(ValueError, match="one example"):
        per_token_vectors(featurizer, random_batch(2, seed=0))


@pytest.fixture(scope="module")
def fitted(tiny_db_template, tmp_path_factory):
    """A copy of the tiny database with both gradient tables and every R (built once here)."""
    root = tmp_path_factory.mktemp("per_token")
    db = copy_db(tiny_db_template, root)
    config = FeaturizerConfig(dim=1024, correction="adam-factored")
    for split in ("train", "queries"):
        ingest_gradients(db, config, GradientJob(split, batch_size=16), progress=False)
    fit(db)
    return db


@pytest.mark.parametrize("method", ["trackstar", "grad-dot", "trak", "opt-cos"])
def test_token_contributions_sum_to_the_stored_score(fitted, method):
    query = fitted.table("queries").to_pylist()[3]
    hits = fitted.query(query["prompt"], query["target"], k=3, method=method).to_pylist()
    for hit in hits[:2] + [h for h in hits if h["kind"] == "opponent"][:1]:
        tokens = fitted.token_contributions(query["prompt"], query["target"], hit["example_id"], method=method)
        total = sum(tokens.column("contribution").to_pylist())
        scale = max(abs(hit["score"]), sum(abs(c) for c in tokens.column("contribution").to_pylist()) * 1e-2)
        assert abs(total - hit["score"]) <= 1e-3 * scale, (method, hit["kind"], total, hit["score"])
        assert tokens.column("method").to_pylist()[0] == method
        assert tokens.column("example_id").to_pylist()[0] == hit["example_id"]
        # token spans point into the example's text
        spans = [(s, e, t) for s, e, t in zip(*(tokens.column(c).to_pylist() for c in ("start", "end", "token")))
                 if s is not None]
        assert spans and all(hit["text"][s:e] == t for s, e, t in spans)


def test_token_contributions_refusals(fitted):
    with pytest.raises(TrackstarError, match="gradient method"):
        fitted.token_contributions("a", "b", "x", method="bm25")
    with pytest.raises(TrackstarError, match="no example 'nope'"):
        fitted.token_contributions("The capital is", "Paris", "nope", method="grad-dot")


def test_query_tokens_on_the_command_line(fitted):
    import json

    from click.testing import CliRunner

    from trackstar_db.cli import main

    query = fitted.table("queries").to_pylist()[5]
    args = ["query", str(fitted.path), "--prompt", query["prompt"], "--target", query["target"], "--k", "2",
            "--method", "trackstar", "--device", "cpu", "--tokens"]
    text = CliRunner().invoke(main, args, catch_exceptions=False)
    assert text.exit_code == 0, text.output
    assert text.stdout.count("tokens: ") == 4  # 2 proponents + 2 opponents
    out = CliRunner().invoke(main, args + ["--format", "json"], catch_exceptions=False).stdout
    rows = [json.loads(line) for line in out.splitlines() if line.strip()]
    hits = fitted.query(query["prompt"], query["target"], k=2, method="trackstar").to_pylist()
    for hit in hits:
        mine = [r["contribution"] for r in rows if r["kind"] == hit["kind"] and r["rank"] == hit["rank"]]
        assert mine and abs(sum(mine) - hit["score"]) <= 1e-3 * max(abs(hit["score"]), 1e-3)
    bad = CliRunner().invoke(main, [a if a != "trackstar" else "bm25" for a in args])
    assert bad.exit_code != 0 and "gradient method" in bad.output
