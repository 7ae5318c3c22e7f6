"""Gradient tables on object storage: an S3 API served by moto on 127.0.0.1, started here.

What the Ray engine needs from a table at s3://: fragment ranges read back in scan order (the
scans of retrieve and fit), fragments written by workers and appended by a committing process,
and two processes appending at once without losing a commit. The database directory itself
(manifest, BM25, R) is not on object storage yet: docs/distributed.md says what remains.
Skipped without the `s3` extra (moto[server], boto3).
"""

import json
import socket
import subprocess
import sys
import time

import numpy as np
import pyarrow as pa
import pytest

pytestmark = pytest.mark.slow  # minutes: run by CI after the fast suite (pytest -m slow)
import torch

pytest.importorskip("boto3")
pytest.importorskip("moto")

DIM = 16


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def s3():
    """(storage_options, boto3 client) of a fresh moto S3 server holding the bucket 'bucket'."""
    import boto3

    port = _free_port()
    server = subprocess.Popen([sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.time() + 60
        while True:
            try:
                socket.create_connection(("127.0.0.1", port), 0.2).close()
                break
            except OSError:
                if time.time() > deadline or server.poll() is not None:
                    pytest.fail("moto server did not start")
                time.sleep(0.2)
        endpoint = f"http://127.0.0.1:{port}"
        client = boto3.client("s3", endpoint_url=endpoint, region_name="us-east-1",
                              aws_access_key_id="test", aws_secret_access_key="test")
        client.create_bucket(Bucket="bucket")
        options = {"aws_endpoint": endpoint, "aws_region": "us-east-1", "allow_http": "true",
                   "aws_access_key_id": "test", "aws_secret_access_key": "test"}
        yield options, client
    finally:
        server.terminate()
        server.wait()


def _aws_env(monkeypatch, options):
    for key, value in {"AWS_ENDPOINT": options["aws_endpoint"], "AWS_ALLOW_HTTP": "true", "AWS_REGION": "us-east-1",
                       "AWS_ACCESS_KEY_ID": "test", "AWS_SECRET_ACCESS_KEY": "test"}.items():
        monkeypatch.setenv(key, value)


def _rows(start: int, n: int) -> pa.Table:
    from trackstar_db.store import schema as _schema
    from trackstar_db.store import vectors

    x = torch.randn(n, DIM, generator=torch.Generator().manual_seed(start))
    table = pa.table({"id": [f"ex-{i:05d}" for i in range(start, start + n)], "vector": vectors.to_arrow(x, "float16"),
                      "norm": pa.array(x.norm(dim=1).numpy()), "loss": pa.array(np.ones(n, np.float32)),
                      "n_tokens": pa.array(np.full(n, 7, np.int32))})
    return _schema.conform(table, _schema.gradient_schema(DIM, "float16"))


def _append_fragments(uri: str, rows: pa.Table, options: dict):
    """What a Ray ingest worker and its driver do: write fragments, then one Append commit."""
    import lance
    from lance.fragment import write_fragments

    dataset = lance.dataset(uri, storage_options=options)
    fragments = write_fragments(rows, uri, schema=dataset.schema, storage_options=options)
    lance.LanceDataset.commit(uri, lance.LanceOperation.Append(fragments), read_version=dataset.version,
                              storage_options=options)


def test_ranges_of_an_s3_table_scan_like_one_process(s3):
    import lance

    from trackstar_db.distributed.ranges import fragment_ranges
    from trackstar_db.distributed.scan import merge_topk, scan_range
    from trackstar_db.store import schema as _schema

    options, _ = s3
    uri = "s3://bucket/db/tables/grads_train_corrected.lance"
    lance.write_dataset(_rows(0, 0).cast(_schema.gradient_schema(DIM, "float16")), uri, storage_options=options)
    for start, n in ((0, 40), (40, 7), (47, 25), (72, 31)):
        _append_fragments(uri, _rows(start, n), options)
    dataset = lance.dataset(uri, storage_options=options)
    assert dataset.count_rows() == 103 and len(dataset.get_fragments()) == 4
    table = {"name": "grads_train_corrected", "dtype": "float16", "dim": DIM}
    q = torch.randn(3, DIM, generator=torch.Generator().manual_seed(9))
    whole = scan_range(fragment_ranges(dataset, 1, options)[0], table, "grad-cos", q, None, 5, 16)
    for parts in (2, 3):
        ranges = fragment_ranges(dataset, parts, options)
        merged = merge_topk([scan_range(r, table, "grad-cos", q, None, 5, 16) for r in ranges], 5)
        assert merged.proponent_ids == whole.proponent_ids and merged.opponent_ids == whole.opponent_ids
    # the reference: the same rows from memory, one scan
    from trackstar_db.retrieval.topk import search
    from trackstar_db.store.vectors import to_torch

    rows = dataset.to_table()
    x = to_torch(rows.column("vector"), "float16")
    direct = search(q, [(rows.column("id").to_pylist(), x / x.norm(dim=1, keepdim=True))], 5)
    assert direct.proponent_ids == whole.proponent_ids


_WRITER = """
import sys
sys.path.insert(0, {tests!r})
from test_s3 import _append_fragments, _rows
import json
options = json.loads(sys.argv[1])
for i in range(int(sys.argv[3])):
    _append_fragments(sys.argv[2], _rows(int(sys.argv[4]) + 10 * i, 10), options)
"""


def test_two_processes_appending_to_one_s3_table_lose_nothing(s3, tmp_path):
    import json

    import lance

    from trackstar_db.store import schema as _schema

    options, _ = s3
    uri = "s3://bucket/db/tables/grads_concurrent.lance"
    lance.write_dataset(_rows(0, 0).cast(_schema.gradient_schema(DIM, "float16")), uri, storage_options=options)
    script = tmp_path / "writer.py"
    script.write_text(_WRITER.format(tests=str(__import__("pathlib").Path(__file__).parent)))
    writers = [subprocess.Popen([sys.executable, str(script), json.dumps(options), uri, "5", str(base)])
               for base in (0, 1000)]
    assert [w.wait(timeout=300) for w in writers] == [0, 0]
    ids = lance.dataset(uri, storage_options=options).to_table(columns=["id"]).column("id").to_pylist()
    assert len(ids) == len(set(ids)) == 100  # 2 processes x 5 commits x 10 rows, none lost


def test_a_database_at_s3_gives_the_same_evaluation_as_a_local_one(s3, tiny_db_template, tmp_path,
                                                                                monkeypatch):
    """init s3://bucket/tiny, ingest corpus/facts/gradients, fit, retrieve, eval, as typed; a
    second cache (another node) then reads the same evaluation back."""
    import json

    from click.testing import CliRunner

    from trackstar_db import connect
    from trackstar_db.cli import main
    from trackstar_db.testbed.world import generate_world

    options, client = s3
    _aws_env(monkeypatch, options)
    world = generate_world(tmp_path / "world", seed=0, size="tiny")
    model = str(tiny_db_template / "model")
    runner = CliRunner()
    outputs = {}
    monkeypatch.setenv("TRACKSTAR_CACHE", str(tmp_path / "cache"))
    for name, db in (("local", str(tmp_path / "local")), ("s3", "s3://bucket/tiny")):
        for args in (["init", db, "--model", model],
                     ["ingest", "corpus", db, str(world.sentences_path)],
                     ["ingest", "facts", db, str(world.facts_path)],
                     ["ingest", "gradients", db, "--split", "train", "--dim", "1024", "--correction", "adam-factored"],
                     ["ingest", "gradients", db, "--split", "queries"],
                     ["fit", db],
                     ["retrieve", db, "--method", "trackstar", "--k", "10"],
                     ["retrieve", db, "--method", "bm25", "--k", "10"],
                     ["eval", db, "--format", "json"]):
            result = runner.invoke(main, args)
            assert result.exit_code == 0, f"{name}: {' '.join(args)}: {result.output}"
        outputs[name] = [json.loads(line) for line in result.output.splitlines() if line.strip()]
    keys = [o["Key"] for o in client.list_objects_v2(Bucket="bucket", Prefix="tiny/tables/")["Contents"]]
    assert any(k.startswith("tiny/tables/grads_train_corrected.lance/data/") for k in keys)
    cache = tmp_path / "cache" / "bucket" / "tiny"
    assert not any((cache / "tables").iterdir())  # nothing of the tables stayed local
    assert connect(cache).count("grads_train_corrected") == connect(tmp_path / "local").count("examples")
    monkeypatch.setenv("TRACKSTAR_CACHE", str(tmp_path / "other-node"))
    again = runner.invoke(main, ["eval", "s3://bucket/tiny", "--format", "json"])
    assert again.exit_code == 0 and again.output == result.output
    local, remote = outputs["local"], outputs["s3"]
    assert len(local) == len(remote) > 0
    for a, b in zip(local, remote):
        assert a.keys() == b.keys()
        for key in a:
            if isinstance(a[key], float):
                assert a[key] == pytest.approx(b[key], rel=1e-4, abs=1e-6), key
            else:
                assert a[key] == b[key], key


def test_a_database_at_an_s3_uri_is_shared_through_caches_and_its_manifest_swap(s3, tiny_db_template, tmp_path,
                                                                                monkeypatch):
    """open_database('s3://bucket/home'): one cache builds it (tables, BM25, manifest), a second,
    empty cache reads it whole; of two writers that read the same manifest, the second loses."""
    from trackstar_db.distributed.objectstore import open_database, pull, push
    from trackstar_db.errors import TrackstarError
    from trackstar_db.sources.corpus import ingest_corpus
    from trackstar_db.store.bm25 import BM25Index
    from trackstar_db.testbed.world import generate_world

    options, client = s3
    _aws_env(monkeypatch, options)
    uri = "s3://bucket/home"
    world = generate_world(tmp_path / "world", seed=0, size="tiny")
    monkeypatch.setenv("TRACKSTAR_CACHE", str(tmp_path / "cache-a"))
    with open_database(uri, create=True, model_dir=tiny_db_template / "model") as db:
        ingest_corpus(db, [world.sentences_path], progress=False)
        texts = db.table("examples", columns=["example_id", "text"]).slice(0, 3).to_pylist()
        hits = BM25Index(db.path).search_many([t["text"] for t in texts], 3)
    keys = {o["Key"] for o in client.list_objects_v2(Bucket="bucket", Prefix="home/")["Contents"]}
    assert "home/manifest.json" in keys and any(k.startswith("home/bm25/") for k in keys)
    monkeypatch.setenv("TRACKSTAR_CACHE", str(tmp_path / "cache-b"))  # another node: nothing cached
    with open_database(uri) as db:
        assert db.path.is_relative_to(tmp_path / "cache-b")
        assert db.count("examples") > 0 and db.manifest["model"] is not None
        assert BM25Index(db.path, must_exist=True).search_many([t["text"] for t in texts], 3) == hits
    assert [h[0][0] for h in hits] == [t["example_id"] for t in texts]  # each text finds itself first
    # two writers read the same manifest; the first upload wins, the second is refused, not merged
    caches = []
    for name in ("cache-c", "cache-d"):
        monkeypatch.setenv("TRACKSTAR_CACHE", str(tmp_path / name))
        caches.append(pull(uri))
    for (cache, before), value in zip(caches, ("c", "d")):
        manifest = json.loads((cache / "manifest.json").read_text())
        (cache / "manifest.json").write_text(json.dumps(dict(manifest, note=value)))
    push(uri, *caches[0])
    with pytest.raises(TrackstarError, match="changed the database's manifest"):
        push(uri, *caches[1])
    stored = json.loads(client.get_object(Bucket="bucket", Key="home/manifest.json")["Body"].read())
    assert stored["note"] == "c"


def test_two_processes_ingest_shards_into_one_s3_database(s3, tiny_db_template, tmp_path, monkeypatch):
    """`ingest gradients s3://... --shard I/2` from two processes at once, each with its own cache
    (two nodes): every example once in each table, the settings fixed by a first --limit 1 run."""
    import os

    from click.testing import CliRunner

    from trackstar_db.cli import main
    from trackstar_db.distributed.objectstore import open_database
    from trackstar_db.testbed.world import generate_world

    options, _ = s3
    _aws_env(monkeypatch, options)
    monkeypatch.setenv("TRACKSTAR_CACHE", str(tmp_path / "cache-0"))
    world = generate_world(tmp_path / "world", seed=0, size="tiny")
    db = "s3://bucket/shards"
    runner = CliRunner()
    for args in (["init", db, "--model", str(tiny_db_template / "model")],
                 ["ingest", "corpus", db, str(world.sentences_path)],
                 ["ingest", "gradients", db, "--dim", "1024", "--correction", "adam-factored", "--limit", "1"]):
        result = runner.invoke(main, args)
        assert result.exit_code == 0, f"{' '.join(args)}: {result.output}"
    shards = [subprocess.Popen([sys.executable, "-m", "trackstar_db.cli", "ingest", "gradients", db, "--device", "cpu",
                                "--shard", f"{i}/2", "--commit-rows", "32"],
                               env=dict(os.environ, TRACKSTAR_CACHE=str(tmp_path / f"cache-{i + 1}")),
                               stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True) for i in range(2)]
    outputs = [shard.communicate(timeout=900)[0] for shard in shards]
    assert [shard.returncode for shard in shards] == [0, 0], outputs
    with open_database(db) as handle:
        n = handle.count("examples")
        for name in ("grads_train_corrected", "grads_train_uncorrected"):
            ids = handle.table(name, columns=["id"]).column("id").to_pylist()
            assert len(ids) == len(set(ids)) == n, name
