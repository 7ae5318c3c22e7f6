"""`trackstar-db check`: each kind of damage is found and named with its repair; damaged
databases fail with one line instead of a traceback or a silent empty answer."""

import json
import math
import shutil

import pyarrow as pa
import pytest
from click.testing import CliRunner
from databases import copy_db

from trackstar_db.cli import main


def run(*args, ok=True, env=None):
    result = CliRunner().invoke(main, [str(a) for a in args], catch_exceptions=not ok, env=env)
    if ok:
        assert result.exit_code == 0, result.output
    return result


@pytest.fixture(scope="module")
def whole(tiny_db_template, tmp_path_factory):
    """A copy of the tiny database with train and query gradients and every R fitted."""
    import torch

    from trackstar_db.gradients.fit import fit
    from trackstar_db.gradients.worker import GradientJob, ingest_gradients

    torch.set_num_threads(1)
    root = tmp_path_factory.mktemp("check")
    db = copy_db(tiny_db_template, root)
    for split in ("train", "queries"):
        ingest_gradients(db, {"dim": 1024}, GradientJob(split, batch_size=32, device="cpu"), progress=False)
    fit(db)
    return root


@pytest.fixture
def copy(whole, tmp_path):
    shutil.copytree(whole / "db", tmp_path / "db")
    return tmp_path / "db"


def problems(db):
    from trackstar_db import connect
    from trackstar_db.store.check import check

    return check(connect(db)).to_pylist()


def test_a_whole_database_has_no_problems(copy):
    assert problems(copy) == []
    assert "no problems found" in run("check", copy).output
    manifest = json.loads((copy / "manifest.json").read_text())
    assert all(len(p["sha256"]) == 64 for p in manifest["preconditioners"].values())


def _r(db, key):
    """The R file the manifest names for `key` (fit names files by their content)."""
    return db / "preconditioners" / json.loads((db / "manifest.json").read_text())["preconditioners"][key]["file"]


def _swap_r(db):
    shutil.copy(_r(db, "grads_train_corrected.mixed"), _r(db, "grads_train_corrected.train"))


def _truncate_r(db):
    path = _r(db, "grads_train_corrected.mixed")
    path.write_bytes(path.read_bytes()[:200])


# damage written by a writer that finished (committed: check judges the committed versions)
def _delete_gradient_row(db):
    from trackstar_db import connect

    handle = connect(db)
    with handle.writer("damage"):
        handle.delete_rows("grads_train_corrected", "id", "S000003")


def _nan_row(db):
    from trackstar_db import connect

    handle = connect(db)
    with handle.writer("damage"):
        row = handle.table("grads_train_uncorrected").slice(0, 1).to_pylist()[0]
        row["vector"] = [math.nan] + row["vector"][1:]
        handle.delete_rows("grads_train_uncorrected", "id", row["id"])
        dataset = handle.dataset("grads_train_uncorrected")  # lance itself: LanceDB's add refuses NaN vectors
        dataset.insert(pa.Table.from_pylist([row], schema=dataset.schema), mode="append")


def _duplicate_row(db):
    from trackstar_db import connect

    handle = connect(db)
    with handle.writer("damage"):
        handle.append("grads_queries_corrected", handle.table("grads_queries_corrected").slice(0, 2))


def _truncate_table(db):
    data = sorted((db / "tables" / "grads_train_corrected.lance" / "data").glob("*.lance"))[0]
    data.write_bytes(data.read_bytes()[:1000])


def _drop_latest_version(db):
    versions = db / "tables" / "examples.lance" / "_versions"
    latest = min(versions.glob("*.manifest"), key=lambda p: int(p.stem))  # Lance names newest smallest
    latest.unlink()


