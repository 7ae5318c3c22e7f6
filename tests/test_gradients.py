"""The gradient ingest worker: stored vectors, invariance, resume after kill -9, shards, refusals."""

import os
import signal
import subprocess
import sys

import numpy as np
import pytest
import torch
from stored_vectors import close, vectors_by_id

from trackstar_db import connect
from trackstar_db.errors import TrackstarError
from trackstar_db.featurizer.config import FeaturizerConfig
from trackstar_db.featurizer.tokenize import collate, encode_text, pad_id
from trackstar_db.gradients.loader import database_featurizer
from trackstar_db.models.load import open_model
from trackstar_db.store.checkpoints import source as model_source
from trackstar_db.gradients.worker import GradientJob, ingest_gradients

CONFIG = FeaturizerConfig(dim=1024, correction="adam-factored")



def test_stored_vectors_equal_the_featurizer_and_cover_every_example(tiny_db):
    totals = ingest_gradients(tiny_db, CONFIG, GradientJob("train", batch_size=8), progress=False)
    n = tiny_db.count("examples")
    assert totals["tables"] == {"grads_train_corrected": n, "grads_train_uncorrected": n}
    ids, stored, table = vectors_by_id(tiny_db, "grads_train_corrected")
    assert len(set(ids)) == n and torch.isfinite(stored).all()
    assert np.allclose(table.column("norm").to_numpy(), stored.norm(dim=1).numpy(), rtol=1e-5)
    featurizer, tokenizer = database_featurizer(tiny_db, CONFIG, uncorrected=True)
    texts = dict(zip(*[tiny_db.table("examples").column(c).to_pylist() for c in ("example_id", "text")]))
    out = featurizer.featurize(collate([encode_text(tokenizer, texts[i]) for i in ids[:5]], pad_id(tokenizer)))
    assert close(out.vectors["corrected"], stored[:5])
    _, raw, _ = vectors_by_id(tiny_db, "grads_train_uncorrected")
    assert close(out.vectors["uncorrected"], raw[:5])
    assert not torch.allclose(raw[:5], stored[:5])  # the correction did something
    manifest = connect(tiny_db.path).manifest["featurizer"]
    assert manifest["config"] == CONFIG.to_dict() and manifest["dtype"] == "float32"


def test_queries_split_and_storage_dtypes(tiny_db):
    ingest_gradients(tiny_db, CONFIG, GradientJob("queries", dtype="bfloat16"), progress=False)
    assert tiny_db.count("grads_queries_corrected") == tiny_db.count("queries")
    _, vectors, table = vectors_by_id(tiny_db, "grads_queries_corrected")
    assert str(table.schema.field("vector").type.value_type) == "uint16"
    norms = torch.tensor(table.column("norm").to_numpy())
    assert torch.allclose(vectors.norm(dim=1), norms, rtol=2e-2)  # bfloat16 keeps ~3 digits


def test_batch_size_does_not_change_vectors(tiny_db, tmp_path):
    ingest_gradients(tiny_db, CONFIG, GradientJob("train", batch_size=1, limit=24), progress=False)
    ids_1, one, _ = vectors_by_id(tiny_db, "grads_train_corrected")
    other = tmp_path / "other"
    import shutil

    # a copy without gradient tables, nor the record of their committed versions
    shutil.copytree(tiny_db.path, other, ignore=shutil.ignore_patterns("grads_*", "versions.json"))
    db2 = connect(other)
    db2.manifest.pop("featurizer"), db2.manifest["gradient_tables"].clear()
    db2.save_manifest()
    ingest_gradients(db2, CONFIG, GradientJob("train", batch_size=16), progress=False)
    _, sixteen, table = vectors_by_id(db2, "grads_train_corrected")
    index = {i: r for r, i in enumerate(table.sort_by("id").column("id").to_pylist())}
    assert close(one, sixteen[[index[i] for i in ids_1]])


