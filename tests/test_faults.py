"""Fault injection: kill -9 every writing command at each named commit point, rerun it, and
compare the whole database with a clean run; two concurrent writers end with one row per id.

Each case: copy a prepared database, run the command as a user types it
(`python -m trackstar_db.cli ...`) with TRACKSTAR_FAULT=point[:n] so it dies by SIGKILL exactly
there, open the database (which recovers the journal) and check the command was all or nothing
(the state equals the one before or the clean one after), rerun the command, and compare every
table's rows (sorted), the BM25 documents, the manifest and the preconditioner files with a
clean run of the same command on the same database. Counts are in docs/reliability.md.
"""

import hashlib
import json
import os
import shutil
import signal
import subprocess
import sys

import pytest

pytestmark = pytest.mark.slow  # minutes: run by CI after the fast suite (pytest -m slow)
import torch
from click.testing import CliRunner

from trackstar_db import Database, connect
from trackstar_db.cli import main

ENV = dict(os.environ, OMP_NUM_THREADS="1", TRACKSTAR_LOCK_TIMEOUT="120")
VOLATILE = {"runs": {"created_at"}}  # columns that differ between two runs of the same command

# command -> (base database, argv with "DB" for the database, fault points, all-or-nothing?)
COMMANDS = {
    "ingest corpus": ("facts_only", ["ingest", "corpus", "DB", "SENTENCES", "--batch-size", "100"],
                      ["corpus.after_examples:2", "corpus.after_bm25", "corpus.after_ground_truth"], True),
    "ingest facts": ("corpus_only", ["ingest", "facts", "DB", "FACTS"],
                     ["facts.after_facts", "facts.after_queries", "facts.after_ground_truth"], True),
    "import": ("half_corpus", ["import", "DB", "EXPORTED", "--method", "bm25-published", "--run", "published"],
               ["import.after_queries", "import.after_examples", "import.after_retrievals", "import.after_runs",
                "import.after_ground_truth_imported", "import.after_bm25", "import.after_ground_truth"], True),
    "retrieve --replace": ("full", ["retrieve", "DB", "--method", "bm25", "--k", "5", "--replace"],
                           ["run.after_stage", "run.after_delete", "run.after_rename"], True),
    "tail-patch rerun": ("full", ["tail-patch", "DB", "--run", "bm25", "--k", "2", "--queries", "5", "--device", "cpu"],
                         ["tailpatch.after_stage", "tailpatch.after_delete", "tailpatch.after_rename"], True),
    "fit": ("gradients", ["fit", "DB", "--damping", "0.2"],
            ["fit.after_files", "fit.after_rename", "fit.after_manifest"], True),
    "ingest gradients": ("full", ["ingest", "gradients", "DB", "--split", "queries", "--dim", "1024", "--device", "cpu",
                                  "--commit-rows", "16", "--batch-size", "8"],
                         ["gradients.after_create_table", "gradients.commit:2"], False),
}
CASES = [(command, point) for command, (_, _, points, _) in COMMANDS.items() for point in points]


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """Subprocesses and this process compute with one thread, so a rolled-forward result computed
    by the killed process equals the clean one bit for bit."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _cli(argv: list[str]) -> None:
    result = CliRunner().invoke(main, argv, catch_exceptions=False)
    assert result.exit_code == 0, result.output


@pytest.fixture(scope="module")
def bases(tiny_db_template, tmp_path_factory):
    """The databases the commands start from (built in-process, once)."""
    from trackstar_db.exchange.run_files import export_run
    from trackstar_db.gradients.fit import fit
    from trackstar_db.gradients.worker import GradientJob, ingest_gradients
    from trackstar_db.retrieval.runs import RetrieveOptions, retrieve
    from trackstar_db.sources.corpus import ingest_corpus
    from trackstar_db.sources.facts import ingest_facts
    from trackstar_db.tailpatch.runs import tail_patch_runs

    root = tmp_path_factory.mktemp("fault_bases")
    world = tiny_db_template / "world"
    files = {"SENTENCES": world / "trex_sentences.jsonl", "FACTS": world / "trex_facts.jsonl"}
    lines = files["SENTENCES"].read_text().splitlines(keepends=True)
    half = root / "half.jsonl"
    half.write_text("".join(lines[: len(lines) // 2]))
    made = {}
    made["facts_only"] = Database.create(root / "facts_only")
    ingest_facts(made["facts_only"], [files["FACTS"]], progress=False)
    made["corpus_only"] = Database.create(root / "corpus_only")
    ingest_corpus(made["corpus_only"], [files["SENTENCES"]], progress=False)
    made["half_corpus"] = Database.create(root / "half_corpus")
    ingest_corpus(made["half_corpus"], [half], progress=False)
    shutil.copytree(tiny_db_template / "db", root / "full")
    made["full"] = connect(root / "full")
    retrieve(made["full"], "bm25", RetrieveOptions(k=3))
    tail_patch_runs(made["full"], ["bm25"], k=2, max_queries=3)
    files["EXPORTED"] = export_run(made["full"], "bm25", root / "exported.jsonl")
    shutil.copytree(root / "full", root / "gradients")
    made["gradients"] = connect(root / "gradients")
    for split in ("train", "queries"):
        ingest_gradients(made["gradients"], {"dim": 1024}, GradientJob(split, batch_size=8, device="cpu"), progress=False)
    fit(made["gradients"])
    return {"dirs": {name: db.path for name, db in made.items()}, "files": files, "root": root}


def _argv(command: str, db, files, commands: dict = COMMANDS) -> list[str]:
    return [str(db) if a == "DB" else str(files.get(a, a)) for a in commands[command][1]]


def _rows(table, drop=()) -> list[str]:
    table = table.drop_columns([c for c in drop if c in table.column_names])
    return sorted(json.dumps(row, sort_keys=True, default=str) for row in table.to_pylist())


def snapshot(path) -> dict:
    """Everything a command may change, in a comparable form (opening recovers a journal)."""
    from trackstar_db.store.bm25 import BM25Index

    db = connect(path)
    state = {"journal": (db.path / "journal.json").exists(),
             "bm25": sorted(BM25Index(db.path).all_ids()) if (db.path / "bm25").exists() else []}
    for name in db.table_names():
        state[f"table {name}"] = _rows(db.table(name), VOLATILE.get(name, ()))
    folder = db.path / "preconditioners"
    files = sorted(folder.glob("*.safetensors")) if folder.exists() else []
    # R files are named by their content (a refit never overwrites a file a pinned reader uses), and
    # the bytes of two fits of the same data differ in layout only: R is compared by manifest key
    entries = db.manifest.get("preconditioners", {})
    state["preconditioners"] = {key: _tensors(folder / e["file"]) for key, e in entries.items()}
    # the manifest names each R file with its sha256: it must describe the file that is there
    state["manifest hashes match"] = all(
        hashlib.sha256((folder / e["file"]).read_bytes()).hexdigest() == e["sha256"]
        for e in entries.values() if "sha256" in e)
    retired = db.manifest.get("retired_preconditioners", {})
    current = {e["file"] for e in entries.values()}
    state["no stray R files"] = {p.name for p in files} <= current | set(retired)
    # retired files kept for readers: those whose R differs from the current one, by key
    now = {key: state["preconditioners"][key] for key in entries}
    state["retired R"] = sorted({name.rsplit(".", 2)[0] for name in retired if (folder / name).exists()
                                 and _tensors(folder / name) != now.get(name.rsplit(".", 2)[0])})
    state["manifest"] = json.loads(json.dumps(db.manifest))
    state["manifest"].pop("retired_preconditioners", None)
    for entry in state["manifest"].get("preconditioners", {}).values():
        entry.pop("sha256", None)
        entry.pop("file", None)
    return state


def _tensors(path) -> dict:
    """An R file's metadata and the bytes of each tensor (not the file's bytes: see above)."""
    from safetensors import safe_open

    with safe_open(str(path), "pt") as handle:
        out = {"metadata": handle.metadata()}
        for key in sorted(handle.keys()):
            tensor = handle.get_tensor(key).contiguous().reshape(-1)
            out[key] = hashlib.sha256(tensor.view(torch.uint8).numpy().tobytes()).hexdigest()
    return out


_clean: dict[str, dict] = {}


def clean_state(command: str, bases, commands: dict = COMMANDS, cache: dict = _clean) -> dict:
    """The database after a clean, uninterrupted run of the command (computed once per cache);
    `commands`: command -> (base database, argv, ...), as COMMANDS."""
    if command not in cache:
        target = bases["root"] / f"clean {command}"
        shutil.copytree(bases["dirs"][commands[command][0]], target)
        _cli(_argv(command, target, bases["files"], commands))
        cache[command] = snapshot(target)
    return cache[command]


def _differences(a: dict, b: dict) -> list[str]:
    return [key for key in sorted(set(a) | set(b)) if a.get(key) != b.get(key)]


@pytest.mark.parametrize("command,point", CASES, ids=[f"{c}@{p}" for c, p in CASES])
def test_kill_9_at_fault_point_then_rerun_equals_clean_run(command, point, bases, tmp_path):
    base_name, _, _, atomic = COMMANDS[command]
    db = tmp_path / "db"
    shutil.copytree(bases["dirs"][base_name], db)
    before = snapshot(db)
    clean = clean_state(command, bases)
    argv = _argv(command, db, bases["files"])
    killed = subprocess.run([sys.executable, "-m", "trackstar_db.cli", *argv], capture_output=True, text=True,
                            env=dict(ENV, TRACKSTAR_FAULT=point), timeout=600)
    assert killed.returncode == -signal.SIGKILL, f"fault point {point} not reached: {killed.stderr[-2000:]}"
    recovered = snapshot(db)
    assert not recovered["journal"]
    if atomic:  # all or nothing: nothing stored before the command is lost, nothing half-written stays
        assert recovered == before or recovered == clean, (
            f"after the kill: differs from before in {_differences(recovered, before)}, "
            f"from the clean run in {_differences(recovered, clean)}")
    _cli(argv)
    after = snapshot(db)
    assert after == clean, f"after the rerun, differs from the clean run in {_differences(after, clean)}"


def test_two_corpus_ingests_at_once_store_each_example_once(bases, tmp_path):
    from trackstar_db.store.bm25 import BM25Index

    db = tmp_path / "db"
    shutil.copytree(bases["dirs"]["facts_only"], db)
    lines = bases["files"]["SENTENCES"].read_text().splitlines(keepends=True)
    first, second = tmp_path / "first.jsonl", tmp_path / "second.jsonl"
    first.write_text("".join(lines[: 2 * len(lines) // 3]))
    second.write_text("".join(lines[len(lines) // 3:]))  # a third of the records are in both files
    # both read what is stored, then wait 5 s before writing: without the lock both would add the overlap
    env = dict(ENV, TRACKSTAR_FAULT_SLEEP="corpus.before_write:5")
    processes = [subprocess.Popen([sys.executable, "-m", "trackstar_db.cli", "ingest", "corpus", str(db), str(f)],
                                  stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env) for f in (first, second)]
    for process in processes:
        _, err = process.communicate(timeout=600)
        assert process.returncode == 0, err.decode()[-2000:]
    handle = connect(db)
    ids = handle.table("examples", columns=["example_id"]).column("example_id").to_pylist()
    assert len(ids) == len(set(ids)) == len(lines)
    assert sorted(BM25Index(db).all_ids()) == sorted(ids)
    assert clean_state("ingest corpus", bases)["table ground_truth"] == snapshot(db)["table ground_truth"]


def test_two_gradient_ingests_of_one_split_store_each_id_once(bases, tmp_path):
    db = tmp_path / "db"
    shutil.copytree(bases["dirs"]["full"], db)
    argv = ["ingest", "gradients", str(db), "--split", "queries", "--dim", "1024", "--device", "cpu", "--batch-size", "8"]
    _cli([*argv, "--limit", "1"])  # the settings are fixed first, as ingest/multi_gpu.sh does
    # both featurize every missing query; each waits 10 s between its duplicate check and its append
    env = dict(ENV, TRACKSTAR_FAULT_SLEEP="gradients.before_append:10")
    processes = [subprocess.Popen([sys.executable, "-m", "trackstar_db.cli", *argv], stdout=subprocess.PIPE,
                                  stderr=subprocess.PIPE, env=env) for _ in range(2)]
    for process in processes:
        _, err = process.communicate(timeout=600)
        assert process.returncode == 0, err.decode()[-2000:]
    handle = connect(db)
    n_queries = handle.count("queries")
    for name in ("grads_queries_corrected", "grads_queries_uncorrected"):
        ids = handle.table(name, columns=["id"]).column("id").to_pylist()
        assert len(ids) == len(set(ids)) == n_queries, name