CASES = {
    "bm25 deleted": (lambda db: shutil.rmtree(db / "bm25"), "bm25", "missing", "rebuild-bm25"),
    "R swapped": (_swap_r, "preconditioners/grads_train_corrected.train.", "sha256 differs", "fit"),
    "R truncated": (_truncate_r, "preconditioners/grads_train_corrected.mixed.", "unreadable", "fit"),
    "R deleted": (lambda db: _r(db, "grads_train_uncorrected.train").unlink(),
                  "preconditioners/grads_train_uncorrected.train.", "missing", "fit"),
    "gradient row deleted": (_delete_gradient_row, "grads_train_corrected", "have no gradient", "ingest gradients"),
    "R stale": (_delete_gradient_row, "preconditioners/grads_train_corrected.train.", "stale", "fit"),
    "NaN vector": (_nan_row, "grads_train_uncorrected", "not finite", "ingest gradients"),
    "duplicate ids": (_duplicate_row, "grads_queries_corrected", "duplicate ids", "ingest gradients"),
    "table truncated": (_truncate_table, "grads_train_corrected", "unreadable", "ingest gradients"),
    "latest version lost": (_drop_latest_version, "examples", "latest version", "ingest corpus"),
    "model moved": (lambda db: shutil.move(db.parent / "model", db.parent / "moved"), "model", "missing", "init"),
}


@pytest.mark.parametrize("case", list(CASES))
def test_damage_is_found_with_its_repair(case, copy, whole):
    damage, table, problem, repair = CASES[case]
    if case == "model moved":
        shutil.copytree(whole / "model", copy.parent / "model")
        from trackstar_db import connect

        connect(copy).set_model(copy.parent / "model")
    damage(copy)
    found = [p for p in problems(copy) if p["table"].startswith(table) and problem in p["problem"]]
    assert found, problems(copy)
    assert repair in found[0]["repair"]
    result = run("check", copy, ok=False)
    assert result.exit_code == 1
    lines = result.output.strip().splitlines()
    assert all("; repair: " in line for line in lines) and any(problem in line for line in lines)


def test_a_deleted_bm25_index_fails_loudly_and_is_rebuilt(copy):
    shutil.rmtree(copy / "bm25")
    result = run("retrieve", copy, "--method", "bm25", "--run", "b", ok=False)
    assert result.exit_code == 1 and "BM25 index is missing" in result.output
    assert len(result.output.strip().splitlines()) == 1
    assert "354" in run("rebuild-bm25", copy).output or problems(copy) == []
    assert problems(copy) == []
    run("retrieve", copy, "--method", "bm25", "--k", 5)


def test_damage_reaches_the_user_as_one_line(copy):
    _truncate_table(copy)
    result = run("retrieve", copy, "--method", "opt-cos", "--k", 5, ok=False)
    errors = [line for line in result.output.replace("\r", "\n").splitlines() if line.startswith("Error: ")]
    assert result.exit_code == 1 and len(errors) == 1 and "Traceback" not in result.output
    assert "trackstar-db check" in errors[0] and ".rs:" not in errors[0]  # points to check, no Rust source line
    debug = run("retrieve", copy, "--method", "opt-cos", "--k", 5, ok=False, env={"TRACKSTAR_DEBUG": "1"})
    assert debug.exit_code == 1 and debug.exception is not None and not isinstance(debug.exception, SystemExit)


def test_a_full_disk_says_so(copy):
    import os

    if not os.path.exists("/dev/full"):
        pytest.skip("no /dev/full here")
    result = run("sql", copy, "SELECT example_id FROM examples", "--format", "csv", "--out", "/dev/full", ok=False)
    assert result.exit_code == 1 and "disk full" in result.output
    assert len(result.output.strip().splitlines()) == 1


def test_errors_become_one_line_naming_the_file(tmp_path):
    import errno

    import duckdb

    from trackstar_db.cli.common import one_line

    assert one_line(OSError(errno.ENOSPC, "No space left on device", "/data/db/x.lance")) == \
        "/data/db/x.lance: disk full (no space left on device); nothing half-written is kept: free space and run " \
        "the command again"
    assert one_line(PermissionError(errno.EACCES, "Permission denied", "/db/manifest.json")) == \
        "/db/manifest.json: Permission denied"
    try:
        json.loads('{"a": ')
    except json.JSONDecodeError as exc:
        assert one_line(exc).startswith("invalid JSON")
    bad = tmp_path / "x.safetensors"
    bad.write_bytes(b"\xff" * 64)
    from safetensors.torch import load_file

    with pytest.raises(Exception) as info:
        load_file(str(bad))
    assert one_line(info.value).startswith("safetensors file: ")
    with pytest.raises(duckdb.Error) as info:
        duckdb.sql("SELECT * FROM no_such_table")
    assert one_line(info.value).startswith("SQL: ")
    assert one_line(TypeError("a bug")) is None  # bugs keep their traceback