def test_interrupted_run_resumes_to_the_clean_result(tiny_db):
    job = GradientJob("train", batch_size=4, commit_rows=8)
    ingest_gradients(tiny_db, CONFIG, GradientJob("train", batch_size=4, commit_rows=8, limit=13), progress=False)
    assert 8 <= tiny_db.count("grads_train_corrected") <= 16
    ingest_gradients(tiny_db, None, job, progress=False)  # settings come from the manifest
    ids, resumed, _ = vectors_by_id(tiny_db, "grads_train_corrected")
    assert len(ids) == len(set(ids)) == tiny_db.count("examples")
    assert len(tiny_db.dataset("grads_train_corrected").get_fragments()) == 1  # commits compacted at the end
    again = ingest_gradients(tiny_db, None, job, progress=False)
    assert again["rows"] == 0


def _cli(*args, **kwargs):
    return subprocess.Popen([sys.executable, "-m", "trackstar_db.cli", *map(str, args)],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, **kwargs)


def test_kill_9_then_resume_equals_clean_run(tiny_db, tmp_path):
    import shutil

    clean = tmp_path / "clean"
    shutil.copytree(tiny_db.path, clean)
    common = ["--split", "train", "--dim", 1024, "--batch-size", 8, "--commit-rows", 16]
    ingest_gradients(connect(clean), CONFIG, GradientJob("train", batch_size=8), progress=False)
    # killed (SIGKILL) right after its second commit: a named fault point, not a timed sleep
    process = _cli("ingest", "gradients", tiny_db.path, *common,
                   env=dict(os.environ, TRACKSTAR_FAULT="gradients.commit:4"))
    assert process.wait(timeout=300) == -signal.SIGKILL
    partial = tiny_db.count("grads_train_corrected")
    assert 0 < partial < tiny_db.count("examples"), "kill came too late to test resuming"
    assert _cli("ingest", "gradients", tiny_db.path, *common).wait() == 0
    ids_a, a, _ = vectors_by_id(connect(tiny_db.path), "grads_train_corrected")
    ids_b, b, _ = vectors_by_id(connect(clean), "grads_train_corrected")
    assert ids_a == ids_b and close(a, b)


def test_two_shard_processes_equal_one_worker(tiny_db, tmp_path):
    import shutil

    single = tmp_path / "single"
    shutil.copytree(tiny_db.path, single)
    ingest_gradients(connect(single), CONFIG, GradientJob("train", batch_size=8), progress=False)
    # fix the settings first (as ingest/multi_gpu.sh does), then two concurrent shards
    ingest_gradients(tiny_db, CONFIG, GradientJob("train", limit=1), progress=False)
    shards = [_cli("ingest", "gradients", tiny_db.path, "--split", "train", "--shard", f"{i}/2",
                   "--batch-size", 8, "--commit-rows", 32) for i in range(2)]
    for process in shards:
        _, err = process.communicate(timeout=300)
        assert process.returncode == 0, err.decode()[-2000:]
    ids_a, a, _ = vectors_by_id(connect(tiny_db.path), "grads_train_corrected")
    ids_b, b, _ = vectors_by_id(connect(single), "grads_train_corrected")
    assert ids_a == ids_b and close(a, b)


def test_different_settings_are_refused_and_nothing_changes(tiny_db):
    ingest_gradients(tiny_db, CONFIG, GradientJob("train", limit=4), progress=False)
    before = (tiny_db.path / "manifest.json").read_text()
    with pytest.raises(TrackstarError, match="'config.dim' is 2048 but the database holds 1024"):
        ingest_gradients(tiny_db, FeaturizerConfig(dim=2048, correction="adam-factored"),
                         GradientJob("train"), progress=False)
    with pytest.raises(TrackstarError, match="dtype"):
        ingest_gradients(tiny_db, CONFIG, GradientJob("train", dtype="float16"), progress=False)
    assert (tiny_db.path / "manifest.json").read_text() == before
    assert tiny_db.count("grads_train_corrected") == 4


