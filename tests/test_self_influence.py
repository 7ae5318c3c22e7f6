"""Self-influence: g R^-1 g and |g|^2 as fit stores them equal a brute-force computation from the
stored vectors and R; a table changed since fit is refused; `rank` lists the outliers; planted
contradictions are written as asked; the report shows the distribution."""

import json

import numpy as np
import pytest
import torch
from click.testing import CliRunner

from trackstar_db.errors import TrackstarError


@pytest.fixture(scope="module")
def db(tiny_db_template, tmp_path_factory):
    """The tiny database with gradients (train and queries, both variants) and R fitted."""
    from databases import with_gradients

    return with_gradients(tiny_db_template, tmp_path_factory.mktemp("self_influence"))


@pytest.mark.parametrize("variant", ["corrected", "uncorrected"])
def test_self_influence_equals_g_r_inverse_g(db, variant):
    from trackstar_db.store.vectors import to_torch

    name = f"grads_train_{variant}"
    stored = db.table(name)
    g = to_torch(stored.column("vector"), db.manifest["gradient_tables"][name]["dtype"]).double()
    pre = db.gradient_table("train", corrected=variant == "corrected").load_preconditioner("train")
    r_inverse = torch.block_diag(*pre.power(-1.0))  # damped R^-1 over every block, float64
    want = dict(zip(stored.column("id").to_pylist(), ((g @ r_inverse) * g).sum(dim=1).tolist()))
    plain = dict(zip(stored.column("id").to_pylist(), (g * g).sum(dim=1).tolist()))
    ranked = db.self_influence(variant=variant)
    assert ranked.num_rows == len(want) and ranked.column("rank").to_pylist() == list(range(1, len(want) + 1))
    ids = ranked.column("example_id").to_pylist()
    got = ranked.column("self_influence").to_numpy()
    assert (np.diff(got) <= 0).all()
    assert np.allclose(got, [want[i] for i in ids], rtol=1e-3)
    assert np.allclose(ranked.column("grad_sq_norm").to_numpy(), [plain[i] for i in ids], rtol=1e-3)
    assert db.self_influence(variant=variant, k=7).column("example_id").to_pylist() == ids[:7]


def test_a_table_changed_since_fit_is_refused(db, tmp_path):
    import shutil

    from trackstar_db import connect
    from trackstar_db.featurizer.config import FeaturizerConfig
    from trackstar_db.gradients.worker import GradientJob, ingest_gradients
    from trackstar_db.sources.corpus import ingest_corpus

    shutil.copytree(db.path.parent / "model", tmp_path / "model")
    shutil.copytree(db.path, tmp_path / "db")
    other = connect(tmp_path / "db")
    other.set_model(tmp_path / "model")
    extra = tmp_path / "more.jsonl"
    extra.write_text(json.dumps({"id": "new-1", "text": "Seideko visited the harbor."}) + "\n")
    ingest_corpus(other, [extra], progress=False)
    ingest_gradients(other, FeaturizerConfig(dim=1024, correction="adam-factored"), GradientJob("train"), progress=False)
    with pytest.raises(TrackstarError, match="changed since R was fitted.*run 'trackstar-db fit"):
        other.self_influence()


def test_rank_cli_lists_the_top(db):
    from trackstar_db.cli import main

    result = CliRunner().invoke(main, ["rank", str(db.path), "--k", "4", "--format", "json"])
    assert result.exit_code == 0, result.output
    rows = [json.loads(line) for line in result.stdout.splitlines()]
    assert [r["example_id"] for r in rows] == db.self_influence(k=4).column("example_id").to_pylist()
    result = CliRunner().invoke(main, ["rank", str(db.path), "--k", "0"])
    assert result.exit_code != 0 and result.output.strip() == "Error: --k must be >= 1, not 0"


def test_plant_contradictions_swaps_objects_of_distinct_facts(tmp_path):
    from trackstar_db.testbed.contradictions import plant_contradictions
    from trackstar_db.testbed.world import generate_world

    world = generate_world(tmp_path / "w", seed=1, size="tiny")
    before = {json.loads(line)["sentence_id"]: json.loads(line) for line in world.sentences_path.read_text().splitlines()}
    facts = [json.loads(line) for line in world.facts_path.read_text().splitlines()]
    planted = plant_contradictions(world, 5, seed=3)
    after = {json.loads(line)["sentence_id"]: json.loads(line) for line in world.sentences_path.read_text().splitlines()}
    assert len(set(planted)) == 5
    assert [i for i in before if before[i] != after[i]] == sorted(planted, key=list(before).index)
    for sentence_id in planted:
        fact = next(f for f in facts if sentence_id in f["trex_sentences"])
        old, new = before[sentence_id]["text"], after[sentence_id]["text"]
        assert fact["entity1"] in old and fact["entity1"] not in new and after[sentence_id]["fact_triples"] == []
        assert old.replace(fact["entity1"], "") != new and len(old.split()) == len(new.split())
    stated = [json.loads(line) for line in world.facts_path.read_text().splitlines()]
    assert not {s for f in stated for s in f["trex_sentences"]} & set(planted)
    with pytest.raises(ValueError, match="asked for 100000"):
        plant_contradictions(world, 100000)


def test_report_sections_show_the_distribution_and_the_ledger(db):
    from trackstar_db.retrieval.runs import RetrieveOptions, retrieve
    from trackstar_db.report.curation import sections

    retrieve(db, "bm25", RetrieveOptions(k=5), replace=True)
    found = {anchor: part for anchor, _, part in sections(db)}
    assert set(found) == {"self-influence", "ledger"}
    assert "<svg" in found["self-influence"] and db.self_influence(k=1).column("example_id")[0].as_py() in \
        found["self-influence"]
    assert "<svg" in found["ledger"] and "bootstrap" in found["ledger"]


def test_write_report_renders_the_sections(db, tmp_path):
    import pyarrow as pa

    from trackstar_db.report.summary import write_report
    from trackstar_db.retrieval.runs import RetrieveOptions, retrieve
    from trackstar_db.report.curation import sections

    retrieve(db, "bm25", RetrieveOptions(k=5), replace=True)
    summary = pa.table({"method": ["bm25"], "run_id": ["bm25"], "mrr": [0.5], "recall_at_10": [0.25]})
    page = write_report(tmp_path, summary, sections=sections(db)).read_text()
    assert '<a href="#self-influence">' in page and '<h2 id="ledger">Contribution ledger by source</h2>' in page
    assert page.count("<svg") == 3  # the summary plot, the distribution, the ledger