def test_half_precision_tables_and_orphan_ids(tmp_path):
    """No model needed: float16 vectors are checked (DuckDB reads only the ids), an id without
    an example and a NaN in a half-precision row are each found."""
    import torch

    from trackstar_db import Database
    from trackstar_db.store.check import check
    from trackstar_db.store import vectors as _vectors
    from trackstar_db.store.bm25 import BM25Index

    db = Database.create(tmp_path / "db")
    ids, texts = ["a", "b", "c"], ["one text", "two texts", "three texts"]
    db.append("examples", pa.table({"example_id": ids, "text": texts, "source": ["t"] * 3, "content_hash": ids}))
    BM25Index(db.path).add(ids, texts)
    table = db.gradient_table("train")
    table.create(1024, "float16")

    def rows(names, x):
        return pa.table({"id": names, "vector": _vectors.to_arrow(x, "float16"), "norm": pa.array([1.0] * len(names), pa.float32()),
                         "loss": pa.array([1.0] * len(names), pa.float32()), "n_tokens": pa.array([1] * len(names), pa.int32())})

    db.append(table.name, rows(ids, torch.randn(3, 1024)))
    with db.writer("test"):  # commits what was written
        pass
    assert check(db).num_rows == 0
    x = torch.randn(1, 1024)
    x[0, 7] = math.inf
    with db.writer("test"):
        db.dataset(table.name).insert(rows(["zz"], x), mode="append")
    found = {(p["table"], p["problem"].split(" (")[0]) for p in check(db).to_pylist()}
    assert found == {(table.name, "1 vectors are not finite"), (table.name, "1 gradient ids are not in examples")}


def test_a_swapped_preconditioner_is_refused_not_used(copy):
    _swap_r(copy)
    result = run("retrieve", copy, "--method", "r-train", "--k", 5, ok=False)
    assert result.exit_code == 1 and "sha256 differs" in result.output and "trackstar-db fit" in result.output
    run("retrieve", copy, "--method", "trackstar", "--k", 5)  # the untouched mixed R still serves


KILLED_WRITER = """
import os, signal, sys
from trackstar_db import connect

handle = connect(sys.argv[1])
with handle.writer("append, then killed"):
    handle.append("grads_queries_corrected", handle.table("grads_queries_corrected").slice(0, 2))
    os.kill(os.getpid(), signal.SIGKILL)  # dies holding the lock: the new version is never committed
"""


def test_check_judges_the_committed_versions_not_a_killed_writers(copy):
    """A killed writer's newer Lance version (two duplicate rows) is on disk but not committed:
    check's verdict is the committed state's (no problem). Once a writer commits that version,
    the same rows are judged and found."""
    import subprocess
    import sys

    from trackstar_db.store import committed

    before = committed.read(copy)["tables"]["grads_queries_corrected"]
    killed = subprocess.run([sys.executable, "-c", KILLED_WRITER, str(copy)], capture_output=True, text=True)
    assert killed.returncode == -9, killed.stderr[-2000:]
    from trackstar_db import connect

    handle = connect(copy)
    assert committed.latest_versions(handle)["grads_queries_corrected"] > before  # the uncommitted version is there
    assert committed.read(copy)["tables"]["grads_queries_corrected"] == before
    assert problems(copy) == []
    assert "no problems found" in run("check", copy).output
    with handle.writer("adopts what is on disk"):
        pass
    found = [p for p in problems(copy) if p["table"] == "grads_queries_corrected"]
    assert found and "2 duplicate ids" in found[0]["problem"], found
