"""The sharded featurizer (gradients/sharded.py: FSDP2 over processes) against the unsharded one:
two gloo processes on the CPU give the vectors of the single-process Featurizer, and the
`ingest gradients --shard-model` run under torchrun, killed by SIGKILL and rerun, ends with the
synchronous single-device worker's tables."""

import os
import signal
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from test_featurizer import fake_adam
from tiny_models import FAMILIES, make_model, random_batch

from trackstar_db.featurizer import Featurizer, build_second_moment
from trackstar_db.gradients.sharded import block_modules

HERE = Path(__file__).parent
# Row-relative tolerance, float32: every rank all-gathers the exact weights, so the sharded run does
# the same arithmetic as the unsharded one; the margin allows another BLAS's summation order.
TOLERANCE = 1e-5


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_ranks(tmp_path, world: int, device: str, families) -> dict:
    """Start `world` sharded_ranks.py processes; {rank: {family: (rows, vectors)}}."""
    env = dict(os.environ, WORLD_SIZE=str(world), MASTER_ADDR="127.0.0.1", MASTER_PORT=str(free_port()),
               OMP_NUM_THREADS="1", PYTHONPATH=os.pathsep.join([str(HERE.parent), os.environ.get("PYTHONPATH", "")]))
    procs = [subprocess.Popen([sys.executable, str(HERE / "sharded_ranks.py"), str(tmp_path), device, ",".join(families)],
                              env=dict(env, RANK=str(r), LOCAL_RANK=str(r)), stderr=subprocess.PIPE, text=True)
             for r in range(world)]
    errors = [p.communicate(timeout=300)[1] for p in procs]
    for p, err in zip(procs, errors):
        assert p.returncode == 0, err[-3000:]
    return {r: torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in range(world)}


def reference_vectors(family: str, device: str = "cpu") -> dict:
    from sharded_ranks import CONFIG, ROWS, SEED

    model = make_model(family).to(device)
    moment = build_second_moment(CONFIG, model, optimizer_state=fake_adam(model))
    return Featurizer(model, CONFIG, moment, device=device, uncorrected=True).featurize(random_batch(ROWS, seed=SEED)).vectors


def assert_rows_close(got: torch.Tensor, want: torch.Tensor, tol: float) -> None:
    error = ((got - want).norm(dim=1) / want.norm(dim=1)).max()
    assert float(error) <= tol, f"largest row-relative difference {float(error):.2e} > {tol:g}"


def test_block_modules_finds_each_family_s_transformer_blocks():
    for family in FAMILIES:
        model = make_model(family)
        assert len(block_modules(model)) == model.config.num_hidden_layers


def test_two_gloo_processes_give_the_unsharded_vectors(tmp_path):
    ranks = run_ranks(tmp_path, 2, "cpu", FAMILIES)
    for family in FAMILIES:
        want = reference_vectors(family)
        seen = []
        for saved in ranks.values():
            rows, vectors = saved[family]
            seen += rows
            for variant in ("corrected", "uncorrected"):
                assert_rows_close(vectors[variant], want[variant][rows], TOLERANCE)
        assert sorted(seen) == list(range(len(want["corrected"])))


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_fsdp_on_one_gpu_gives_the_unsharded_vectors(tmp_path):
    ranks = run_ranks(tmp_path, 1, "cuda", FAMILIES)
    for family in FAMILIES:
        want = reference_vectors(family, "cuda")
        rows, vectors = ranks[0][family]
        for variant in ("corrected", "uncorrected"):
            assert_rows_close(vectors[variant], want[variant][rows], 1e-4)


# -- the CLI under torchrun: kill -9, rerun, resume --------------------------------------------

COMMON = ["--split", "train", "--dim", "1024", "--correction", "adam-factored", "--batch-tokens", "64",
          "--batch-size", "8", "--commit-rows", "16"]


def _torchrun(db_path, *extra, env=None):
    args = [sys.executable, "-m", "torch.distributed.run", "--nnodes", "1", "--nproc-per-node", "2",
            "--master-addr", "127.0.0.1", "--master-port", str(free_port()), "-m", "trackstar_db.cli",
            "ingest", "gradients", str(db_path), *COMMON, "--shard-model", "--device", "cpu", *extra]
    return subprocess.run(args, capture_output=True, text=True, timeout=600,
                          env=dict(os.environ, OMP_NUM_THREADS="1", **(env or {})))


