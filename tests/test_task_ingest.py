"""Prompt/completion examples end to end as a user types it (ingest corpus -> ingest gradients),
against the brute-force loop of test_task; the table never mixes losses; bad input stops with
one line and loses nothing; databases written before the task field keep working."""

from __future__ import annotations

import json

import lancedb
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from click.testing import CliRunner
from test_task import PAIRS, brute_force
from tiny_tokenizers import CHATML, model_dir

from trackstar_db import connect
from trackstar_db.cli import main
from trackstar_db.featurizer import FeaturizerConfig
from trackstar_db.featurizer.task import DEFAULT, MANIFEST_KEY, Task, task_of
from trackstar_db.store import manifest as _manifest
from trackstar_db.store import schema as _schema


def run(*args, ok=True):
    result = CliRunner().invoke(main, [str(a) for a in args])
    if ok:
        assert result.exit_code == 0, result.output
    else:
        assert result.exit_code != 0, result.output
    return result


def error_line(result) -> str:
    """The one error line (progress bars aside), with no traceback."""
    assert "Traceback" not in result.output, result.output
    lines = [line for line in result.output.splitlines() if line.startswith("Error")]
    assert len(lines) == 1, result.output
    return lines[0]


def write_jsonl(path, records):
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


def snapshot(db_path):
    """Everything a failed ingest must leave alone: the examples rows, BM25 and the manifest's task."""
    db = connect(db_path)
    rows = sorted(db.table("examples").to_pylist(), key=lambda r: r["example_id"])
    from trackstar_db.store.bm25 import BM25Index

    return rows, sorted(BM25Index(db_path).all_ids()), db.manifest.get(MANIFEST_KEY)


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    return model_dir(tmp_path_factory.mktemp("task") / "model", CHATML)


@pytest.fixture
def completion_db(tmp_path, model):
    db = tmp_path / "db"
    run("init", db, "--model", model)
    records = [{"id": f"ex{i}", "prompt": p, "completion": c, "source_kind": "qa"} for i, (p, c) in enumerate(PAIRS)]
    write_jsonl(tmp_path / "pairs.jsonl", records[:3])
    pq.write_table(pa.Table.from_pylist(records[3:]), tmp_path / "pairs.parquet")
    out = run("ingest", "corpus", db, tmp_path / "pairs.jsonl", tmp_path / "pairs.parquet",
              "--prompt-field", "prompt", "--completion-field", "completion").output
    assert f"added {len(PAIRS)} examples" in out
    return db


def test_completion_examples_featurize_to_the_brute_force_vectors(completion_db, model):
    db = connect(completion_db)
    assert task_of(db.manifest) == Task("completion")
    rows = {r["example_id"]: r for r in db.table("examples").to_pylist()}
    prompt, completion = PAIRS[0]
    assert rows["ex0"]["text"] == f"{prompt} {completion}"
    assert rows["ex0"]["loss_spans"] == [len(prompt), len(rows["ex0"]["text"])]
    assert json.loads(rows["ex0"]["metadata"]) == {"source_kind": "qa"}
    run("ingest", "gradients", completion_db, "--correction", "none", "--dim", "1024", "--batch-size", "2",
        "--device", "cpu")
    stored = connect(completion_db).table("grads_train_uncorrected")
    got = dict(zip(stored.column("id").to_pylist(), torch.tensor(stored.column("vector").to_pylist())))
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(model), local_files_only=True)
    reference = AutoModelForCausalLM.from_pretrained(str(model), local_files_only=True).float().eval()
    want = brute_force(reference, tokenizer, PAIRS, FeaturizerConfig(dim=1024, correction="none"))
    got = torch.stack([got[f"ex{i}"] for i in range(len(PAIRS))])
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4 * float(want.abs().max()))
    assert connect(completion_db).manifest["featurizer"]["task"]["examples"] == "completion"


def test_a_table_never_mixes_losses(completion_db, tmp_path):
    before = snapshot(completion_db)
    plain = write_jsonl(tmp_path / "plain.jsonl", [{"id": "p1", "text": "the river runs north"}])
    line = error_line(run("ingest", "corpus", completion_db, plain, ok=False))
    assert "prompt/completion" in line and "plain-text" in line and "new database" in line
    assert snapshot(completion_db) == before
    chat = write_jsonl(tmp_path / "chat.jsonl", [{"messages": [{"role": "user", "content": "hello"},
                                                               {"role": "assistant", "content": "fine thanks"}]}])
    line = error_line(run("ingest", "corpus", completion_db, chat, "--messages-field", "messages", ok=False))
    assert "chat" in line and "prompt/completion" in line
    assert snapshot(completion_db) == before


