"""One warm model cache per handle (models/cache.py): query, token contributions, verify's
tail-patcher and the second stage share what one of them loaded; a new model or other featurizer
settings is a miss; a server's next snapshot keeps what its manifest still describes.

Loads are counted at the one model factory (models/load.open_model), which every featurizer and
tail-patcher goes through."""

import shutil
from pathlib import Path

import pytest

from trackstar_db.models.cache import FEATURIZER_VARIANTS, ModelCache, ModelKey, state


@pytest.fixture(scope="module")
def template(tiny_db_template, tmp_path_factory):
    """The tiny database with both gradient tables, R and EK-FAC factors (module-wide, read only)."""
    from databases import run_cli, with_gradients

    db = with_gradients(tiny_db_template, tmp_path_factory.mktemp("cache"))
    run_cli("fit-factors", db.path, "--kind", "ekfac", "--device", "cpu")
    return db.path.parent


@pytest.fixture
def fresh(template, tmp_path):
    """A private copy of the template's db and model, opened with the model re-pointed."""
    from databases import copy_db

    return copy_db(template, tmp_path)


@pytest.fixture
def opened(monkeypatch):
    """Counts every model the factory opens (featurizers and tail-patchers alike)."""
    import importlib
    import re

    from trackstar_db.models import load

    calls = []
    real = load.open_model

    def counting(source, device="cpu", *args, **kwargs):
        calls.append(str(source.path))
        return real(source, device, *args, **kwargs)

    monkeypatch.setattr(load, "open_model", counting)
    package = Path(load.__file__).parents[1]  # the modules that import open_model at their top hold their own name
    for path in package.rglob("*.py"):
        if re.search(r"^from trackstar_db\.models\.load import .*\bopen_model\b", path.read_text(encoding="utf-8"), re.M):
            module = importlib.import_module(".".join(("trackstar_db", *path.relative_to(package).with_suffix("").parts)))
            monkeypatch.setattr(module, "open_model", counting)
    return calls


def _pair(db):
    row = db.table("queries", columns=["prompt", "target"]).slice(0, 2).to_pylist()
    return [(r["prompt"], r["target"]) for r in row]


def replace_model(db, root):
    """Record a retrained model: a copy of db's model with one weight changed, under a new path and
    fingerprint (what `attach` over the same architecture leaves in the manifest)."""
    import torch
    from safetensors.torch import load_file, save_file

    from trackstar_db.models.directory import fingerprint

    old = db.manifest["model"]["path"]
    new = root / "model-2"
    shutil.copytree(old, new)
    weights = sorted(new.glob("model*.safetensors"))[0]
    tensors = load_file(weights)
    name = next(n for n, t in tensors.items() if t.is_floating_point() and t.dim() == 2)
    tensors[name] = tensors[name] + 0.01 * torch.randn_like(tensors[name])
    save_file(tensors, weights, metadata={"format": "pt"})
    digest = fingerprint(new)
    assert digest != db.manifest["model"]["fingerprint"]
    with db.writer("test: replace the model"):
        db.update_manifest(lambda m: m["model"].update(path=str(new), tokenizer=str(new), fingerprint=digest))
    return new


def test_the_cache_rule():
    manifest = {"model": {"path": "/m", "fingerprint": "a"}, "featurizer": {"config": {"dim": 8}, "coverage": 1.0},
                "task": None}
    cache, loads = ModelCache(), []
    key = ModelKey.of(manifest, "corrected", "cpu")
    assert cache.get(key, lambda: loads.append(1) or "F") == "F"
    assert cache.get(key, lambda: loads.append(1) or "G") == "F" and loads == [1] and cache.loads == 1
    assert cache.get(ModelKey.of(manifest, "corrected", "cuda:0"), lambda: "C") == "C"  # another device: its own
    assert cache.find(manifest, "cpu") == "F" and cache.find(manifest, "cpu", ["tail-patch"]) is None
    # what follows the model per run (coverage, context_cap) is not a setting: the same key
    assert state(dict(manifest, featurizer={"config": {"dim": 8}, "coverage": 0.5, "context_cap": 32})) == key.state
    other = dict(manifest, featurizer={"config": {"dim": 16}})  # other settings
    assert ModelKey.of(other, "corrected", "cpu") != key and cache.find(other, "cpu") is None
    assert cache.get(ModelKey.of(other, "corrected", "cpu"), lambda: "H") == "H"
    assert cache.keys() == [ModelKey.of(other, "corrected", "cpu")]  # the other model's entries were dropped
    moved = dict(manifest, model={"path": "/m", "fingerprint": "b"})  # a new model
    successor = ModelCache()
    assert successor.adopt(cache, moved) == 0 and len(successor) == 0
    assert successor.adopt(cache, other) == 1 and successor.find(other, "cpu") == "H" and successor.loads == 0
    assert set(FEATURIZER_VARIANTS) >= {"corrected", "uncorrected"}


