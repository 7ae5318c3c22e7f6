"""A full disk heals (issue 27, item 3): a writing command that runs out of space leaves the
database as it was, and once space is freed its rerun completes and equals a clean run.

Two ways to fill the disk:
- injected: TRACKSTAR_FAULT_ENOSPC=point[:n] (trackstar_db/faults.py) raises OSError(ENOSPC) at
  a named write point of each writing command (runs anywhere);
- real: the database on a small tmpfs (needs root; skipped otherwise), the command run until
  Lance, safetensors or Tantivy get ENOSPC, then the tmpfs grown and the command run again.
The comparison is test_faults.snapshot: every table's rows, BM25 ids, the manifest, the R tensors.
"""

import os
import shutil
import subprocess
import sys

import pytest
from databases import run_cli

from trackstar_db import faults
from test_faults import _argv, _differences, clean_state, snapshot

pytestmark = pytest.mark.slow  # about a minute: a database with gradients and R is built first


def _cli(argv, ok=True):
    return run_cli(*argv, ok=ok)


@pytest.fixture(scope="module")
def bases(tiny_db_template, tmp_path_factory):
    from databases import copy_db

    from trackstar_db import Database
    from trackstar_db.gradients.fit import fit
    from trackstar_db.gradients.worker import GradientJob, ingest_gradients
    from trackstar_db.sources.facts import ingest_facts

    root = tmp_path_factory.mktemp("enospc")
    world = tiny_db_template / "world"
    files = {"SENTENCES": world / "trex_sentences.jsonl", "FACTS": world / "trex_facts.jsonl"}
    facts_only = Database.create(root / "facts_only")
    ingest_facts(facts_only, [files["FACTS"]], progress=False)
    from trackstar_db.sources.corpus import ingest_corpus

    corpus_only = Database.create(root / "corpus_only")
    ingest_corpus(corpus_only, [files["SENTENCES"]], progress=False)
    full = copy_db(tiny_db_template, root)
    _cli(["retrieve", full.path, "--method", "bm25", "--k", "3"])
    files["EXPORTED"] = root / "bm25.jsonl"
    _cli(["export", full.path, "--run", "bm25", "--out", files["EXPORTED"]])
    shutil.copytree(full.path, root / "gradients")
    from trackstar_db import connect

    grads = connect(root / "gradients")
    for split in ("train", "queries"):
        ingest_gradients(grads, {"dim": 1024}, GradientJob(split, batch_size=16, device="cpu"), progress=False)
    fit(grads)
    return {"dirs": {"facts_only": facts_only.path, "corpus_only": corpus_only.path, "full": full.path,
                     "gradients": root / "gradients"},
            "files": files, "root": root}


# command -> (base, argv, injected ENOSPC points)
COMMANDS = {
    "ingest corpus": ("facts_only", ["ingest", "corpus", "DB", "SENTENCES", "--batch-size", "100"],
                      ["corpus.after_examples:2", "corpus.after_bm25"]),
    "ingest facts": ("corpus_only", ["ingest", "facts", "DB", "FACTS"], ["facts.after_facts", "facts.after_queries"]),
    "tail-patch": ("full", ["tail-patch", "DB", "--run", "bm25", "--k", "2", "--queries", "3", "--device", "cpu"],
                   ["tailpatch.after_stage"]),
    "import": ("facts_only", ["import", "DB", "EXPORTED", "--method", "bm25-published", "--run", "published"],
               ["import.after_examples", "import.after_ground_truth_imported", "import.after_bm25"]),
    "retrieve --replace": ("full", ["retrieve", "DB", "--method", "bm25", "--k", "5", "--replace"], ["run.after_stage"]),
    "ingest gradients": ("full", ["ingest", "gradients", "DB", "--split", "queries", "--dim", "1024", "--device", "cpu",
                                  "--commit-rows", "16", "--batch-size", "8"], ["gradients.commit:1", "gradients.commit:3"]),
    "fit": ("gradients", ["fit", "DB", "--damping", "0.2"], ["fit.after_files"]),
}
CASES = [(c, p) for c, (_, _, points) in COMMANDS.items() for p in points]
_clean: dict = {}


