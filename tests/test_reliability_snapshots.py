"""Readers see one committed version; damage is never silent (issue 27, items 1 and 2).

- A reader process loops over eval, sql, export and query (the CLI, in-process in that reader)
  while other processes run `retrieve --replace` (alternating k, widened between staging and
  swap) and `fit` (alternating damping): every read must succeed and see one committed state
  (a run's rows all of one k, never a staged run, never an R file that is not the fitted one).
- Each silent-damage case of the issue (latest Lance version of a table deleted, an edited
  projection seed or dim, a garbage journal, a journal naming a lost version) is named by
  `check` and refused by reads with one line that names the repair.
"""

import json
import os
import re
import shutil
import subprocess
import sys
import textwrap
import time

import pytest
from databases import run_cli


ENV = dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", TRACKSTAR_LOCK_TIMEOUT="120")


def _cli(*argv, ok=True):
    return run_cli(*argv, ok=ok)


@pytest.fixture(scope="module")
def fitted(tiny_db_template, tmp_path_factory):
    """The tiny database with a bm25 run (k 3), gradients of both splits (dim 1024) and R fitted."""
    from databases import copy_db

    from trackstar_db.gradients.fit import fit
    from trackstar_db.gradients.worker import GradientJob, ingest_gradients

    root = tmp_path_factory.mktemp("snapshots")
    db = copy_db(tiny_db_template, root)
    _cli("retrieve", db.path, "--method", "bm25", "--k", "3")
    for split in ("train", "queries"):
        ingest_gradients(db, {"dim": 1024}, GradientJob(split, batch_size=16, device="cpu"), progress=False)
    fit(db)
    return db.path


def _copy(fitted, tmp_path):
    shutil.copytree(fitted, tmp_path / "db")
    shutil.copytree(fitted.parent / "model", tmp_path / "model")
    from trackstar_db import connect

    connect(tmp_path / "db").set_model(tmp_path / "model")
    return tmp_path / "db"


READER = textwrap.dedent("""
    import json, sys, time
    from click.testing import CliRunner
    from trackstar_db.cli import main

    import os

    db, out, stop, n_queries = sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4])
    seen = {"reads": 0, "counts": set()}

    def run(*argv):
        result = CliRunner().invoke(main, [str(a) for a in argv], catch_exceptions=False)
        if result.exit_code != 0:
            sys.exit(f"{argv[0]} failed: {result.output[-800:]}")
        seen["reads"] += 1
        return result.output

    while not os.path.exists(stop) or seen["reads"] < 4:
        methods = [json.loads(line)["run_id"] for line in run("eval", db, "--format", "json").splitlines()]
        if sorted(methods) != ["bm25"]:
            sys.exit(f"eval lists runs {methods}")
        rows = [json.loads(line) for line in run("sql", db, "SELECT run_id, count(*) AS n, max(rank) AS k "
                                                 "FROM retrievals GROUP BY run_id", "--format", "json").splitlines()]
        if len(rows) != 1 or rows[0]["run_id"] != "bm25" or rows[0]["n"] != n_queries * rows[0]["k"]:
            sys.exit(f"sql sees {rows}")
        seen["counts"].add(rows[0]["k"])
        run("export", db, "--run", "bm25", "--out", out)
        lengths = {len(json.loads(line)["proponent_ids"]) for line in open(out)}
        if len(lengths) != 1:
            sys.exit(f"export mixes runs of k {sorted(lengths)}")
        run("query", db, "--prompt", "As the records show, Veidukrouth was born in", "--target", "Zuteil",
            "--method", "trackstar", "--k", "3", "--device", "cpu", "--format", "json")
    print(json.dumps({"reads": seen["reads"], "ks": sorted(seen["counts"])}))
""")