def test_changing_the_model_under_stored_gradients_is_refused(tiny_db, tmp_path):
    ingest_gradients(tiny_db, CONFIG, GradientJob("train", limit=2), progress=False)
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(tiny_db.manifest["model"]["path"])
    with torch.no_grad():
        next(model.parameters()).add_(1.0)
    model.save_pretrained(tmp_path / "changed")
    AutoTokenizer.from_pretrained(tiny_db.manifest["model"]["path"]).save_pretrained(tmp_path / "changed")
    with pytest.raises(TrackstarError, match="fingerprint"):
        tiny_db.set_model(tmp_path / "changed")


def test_corpus_ingest_counts_tokens_once_a_model_is_recorded(tiny_db, tmp_path):
    import json

    from trackstar_db.sources.corpus import ingest_corpus

    path = tmp_path / "more.jsonl"
    path.write_text(json.dumps({"sentence_id": "new-1", "text": "a b c"}) + "\n")
    ingest_corpus(tiny_db, [path], progress=False)
    row = tiny_db.table("examples", filter="example_id = 'new-1'").to_pylist()[0]
    _, tokenizer = open_model(model_source(tiny_db))
    assert row["n_tokens"] == len(tokenizer("a b c", add_special_tokens=False)["input_ids"]) == 3


@pytest.mark.parametrize("correction, source", [("estimated", "estimated: mean squared per-example gradient"),
                                                ("adam-exact", "Adam exp_avg_sq"), ("none", "none")])
def test_every_correction_runs_through_the_worker_and_is_recorded(tiny_db, correction, source):
    config = FeaturizerConfig(dim=1024, correction=correction)
    job = GradientJob("train", batch_size=8, limit=8, estimate_sample=16)
    totals = ingest_gradients(tiny_db, config, job, progress=False)
    table = "grads_train_uncorrected" if correction == "none" else "grads_train_corrected"
    assert totals["tables"][table] == 8
    assert connect(tiny_db.path).manifest["featurizer"]["correction_source"].startswith(source)


def test_adafactor_correction_without_its_state_is_a_clear_error(tiny_db):
    with pytest.raises(ValueError, match="exp_avg_sq_row"):
        ingest_gradients(tiny_db, FeaturizerConfig(dim=1024, correction="adafactor"), GradientJob("train", limit=2),
                         progress=False)
    assert not tiny_db.has_table("grads_train_corrected")


@pytest.mark.slow
def test_kill_9_then_resume_of_a_checkpoint_equals_clean_run(tiny_db, tmp_path):
    """An intermediate checkpoint's ingest (--checkpoint) resumes after kill -9 like the final one's."""
    import shutil

    from test_tracin import db_with_checkpoints

    db_with_checkpoints(tiny_db, tmp_path / "kept", attach=False)  # the final checkpoint's tables only
    clean = tmp_path / "clean"
    shutil.copytree(tiny_db.path, clean)
    name, table = "step-000008", "grads_train_corrected__step-000008"
    args = ["ingest", "gradients", tiny_db.path, "--split", "train", "--checkpoint", name, "--batch-size", 8,
            "--commit-rows", 16]
    ingest_gradients(connect(clean), None, GradientJob("train", batch_size=8, checkpoint=name), progress=False)
    killed = _cli(*args, env=dict(os.environ, TRACKSTAR_FAULT="gradients.commit:4"))
    assert killed.wait(timeout=300) == -signal.SIGKILL
    assert 0 < connect(tiny_db.path).count(table) < tiny_db.count("examples"), "kill came too late to test resuming"
    resumed = _cli(*args)
    assert resumed.wait(timeout=300) == 0, resumed.stderr.read().decode()[-2000:]
    (ids_a, a, _), (ids_b, b, _) = (vectors_by_id(connect(path), table) for path in (tiny_db.path, clean))
    assert ids_a == ids_b and close(a, b)
    _, final, _ = vectors_by_id(connect(clean), "grads_train_corrected")
    assert not close(a, final)  # the checkpoint's own weights, not the final one's