@pytest.mark.parametrize("record, message", [
    ({"id": "b1", "prompt": "the river runs"}, "missing field 'completion'"),
    ({"id": "b1", "completion": "north"}, "missing field 'prompt'"),
    ({"id": "b1", "prompt": "the river runs", "completion": "  "}, "field 'completion' is empty"),
    ({"id": "b1", "prompt": "the river runs", "completion": 7}, "field 'completion' must be a string"),
])
@pytest.mark.parametrize("kind", ["jsonl", "parquet"])
def test_bad_completion_records_stop_with_one_line_and_lose_nothing(completion_db, tmp_path, record, message, kind):
    before = snapshot(completion_db)
    good = {"id": "g1", "prompt": "tell me about", "completion": "rivers"}
    if kind == "jsonl":
        path = write_jsonl(tmp_path / "bad.jsonl", [good, record])
    else:
        if "must be a string" in message:
            pytest.skip("a Parquet column has one type")
        path = tmp_path / "bad.parquet"  # an absent field is a null cell
        pq.write_table(pa.Table.from_pylist([{k: r.get(k) for k in ("id", "prompt", "completion")}
                                             for r in (good, record)]), path)
    args = ("ingest", "corpus", completion_db, path, "--prompt-field", "prompt", "--completion-field", "completion")
    line = error_line(run(*args, ok=False))
    assert f"{path}:2: {message}" in line
    assert snapshot(completion_db) == before
    out = run(*args, "--skip-bad").output  # the good record goes in, the bad one to DB/rejects.jsonl
    assert "added 1 examples" in out and "1 rejected" in out
    rejects = [json.loads(x) for x in (completion_db / "rejects.jsonl").read_text().splitlines()]
    assert rejects[-1]["line"] == 2 and message in rejects[-1]["reason"]


def test_options_that_do_not_go_together(tmp_path, model):
    db = tmp_path / "db"
    run("init", db, "--model", model)
    path = write_jsonl(tmp_path / "x.jsonl", [{"prompt": "a", "completion": "b"}])
    assert "go together" in error_line(run("ingest", "corpus", db, path, "--prompt-field", "prompt", ok=False))
    line = error_line(run("ingest", "corpus", db, path, "--prompt-field", "prompt", "--completion-field", "completion",
                          "--messages-field", "messages", ok=False))
    assert "excludes" in line


def test_databases_without_the_task_field_keep_working(tmp_path, model):
    """A database as an older trackstar-db left it: no task in the manifest, no loss_spans column."""
    db_path = tmp_path / "db"
    run("init", db_path, "--model", model)
    old_schema = pa.schema([f for f in _schema.arrow_schema("examples") if f.name != "loss_spans"])
    lancedb.connect(str(db_path / "tables")).create_table("examples", schema=old_schema, mode="overwrite")
    texts = write_jsonl(tmp_path / "texts.jsonl", [{"id": f"t{i}", "text": f"{p} {c}"} for i, (p, c) in enumerate(PAIRS)])
    run("ingest", "corpus", db_path, texts)
    manifest = _manifest.read(db_path)
    manifest.pop(MANIFEST_KEY)
    _manifest.write(db_path, manifest)
    db = connect(db_path)
    assert MANIFEST_KEY not in db.manifest and task_of(db.manifest) == DEFAULT
    assert "loss_spans" not in db.dataset("examples").schema.names
    run("ingest", "gradients", db_path, "--correction", "none", "--dim", "1024", "--limit", "3", "--device", "cpu")
    run("ingest", "gradients", db_path, "--device", "cpu")  # the rest, checked against the stored settings
    db = connect(db_path)
    assert db.count("grads_train_uncorrected") == len(PAIRS) and "task" not in db.manifest["featurizer"]
    more = write_jsonl(tmp_path / "more.jsonl", [{"id": "t9", "text": "hello how are you"}])
    run("ingest", "corpus", db_path, more)
    assert connect(db_path).count("examples") == len(PAIRS) + 1


