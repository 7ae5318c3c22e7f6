"""The pipelined gradient worker: token-budget batches, threads ahead and behind the model, model
dtype, the memory plan. The synchronous path (pipeline=False, fixed batch_size rows) is the
reference every pipelined table is compared with."""

import os
import shutil
import signal
import subprocess
import sys
import threading

import pytest
import torch
from stored_vectors import close, vectors_by_id

from trackstar_db import connect
from trackstar_db.errors import TrackstarError
from trackstar_db.featurizer.config import FeaturizerConfig
from trackstar_db.featurizer.tokenize import Encoded
from trackstar_db.gradients.memory import CPU_BATCH_TOKENS, plan_batch_tokens
from trackstar_db.gradients.pipeline import Writer, ahead, token_batches
from trackstar_db.gradients.worker import GradientJob, ingest_gradients
from trackstar_db.models.source import checkpoint_dtype

CONFIG = FeaturizerConfig(dim=1024, correction="adam-factored")
BF16_TOLERANCE = 3e-2  # row-relative, bfloat16 model vs float32 model (measured <= 1e-2 on tiny models)



def fresh_copy(db, path):
    """A copy of db's directory without gradients (same examples, same model)."""
    shutil.copytree(db.path, path, ignore=shutil.ignore_patterns("grads_*"))
    copy = connect(path)
    copy.manifest.pop("featurizer", None)
    copy.manifest.get("gradient_tables", {}).clear()
    copy.save_manifest()
    return copy


@pytest.fixture
def reference(tiny_db, tmp_path):
    """The synchronous worker's corrected and uncorrected tables on a copy of tiny_db."""
    db = fresh_copy(tiny_db, tmp_path / "sync")
    job = GradientJob("train", batch_size=8, batch_tokens=None, pipeline=False)
    ingest_gradients(db, CONFIG, job, progress=False)
    return {name: vectors_by_id(db, name)[:2] for name in ("grads_train_corrected", "grads_train_uncorrected")}


# -- batching --------------------------------------------------------------------------------

def test_token_batches_respect_the_budget_and_keep_every_id():
    g = torch.Generator().manual_seed(0)
    lengths = torch.randint(1, 40, (200,), generator=g).tolist()
    items = [Encoded([1] * n, [1] * n) for n in lengths]
    ids = [f"e{i}" for i in range(len(items))]
    for budget, rows in ((16, 64), (100, 8), (300, 64), (10_000, 16)):
        batches = token_batches(ids, items, budget, rows)
        assert sorted(i for b, _ in batches for i in b) == sorted(ids)
        widths = []
        for batch_ids, batch_items in batches:
            width = max(len(it.input_ids) for it in batch_items)
            assert len(batch_ids) <= rows
            assert len(batch_ids) == 1 or len(batch_ids) * width <= budget
            assert [lengths[int(i[1:])] for i in batch_ids] == [len(it.input_ids) for it in batch_items]
            widths.append(width)
        assert widths == sorted(widths, reverse=True)  # length-bucketed: longest first
        # greedy: no batch could have taken the next batch's first item
        for (b, its), (_, nxt) in zip(batches, batches[1:]):
            width = max(len(it.input_ids) for it in its)
            assert len(b) == rows or (len(b) + 1) * max(width, len(nxt[0].input_ids)) > budget
    fixed = token_batches(ids, items, None, 16)
    assert [b for b, _ in fixed] == [ids[i:i + 16] for i in range(0, 200, 16)]


def test_ahead_and_writer_pass_items_and_errors_through():
    assert list(ahead(iter(range(50)), depth=2)) == list(range(50))

    def failing():
        yield 1
        raise ValueError("bad record 2")

    with pytest.raises(ValueError, match="bad record 2"):
        list(ahead(failing(), depth=1))
    seen, threads = [], set()
    with Writer(lambda x: (seen.append(x), threads.add(threading.get_ident())), depth=2) as writer:
        for i in range(20):
            writer.put(i)
    assert seen == list(range(20)) and threading.get_ident() not in threads

    def refuse(x):
        if x == 3:
            raise TrackstarError("gradient of '3' has norm nan")

    with pytest.raises(TrackstarError, match="norm nan"):
        with Writer(refuse, depth=1) as writer:
            for i in range(100):
                writer.put(i)


# -- the worker ------------------------------------------------------------------------------

@pytest.mark.parametrize("budget", [24, 200, 4096])
def test_pipelined_worker_equals_the_synchronous_one(tiny_db, reference, budget):
    totals = ingest_gradients(tiny_db, CONFIG, GradientJob("train", batch_size=16, batch_tokens=budget,
                                                          commit_rows=40), progress=False)
    assert totals["batch_tokens"] == budget and totals["rows"] == tiny_db.count("examples")
    for name, (ids_ref, ref) in reference.items():
        ids, vectors, _ = vectors_by_id(tiny_db, name)
        assert ids == ids_ref and close(vectors, ref)


def _cli(*args, **kwargs):
    return subprocess.Popen([sys.executable, "-m", "trackstar_db.cli", *map(str, args)],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, **kwargs)