@pytest.mark.slow
def test_shard_model_killed_by_sigkill_then_rerun_equals_the_single_device_tables(tiny_db, tmp_path):
    from stored_vectors import close, vectors_by_id
    from test_pipeline import CONFIG, fresh_copy

    from trackstar_db import connect
    from trackstar_db.gradients.worker import GradientJob, ingest_gradients

    assert CONFIG.dim == 1024 and CONFIG.correction == "adam-factored"  # COMMON's settings
    single = fresh_copy(tiny_db, tmp_path / "single")
    ingest_gradients(single, CONFIG, GradientJob("train", batch_size=8, batch_tokens=None, pipeline=False),
                     progress=False)
    killed = _torchrun(tiny_db.path, env={"TRACKSTAR_FAULT": "gradients.commit:4"})
    assert killed.returncode != 0 and str(signal.SIGKILL.name) in killed.stderr + killed.stdout, killed.stderr[-3000:]
    partial = connect(tiny_db.path).count("grads_train_corrected")
    assert 0 < partial < tiny_db.count("examples"), "kill came too late to test resuming"
    rerun = _torchrun(tiny_db.path)
    assert rerun.returncode == 0, rerun.stderr[-3000:]
    db = connect(tiny_db.path)
    for name in ("grads_train_corrected", "grads_train_uncorrected"):
        ids, vectors, _ = vectors_by_id(db, name)
        ids_ref, ref, _ = vectors_by_id(single, name)
        assert ids == ids_ref and close(vectors, ref)


def test_shard_model_refuses_an_explicit_shard(tiny_db):
    from click.testing import CliRunner

    from trackstar_db.cli import main

    result = CliRunner().invoke(main, ["ingest", "gradients", str(tiny_db.path), "--shard-model", "--shard", "1/2"])
    assert result.exit_code != 0 and "--shard-model" in result.output


# -- the device plan ---------------------------------------------------------------------------

