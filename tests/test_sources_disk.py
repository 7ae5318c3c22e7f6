"""Datasets on disk: a datasets.save_to_disk directory and folders of Parquet/Arrow shards,
read in record batches (rows are committed before the whole input is read), with the field
options and --skip-bad; bad input stops with one line naming the file and row, losing nothing."""

from __future__ import annotations

import datasets
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from test_chat import CONVERSATIONS
from test_task import PAIRS
from test_task_ingest import error_line, run, snapshot
from tiny_tokenizers import CHATML, model_dir, word_tokenizer

from trackstar_db import connect
from trackstar_db.featurizer.task import Task, task_of
from trackstar_db.sources import records
from trackstar_db.sources.chat import render
from trackstar_db.sources.corpus import CorpusOptions, ingest_corpus

N = 60  # rows: several read batches and several commits


def pair_records(n=N, start=0):
    return [{"id": f"r{i}", "prompt": PAIRS[i % len(PAIRS)][0], "completion": PAIRS[i % len(PAIRS)][1] + f" {i}",
             "shard_note": i % 3} for i in range(start, start + n)]


def write_arrow_stream(path, rows, batch_rows):
    table = pa.Table.from_pylist(rows)
    with pa.ipc.new_stream(str(path), table.schema) as writer:
        for batch in table.to_batches(max_chunksize=batch_rows):
            writer.write_batch(batch)
    return path


@pytest.fixture(scope="module")
def chat_model(tmp_path_factory):
    return model_dir(tmp_path_factory.mktemp("disk") / "model", CHATML)


@pytest.fixture
def db_path(tmp_path, chat_model):
    run("init", tmp_path / "db", "--model", chat_model)
    return tmp_path / "db"