def test_every_verb_shares_one_load(fresh, opened):
    """Two queries, the other gradient variant's rung, token contributions and the second stage:
    one model opened per variant; verify's patcher once for two verified queries."""
    (p1, t1), (p2, t2) = _pair(fresh)
    first = fresh.query(p1, t1, k=3, method="trackstar")
    assert len(opened) == 1
    fresh.query(p2, t2, k=3, method="trackstar")
    fresh.token_contributions(p1, t1, first.column("example_id")[0].as_py(), method="trackstar")
    fresh.query(p1, t1, k=3, method="trackstar", rerank="ekfac", candidates=10)  # the warm featurizer re-scores
    assert len(opened) == 1 and fresh.models.loads == 1
    fresh.query(p1, t1, k=3, method="grad-cos")  # the uncorrected variant: a featurizer of its own
    assert len(opened) == 2
    fresh.query(p1, t1, k=2, method="trackstar", verify=True)
    fresh.query(p2, t2, k=2, method="trackstar", verify=True)
    assert len(opened) == 3 and {k.variant for k in fresh.models.keys()} == {"corrected", "uncorrected", "tail-patch"}
    assert fresh.prompt_attributor("cpu").featurizer("corrected") is fresh.models.find(fresh.manifest, "cpu")


def test_the_second_stage_alone_loads_a_plain_featurizer_once(fresh, opened):
    from trackstar_db.retrieval import rerank

    pairs = _pair(fresh)
    rerank.score_examples(fresh, pairs[:1])
    rerank.score_examples(fresh, pairs[1:])
    assert len(opened) == 1 and [k.variant for k in fresh.models.keys()] == ["plain"]
    fresh.query(*pairs[0], k=3, method="trackstar")  # a query builds its own variant, the plain one is kept
    assert len(opened) == 2 and fresh.models.find(fresh.manifest, "cpu", ["plain"]) is not None


def test_a_refit_keeps_the_model_warm(fresh, opened):
    """R is not part of the featurizer (scoring applies it): a refit changes the answer, not the model."""
    (prompt, target), _ = _pair(fresh)
    before = fresh.query(prompt, target, k=5, method="trackstar")
    fresh.fit(damping=0.5)
    after = fresh.query(prompt, target, k=5, method="trackstar")
    assert len(opened) == 1 and fresh.models.loads == 1
    assert after.column("score").to_pylist() != before.column("score").to_pylist()  # the new R answered


def test_a_new_model_is_loaded_again(fresh, opened, tmp_path):
    (prompt, target), _ = _pair(fresh)
    before = fresh.query(prompt, target, k=5, method="grad-dot")
    fresh.query(prompt, target, k=5, method="grad-dot")
    assert len(opened) == 1
    new = replace_model(fresh, tmp_path)
    after = fresh.query(prompt, target, k=5, method="grad-dot")  # the handle re-reads its manifest per verb
    assert opened == [opened[0], str(new)]
    assert [k.model for k in fresh.models.keys()] == [state(fresh.manifest)[0]]  # the old model's entry dropped
    assert after.column("score").to_pylist() != before.column("score").to_pylist()  # the new weights answered


def test_a_serve_snapshot_keeps_the_model_while_it_is_the_same(fresh, opened, tmp_path):
    from trackstar_db.serve.snapshot import Tracker

    (prompt, target), _ = _pair(fresh)
    tracker = Tracker(fresh.path, interval=0)
    first = tracker.current()
    first.query(prompt, target, k=3, method="trackstar")
    warm = first.models.find(first.manifest, "cpu")
    assert len(opened) == 1 and warm is not None
    (tmp_path / "more.jsonl").write_text('{"id": "late-1", "text": "A late example about the river."}\n')
    fresh.ingest_corpus([tmp_path / "more.jsonl"], progress=False)  # a writer commits; the model is the same
    second = tracker.current()
    assert second is not first and second.count("examples") == first.count("examples") + 1
    assert second.models.find(second.manifest, "cpu") is warm and second.models.loads == 0
    second.query(prompt, target, k=3, method="trackstar")
    assert len(opened) == 1
    replace_model(fresh, tmp_path)
    third = tracker.current()
    assert third is not second and len(third.models) == 0  # the old model is not carried over
    third.query(prompt, target, k=3, method="trackstar")
    assert len(opened) == 2 and third.models.loads == 1
    assert second.models.find(second.manifest, "cpu") is warm  # the old snapshot, still answering, keeps its own