def test_an_older_empty_examples_table_gains_the_loss_spans_column(tmp_path, model):
    db_path = tmp_path / "db"
    run("init", db_path, "--model", model)
    old_schema = pa.schema([f for f in _schema.arrow_schema("examples") if f.name != "loss_spans"])
    lancedb.connect(str(db_path / "tables")).create_table("examples", schema=old_schema, mode="overwrite")
    path = write_jsonl(tmp_path / "pairs.jsonl", [{"prompt": p, "completion": c} for p, c in PAIRS])
    run("ingest", "corpus", db_path, path, "--prompt-field", "prompt", "--completion-field", "completion")
    rows = connect(db_path).table("examples").to_pylist()
    assert len(rows) == len(PAIRS) and all(r["loss_spans"][1] == len(r["text"]) for r in rows)


def test_tracked_modules_are_part_of_the_recorded_task(completion_db):
    from dataclasses import replace

    from trackstar_db.errors import TrackstarError
    from trackstar_db.featurizer.task import record_task

    db = connect(completion_db)
    task = replace(task_of(db.manifest), modules=("transformer.h.1.*",))
    record_task(db, task)
    run("ingest", "gradients", completion_db, "--correction", "none", "--dim", "1024", "--device", "cpu")
    manifest = connect(completion_db).manifest
    assert manifest[MANIFEST_KEY] == {"examples": "completion", "queries": "target", "modules": ["transformer.h.1.*"]}
    tracked = manifest["featurizer"]["tracked"]
    assert tracked and all(name.startswith("transformer.h.1.") for name in tracked)
    assert manifest["featurizer"]["task"] == manifest[MANIFEST_KEY]
    with pytest.raises(TrackstarError, match="fixed by the first gradient run"):
        record_task(connect(completion_db), replace(task, modules=None))


def test_stored_tail_patch_steps_on_the_stored_loss_spans(completion_db, model, tmp_path):
    """load_patcher (stored runs, query --verify) carries the task and reads each example's spans."""
    import shutil

    from trackstar_db.featurizer import optimizer_state
    from trackstar_db.tailpatch.patcher import TailPatcher
    from trackstar_db.tailpatch.runs import load_patcher

    local = shutil.copytree(model, tmp_path / "model_with_state")
    from transformers import AutoModelForCausalLM, AutoTokenizer

    reference = AutoModelForCausalLM.from_pretrained(str(local), local_files_only=True).float().eval()
    g = torch.Generator().manual_seed(5)
    tensors = {f"{kind}.{n}": (torch.rand(p.shape, generator=g) * 1e-5 + 1e-8) for n, p in reference.named_parameters()
               for kind in ("exp_avg", "exp_avg_sq")}
    state = optimizer_state.OptimizerState("adamw", step=10, lr=3e-2, beta2=0.999, tensors=tensors)
    optimizer_state.save(state, local)
    db = connect(completion_db)
    db.set_model(local)
    patcher = load_patcher(db, k=1)
    row = {r["example_id"]: r for r in db.table("examples").to_pylist()}["ex2"]
    assert patcher.task == Task("completion") and patcher.spans.get("ex2") == row["loss_spans"]
    pairs = {"r": [("q", PAIRS[0][0], PAIRS[0][1], [(1, "ex2", row["text"])])]}
    tokenizer = AutoTokenizer.from_pretrained(str(local), local_files_only=True)
    want = TailPatcher(reference, tokenizer, optimizer_state.load(local / "optimizer.safetensors"),
                       task=Task("completion"), spans={"ex2": row["loss_spans"]}).run(pairs)
    assert patcher.run(pairs).column("p_after").to_pylist() == pytest.approx(want.column("p_after").to_pylist(), rel=1e-6)


@pytest.mark.slow
def test_the_ray_engine_featurizes_the_completion_loss_like_the_worker(completion_db, tmp_path):
    ray = pytest.importorskip("ray")
    import shutil

    copy = shutil.copytree(completion_db, tmp_path / "ray_db")
    args = ("--correction", "none", "--dim", "1024", "--device", "cpu", "--batch-size", "2")
    run("ingest", "gradients", completion_db, *args)
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, configure_logging=False)
    try:
        run("ingest", "gradients", copy, "--engine", "ray", *args)
    finally:
        ray.shutdown()
    tables = [connect(path).table("grads_train_uncorrected").sort_by("id") for path in (completion_db, copy)]
    assert tables[0].column("id").to_pylist() == tables[1].column("id").to_pylist() == [f"ex{i}" for i in range(len(PAIRS))]
    local, remote = (torch.tensor(t.column("vector").to_pylist()) for t in tables)
    torch.testing.assert_close(remote, local, rtol=1e-4, atol=1e-4 * float(local.abs().max()))
    assert connect(copy).manifest["featurizer"]["task"] == connect(completion_db).manifest["featurizer"]["task"]
