"""Quiet as a library: a script that calls db.query() with stderr redirected to a file writes
nothing there (no scan bar, no transformers "Loading weights" bar); asked for, progress shows."""

import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = """
import sys, trackstar_db
db = trackstar_db.connect(sys.argv[1])
for method in (None, "grad-cos", "bm25"):
    rows = db.query("As the records show, the river", "bridge", k=3, method=method)
    assert rows.num_rows >= 3, rows
print(rows.column("method")[0].as_py())
"""


@pytest.fixture(scope="module")
def featurized(tiny_db_template, tmp_path_factory):
    """The tiny database with training gradients and R_train (queries answered by r-train)."""
    from databases import copy_db

    db = copy_db(tiny_db_template, tmp_path_factory.mktemp("quiet"))
    db.ingest_gradients("train", dim=1024, batch_size=32, device="cpu", limit=64, progress=False)
    db.fit(mix="train")
    return db.path


def _query(db_path, tmp_path, **env_extra):
    import os

    err = tmp_path / "stderr.txt"
    env = {k: v for k, v in os.environ.items() if k != "TRACKSTAR_PROGRESS"} | {"PYTHONPATH": str(ROOT)} | env_extra
    with open(err, "w") as stderr:
        done = subprocess.run([sys.executable, "-c", SCRIPT, str(db_path)], stdout=subprocess.PIPE, stderr=stderr,
                              text=True, env=env, timeout=300)
    return done, err.read_text()


def test_query_from_a_script_writes_nothing_to_stderr(featurized, tmp_path):
    done, err = _query(featurized, tmp_path)
    assert done.returncode == 0, err
    assert done.stdout.strip() == "bm25"
    assert err == ""


@pytest.mark.slow
def test_progress_shows_when_asked(featurized, tmp_path):
    """The same script with TRACKSTAR_PROGRESS=1: the bars do appear, so the quiet test can fail."""
    done, err = _query(featurized, tmp_path, TRACKSTAR_PROGRESS="1")
    assert done.returncode == 0, err
    assert "Loading weights" in err  # transformers' own bar, silenced in the quiet run


def test_progress_rule():
    from trackstar_db.progress import wanted

    assert wanted(True) and not wanted(False)
    assert wanted(None) == sys.stderr.isatty() or "TRACKSTAR_PROGRESS" in __import__("os").environ


def _validate(tiny_db_template, tmp_path, **env_extra):
    """`trackstar-db validate` (the testbed trainer: train, save, load each model) with stderr in a file."""
    import os

    from databases import copy_db

    db = copy_db(tiny_db_template, tmp_path)
    err = tmp_path / "stderr.txt"
    env = {k: v for k, v in os.environ.items() if k != "TRACKSTAR_PROGRESS"} | {"PYTHONPATH": str(ROOT)} | env_extra
    with open(err, "w") as stderr:
        done = subprocess.run([sys.executable, "-m", "trackstar_db.cli", "validate", str(db.path), "--models", "2",
                               "--steps", "2", "--bootstrap", "10", "--device", "cpu"],
                              stdout=subprocess.PIPE, stderr=stderr, text=True, env=env, timeout=600)
    return done, err.read_text()


def test_validate_writes_no_transformers_bars_into_a_redirected_log(tiny_db_template, tmp_path):
    done, err = _validate(tiny_db_template, tmp_path)
    assert done.returncode == 0, err
    assert "validation lds: trained 2 model(s) now" in err
    for bar in ("Loading weights", "Writing model shards", "it/s]"):
        assert bar not in err, err


@pytest.mark.slow
def test_validate_shows_the_bars_when_asked(tiny_db_template, tmp_path):
    """TRACKSTAR_PROGRESS=1: transformers' bar appears, so the quiet test above can fail."""
    done, err = _validate(tiny_db_template, tmp_path, TRACKSTAR_PROGRESS="1")
    assert done.returncode == 0, err
    assert "Loading weights" in err


def test_the_testbed_trainer_follows_the_progress_rule(tmp_path, capfd, monkeypatch):
    """`trackstar-db train` and the demo train through train_model: no bar into a redirected log."""
    from trackstar_db.testbed.train import TrainConfig, train_model

    monkeypatch.delenv("TRACKSTAR_PROGRESS", raising=False)
    texts = [f"the river {i} flows north past the bridge" for i in range(16)]
    config = TrainConfig(n_layer=1, d_model=16, n_head=2, max_length=16, batch_size=8, max_steps=2, warmup=1)
    train_model(texts, tmp_path / "quiet", config)
    assert "train:" not in capfd.readouterr().err
    train_model(texts, tmp_path / "asked", config, progress=True)
    assert "train:" in capfd.readouterr().err
