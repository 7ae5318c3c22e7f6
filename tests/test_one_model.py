"""One model source, one featurize loop: every path that featurizes (the local worker, the Ray
actor's loop, TracIn-CP in memory, the one-prompt query, token contributions, tail-patch's
gradient) gives the vectors the worker stored, with the same recipe.

Reference: the vectors the local worker stored, featurized in token-budget batches of mixed
lengths. Each other path featurizes the same texts on its own (one example at a time, or in its
own batches); float32 rounding differs between batch shapes, so rows agree to TOL relative error.
"""

from __future__ import annotations

import shutil

import pyarrow.compute as pc
import pytest
import torch
from databases import copy_db
from stored_vectors import close, vectors_by_id

from trackstar_db import connect
from trackstar_db.featurizer.config import FeaturizerConfig, Layout
from trackstar_db.featurizer.projection import projection_matrix
from trackstar_db.gradients.worker import GradientJob, ingest_gradients

CONFIG = FeaturizerConfig(dim=1024, correction="adam-factored")
TOL = 1e-4  # row-relative error between float32 vectors featurized in different batch shapes
JOB = dict(batch_size=8, batch_tokens=160, commit_rows=40)  # a token budget: rows of mixed count per batch


def featurized(db, config=CONFIG):
    for split in ("train", "queries"):
        ingest_gradients(db, config, GradientJob(split, **JOB), progress=False)
    return db


@pytest.fixture(scope="module")
def recipe_db(tiny_db_template, tmp_path_factory):
    return featurized(copy_db(tiny_db_template, tmp_path_factory.mktemp("recipe")))


def stored(db, split, variant):
    ids, vectors, _ = vectors_by_id(db, f"grads_{split}_{variant}")
    return dict(zip(ids, vectors))


def sample(db, n_examples=6, n_queries=4):
    examples = db.table("examples", columns=["example_id", "text"]).sort_by("example_id")
    queries = db.table("queries", columns=["query_id", "prompt", "target"]).sort_by("query_id")
    return examples.slice(0, n_examples).to_pylist(), queries.slice(0, n_queries).to_pylist()


def test_actor_loop_writes_the_local_workers_table(recipe_db, tiny_db_template, tmp_path):
    """The Ray actor class run in this process (no Ray): its fragments, committed as the driver
    commits them, hold the local worker's rows (ids, vectors, loss, n_tokens)."""
    from trackstar_db.distributed.ingest import GradientActor, _commit
    from trackstar_db.gradients.setup import run_tables

    db = copy_db(tiny_db_template, tmp_path)
    for split in ("train", "queries"):
        job = GradientJob(split, **JOB)
        actor = GradientActor(str(db.path), CONFIG.to_dict(), job, "cpu", (0, 1))
        assert actor.run.batch_tokens == JOB["batch_tokens"]
        assert actor.setup() == ["corrected", "uncorrected"]
        tables = run_tables(db, actor.run, split)
        actor.start()
        batches = 0
        while (batch := actor.next()) is not None:
            _commit(tables, batch["fragments"], None)
            batches += 1
        assert batches > 1  # commit_rows cut the split into several fragment commits
    db = connect(db.path)  # the manifest as the actor recorded it
    for name in ("grads_train_corrected", "grads_train_uncorrected", "grads_queries_corrected"):
        ids, vectors, table = vectors_by_id(db, name)
        local_ids, local, local_table = vectors_by_id(recipe_db, name)
        assert ids == local_ids and len(set(ids)) == len(ids) == recipe_db.count(
            "examples" if "train" in name else "queries")
        assert close(vectors, local, TOL), name
        assert table.column("n_tokens").to_pylist() == local_table.column("n_tokens").to_pylist()
        assert torch.allclose(torch.tensor(table.column("loss").to_pylist()),
                              torch.tensor(local_table.column("loss").to_pylist()), rtol=1e-5)