def test_device_plan_counts_shards_gathered_groups_and_the_fewest_devices_that_fit():
    from trackstar_db.errors import TrackstarError
    from trackstar_db.featurizer import FeaturizerConfig
    from trackstar_db.gradients.memory import HEADROOM, RESERVE, bytes_per_token, device_need, devices_needed

    model = make_model("gptneox")
    featurizer = Featurizer(model, FeaturizerConfig(dim=1024, correction="none", max_length=64))
    weights = sum(p.numel() * 4 for p in model.parameters())  # float32
    layers = [sum(p.numel() * 4 for p in layer.parameters()) for layer in model.gpt_neox.layers]
    root = weights - sum(layers)
    one, two = device_need(featurizer, 1, 64, 64), device_need(featurizer, 2, 64, 64)
    assert (one.shard_bytes, one.gathered_bytes) == (weights, 0)
    assert (two.shard_bytes, two.gathered_bytes) == (-(-weights // 2), root + 2 * max(layers))
    assert one.activation_bytes == 64 * bytes_per_token(featurizer, 64)
    assert one.total_bytes == int((weights + one.projection_bytes + one.activation_bytes + RESERVE) / HEADROOM)
    assert devices_needed(featurizer, one.total_bytes, 64).devices == 1
    with pytest.raises(TrackstarError, match="no sharding up to 64 devices"):
        devices_needed(featurizer, RESERVE, 64)


def test_device_plan_shards_a_model_whose_weights_exceed_one_device():
    import transformers

    from trackstar_db.featurizer import FeaturizerConfig
    from trackstar_db.gradients.memory import GiB, devices_needed

    config = transformers.GPTNeoXConfig(hidden_size=4096, num_hidden_layers=32, num_attention_heads=32,
                                        intermediate_size=16384, vocab_size=50304)  # a 7B shape
    with torch.device("meta"):
        model = transformers.AutoModelForCausalLM.from_config(config).to(torch.bfloat16)
    featurizer = Featurizer(model, FeaturizerConfig(dim=65536, correction="none", max_length=512))
    weights = sum(p.numel() * 2 for p in model.parameters())
    need = devices_needed(featurizer, 16 * GiB, 512)
    assert weights > 12 * GiB and need.devices >= 2 and need.total_bytes <= 16 * GiB
    assert devices_needed(featurizer, 80 * GiB, 512).devices == 1


def test_plan_command_adds_the_devices_a_model_needs(tmp_path):
    from click.testing import CliRunner
    from tiny_models import make_config

    from trackstar_db.cli import main

    make_config("gptneox").save_pretrained(tmp_path / "model")
    result = CliRunner().invoke(main, ["plan", "--rows", "1000", "--dim", "1024", "--model", str(tmp_path / "model"),
                                       "--device-gib", "1", "--format", "csv"])
    assert result.exit_code == 0, result.output
    assert "devices: featurize on 1 GiB devices" in result.output and "1 device, unsharded" in result.output


# -- a failing rank stops the run (issue 34, item 4) --------------------------------------------

def _ranks_by_hand(db_path, rank_env: dict, world: int = 2):
    """The CLI as `world` processes given RANK and WORLD_SIZE by hand (no launcher that would end
    the others): {rank: (returncode, stderr, seconds from start to exit)}; rank_env: extra env per rank."""
    import time

    env = dict(os.environ, WORLD_SIZE=str(world), MASTER_ADDR="127.0.0.1", MASTER_PORT=str(free_port()),
               OMP_NUM_THREADS="1", TRACKSTAR_RANK_TIMEOUT="300",
               TRACKSTAR_LOCK_TIMEOUT="120")  # a loaded machine may hold the other rank's commit past the default wait
    args = [sys.executable, "-m", "trackstar_db.cli", "ingest", "gradients", str(db_path), *COMMON, "--shard-model",
            "--device", "cpu"]
    start = time.monotonic()
    procs = {r: subprocess.Popen(args, env=dict(env, RANK=str(r), LOCAL_RANK=str(r), **rank_env.get(r, {})),
                                 stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for r in range(world)}
    ended = {}
    while len(ended) < world and time.monotonic() - start < 400:
        for r, p in procs.items():
            if r not in ended and p.poll() is not None:
                ended[r] = time.monotonic() - start
        time.sleep(0.1)
    out = {}
    for r, p in procs.items():
        if p.poll() is None:
            p.kill()
        _, err = p.communicate(timeout=60)
        out[r] = (p.returncode, err, ended.get(r))
    return out


@pytest.mark.slow
@pytest.mark.parametrize("failure", ["killed", "raises"])
def test_a_failing_rank_stops_the_other_with_one_line_and_the_rerun_resumes(tiny_db, failure):
    from trackstar_db import connect

    fault = ({"TRACKSTAR_FAULT": "gradients.commit:2"} if failure == "killed"
             else {"TRACKSTAR_FAULT_ENOSPC": "gradients.commit:2"})
    runs = _ranks_by_hand(tiny_db.path, {1: fault})
    code1, err1, end1 = runs[1]
    code0, err0, end0 = runs[0]
    assert end0 is not None and end1 is not None, "a rank was still running after 400 s"
    assert code1 != 0 and code0 == 1, (err0[-2000:], err1[-2000:])
    assert end0 - end1 < 30, f"rank 0 ended {end0 - end1:.0f} s after rank 1"  # bounded: polled each second
    errors = [line for line in err0.splitlines() if line.startswith("Error:")]
    assert len(errors) == 1 and "Traceback" not in err0, err0[-3000:]
    assert "rank 1 of 2" in errors[0] and "Rerun the same command" in errors[0], errors[0]
    if failure == "killed":
        assert code1 == -signal.SIGKILL and "died without a word" in errors[0], errors[0]
    else:
        assert "No space left on device" in errors[0], errors[0]
        assert [x for x in err1.splitlines() if x.startswith("Error:")], err1[-2000:]
    db = connect(tiny_db.path)
    partial = db.count("grads_train_corrected")
    assert 0 < partial < db.count("examples"), "the failure came too late to test resuming"
    rerun = _ranks_by_hand(tiny_db.path, {})
    assert all(code == 0 for code, _, _ in rerun.values()), [err[-2000:] for _, err, _ in rerun.values()]
    db = connect(tiny_db.path)
    ids = db.table("grads_train_corrected", columns=["id"]).column("id").to_pylist()
    assert sorted(ids) == sorted(db.table("examples", columns=["example_id"]).column("example_id").to_pylist())
    assert "no problems found" in subprocess.run([sys.executable, "-m", "trackstar_db.cli", "check", str(tiny_db.path)],
                                                 capture_output=True, text=True, timeout=300).stdout