def _clean_state(command, bases):
    return clean_state(command, bases, COMMANDS, _clean)


@pytest.mark.parametrize("command,point", CASES, ids=[f"{c}@{p}" for c, p in CASES])
def test_injected_enospc_keeps_the_database_and_the_rerun_equals_a_clean_run(command, point, bases, tmp_path,
                                                                             monkeypatch):
    db = tmp_path / "db"
    shutil.copytree(bases["dirs"][COMMANDS[command][0]], db)
    before = snapshot(db)
    clean = _clean_state(command, bases)
    faults._reached.clear()
    monkeypatch.setenv("TRACKSTAR_FAULT_ENOSPC", point)
    failed = _cli(_argv(command, db, bases["files"], COMMANDS), ok=False)
    assert failed.exit_code == 1 and "disk full" in failed.output and "Traceback" not in failed.output, failed.output
    monkeypatch.delenv("TRACKSTAR_FAULT_ENOSPC")
    after_failure = snapshot(db)
    if command != "ingest gradients":  # resumable, not atomic: whole commits may stay
        assert after_failure == before, f"the failure changed {_differences(after_failure, before)}"
    _cli(_argv(command, db, bases["files"], COMMANDS))
    assert snapshot(db) == clean, f"the rerun differs from a clean run in {_differences(snapshot(db), clean)}"


def _kb(folder) -> int:
    """KiB a tmpfs needs for the files of `folder` (whole 4 KiB pages)."""
    return sum(-(-p.stat().st_size // 4096) * 4 for p in folder.rglob("*") if p.is_file())


def _tmpfs(path, size_kb: int) -> bool:
    path.mkdir(parents=True, exist_ok=True)
    return subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size_kb}k", "tmpfs", str(path)],
                          capture_output=True).returncode == 0


@pytest.mark.skipif(os.geteuid() != 0 or sys.platform != "linux", reason="mounting a small tmpfs needs root")
@pytest.mark.parametrize("command", ["ingest gradients", "import", "fit", "retrieve --replace"])
def test_a_real_full_disk_heals_after_space_is_freed(command, bases, tmp_path):
    base = bases["dirs"][COMMANDS[command][0]]
    clean = _clean_state(command, bases) and bases["root"] / f"clean {command}"
    # room for the base and half of what a clean run adds: the command runs out of space half-way
    mount = tmp_path / "small"
    if not _tmpfs(mount, _kb(base) + max(8, (_kb(clean) - _kb(base)) // 2)):
        pytest.skip("cannot mount a tmpfs here")
    try:
        try:
            shutil.copytree(base, mount / "db")
        except OSError:
            pytest.skip("the base does not fit the tmpfs")
        before = snapshot(mount / "db")
        env = dict(os.environ, OMP_NUM_THREADS="1")
        argv = [str(a) for a in _argv(command, mount / "db", bases["files"], COMMANDS)]
        first = subprocess.run([sys.executable, "-m", "trackstar_db.cli", *argv], capture_output=True, text=True,
                               env=env, timeout=600)
        subprocess.run(["mount", "-o", "remount,size=200m", str(mount)], check=True)
        assert first.returncode == 1, "the command did not run out of space"
        assert "disk full" in first.stderr.strip().splitlines()[-1], first.stderr[-2000:]
        if command != "ingest gradients":  # all or nothing: as before, or (a swap past its point of no
            # return, finished by the next writer) as after a clean run
            state = snapshot(mount / "db")
            assert state == before or state == _clean_state(command, bases), _differences(state, before)
        _cli(argv)
        assert snapshot(mount / "db") == _clean_state(command, bases)
    finally:
        subprocess.run(["umount", str(mount)], capture_output=True)