def test_kill_9_in_the_writer_thread_then_rerun_equals_the_synchronous_table(tiny_db, reference):
    common = ["--split", "train", "--dim", 1024, "--correction", "adam-factored", "--batch-tokens", 64,
              "--batch-size", 8, "--commit-rows", 16]
    process = _cli("ingest", "gradients", tiny_db.path, *common,
                   env=dict(os.environ, TRACKSTAR_FAULT="gradients.commit:4"))
    assert process.wait(timeout=300) == -signal.SIGKILL
    partial = connect(tiny_db.path).count("grads_train_corrected")
    assert 0 < partial < tiny_db.count("examples"), "kill came too late to test resuming"
    rerun = _cli("ingest", "gradients", tiny_db.path, *common)
    _, err = rerun.communicate(timeout=300)
    assert rerun.returncode == 0, err.decode()[-2000:]
    db = connect(tiny_db.path)
    for name, (ids_ref, ref) in reference.items():
        ids, vectors, _ = vectors_by_id(db, name)
        assert ids == ids_ref and close(vectors, ref)


def test_bfloat16_model_gives_the_float32_vectors_within_tolerance(tiny_db, reference):
    assert checkpoint_dtype(tiny_db.manifest["model"]["path"]) == "float32"
    ingest_gradients(tiny_db, CONFIG, GradientJob("train", model_dtype="bfloat16"), progress=False)
    assert connect(tiny_db.path).manifest["featurizer"]["model_dtype"] == "bfloat16"
    for name, (ids_ref, ref) in reference.items():
        ids, vectors, _ = vectors_by_id(tiny_db, name)
        assert ids == ids_ref
        assert close(vectors, ref, BF16_TOLERANCE)
        assert not close(vectors, ref, 1e-5)  # it did run in bfloat16
    with pytest.raises(TrackstarError, match="model_dtype"):  # never mixed with float32 vectors
        ingest_gradients(tiny_db, CONFIG, GradientJob("train", model_dtype="float32"), progress=False)


@pytest.mark.parametrize("family", ["gpt2", "llama", "gptneox"])
def test_bfloat16_featurizer_matches_float32_on_every_family(family):
    """Corrected (factored, estimated) and uncorrected vectors of a bfloat16 copy of a model."""
    from tiny_models import make_model, random_batch

    from trackstar_db.featurizer import Featurizer, build_second_moment

    model = make_model(family)
    config = FeaturizerConfig(dim=1024, correction="estimated")
    moment = build_second_moment(config, model, None, [random_batch(8, seed=2)])
    batch = random_batch(12, seed=1)
    want = Featurizer(model, config, moment, uncorrected=True).featurize(batch)
    half = Featurizer(model.to(torch.bfloat16), config, moment, uncorrected=True)
    assert half.dtype == torch.bfloat16
    got = half.featurize(batch)
    for variant in ("corrected", "uncorrected"):
        assert got.vectors[variant].dtype == torch.float32
        assert close(got.vectors[variant], want.vectors[variant], BF16_TOLERANCE)
    assert torch.allclose(got.loss, want.loss, atol=2e-2)


def test_checkpoint_dtype_reads_config_json(tmp_path):
    (tmp_path / "config.json").write_text('{"torch_dtype": "bfloat16"}')
    assert checkpoint_dtype(tmp_path) == "bfloat16"
    (tmp_path / "config.json").write_text('{"model_type": "gpt2"}')
    assert checkpoint_dtype(tmp_path) == "float32"
    (tmp_path / "config.json").write_text('{"torch_dtype": "int8"}')
    with pytest.raises(TrackstarError, match="config.json: field 'torch_dtype' is 'int8'"):
        checkpoint_dtype(tmp_path)
    with pytest.raises(TrackstarError, match="^model_dtype must be one of"):
        GradientJob("train", model_dtype="fp8")


# -- the memory plan -------------------------------------------------------------------------

def _featurizer(dtype=torch.float32, device="cpu"):
    from tiny_models import make_model

    from trackstar_db.featurizer import Featurizer

    return Featurizer(make_model("gpt2").to(device, dtype), FeaturizerConfig(dim=1024, correction="none"), device=device)


def test_memory_plan_grows_with_free_memory_and_refuses_what_cannot_fit():
    featurizer = _featurizer()
    assert plan_batch_tokens(featurizer, 64).batch_tokens == CPU_BATCH_TOKENS  # CPU: the fixed default
    small, large = (plan_batch_tokens(featurizer, 64, free_bytes=gib * 2**30) for gib in (1, 8))
    assert 64 <= small.batch_tokens < large.batch_tokens
    assert large.batch_tokens * large.bytes_per_token <= 8 * 2**30  # never more than is free
    with pytest.raises(TrackstarError, match="one 64-token example needs .* GiB are free"):
        plan_batch_tokens(featurizer, 64, free_bytes=600 * 2**20)
    half = plan_batch_tokens(_featurizer(dtype=torch.bfloat16), 64, free_bytes=2**30)
    assert half.bytes_per_token < small.bytes_per_token


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_cuda_pipelined_worker_equals_the_cpu_synchronous_one(tiny_db, reference):
    totals = ingest_gradients(tiny_db, CONFIG, GradientJob("train", device="cuda"), progress=False)
    assert totals["batch_tokens"] > CPU_BATCH_TOKENS  # planned from the free GPU memory
    for name, (ids_ref, ref) in reference.items():
        ids, vectors, _ = vectors_by_id(tiny_db, name)
        assert ids == ids_ref and close(vectors, ref, 1e-3)


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_cuda_planned_budget_runs_without_running_out_of_memory():
    from tiny_models import random_batch

    featurizer = _featurizer(device="cuda")
    plan = plan_batch_tokens(featurizer, 64)
    rows = min(plan.batch_tokens // 64, 4096)
    batch = random_batch(rows, seed=0, min_len=64, max_len=64)
    out = featurizer.featurize(batch, non_blocking=True).wait()
    assert out.vectors["uncorrected"].shape == (rows, featurizer.layout.dim)