def test_a_shard_larger_than_the_batch_streams(tmp_path, db_path, monkeypatch):
    """Rows reach the table batch by batch while the file is still being read."""
    folder = tmp_path / "shards"
    folder.mkdir()
    write_arrow_stream(folder / "part-0.arrow", pair_records(N), batch_rows=10)  # 6 stream batches
    monkeypatch.setattr(records, "READ_ROWS", 4)
    read = {"batches": 0}
    real = records._record_batches

    def counting(path, kind):
        for batch in real(path, kind):
            read["batches"] += 1
            yield batch

    monkeypatch.setattr(records, "_record_batches", counting)
    db = connect(db_path)
    commits = []
    real_append = db.append

    def append(name, rows):
        commits.append((read["batches"], rows.num_rows))
        real_append(name, rows)

    monkeypatch.setattr(db, "append", append)
    options = CorpusOptions(prompt_field="prompt", completion_field="completion", batch_size=7)
    report = ingest_corpus(db, [folder], options, progress=False)
    assert report.added == N and read["batches"] == 6
    assert [rows for _, rows in commits] == [7] * (N // 7) + [N % 7]
    assert commits[0][0] == 1  # the first commit came while one of six batches had been read
    stored = connect(db_path).table("examples").to_pylist()
    assert sorted(r["example_id"] for r in stored) == sorted(f"r{i}" for i in range(N))
    assert {r["source"] for r in stored} == {"shards/part-0.arrow"}


def test_save_to_disk_directory_of_prompt_completion_records(tmp_path, db_path):
    data = tmp_path / "sft"
    datasets.Dataset.from_list(pair_records()).save_to_disk(str(data), num_shards=3)
    out = run("ingest", "corpus", db_path, data, "--prompt-field", "prompt", "--completion-field", "completion",
              "--batch-size", "16").output
    assert f"added {N} examples" in out
    db = connect(db_path)
    assert task_of(db.manifest) == Task("completion")
    rows = {r["example_id"]: r for r in db.table("examples").to_pylist()}
    assert len(rows) == N and rows["r7"]["text"] == f"{PAIRS[2][0]} {PAIRS[2][1]} 7"
    assert rows["r7"]["loss_spans"] == [len(PAIRS[2][0]), len(rows["r7"]["text"])]
    assert rows["r7"]["source"].startswith("sft/data-0000") and '"shard_note": 1' in rows["r7"]["metadata"]
    # idempotent: the same directory again adds nothing
    assert f"added 0 examples ({N} already present" in run(
        "ingest", "corpus", db_path, data, "--prompt-field", "prompt", "--completion-field", "completion").output


def test_chat_dataset_saved_to_disk(tmp_path, db_path):
    data = tmp_path / "chat"
    datasets.Dataset.from_list([{"id": f"c{i}", "messages": m} for i, m in enumerate(CONVERSATIONS)]).save_to_disk(str(data))
    run("ingest", "corpus", db_path, data, "--messages-field", "messages")
    rows = {r["example_id"]: r for r in connect(db_path).table("examples").to_pylist()}
    tokenizer = word_tokenizer(chat_template=CHATML)
    for i, messages in enumerate(CONVERSATIONS):
        assert (rows[f"c{i}"]["text"], rows[f"c{i}"]["loss_spans"]) == render(tokenizer, messages, "x", 1)


def test_folder_of_parquet_and_arrow_shards(tmp_path, db_path):
    folder = tmp_path / "mixed"
    folder.mkdir()
    pq.write_table(pa.Table.from_pylist(pair_records(25)), folder / "a.parquet", row_group_size=6)
    write_arrow_stream(folder / "b.arrow", pair_records(20, start=25), batch_rows=6)
    with pa.ipc.new_file(str(folder / "c.arrow"), pa.Table.from_pylist(pair_records(15, start=45)).schema) as writer:
        writer.write_table(pa.Table.from_pylist(pair_records(15, start=45)), max_chunksize=4)  # the IPC file format
    (folder / "README.md").write_text("not a shard")
    out = run("ingest", "corpus", db_path, folder, "--prompt-field", "prompt", "--completion-field", "completion",
              "--batch-size", "10").output
    assert f"added {N} examples" in out
    assert connect(db_path).count("examples") == N


@pytest.mark.parametrize("kind", ["save_to_disk", "parquet", "arrow"])
def test_a_bad_record_in_a_shard_names_the_shard_and_row(tmp_path, db_path, kind):
    run("ingest", "corpus", db_path, run_file(tmp_path / "first.parquet", pair_records(3, start=100)),
        "--prompt-field", "prompt", "--completion-field", "completion")
    before = snapshot(db_path)
    rows = pair_records(12)
    rows[9]["completion"] = ""  # empty completion at row 10 of the (single) shard
    if kind == "save_to_disk":
        datasets.Dataset.from_list(rows).save_to_disk(str(tmp_path / "data"))
        shard = tmp_path / "data" / "data-00000-of-00001.arrow"
    else:
        (tmp_path / "data").mkdir()
        shard = tmp_path / "data" / f"part.{kind}"
        run_file(shard, rows) if kind == "parquet" else write_arrow_stream(shard, rows, batch_rows=4)
    args = ("ingest", "corpus", db_path, tmp_path / "data", "--prompt-field", "prompt", "--completion-field", "completion",
            "--batch-size", "4")
    line = error_line(run(*args, ok=False))
    assert f"{shard}:10: field 'completion' is empty" in line
    assert snapshot(db_path) == before  # the rows committed before the bad one were rolled back
    assert "added 11 examples" in run(*args, "--skip-bad").output
    line = error_line(run("ingest", "corpus", db_path, tmp_path / "data", "--prompt-field", "prompt",
                          "--completion-field", "answer", ok=False))
    assert f"{shard}:1: missing field 'answer'" in line


def run_file(path, rows):
    pq.write_table(pa.Table.from_pylist(rows), path)
    return path


def test_directories_that_are_not_datasets(tmp_path, db_path):
    empty = tmp_path / "empty"
    empty.mkdir()
    (empty / "notes.txt").write_text("x")
    assert "no .parquet, .arrow or .jsonl files" in error_line(run("ingest", "corpus", db_path, empty, ok=False))
    dd = tmp_path / "dd"
    ds = datasets.Dataset.from_list(pair_records(4))
    datasets.DatasetDict({"train": ds, "test": ds}).save_to_disk(str(dd))
    line = error_line(run("ingest", "corpus", db_path, dd, ok=False))
    assert "DatasetDict" in line and str(dd / "train") in line
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "part.arrow").write_bytes(b"not arrow at all")
    line = error_line(run("ingest", "corpus", db_path, broken, ok=False))
    assert f"{broken / 'part.arrow'}: not a readable arrow file" in line
    state = tmp_path / "lost"
    datasets.Dataset.from_list(pair_records(4)).save_to_disk(str(state))
    (state / "data-00000-of-00001.arrow").unlink()
    assert "listed in" in error_line(run("ingest", "corpus", db_path, state, ok=False))
    assert connect(db_path).count("examples") == 0