WRITER = textwrap.dedent("""
    import sys, time
    from click.testing import CliRunner
    from trackstar_db.cli import main

    db, kind, times = sys.argv[1], sys.argv[2], int(sys.argv[3])
    done = 0
    while done < times:
        if kind == "retrieve":
            argv = ["retrieve", db, "--method", "bm25", "--k", "5" if done % 2 == 0 else "3", "--replace"]
        else:
            argv = ["fit", db, "--damping", "0.2" if done % 2 == 0 else "0.1"]
        result = CliRunner().invoke(main, argv, catch_exceptions=False)
        if result.exit_code != 0:
            sys.exit(f"{argv[0]} failed: {result.output[-800:]}")
        done += 1
    print(done)
""")


@pytest.mark.slow  # a minute on a loaded machine: three replaces and three fits beside the reader
def test_readers_see_only_committed_states_beside_replace_and_fit(fitted, tmp_path):
    db = _copy(fitted, tmp_path)
    from trackstar_db import connect

    n_queries = connect(db).sql("SELECT count(DISTINCT query_id) AS n FROM retrievals").column("n")[0].as_py()
    stop = tmp_path / "stop"
    reader = subprocess.Popen([sys.executable, "-c", READER, str(db), str(tmp_path / "out.jsonl"), str(stop),
                               str(n_queries)], env=ENV, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    env = dict(ENV, TRACKSTAR_FAULT_SLEEP="run.after_stage:1")  # the staged run waits before its swap
    writers = [subprocess.Popen([sys.executable, "-c", WRITER, str(db), kind, "3"], env=env,
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
               for kind in ("retrieve", "fit")]
    outputs = [w.communicate(timeout=600) for w in writers]
    stop.touch()
    out, err = reader.communicate(timeout=600)
    for writer, (written, werr) in zip(writers, outputs):
        assert writer.returncode == 0, werr[-2000:]
        assert int(written.split()[-1]) == 3
    assert reader.returncode == 0, (out[-1000:], err[-3000:])
    reader.stdout = out
    seen = json.loads(out.splitlines()[-1])
    assert seen["reads"] >= 8
    assert set(seen["ks"]) <= {3, 5}


READER_ALL = textwrap.dedent("""
    import json, os, sys, urllib.error, urllib.request
    from click.testing import CliRunner
    from trackstar_db.cli import main

    db, out, stop, n_queries, url = sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4]), sys.argv[5]
    PROMPT, TARGET = "As the records show, Veidukrouth was born in", "Zuteil"
    seen = {"reads": 0, "server": 0, "stale": 0, "counts": set(), "examples": set(), "versions": set()}

    def fail(what):
        sys.exit(f"after {seen['reads']} reads: {what}")

    STALE = "changed since R was fitted"  # committed: gradients added by ingest, before the next fit

    def run(*argv, stale_ok=False):
        result = CliRunner().invoke(main, [str(a) for a in argv], catch_exceptions=False)
        seen["reads"] += 1
        if result.exit_code != 0:
            if stale_ok and STALE in result.output and len(result.output.strip().splitlines()) == 1:
                seen["stale"] += 1
                return ""
            fail(f"{argv[0]} failed: {result.output[-800:]}")
        return result.output

    def ask(path, body=None, stale_ok=False):
        request = urllib.request.Request(url + path, data=None if body is None else json.dumps(body).encode(),
                                         headers={"Content-Type": "application/json"})
        try:
            with urllib.request.urlopen(request, timeout=300) as answer:
                seen["server"] += 1
                return json.loads(answer.read())
        except urllib.error.HTTPError as exc:
            text = exc.read()[:800].decode(errors="replace")
            if stale_ok and exc.code == 400 and STALE in text:
                seen["stale"] += 1
                return None
            fail(f"server {path}: HTTP {exc.code}: {text}")

    def check_run(rows, who):
        if len(rows) != 1 or rows[0]["run_id"] != "bm25" or rows[0]["n"] != n_queries * rows[0]["k"]:
            fail(f"{who} sees {rows}")
        seen["counts"].add(rows[0]["k"])

    SQL = ("SELECT run_id, count(*) AS n, max(rank) AS k, (SELECT count(*) FROM examples) AS examples, "
           "(SELECT count(*) FROM ground_truth WHERE example_id NOT IN (SELECT example_id FROM examples)) AS lost, "
           "(SELECT count(*) FROM retrievals WHERE example_id NOT IN (SELECT example_id FROM examples)) AS stray "
           "FROM retrievals GROUP BY run_id")

    while not os.path.exists(stop) or seen["reads"] < 16 or seen["server"] < 4:  # the test asks at least these
        methods = [json.loads(line)["run_id"] for line in run("eval", db, "--format", "json").splitlines()]
        if sorted(methods) != ["bm25"]:
            fail(f"eval lists runs {methods}")
        rows = [json.loads(line) for line in run("sql", db, SQL, "--format", "json").splitlines()]
        check_run(rows, "sql")
        if rows[0]["lost"] or rows[0]["stray"]:
            fail(f"sql sees rows naming examples it cannot see: {rows}")
        seen["examples"].add(rows[0]["examples"])
        run("export", db, "--run", "bm25", "--out", out)
        lengths = {len(json.loads(line)["proponent_ids"]) for line in open(out)}
        if len(lengths) != 1:
            fail(f"export mixes runs of k {sorted(lengths)}")
        for method in ("trackstar", "bm25"):
            output = run("query", db, "--prompt", PROMPT, "--target", TARGET, "--method", method, "--k", "3",
                         "--device", "cpu", "--format", "json", stale_ok=method == "trackstar")
            hits = [json.loads(line) for line in output.splitlines()]
            if (method == "bm25" and not hits) or any(h["text"] is None for h in hits):
                fail(f"query {method} returns a hit on an example it cannot see: {hits}")
        # the server: each answer from one committed version (its texts, its run, its counts)
        for method in ("bm25", "trackstar"):
            answer = ask("/api/query", {"prompt": PROMPT, "target": TARGET, "methods": [method], "k": 3},
                         stale_ok=method == "trackstar")
            for result in (answer or {}).get("results", []):
                if not result["proponents"] or any(h["text"] is None for h in result["proponents"] + result["opponents"]):
                    fail(f"server {result['method']} answers with a hit it cannot see: {result}")
            if answer:
                seen["versions"].add(answer["version"])
        table = ask("/api/sql", {"sql": SQL, "limit": 10})
        check_run([dict(zip([c["name"] for c in table["columns"]], row)) for row in table["rows"]], "server sql")
    print(json.dumps({"reads": seen["reads"], "server": seen["server"], "stale": seen["stale"], "ks": sorted(seen["counts"]),
                      "examples": sorted(seen["examples"]), "versions": len(seen["versions"])}))
""")

WRITER_ALL = textwrap.dedent("""
    import json, sys
    from click.testing import CliRunner
    from trackstar_db.cli import main

    db, kind, times, folder = sys.argv[1], sys.argv[2], int(sys.argv[3]), sys.argv[4]
    PROMPT, TARGET = "As the records show, Veidukrouth was born in", "Zuteil"
    for done in range(times):
        if kind == "retrieve":
            argv = ["retrieve", db, "--method", "bm25", "--k", "5" if done % 2 == 0 else "3", "--replace"]
        elif kind == "fit":
            argv = ["fit", db, "--damping", "0.2" if done % 2 == 0 else "0.1"]
        elif kind == "corpus":  # new texts that BM25 ranks first for the readers' query
            path = f"{folder}/echo-{done}.jsonl"
            with open(path, "w") as handle:
                for i in range(3):
                    handle.write(json.dumps({"sentence_id": f"echo-{done}-{i}", "text": f"{PROMPT} {TARGET} {i}."}) + "\\n")
            argv = ["ingest", "corpus", db, path]
        elif kind == "gradients":
            argv = ["ingest", "gradients", db, "--split", "train", "--dim", "1024", "--device", "cpu",
                    "--batch-size", "16", "--commit-rows", "4"]
        else:
            argv = ["tail-patch", db, "--run", "bm25", "--k", "2", "--queries", "2", "--device", "cpu"]
        result = CliRunner().invoke(main, argv, catch_exceptions=False)
        if result.exit_code != 0:
            sys.exit(f"{argv[0]} failed: {result.output[-800:]}")
    print(times)
""")


def _serve(db):
    """`trackstar-db serve DB` on a free port; (process, base URL) once it answers."""
    import socket
    import urllib.request

    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    server = subprocess.Popen([sys.executable, "-m", "trackstar_db.cli", "serve", str(db), "--port", str(port),
                               "--device", "cpu", "--no-warm"], env=ENV, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 120
    while True:
        try:
            urllib.request.urlopen(url + "/api/health", timeout=5).read()
            return server, url
        except OSError:
            if server.poll() is not None or time.monotonic() > deadline:
                server.kill()
                raise RuntimeError(f"serve did not start: {server.communicate()[1][-2000:]}")
            time.sleep(0.5)


@pytest.mark.slow  # minutes on a loaded machine: five writers, two rounds each, beside the reader and the server
def test_readers_and_the_server_see_one_committed_state_beside_every_writer(fitted, tmp_path):
    """eval, sql, export, query (trackstar and BM25) and the server beside ingest corpus, ingest
    gradients, fit, retrieve --replace and tail-patch: every read succeeds and sees one committed
    state (one k per run, no row naming an example it cannot see, no BM25 hit on an unseen
    example, a server answer with every text)."""
    db = _copy(fitted, tmp_path)
    from trackstar_db import connect

    n_queries = connect(db).sql("SELECT count(DISTINCT query_id) AS n FROM retrievals").column("n")[0].as_py()
    examples = connect(db).count("examples")
    server, url = _serve(db)
    stop = tmp_path / "stop"
    try:
        reader = subprocess.Popen([sys.executable, "-c", READER_ALL, str(db), str(tmp_path / "out.jsonl"), str(stop),
                                   str(n_queries), url], env=ENV, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                  text=True)
        env = dict(ENV, TRACKSTAR_FAULT_SLEEP="run.after_stage:1")  # the staged run waits before its swap
        writers = {kind: subprocess.Popen([sys.executable, "-c", WRITER_ALL, str(db), kind, "2", str(tmp_path)],
                                          env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
                   for kind in ("corpus", "gradients", "fit", "retrieve", "tail-patch")}
        outputs = {kind: w.communicate(timeout=900) for kind, w in writers.items()}
        stop.touch()
        out, err = reader.communicate(timeout=900)
    finally:
        stop.touch()
        server.terminate()
        server.communicate(timeout=60)
    for kind, writer in writers.items():
        assert writer.returncode == 0, (kind, outputs[kind][1][-2000:])
    assert reader.returncode == 0, (out[-1000:], err[-3000:])
    seen = json.loads(out.splitlines()[-1])
    assert seen["reads"] >= 16 and seen["server"] >= 4, seen
    print(seen)
    assert set(seen["ks"]) <= {3, 5}
    assert set(seen["examples"]) <= {examples, examples + 3, examples + 6}
    assert connect(db).count("examples") == examples + 6
    _cli("ingest", "gradients", db, "--split", "train", "--dim", "1024", "--device", "cpu")  # the last echoes' rows
    _cli("fit", db)
    assert "no problems found" in _cli("check", db).output


def test_a_staged_run_is_invisible_and_the_replaced_one_readable_until_the_swap(fitted, tmp_path):
    """Deterministic: the writer is held between staging and swap; the reader then sees the old run only."""
    db = _copy(fitted, tmp_path)
    env = dict(ENV, TRACKSTAR_FAULT_SLEEP="run.after_stage:6")
    writer = subprocess.Popen([sys.executable, "-m", "trackstar_db.cli", "retrieve", str(db), "--method", "bm25",
                               "--k", "5", "--replace"], env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        deadline = time.monotonic() + 60
        from trackstar_db.store.lock import holder

        while not (db / "journal.json").exists() and time.monotonic() < deadline:  # the swap's journal is written
            time.sleep(0.1)
        time.sleep(2)  # the staged rows are appended
        staged = _cli("sql", db, "SELECT DISTINCT run_id FROM retrievals", "--format", "json").output
        assert holder(db) is not None and writer.poll() is None, "the writer finished before the reads"
        assert [json.loads(line) for line in staged.splitlines()] == [{"run_id": "bm25"}]
        assert '"run_id": "bm25"' in _cli("eval", db, "--format", "json").output
        _cli("export", db, "--run", "bm25", "--out", tmp_path / "old.jsonl")
        assert {len(json.loads(x)["proponent_ids"]) for x in open(tmp_path / "old.jsonl")} == {3}
    finally:
        writer.communicate(timeout=120)
    assert writer.returncode == 0
    _cli("export", db, "--run", "bm25", "--out", tmp_path / "new.jsonl")
    assert {len(json.loads(x)["proponent_ids"]) for x in open(tmp_path / "new.jsonl")} == {5}


PROMPT, TARGET = "As the records show, Veidukrouth was born in", "Zuteil"


def _bm25_hits(db):
    rows = [json.loads(line) for line in _cli("query", db, "--prompt", PROMPT, "--target", TARGET, "--method", "bm25",
                                              "--k", "5", "--format", "json").output.splitlines()]
    return [(r["example_id"], r["text"], round(r["score"], 4)) for r in rows if r["kind"] == "proponent"]


def _echoes(db, tmp_path, n=6, tag="echo"):
    """A corpus file of `n` new examples that repeat the query's words (BM25 ranks them first)."""
    path = tmp_path / f"{tag}.jsonl"
    path.write_text("".join(json.dumps({"sentence_id": f"{tag}-{i}", "text": f"{PROMPT} {TARGET} {TARGET} {i}."}) + "\n"
                            for i in range(n)))
    return path


def test_bm25_reads_the_committed_index_beside_an_ingest(fitted, tmp_path):
    """Deterministic: an ingest is held after its BM25 commit, before its own; a BM25 query then
    answers from the committed index (same hits, same scores: the statistics of the committed
    examples), and after the ingest from the new one."""
    from trackstar_db.store.bm25 import BM25Index

    db = _copy(fitted, tmp_path)
    before, documents = _bm25_hits(db), BM25Index(db).count()
    assert before and all(text for _, text, _ in before)
    env = dict(ENV, TRACKSTAR_FAULT_SLEEP="corpus.after_bm25:20")
    writer = subprocess.Popen([sys.executable, "-m", "trackstar_db.cli", "ingest", "corpus", str(db),
                               str(_echoes(db, tmp_path))], env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        deadline = time.monotonic() + 120
        while BM25Index(db).count() == documents and time.monotonic() < deadline:
            time.sleep(0.1)  # the live index holds the new documents: the writer sleeps before its commit
        assert BM25Index(db).count() == documents + 6 and writer.poll() is None
        during = _bm25_hits(db)
        assert writer.poll() is None, "the writer finished before the read"
        assert during == before
    finally:
        writer.communicate(timeout=120)
    assert writer.returncode == 0
    after = _bm25_hits(db)
    assert all(text for _, text, _ in after) and {e for e, _, _ in after} <= {f"echo-{i}" for i in range(6)}


# -- damage (item 2) ----------------------------------------------------------------------------
def _drop_latest(db, table):
    versions = sorted((db / "tables" / f"{table}.lance" / "_versions").glob("*.manifest"))
    # V2 naming: the newest version has the smallest file name
    versions[0].unlink()


def _edit_manifest(db, change):
    path = db / "manifest.json"
    manifest = json.loads(path.read_text())
    change(manifest)
    path.write_text(json.dumps(manifest))


DAMAGE = {
    "examples behind": (lambda db: _drop_latest(db, "examples"), "examples", ["sql", "DB", "SELECT count(*) FROM examples"]),
    "retrievals behind": (lambda db: _drop_latest(db, "retrievals"), "retrievals", ["eval", "DB"]),
    "ground_truth behind": (lambda db: _drop_latest(db, "ground_truth"), "ground_truth", ["eval", "DB"]),
    "projection seed edited": (lambda db: _edit_manifest(db, lambda m: m["featurizer"]["config"].__setitem__("seed", 7)),
                               "config.seed", ["query", "DB", "--prompt", "p", "--target", "t", "--device", "cpu"]),
    "dim edited": (lambda db: _edit_manifest(db, lambda m: m["gradient_tables"]["grads_train_corrected"]
                                             .__setitem__("dim", 2048)), "records dim 2048",
                   ["query", "DB", "--prompt", "p", "--target", "t", "--device", "cpu"]),
    "garbage journal": (lambda db: (db / "journal.json").write_text("garbage{"), "unreadable journal",
                        ["sql", "DB", "SELECT 1"]),
}


@pytest.mark.parametrize("case", list(DAMAGE))
def test_damage_is_named_by_check_and_refused_by_reads(fitted, tmp_path, case):
    damage, fragment, read = DAMAGE[case]
    db = _copy(fitted, tmp_path)
    assert _cli("check", db).exit_code == 0
    damage(db)
    checked = _cli("check", db, ok=False)
    assert checked.exit_code == 1 and fragment in checked.output and "repair:" in checked.output, checked.output
    result = _cli(*[db if a == "DB" else a for a in read], ok=False)
    assert result.exit_code == 1 and "Traceback" not in result.output
    errors = [line for line in result.output.splitlines() if line.startswith("Error:")]
    assert len(errors) == 1 and fragment in errors[0] and "repair:" in errors[0], result.output


def test_a_journal_naming_a_lost_version_is_one_line_with_its_repair(fitted, tmp_path):
    db = _copy(fitted, tmp_path)
    (db / "journal.json").write_text(json.dumps({"command": "ingest corpus", "pid": 1, "bm25": False, "phase": "write",
                                                 "forward": None, "tables": {"examples": 999}}))
    checked = _cli("check", db, ok=False)
    assert "names version 999 of examples" in checked.output
    result = _cli("retrieve", db, "--method", "bm25", "--run", "again", ok=False)
    line = [x for x in result.output.splitlines() if x.startswith("Error:")]
    assert len(line) == 1 and "version 999 of examples" in line[0] and "repair: move" in line[0], result.output
    (db / "journal.json").rename(tmp_path / "journal.json")  # the repair it names
    _cli("retrieve", db, "--method", "bm25", "--run", "again")


# -- one read view for the CLI, the API and the server (issue 30, item 1) -----------------------
HOLDER = textwrap.dedent("""
    import sys, time, pyarrow as pa
    from pathlib import Path
    from trackstar_db import connect
    db = connect(sys.argv[1])
    with db.writer("test append"):
        if sys.argv[4] == "append":
            db.append("examples", pa.table({"example_id": ["late-1"], "text": ["written while readers read"],
                                            "source": ["late"], "content_hash": ["0" * 64]}))
        Path(sys.argv[2]).write_text("held")
        while not Path(sys.argv[3]).exists():
            time.sleep(0.05)
""")


class _Held:
    """A writer process holding the lock (after one uncommitted append to examples, or none)."""

    def __init__(self, db, tmp_path, append=True):
        self.held, self.release = tmp_path / "held", tmp_path / "release"
        self.process = subprocess.Popen([sys.executable, "-c", HOLDER, str(db), str(self.held), str(self.release),
                                         "append" if append else "hold"], env=ENV,
                                        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)

    def __enter__(self):
        deadline = time.monotonic() + 120
        while not self.held.exists():
            assert self.process.poll() is None, self.process.communicate()[1][-2000:]
            assert time.monotonic() < deadline, "the writer did not get going"
            time.sleep(0.05)
        return self

    def __exit__(self, *exc):
        self.release.write_text("go")
        out, err = self.process.communicate(timeout=120)
        assert self.process.returncode == 0, err[-2000:]


def _cli_count(db):
    return json.loads(_cli("sql", db, "SELECT count(*) AS n FROM examples", "--format", "json").output)["n"]


def test_cli_api_and_server_each_read_the_committed_version_beside_an_uncommitted_append(tiny_db, tmp_path):
    """While a writer holds an appended example it has not committed, the CLI (sql, info),
    the API's read verbs (sql, info, evaluate, query) and a server started then (its first
    snapshot, /api/sql, /api/examples) all read the committed version; after the writer's commit
    each sees the row. Without one view per read (the newest version on disk), each read fails.
    The server's part needs the serve extra (fastapi); without it the CLI and API parts still run."""
    import importlib.util

    from trackstar_db import connect

    served = importlib.util.find_spec("fastapi") is not None
    if served:
        from fastapi.testclient import TestClient

        from trackstar_db.serve import app

    db = tiny_db.path
    _cli("retrieve", db, "--method", "bm25", "--k", "3")
    before = connect(db).count("examples")
    with _Held(db, tmp_path):
        assert connect(db).count("examples") == before + 1  # on disk (Lance committed it), not yet in the record
        assert _cli_count(db) == before
        assert re.search(rf"examples +{before:,} rows", _cli("info", db).output)
        handle = connect(db)
        assert handle.sql("SELECT count(*) AS n FROM examples").column("n")[0].as_py() == before
        assert handle.info()["tables"]["examples"] == before
        assert handle.evaluate().num_rows >= 1
        hits = handle.query(PROMPT, TARGET, k=3, method="bm25").column("example_id").to_pylist()
        assert "late-1" not in hits
        if served:
            client = TestClient(app(db), raise_server_exceptions=False)  # made while the writer works
            answer = client.post("/api/sql", json={"sql": "SELECT count(*) AS n FROM examples"}).json()
            assert answer["rows"][0][0] == before, answer
            assert client.get("/api/examples/late-1").status_code == 404
            version = client.get("/api/version").json()
            assert version["writer_active"]
            assert version["tables"] == json.loads((db / "versions.json").read_text())["tables"]
    assert _cli_count(db) == before + 1
    assert connect(db).info()["tables"]["examples"] == before + 1
    assert re.search(rf"examples +{before + 1:,} rows", _cli("info", db).output)
    if served:
        time.sleep(0.6)  # past the tracker's check interval: the next request reads the committed append
        answer = client.post("/api/sql", json={"sql": "SELECT count(*) AS n FROM examples"}).json()
        assert answer["rows"][0][0] == before + 1
        assert client.get("/api/examples/late-1").status_code == 200


def test_a_database_older_than_versions_json_gets_one_at_its_first_open(tiny_db, tmp_path):
    """No versions.json: the first open records the tables as they are (under the writer lock), so
    the next reader reads that record, not the newest versions; with another writer holding the
    lock the open writes nothing (and its reads take the newest versions), the next open does."""
    from trackstar_db import connect
    from trackstar_db.store import committed

    db = tiny_db.path
    record = db / committed.FILENAME
    recorded = json.loads(record.read_text())
    (tmp_path / "holder").mkdir()
    with _Held(db, tmp_path / "holder", append=False):
        record.unlink()
        handle = connect(db)
        assert not record.exists()  # a writer holds the lock: the open leaves the record to it
        assert handle.sql("SELECT count(*) AS n FROM examples").column("n")[0].as_py() == handle.count("examples")
    record.unlink()  # the writer committed on release: make the database old again
    handle = connect(db)
    assert record.exists()
    written = json.loads(record.read_text())
    assert written["tables"] == committed.latest_versions(handle) == recorded["tables"]
    assert written["manifest"] == json.loads((db / "manifest.json").read_text())
    assert written.get("bm25") and (db / "bm25_versions" / written["bm25"] / "meta.json").is_file()
    # the record now holds: an append no writer committed is not read
    import pyarrow as pa

    handle.append("examples", pa.table({"example_id": ["raw-1"], "text": ["x"], "source": ["x"], "content_hash": ["1" * 64]}))
    assert connect(db).sql("SELECT count(*) AS n FROM examples").column("n")[0].as_py() == handle.count("examples") - 1
