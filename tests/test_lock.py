"""The writer lock, the journal and the input checks, one at a time (fast; test_faults.py kills real commands)."""

import json
import os
import signal
import subprocess
import sys
import time

import pyarrow as pa
import pytest

from trackstar_db import Database, connect
from trackstar_db.errors import RecordError, TrackstarError
from trackstar_db.store import journal
from trackstar_db.store.lock import WriterLock, holder

HOLD = """
import sys, time
from trackstar_db.store.lock import WriterLock
with WriterLock(sys.argv[1], "test holder"):
    print("held", flush=True)
    time.sleep(float(sys.argv[2]))
"""


def _hold(path, seconds):
    """A separate process holding the lock of `path` for `seconds`; returns once it holds it."""
    process = subprocess.Popen([sys.executable, "-c", HOLD, str(path), str(seconds)], stdout=subprocess.PIPE)
    assert process.stdout.readline().strip() == b"held"
    return process


@pytest.fixture
def empty_db(tmp_path):
    return Database.create(tmp_path / "db")


def test_second_writer_fails_naming_the_holder(empty_db):
    process = _hold(empty_db.path, 30)
    try:
        start = time.monotonic()
        with pytest.raises(TrackstarError) as error:
            with WriterLock(empty_db.path, "second", timeout=0.5):
                pass
        assert time.monotonic() - start >= 0.5
        message = str(error.value)
        assert "\n" not in message and f"pid {process.pid}" in message and "test holder" in message
    finally:
        process.kill()
        process.wait()


def test_waiting_writer_gets_the_lock_when_the_holder_ends(empty_db):
    process = _hold(empty_db.path, 1)
    with WriterLock(empty_db.path, "waiter", timeout=30):
        assert holder(empty_db.path)["pid"] == os.getpid()
    process.wait()


def test_lock_of_a_killed_process_is_taken_over(empty_db):
    process = _hold(empty_db.path, 60)
    assert holder(empty_db.path)["pid"] == process.pid
    os.kill(process.pid, signal.SIGKILL)
    process.wait()
    with WriterLock(empty_db.path, "after the kill", timeout=0):
        assert holder(empty_db.path) == {**holder(empty_db.path), "pid": os.getpid(), "command": "after the kill"}


def test_lock_is_reentrant_and_released(empty_db):
    with empty_db.writer("outer"):
        with empty_db.writer("inner"):
            pass
        assert holder(empty_db.path)["command"] == "outer"
    process = _hold(empty_db.path, 0)  # another process can take it now
    process.wait()


def test_readers_never_wait_for_the_lock(empty_db):
    process = _hold(empty_db.path, 30)
    try:
        start = time.monotonic()
        reader = connect(empty_db.path)
        assert reader.count("examples") == 0 and reader.sql("SELECT count(*) AS n FROM facts").num_rows == 1
        assert time.monotonic() - start < 5
    finally:
        process.kill()
        process.wait()


def test_cli_writer_fails_in_one_line_while_locked(empty_db, tmp_path):
    facts = tmp_path / "facts.jsonl"
    facts.write_text(json.dumps({"fact_id": "F1", "entity0": "a", "relation": "r", "entity1": "b",
                                 "prompt0": "a r"}) + "\n")
    process = _hold(empty_db.path, 60)
    try:
        run = subprocess.run([sys.executable, "-m", "trackstar_db.cli", "ingest", "facts", str(empty_db.path), str(facts)],
                             capture_output=True, text=True, env=dict(os.environ, TRACKSTAR_LOCK_TIMEOUT="0.5"))
    finally:
        process.kill()
        process.wait()
    assert run.returncode == 1
    lines = run.stderr.strip().splitlines()
    assert lines[-1].startswith("Error:") and f"pid {process.pid}" in lines[-1] and "Traceback" not in run.stderr
    assert connect(empty_db.path).count("facts") == 0


def test_update_manifest_keeps_a_concurrent_entry(empty_db):
    stale = connect(empty_db.path)  # read before the other change: writing it back would lose it
    empty_db.update_manifest(lambda m: m["gradient_tables"].__setitem__("grads_train_corrected", {"dim": 8}))
    stale.update_manifest(lambda m: m["preconditioners"].__setitem__("x.train", {"damping": 0.1}))
    manifest = connect(empty_db.path).manifest
    assert manifest["gradient_tables"] == {"grads_train_corrected": {"dim": 8}}
    assert manifest["preconditioners"] == {"x.train": {"damping": 0.1}}


def _fact(i):
    return {"fact_id": f"F{i}", "subject": "s", "relation": "r", "object": "o", "fact_key": f"k{i}"}


def test_journal_left_by_a_dead_writer_is_rolled_back_on_open(empty_db):
    empty_db.append("facts", pa.Table.from_pylist([_fact(0)]))
    with empty_db.writer("test"):
        journal.begin(empty_db, "test", ["facts", "queries"])
        empty_db.append("facts", pa.Table.from_pylist([_fact(1)]))
        # the process "dies" here: the journal stays
    assert (empty_db.path / journal.FILENAME).exists()
    reopened = connect(empty_db.path)
    assert not (empty_db.path / journal.FILENAME).exists()
    assert reopened.table("facts").column("fact_id").to_pylist() == ["F0"]


