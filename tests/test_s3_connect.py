"""`trackstar_db.connect(uri)`, the one door, against a local moto S3 server: a database directory
uploaded as plain files (what `aws s3 sync DB s3://bucket/db` does) answers query, sql and
evaluate through connect("s3://..."), the CLI and `serve`; copied back down, or moved to another
prefix, it opens there too (its tables live beside its manifest). Skipped without boto3 and moto."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

pytest.importorskip("boto3")
pytest.importorskip("moto")

from serve_db import EVIL_PROMPT, EVIL_TARGET, build_serve_db  # noqa: E402
from test_s3 import _aws_env, s3  # noqa: E402,F401 (the moto server fixture)


@pytest.fixture(scope="module")
def local_db(tiny_db_template, tmp_path_factory) -> Path:
    return build_serve_db(tiny_db_template, tmp_path_factory.mktemp("s3-connect"))


def upload(client, directory: Path, prefix: str) -> int:
    """Put every file of `directory` under s3://bucket/prefix/, as `aws s3 sync` would."""
    files = [p for p in directory.rglob("*") if p.is_file()]
    for path in files:
        client.put_object(Bucket="bucket", Key=f"{prefix}/{path.relative_to(directory).as_posix()}",
                          Body=path.read_bytes())
    return len(files)


def download(client, prefix: str, directory: Path) -> None:
    """Every object under s3://bucket/prefix/ into `directory`, as `aws s3 sync` back would."""
    for page in client.get_paginator("list_objects_v2").paginate(Bucket="bucket", Prefix=prefix + "/"):
        for obj in page.get("Contents", []):
            path = directory / obj["Key"][len(prefix) + 1:]
            path.parent.mkdir(parents=True, exist_ok=True)
            client.download_file("bucket", obj["Key"], str(path))


def _answers(db) -> dict:
    """What the test compares: a gradient and a BM25 query, one SQL statement, the evaluation."""
    query = {m: [(r["kind"], r["example_id"], round(r["score"], 4))
                 for r in db.query(EVIL_PROMPT, EVIL_TARGET, k=3, method=m).to_pylist()] for m in ("trackstar", "bm25")}
    sql = db.sql("SELECT method, count(*) AS n FROM retrievals GROUP BY method ORDER BY method").to_pylist()
    evaluation = db.evaluate().to_pylist()
    return {"query": query, "sql": sql, "evaluation": evaluation}


@pytest.fixture()
def aws(s3, monkeypatch, tmp_path):  # noqa: F811
    options, client = s3
    _aws_env(monkeypatch, options)
    monkeypatch.setenv("TRACKSTAR_CACHE", str(tmp_path / "cache"))
    return client


def test_an_uploaded_directory_answers_through_connect(aws, local_db, tmp_path):
    import trackstar_db

    expected = _answers(trackstar_db.connect(local_db))
    assert upload(aws, local_db, "up") > 10
    with trackstar_db.connect("s3://bucket/up") as db:
        assert db.remote.uri == "s3://bucket/up" and db.tables_uri == "s3://bucket/up/tables"
        assert not any((db.path / "tables").glob("*.lance"))  # the tables are read in place
        assert _answers(db) == expected
    again = trackstar_db.connect(Path("s3://bucket/up"))  # as a click Path writes it: s3:/bucket/up
    assert again.count("examples") == trackstar_db.connect(local_db).count("examples")
    # moved to another prefix: still opens (the tables are the ones beside its manifest)
    download(aws, "up", tmp_path / "down")
    upload(aws, tmp_path / "down", "moved")
    assert _answers(trackstar_db.connect("s3://bucket/moved")) == expected
    with pytest.raises(trackstar_db.errors.TrackstarError, match="no trackstar-db database"):
        trackstar_db.connect("s3://bucket/nothing-here")
    with pytest.raises(trackstar_db.errors.TrackstarError, match="only s3://"):
        trackstar_db.connect("gs://bucket/up")


