"""Content names come from content (issue 34, item 1).

An R file's name and recorded sha256 are a hash of its tensors and metadata in one canonical
layout (content.py), so: the same R saved by two processes is the same bytes; two
identical refits on copies of one database name their files alike; a fit killed after writing
its files and rerun names them as a clean fit does; an identical refit rewrites nothing.
Each fit runs in its own process, as a user's would (safetensors' header order changed per process).
"""

import json
import os
import shutil
import subprocess
import sys

import pytest

ENV = dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1")


def _fit(db, *extra, env=None, ok=True):
    result = subprocess.run([sys.executable, "-m", "trackstar_db.cli", "fit", str(db), "--damping", "0.2", *extra],
                            env=env or ENV, capture_output=True, text=True, timeout=600)
    if ok:
        assert result.returncode == 0, result.stderr[-2000:]
    return result


def _entries(db):
    manifest = json.loads((db / "manifest.json").read_text())
    return manifest["preconditioners"], manifest.get("retired_preconditioners", [])


@pytest.fixture(scope="module")
def fitted(tiny_db_template, tmp_path_factory):
    from databases import with_gradients

    return with_gradients(tiny_db_template, tmp_path_factory.mktemp("content")).path


def _copy(fitted, where):
    shutil.copytree(fitted, where)
    return where


SAVER = """
import sys, torch
from trackstar_db.featurizer import fit_preconditioner
g = torch.Generator().manual_seed(0)
x = torch.randn(40, 12, generator=g)
pre = fit_preconditioner([x[:20], x[20:]], [x[:9] * 2], dim=12, spans=[(0, 5), (5, 7)], k=2)
pre.row_norms = {-0.5: pre.norms(x, -0.5)}
pre.params["table_version"] = 3
pre.save(sys.argv[1])
"""


def test_one_r_saved_by_two_processes_is_one_file_that_safetensors_reads(tmp_path):
    from safetensors import safe_open

    from trackstar_db.featurizer import Preconditioner

    for name in ("a", "b"):
        subprocess.run([sys.executable, "-c", SAVER, str(tmp_path / name)], env=ENV, check=True, timeout=120)
    assert (tmp_path / "a").read_bytes() == (tmp_path / "b").read_bytes()
    with safe_open(str(tmp_path / "a"), "pt") as handle:  # the canonical layout is plain safetensors
        assert sorted(handle.keys()) == ["eigvals.0", "eigvals.1", "eigvecs.0", "eigvecs.1", "row_norms.-0.5"]
        assert handle.metadata()["table_version"] == "3"
    back = Preconditioner.load(tmp_path / "a")
    again = back.to_bytes()
    assert again == (tmp_path / "a").read_bytes()  # load -> save is the identity on bytes
    here = {}
    exec(SAVER.replace("pre.save(sys.argv[1])", ""), here)  # the same R fitted in this process
    assert here["pre"].to_bytes() == again
    back.params["damping"] = 0.5  # other metadata: other bytes, other name
    from trackstar_db.content import digest

    assert digest(back.to_bytes()) != digest(again)


@pytest.mark.slow  # three fits in their own processes on a tiny database
def test_identical_refits_on_copies_name_their_files_alike(fitted, tmp_path):
    first, second = _copy(fitted, tmp_path / "a"), _copy(fitted, tmp_path / "b")
    _fit(first)
    _fit(second)
    (entries_a, _), (entries_b, _) = _entries(first), _entries(second)
    assert entries_a == entries_b  # file names, sha256 and parameters
    assert (first / "manifest.json").read_bytes() == (second / "manifest.json").read_bytes()
    for entry in entries_a.values():
        assert (first / "preconditioners" / entry["file"]).read_bytes() == \
            (second / "preconditioners" / entry["file"]).read_bytes()
        assert entry["file"].split(".")[-2] == entry["sha256"][:16]


@pytest.mark.slow
def test_an_identical_refit_rewrites_nothing(fitted, tmp_path):
    db = _copy(fitted, tmp_path / "db")
    _fit(db)
    files = {p.name: (p.stat().st_ino, p.stat().st_mtime_ns) for p in (db / "preconditioners").iterdir()}
    manifest = (db / "manifest.json").read_bytes()
    manifest_stat = (db / "manifest.json").stat()
    _fit(db)
    assert {p.name: (p.stat().st_ino, p.stat().st_mtime_ns) for p in (db / "preconditioners").iterdir()} == files
    assert (db / "manifest.json").read_bytes() == manifest
    assert (db / "manifest.json").stat().st_mtime_ns == manifest_stat.st_mtime_ns
    entries, retired = _entries(db)
    assert not {e["file"] for e in entries.values()} & set(retired)  # the current files are never retired


@pytest.mark.slow
def test_a_fit_killed_after_its_files_reruns_to_the_clean_names(fitted, tmp_path):
    clean, killed = _copy(fitted, tmp_path / "clean"), _copy(fitted, tmp_path / "killed")
    _fit(clean)
    dead = _fit(killed, env=dict(ENV, TRACKSTAR_FAULT="fit.after_files"), ok=False)
    assert dead.returncode == -9
    _fit(killed)
    (want, want_retired), (got, got_retired) = _entries(clean), _entries(killed)
    assert got == want and got_retired == want_retired
    assert (killed / "manifest.json").read_bytes() == (clean / "manifest.json").read_bytes()  # byte for byte
    assert sorted(p.name for p in (killed / "preconditioners").iterdir()) == \
        sorted(p.name for p in (clean / "preconditioners").iterdir())


@pytest.mark.slow
def test_a_replaced_r_is_kept_for_readers_then_removed_after_its_grace(fitted, tmp_path, monkeypatch):
    from trackstar_db import connect
    from trackstar_db.gradients.fit import fit

    db = connect(_copy(fitted, tmp_path / "db"))
    folder = db.path / "preconditioners"
    first = {e["file"] for e in fit(db, damping=0.3).preconditioners.values()}
    monkeypatch.setenv("TRACKSTAR_RETIRE_SECONDS", "3600")
    second = {e["file"] for e in fit(db, damping=0.4).preconditioners.values()}
    _, retired = _entries(db.path)
    assert first <= set(retired) and retired == sorted(retired) and all((folder / n).is_file() for n in first)
    monkeypatch.setenv("TRACKSTAR_RETIRE_SECONDS", "0")
    third = {e["file"] for e in fit(db, damping=0.5).preconditioners.values()}
    _, retired = _entries(db.path)
    assert not any((folder / n).exists() for n in first)  # past its grace: removed
    assert set(retired) >= second and not set(retired) & third
    assert {p.name for p in folder.iterdir()} == second | third | set(retired)