def test_tracin_cp_one_prompt_tokens_and_tail_patch_give_the_stored_vectors(recipe_db):
    from trackstar_db.featurizer.per_token import per_token_vectors
    from trackstar_db.featurizer.tokenize import collate, encode_query, encode_text, pad_id
    from trackstar_db.retrieval.adhoc import PromptAttributor
    from trackstar_db.retrieval.tracin_cp import checkpoint_featurizer, scores
    from trackstar_db.store.checkpoints import stored as stored_points
    from trackstar_db.tailpatch.patcher import TailPatcher
    from trackstar_db.tailpatch.runs import patch_model

    db = recipe_db
    examples, queries = sample(db)
    final = stored_points(db)[-1]
    assert final.name == "final" and final.lr > 0 and final.optimizer == "adamw"
    for variant in ("corrected", "uncorrected"):
        want_z = torch.stack([stored(db, "train", variant)[e["example_id"]] for e in examples])
        want_q = torch.stack([stored(db, "queries", variant)[q["query_id"]] for q in queries])

        # TracIn-CP's featurizer, one example at a time
        featurizer, tokenizer = checkpoint_featurizer(final, CONFIG, variant)
        assert featurizer.config.correction == ("adam-factored" if variant == "corrected" else "none")
        got_z = torch.cat([featurizer.featurize(collate([encode_text(tokenizer, e["text"], CONFIG.max_length)],
                                                        pad_id(tokenizer))).vectors[variant] for e in examples])
        got_q = torch.cat([featurizer.featurize(collate([encode_query(tokenizer, q["prompt"], q["target"],
                                                                      CONFIG.max_length)], pad_id(tokenizer)))
                           .vectors[variant] for q in queries])
        assert close(got_z, want_z, TOL) and close(got_q, want_q, TOL), variant

        # the one-prompt query
        attributor = PromptAttributor(db)
        got = torch.cat([attributor.gradient(q["prompt"], q["target"], variant) for q in queries])
        assert close(got, want_q, TOL), variant

        # token contributions: the per-token parts of an example sum to its stored vector
        featurizer, tokenizer = attributor.featurizer(variant)
        for e in examples[:2]:
            parts = per_token_vectors(featurizer, collate([encode_text(tokenizer, e["text"], CONFIG.max_length)],
                                                          pad_id(tokenizer)), [variant])[variant]
            assert close(parts.sum(0, keepdim=True), want_z[examples.index(e)][None], TOL), variant

    # TracIn-CP's in-memory score over the final checkpoint = lr x the stored dot products
    pairs = [(q["prompt"], q["target"]) for q in queries]
    got = scores([final], [e["text"] for e in examples], pairs, CONFIG, "tracin-cp")
    z = torch.stack([stored(db, "train", "uncorrected")[e["example_id"]] for e in examples]).double()
    q = torch.stack([stored(db, "queries", "uncorrected")[x["query_id"]] for x in queries]).double()
    assert torch.allclose(got, final.lr * q @ z.T, rtol=1e-3, atol=1e-6 * final.lr * float(q.norm() * z.norm()))

    # tail-patch's gradient: the loss gradient its step takes, projected with the recipe
    model, tokenizer, state = patch_model(db)
    patcher = TailPatcher(model, tokenizer, state)
    layout = Layout.from_dict(db.manifest["featurizer"]["layout"])
    for e in examples[:3]:
        grads = patcher.backward_on(e["text"])
        vector = torch.zeros(layout.dim)
        for block in layout.blocks:
            g = grads[block.name].float()
            p_r = projection_matrix(CONFIG.seed, block.name, "row", block.k_r, g.shape[0])
            p_c = projection_matrix(CONFIG.seed, block.name, "col", block.k_c, g.shape[1])
            vector[block.offset: block.offset + block.size] += (p_r @ g @ p_c.T).flatten()
        assert close(vector[None], stored(db, "train", "uncorrected")[e["example_id"]][None], TOL), e["example_id"]


def test_tracin_cp_with_the_estimated_correction(tiny_db):
    """TracIn-CP in memory (a kept checkpoint, nothing attached) with correction 'estimated':
    each checkpoint's estimate comes from the database's sample, as the worker's did, so the
    tracin-cp-opt scores are the sum over checkpoints of lr x cos of the stored vectors."""
    from trackstar_db.retrieval.methods import unit_normalize
    from trackstar_db.retrieval.tracin_cp import _points, top_k_stored

    config = FeaturizerConfig(dim=1024, correction="estimated")
    db = featurized(tiny_db, config)
    assert db.manifest["featurizer"]["correction_source"].startswith("estimated")
    model_dir = db.path.parent / "model"
    step = model_dir / "checkpoints" / "step-000001"  # a kept checkpoint with the final weights
    step.mkdir(parents=True)
    for f in model_dir.iterdir():
        if f.is_file():
            shutil.copy(f, step / f.name)
    mode, points = _points(db, "tracin-cp-opt")
    assert mode == "memory" and [p.name for p in points] == ["step-000001", "final"]
    query_ids = sorted(db.table("queries", columns=["query_id"]).column("query_id").to_pylist())[:3]
    result = top_k_stored(db, query_ids, 5, "tracin-cp-opt")

    ids, z, _ = vectors_by_id(db, "grads_train_corrected")
    q = torch.stack([stored(db, "queries", "corrected")[i] for i in query_ids])
    expected = sum(p.lr for p in points) * (unit_normalize(q.double()) @ unit_normalize(z.double()).T)
    best = torch.topk(expected, 5, dim=1)
    got = torch.from_numpy(result.proponent_scores).double()
    assert torch.allclose(got, best.values, rtol=1e-3)  # the same top scores (near ties may swap ids)
    column = {example_id: i for i, example_id in enumerate(ids)}
    for row, hits in enumerate(result.proponent_ids):  # each hit's score is its own stored score
        assert torch.allclose(got[row], expected[row, [column[h] for h in hits]], rtol=1e-3)


def test_checkpoints_are_described_not_proxied(recipe_db):
    from trackstar_db.errors import TrackstarError
    from trackstar_db.models.source import ModelSource
    from trackstar_db.store import checkpoints

    final = checkpoints.source(recipe_db)
    assert isinstance(final, ModelSource) and final.is_default
    assert str(final.path) == recipe_db.manifest["model"]["path"] and final.fingerprint
    assert final.weights_dtype() == "float32" and final.with_dtype("bfloat16").weights_dtype() == "bfloat16"
    with pytest.raises(TrackstarError, match="not attached"):
        checkpoints.source(recipe_db, "step-000009")
    with pytest.raises(TrackstarError, match="model dtype"):
        final.with_dtype("int8")
    assert not hasattr(recipe_db, "load_model")  # the store opens no model; models/load.py does
    assert pc.sum(recipe_db.table("grads_train_corrected", columns=["n_tokens"]).column("n_tokens")).as_py() > 0