def test_a_database_made_on_s3_copies_back_and_opens_locally(aws, local_db, tiny_db_template, tmp_path):
    """`init s3://...` records its tables at s3://bucket/made/tables; copied down, the local
    copy reads its own tables (once refused: "its tables are at ..."), and the CLI reads both."""
    from click.testing import CliRunner

    import trackstar_db
    from trackstar_db.cli import main

    runner = CliRunner()
    db = "s3://bucket/made"
    for args in (["init", db, "--model", str(tiny_db_template / "model")],
                 ["ingest", "corpus", db, str(tiny_db_template / "world" / "trex_sentences.jsonl")]):
        result = runner.invoke(main, args)
        assert result.exit_code == 0, result.output
    manifest = json.loads(aws.get_object(Bucket="bucket", Key="made/manifest.json")["Body"].read())
    assert manifest["tables_uri"] == "s3://bucket/made/tables"
    download(aws, "made", tmp_path / "made")
    local = trackstar_db.connect(tmp_path / "made")
    assert local.tables_uri == str(tmp_path / "made" / "tables")
    n = local.count("examples")
    assert n > 0 and n == trackstar_db.connect(db).count("examples")
    aws.delete_object(Bucket="bucket", Key="made/tables/examples.lance/_versions/1.manifest")  # the copy is independent
    assert trackstar_db.connect(tmp_path / "made").count("examples") == n
    # the CLI opens both through the same door, and the uploaded directory too
    upload(aws, local_db, "uploaded")
    for where in (str(tmp_path / "made"), "s3://bucket/uploaded"):
        info = runner.invoke(main, ["sql", where, "SELECT count(*) AS n FROM examples", "--format", "json"])
        assert info.exit_code == 0, info.output
        assert json.loads(info.output.splitlines()[0])["n"] > 0


def test_serve_an_object_store_database(aws, local_db):
    """`serve s3://...`: the same answers as the local database, the snapshot pinned to the
    committed versions, and a commit uploaded by another writer served after it."""
    pytest.importorskip("fastapi")
    import pyarrow as pa
    from fastapi.testclient import TestClient

    import trackstar_db
    from trackstar_db.serve import app

    upload(aws, local_db, "served")
    local = TestClient(app(local_db), raise_server_exceptions=False)
    remote = TestClient(app("s3://bucket/served"), raise_server_exceptions=False)
    body = {"prompt": EVIL_PROMPT, "target": EVIL_TARGET, "methods": ["trackstar", "bm25"], "k": 3}
    mine, theirs = remote.post("/api/query", json=body), local.post("/api/query", json=body)
    assert mine.status_code == 200, mine.text
    for a, b in zip(mine.json()["results"], theirs.json()["results"]):
        for kind in ("proponents", "opponents"):
            assert [(h["example_id"], h["text"]) for h in a[kind]] == [(h["example_id"], h["text"]) for h in b[kind]]
    version = remote.get("/api/version").json()
    assert version["database"] == "s3://bucket/served" and not version["pending"]
    sql = {"sql": "SELECT count(*) AS n FROM examples"}
    before = remote.post("/api/sql", json=sql).json()["rows"][0][0]
    # another node commits a new example through its own cache: served once its upload is whole
    with trackstar_db.connect("s3://bucket/served") as writer:
        with writer.writer("test"):
            writer.append("examples", pa.table({"example_id": ["late-1"], "text": ["late"], "source": ["late"],
                                                "content_hash": ["2" * 64]}))
    service = remote.app.state.service
    service.tracker._checked = 0.0  # the next request looks now (REMOTE_INTERVAL otherwise)
    assert remote.post("/api/sql", json=sql).json()["rows"][0][0] == before + 1
    after = remote.get("/api/version").json()
    assert after["version"] != version["version"] and after["renewals"] == 1
    assert remote.get("/api/examples/late-1").status_code == 200


def test_cli_serves_an_object_store_database_as_typed(aws, local_db, monkeypatch):
    """`trackstar-db serve s3://bucket/db --no-warm` (uvicorn.run stubbed: the app it would serve)."""
    pytest.importorskip("fastapi")
    import uvicorn
    from click.testing import CliRunner
    from fastapi.testclient import TestClient

    from trackstar_db.cli import main

    upload(aws, local_db, "typed")
    seen = {}
    monkeypatch.setattr(uvicorn, "run", lambda asgi, host, port, log_level: seen.update(asgi=asgi))
    result = CliRunner().invoke(main, ["serve", "s3://bucket/typed", "--no-warm", "--max-batch", "4"])
    assert result.exit_code == 0, result.output
    assert "serving s3://bucket/typed" in result.stderr
    client = TestClient(seen["asgi"], base_url="http://127.0.0.1:8000")
    assert client.get("/api/version").json()["database"] == "s3://bucket/typed"
    hits = client.post("/api/query", json={"prompt": EVIL_PROMPT, "target": EVIL_TARGET, "methods": ["bm25"],
                                           "k": 1}).json()["results"][0]["proponents"]
    assert hits[0]["text"] and client.get("/api/health").json()["max_batch"] == 4