def test_journal_of_a_live_writer_is_left_alone(empty_db):
    empty_db.append("facts", pa.Table.from_pylist([_fact(0)]))
    with empty_db.writer("test"):
        journal.begin(empty_db, "test", ["facts"])
        empty_db.append("facts", pa.Table.from_pylist([_fact(1)]))
        process = subprocess.run([sys.executable, "-c", "import sys; from trackstar_db import connect; "
                                  "print(connect(sys.argv[1]).count('facts'))", str(empty_db.path)],
                                 capture_output=True, text=True)
        assert process.stdout.strip() == "2"  # a reader sees the snapshot and recovers nothing
        assert (empty_db.path / journal.FILENAME).exists()
        journal.clear(empty_db)


def test_transaction_rolls_back_in_process_failure(empty_db):
    with pytest.raises(RuntimeError):
        with journal.transaction(empty_db, "test", ["facts"]):
            empty_db.append("facts", pa.Table.from_pylist([_fact(1)]))
            raise RuntimeError("disk full")
    assert empty_db.count("facts") == 0 and not (empty_db.path / journal.FILENAME).exists()


def _jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def test_conflicting_duplicate_ids_name_both_lines(empty_db, tmp_path):
    from trackstar_db.sources.corpus import ingest_corpus

    first = _jsonl(tmp_path / "a.jsonl", [{"sentence_id": "s1", "text": "one"}, {"sentence_id": "s2", "text": "two"}])
    second = _jsonl(tmp_path / "b.jsonl", [{"sentence_id": "s3", "text": "three"}, {"sentence_id": "s2", "text": "TWO"}])
    with pytest.raises(RecordError, match=r"b.jsonl:2: .*'s2'.*a.jsonl:2"):
        ingest_corpus(empty_db, [first, second], progress=False)
    assert empty_db.count("examples") == 0  # all or nothing
    again = _jsonl(tmp_path / "c.jsonl", [{"sentence_id": "s1", "text": "one"}, {"sentence_id": "s2", "text": "two"}])
    assert ingest_corpus(empty_db, [first, again], progress=False).added == 2  # exact repeats are fine
    with pytest.raises(RecordError, match=r"d.jsonl:1: .*'s1' is stored \(from a.jsonl\)"):
        ingest_corpus(empty_db, [_jsonl(tmp_path / "d.jsonl", [{"sentence_id": "s1", "text": "uno"}])], progress=False)


def test_integer_and_string_ids_never_collide(empty_db, tmp_path):
    from trackstar_db.sources.corpus import ingest_corpus
    from trackstar_db.sources.facts import ingest_facts

    mixed = _jsonl(tmp_path / "mixed.jsonl", [{"sentence_id": 17, "text": "a"}, {"sentence_id": "17", "text": "a"}])
    with pytest.raises(RecordError, match=r"mixed.jsonl:2: .*'17' \(string\).*integer id at .*mixed.jsonl:1"):
        ingest_corpus(empty_db, [mixed], progress=False)
    for bad in (1.5, True, [1]):
        with pytest.raises(RecordError, match="must be a string"):
            ingest_corpus(empty_db, [_jsonl(tmp_path / "bad.jsonl", [{"sentence_id": bad, "text": "a"}])], progress=False)
    ints = _jsonl(tmp_path / "ints.jsonl", [{"sentence_id": 17, "text": "a"}, {"sentence_id": 0, "text": "b"}])
    assert ingest_corpus(empty_db, [ints], progress=False).added == 2
    assert sorted(empty_db.ids("examples", "example_id")) == ["0", "17"]  # the canonical conversion
    fact = {"entity0": "a", "relation": "r", "entity1": "b", "prompt0": "a r"}
    facts = _jsonl(tmp_path / "facts.jsonl", [dict(fact, fact_id=5), dict(fact, fact_id="5")])
    with pytest.raises(RecordError, match=r"facts.jsonl:2: fact id '5'"):
        ingest_facts(empty_db, [facts], progress=False)
    conflict = _jsonl(tmp_path / "conflict.jsonl", [dict(fact, fact_id="F"), dict(fact, fact_id="F", entity1="c")])
    with pytest.raises(RecordError, match=r"conflict.jsonl:2: .*conflict.jsonl:1"):
        ingest_facts(empty_db, [conflict], progress=False)
    assert empty_db.count("facts") == 0


def test_nan_tail_patch_rows_are_refused():
    from trackstar_db.tailpatch.runs import _check_finite

    rows = pa.table({"run_id": ["r", "r"], "query_id": ["q1", "q2"], "rank": [1, 1], "example_id": ["e", "e"],
                     "p_before": [0.1, 0.2], "p_after": [0.2, float("nan")]})
    with pytest.raises(TrackstarError, match="query 'q2'.*p_after is nan"):
        _check_finite(rows)
    _check_finite(rows.slice(0, 1))
