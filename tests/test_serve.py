"""`trackstar-db serve` and trackstar_db.serve.app: every endpoint against the library's own
answers, bad input as one-line 4xx (never a 500), the token, concurrent clients over real HTTP,
snapshot reads while another process writes, embedding in a user's app, and the CLI as typed."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path

import pytest

pytest.importorskip("fastapi")
pytest.importorskip("httpx")

from fastapi.testclient import TestClient  # noqa: E402
from serve_db import EVIL_ID, EVIL_PROMPT, EVIL_TARGET, EVIL_TEXT, build_serve_db, live_server  # noqa: E402

from trackstar_db.serve import app  # noqa: E402

ENDPOINTS = [("GET", "/"), ("GET", "/static/app.js"), ("GET", "/static/app.css"), ("GET", "/static/explorer.css"),
             ("GET", "/api/health"), ("GET", "/api/version"), ("GET", "/api/methods"), ("GET", "/api/runs"),
             ("GET", "/api/evaluation"), ("GET", f"/api/examples/{EVIL_ID}"), ("GET", "/api/queries"),
             ("GET", "/openapi.json"), ("POST", "/api/query"), ("POST", "/api/tokens"), ("POST", "/api/sql")]


@pytest.fixture(scope="module")
def serve_db(tiny_db_template, tmp_path_factory) -> Path:
    return build_serve_db(tiny_db_template, tmp_path_factory.mktemp("serve"))


@pytest.fixture(scope="module")
def client(serve_db):
    return TestClient(app(serve_db), raise_server_exceptions=False)


@pytest.fixture(scope="module")
def stored(serve_db) -> dict:
    """A stored prompt0 query whose fact has ground truth."""
    from trackstar_db import connect

    return connect(serve_db).sql(
        "SELECT q.query_id, q.prompt, q.target, q.fact_id FROM queries q JOIN ground_truth g USING (fact_id) "
        "WHERE q.template = 'prompt0' ORDER BY q.query_id LIMIT 1").to_pylist()[0]


def _one_line_error(response, status: int) -> str:
    assert response.status_code == status, (response.status_code, response.text)
    message = response.json()["error"]
    assert message and "\n" not in message and "Traceback" not in message
    return message


# -- every endpoint against the library ------------------------------------------------------

def test_query_matches_database_query_and_shades_tokens(client, serve_db):
    from trackstar_db import connect

    db = connect(serve_db)
    response = client.post("/api/query", json={"prompt": EVIL_PROMPT, "target": EVIL_TARGET,
                                               "methods": ["bm25", "grad-cos"], "k": 4, "tokens": 2})
    assert response.status_code == 200, response.text
    answer = response.json()
    assert [r["method"] for r in answer["results"]] == ["bm25", "grad-cos"] and answer["stored_query"] is None
    for result in answer["results"]:
        reference = db.query(EVIL_PROMPT, EVIL_TARGET, k=4, method=result["method"]).to_pylist()
        for kind in ("proponent", "opponent"):
            mine = [(h["example_id"], h["rank"]) for h in result[kind + "s"]]
            assert mine == [(r["example_id"], r["rank"]) for r in reference if r["kind"] == kind]
            scores = [h["score"] for h in result[kind + "s"]]
            assert scores == pytest.approx([r["score"] for r in reference if r["kind"] == kind], rel=1e-5)
        evidence = {(r["kind"], r["rank"]): r for r in reference}
        for kind in ("proponent", "opponent"):
            for hit in result[kind + "s"]:
                assert "".join(p["text"] for p in hit["pieces"]) == hit["text"]  # the pieces are the text, cut
                stored = evidence[(kind, hit["rank"])]
                assert (hit["label"], hit["shared_span"], hit["states_it"]) == (
                    stored["label"], stored["shared_span"], stored["states_it"])
    bm25, grad = answer["results"]
    assert bm25["proponents"][0]["example_id"] == EVIL_ID and bm25["proponents"][0]["text"] == EVIL_TEXT
    assert {p["text"] for p in bm25["proponents"][0]["pieces"] if p.get("mark")} == {"Zanzibar", "marker", "pwned"}
    assert bm25["opponents"] == [] and grad["opponents"]
    shaded = [h for h in grad["proponents"] if h["token_total"] is not None]
    assert len(shaded) == 2 and all(h["token_total"] is None for h in grad["proponents"][2:])
    for hit in shaded:  # each token's part: the parts (special tokens included) sum to the score
        assert hit["token_total"] == pytest.approx(hit["score"], rel=2e-3, abs=1e-4)
        values = sum(p["value"] for p in hit["pieces"] if "shade" in p)
        assert values + hit["token_special"] == pytest.approx(hit["token_total"], rel=1e-6, abs=1e-9)


def test_query_of_a_stored_query_marks_its_facts(client, serve_db, stored):
    from trackstar_db import connect

    db = connect(serve_db)
    answer = client.post("/api/query", json={"prompt": stored["prompt"], "target": stored["target"],
                                             "methods": ["bm25"], "k": 5}).json()
    assert answer["stored_query"]["query_id"] == stored["query_id"]
    assert answer["stored_query"]["fact_id"] == stored["fact_id"]
    truth = set(db.sql(f"SELECT example_id FROM ground_truth WHERE fact_id = '{stored['fact_id']}'")
                .column("example_id").to_pylist())
    hits = answer["results"][0]["proponents"]
    assert [h["correct"] for h in hits] == [h["example_id"] in truth for h in hits] and any(h["correct"] for h in hits)


def test_verify_measures_each_proponent(client):
    answer = client.post("/api/query", json={"prompt": EVIL_PROMPT, "target": EVIL_TARGET, "methods": ["trackstar"],
                                             "k": 2, "verify": True})
    assert answer.status_code == 200, answer.text
    result = answer.json()["results"][0]
    for hit in result["proponents"]:
        assert isinstance(hit["delta_p"], float) and hit["label"] in ("both", "states it", "moves the model", "neither")
        assert hit["label_class"] or hit["label"] == "neither"
    assert all(hit["delta_p"] is None for hit in result["opponents"])


def test_best_method_when_none_named(client):
    answer = client.post("/api/query", json={"prompt": EVIL_PROMPT, "target": EVIL_TARGET, "k": 2}).json()
    assert [r["method"] for r in answer["results"]] == ["trackstar"]


def test_tokens_endpoint_sums_to_the_score(client, serve_db):
    from trackstar_db import connect

    hit = connect(serve_db).query(EVIL_PROMPT, EVIL_TARGET, k=1, method="trackstar").to_pylist()[0]
    response = client.post("/api/tokens", json={"prompt": EVIL_PROMPT, "target": EVIL_TARGET,
                                                "example_id": hit["example_id"], "method": "trackstar"})
    assert response.status_code == 200, response.text
    table = response.json()
    column = [c["name"] for c in table["columns"]].index("contribution")
    assert sum(row[column] for row in table["rows"]) == pytest.approx(hit["score"], rel=2e-3, abs=1e-4)


def test_sql_runs_reads_and_refuses_writes(client, serve_db):
    from trackstar_db import connect

    db = connect(serve_db)
    statement = "SELECT method, count(*) AS n FROM retrievals GROUP BY method ORDER BY method"
    answer = client.post("/api/sql", json={"sql": statement}).json()
    assert answer["rows"] == [list(r.values()) for r in db.sql(statement).to_pylist()]
    assert [c["name"] for c in answer["columns"]] == ["method", "n"] and not answer["truncated"]
    cut = client.post("/api/sql", json={"sql": "SELECT example_id FROM examples", "limit": 7}).json()
    assert len(cut["rows"]) == 7 and cut["num_rows"] == 7 and cut["truncated"]
    odd = client.post("/api/sql", json={"sql": "SELECT 1.0 / 0 AS inf, 'nan'::DOUBLE AS nan, now() AS t"}).json()
    assert odd["rows"][0][:2] == [None, None] and isinstance(odd["rows"][0][2], str)
    before = db.count("examples")
    for write in ("DELETE FROM examples", "DROP TABLE examples", "CREATE TABLE x AS SELECT 1",
                  "SELECT 1; DELETE FROM examples", "COPY examples TO '/tmp/x.csv'"):
        assert "read-only" in _one_line_error(client.post("/api/sql", json={"sql": write}), 400)
    assert connect(serve_db).count("examples") == before


def test_reads_runs_evaluation_example_queries(client, serve_db):
    from trackstar_db import connect

    db = connect(serve_db)
    runs = client.get("/api/runs").json()
    run_ids = [c["name"] for c in runs["columns"]].index("run_id")
    assert sorted(r[run_ids] for r in runs["rows"]) == ["bm25", "grad-cos"]
    for by in ("method", "bucket"):
        table = client.get(f"/api/evaluation?by={by}").json()
        reference = db.evaluate(by)
        assert [c["name"] for c in table["columns"]] == reference.column_names
        assert len(table["rows"]) == reference.num_rows > 0
        mrr = [c["name"] for c in table["columns"]].index("mrr")
        assert [r[mrr] for r in table["rows"]] == pytest.approx(reference.column("mrr").to_pylist())
    example = client.get(f"/api/examples/{EVIL_ID}").json()
    assert example["text"] == EVIL_TEXT and example["source"] == "evil.jsonl" and "content_hash" in example
    queries = client.get("/api/queries?limit=3").json()
    assert [r[0] for r in queries["rows"]] == sorted(db.table("queries").column("query_id").to_pylist())[:3]


def test_health_version_methods_openapi_assets(client, serve_db):
    from trackstar_db import __version__
    from trackstar_db.report.page import STYLESHEET

    health = client.get("/api/health").json()
    assert health["status"] == "ok" and health["queued"] == 0 and health["examples"] > 300
    version = client.get("/api/version").json()
    assert version["trackstar_db"] == __version__ and version["follow"] and not version["pending"]
    assert version["database"] == str(serve_db) and version["tables"]["examples"] >= 1
    methods = {m["name"]: m for m in client.get("/api/methods").json()["methods"]}
    assert all(methods[m]["available"] for m in ("grad-dot", "grad-cos", "trak", "opt-cos", "r-train", "trackstar", "bm25"))
    spec = client.get("/openapi.json").json()
    assert {"/api/query", "/api/tokens", "/api/sql", "/api/runs", "/api/evaluation", "/api/health",
            "/api/version", "/api/methods", "/api/examples/{example_id}", "/api/queries"} <= set(spec["paths"])
    page = client.get("/")
    assert page.status_code == 200 and "static/app.js" in page.text and "default-src 'self'" in page.headers[
        "content-security-policy"]
    assert "http://" not in page.text and "https://" not in page.text  # nothing from the network
    script = client.get("/static/app.js").text
    for sink in (".innerHTML", ".outerHTML", "insertAdjacentHTML", "document.write", "eval(", "http://", "https://"):
        assert sink not in script, sink  # the DOM is built with textContent; nothing from the network
    assert client.get("/static/explorer.css").text == STYLESHEET
    assert client.get("/docs").status_code == 404  # swagger would load from a CDN


# -- bad input: 4xx with one line ------------------------------------------------------------

BAD = [
    ("unknown method", "/api/query", {"prompt": "a", "target": "b", "methods": ["nope"]}, 400, "unknown method"),
    ("negative k", "/api/query", {"prompt": "a", "target": "b", "k": -3}, 422, "k"),
    ("k too large", "/api/query", {"prompt": "a", "target": "b", "k": 10 ** 9}, 422, "k"),
    ("k not a number", "/api/query", {"prompt": "a", "target": "b", "k": "ten"}, 422, "k"),
    ("huge prompt", "/api/query", {"prompt": "x" * 50_000, "target": "b"}, 422, "prompt"),
    ("empty target", "/api/query", {"prompt": "a", "target": ""}, 422, "target"),
    ("blank prompt", "/api/query", {"prompt": "   ", "target": "b"}, 400, "prompt"),
    ("missing target", "/api/query", {"prompt": "a"}, 422, "target"),
    ("unknown field", "/api/query", {"prompt": "a", "target": "b", "kk": 3}, 422, "kk"),
    ("ann options alone", "/api/query", {"prompt": "a", "target": "b", "nprobes": 4}, 400, "ann"),
    ("ann without an index", "/api/query", {"prompt": "a", "target": "b", "methods": ["trackstar"], "ann": True},
     400, "trackstar"),
    ("ann on bm25", "/api/query", {"prompt": "a", "target": "b", "methods": ["bm25"], "ann": True}, 400, "ann"),
    ("tokens of bm25", "/api/tokens", {"prompt": "a", "target": "b", "example_id": EVIL_ID, "method": "bm25"},
     400, "gradient method"),
    ("tokens of a missing example", "/api/tokens", {"prompt": "a", "target": "b", "example_id": "nope"}, 404, "nope"),
    ("sql write", "/api/sql", {"sql": "INSERT INTO runs VALUES (1)"}, 400, "read-only"),
    ("sql syntax", "/api/sql", {"sql": "SELEC 1"}, 400, "syntax"),
    ("sql unknown table", "/api/sql", {"sql": "SELECT * FROM nowhere"}, 400, "unknown table"),
    ("sql file read", "/api/sql", {"sql": "SELECT * FROM read_csv('/etc/passwd')"}, 400, ""),
    ("sql limit 0", "/api/sql", {"sql": "SELECT 1", "limit": 0}, 422, "limit"),
]


@pytest.mark.parametrize("name,path,body,status,words", BAD, ids=[b[0] for b in BAD])
def test_bad_input_is_a_one_line_4xx(client, name, path, body, status, words):
    message = _one_line_error(client.post(path, json=body), status)
    assert words.lower() in message.lower(), message


def test_bad_requests_beyond_the_body(client):
    assert "no example 'nope'" in _one_line_error(client.get("/api/examples/nope"), 404)
    assert "not found" in _one_line_error(client.get("/api/nothing"), 404)
    _one_line_error(client.post("/api/query", content=b"{not json", headers={"content-type": "application/json"}), 422)
    _one_line_error(client.post("/api/query", content=b"[]", headers={"content-type": "application/json"}), 422)
    assert "bytes" in _one_line_error(client.post("/api/sql", content=b"x" * (2 << 20),
                                                  headers={"content-type": "application/json"}), 413)
    _one_line_error(client.get("/api/evaluation?by=nonsense"), 400)
    _one_line_error(client.get("/api/queries?limit=-1"), 422)
    assert client.get("/api/query").status_code == 405


# -- the token --------------------------------------------------------------------------------

def test_token_guards_every_endpoint(serve_db):
    guarded = TestClient(app(serve_db, token="s3cret"), raise_server_exceptions=False)
    for method, path in ENDPOINTS:
        assert "token" in _one_line_error(guarded.request(method, path, json={}), 401), path
        assert guarded.request(method, path, json={}, headers={"Authorization": "Bearer wrong"}).status_code == 401
    assert guarded.get("/api/health", headers={"Authorization": "Bearer s3cret"}).status_code == 200
    assert guarded.get("/api/health", headers={"X-Trackstar-Token": "s3cret"}).status_code == 200
    page = guarded.get("/?token=s3cret")  # a browser opens the link once; the cookie carries it on
    assert page.status_code == 200 and "httponly" in page.headers["set-cookie"].lower()
    assert guarded.get("/static/app.js").status_code == 200 and guarded.get("/api/version").status_code == 200


def test_loopback_bind_refuses_other_hosts(serve_db):
    from trackstar_db.cli.serve import check_bind

    local = TestClient(app(serve_db, allowed_hosts=check_bind("127.0.0.1", False)), base_url="http://127.0.0.1:8000")
    assert local.get("/api/health").status_code == 200
    assert local.get("/api/health", headers={"host": "evil.example:8000"}).status_code == 400  # DNS rebinding
    assert check_bind("0.0.0.0", True) is None
    with pytest.raises(Exception, match="--public"):
        check_bind("0.0.0.0", False)


# -- many clients, one model -----------------------------------------------------------------

def test_eight_clients_at_once_over_http(serve_db):
    import httpx

    asgi = app(serve_db)
    service = asgi.state.service
    threads_seen, inside, overlap = set(), [0], []
    original = service.query

    def watched(*args, **kwargs):  # records which thread runs the model and whether two ever overlap
        threads_seen.add(threading.current_thread().name)
        inside[0] += 1
        overlap.append(inside[0])
        try:
            return original(*args, **kwargs)
        finally:
            inside[0] -= 1

    service.query = watched
    body = {"prompt": EVIL_PROMPT, "target": EVIL_TARGET, "methods": ["grad-cos", "bm25"], "k": 3}
    with live_server(asgi) as url:
        reference = httpx.post(f"{url}/api/query", json=body, timeout=120).json()["results"]
        answers, errors = [], []

        def client(n):
            try:
                with httpx.Client(base_url=url, timeout=120) as http:
                    for i in range(3):
                        if i == 1:
                            assert http.post("/api/sql", json={"sql": "SELECT count(*) FROM examples"}).status_code == 200
                        response = http.post("/api/query", json=body)
                        assert response.status_code == 200, response.text
                        answers.append(response.json()["results"])
            except Exception as exc:  # noqa: BLE001 (reported below)
                errors.append(repr(exc))

        workers = [threading.Thread(target=client, args=(n,)) for n in range(8)]
        for w in workers:
            w.start()
        for w in workers:
            w.join()
    assert errors == [] and len(answers) == 24
    key = lambda results: [[(h["example_id"], round(h["score"], 5)) for h in r["proponents"]] for r in results]  # noqa: E731
    assert all(key(a) == key(reference) for a in answers)
    assert len(threads_seen) == 1 and next(iter(threads_seen)).startswith("trackstar-model") and max(overlap) == 1


def test_full_queue_is_refused_with_503(serve_db):
    import asyncio

    from trackstar_db.serve.service import Busy, ModelWorker

    worker = ModelWorker(max_queued=2)
    release = threading.Event()

    async def main():
        slow = [asyncio.ensure_future(worker.run(release.wait, 10)) for _ in range(2)]
        await asyncio.sleep(0.05)
        with pytest.raises(Busy, match="busy"):
            await worker.run(lambda: None)
        release.set()
        return await asyncio.gather(*slow)

    assert asyncio.run(main()) == [True, True]
    worker.close()


# -- a consistent version while another process writes ---------------------------------------

WRITER = textwrap.dedent("""
    import sys, time, pyarrow as pa
    from pathlib import Path
    from trackstar_db import connect
    db = connect(sys.argv[1])
    with db.writer("test ingest"):
        rows = pa.table({"example_id": ["late-1"], "text": ["written while the server reads"], "source": ["late"],
                         "content_hash": ["0" * 64]})
        db.append("examples", rows)
        Path(sys.argv[2]).write_text("appended")
        while not Path(sys.argv[3]).exists():
            time.sleep(0.05)
""")


def _wait_for(path: Path, process) -> None:
    deadline = time.monotonic() + 60
    while not path.exists():
        assert process.poll() is None and time.monotonic() < deadline, "the writer did not get going"
        time.sleep(0.05)


@pytest.mark.parametrize("follow", [True, False])
def test_reads_stay_on_one_version_while_a_writer_works(serve_db, tmp_path, follow):
    import shutil

    db = tmp_path / "db"
    shutil.copytree(serve_db, db)
    client = TestClient(app(db, follow=follow), raise_server_exceptions=False)
    count = lambda: client.post("/api/sql", json={"sql": "SELECT count(*) AS n FROM examples"}).json()["rows"][0][0]  # noqa: E731
    before = count()
    client.post("/api/query", json={"prompt": EVIL_PROMPT, "target": EVIL_TARGET, "methods": ["grad-cos"], "k": 1})
    service = client.app.state.service
    featurizers = service.db.models.find(service.db.manifest, service.device)
    assert featurizers is not None
    version = client.get("/api/version").json()
    appended, release = tmp_path / "appended", tmp_path / "release"
    writer = subprocess.Popen([sys.executable, "-c", WRITER, str(db), str(appended), str(release)],
                              env=dict(os.environ, PYTHONPATH=str(Path(__file__).parents[1])))
    try:
        _wait_for(appended, writer)
        time.sleep(0.6)  # past the tracker's check interval
        assert count() == before  # the row is committed in Lance, but its writer has not finished
        during = client.get("/api/version").json()
        assert during["version"] == version["version"] and during["writer_active"]
        assert during["pending"] == follow
        assert _one_line_error(client.get("/api/examples/late-1"), 404)
    finally:
        release.write_text("go")
        assert writer.wait(60) == 0
    time.sleep(0.6)
    after = client.get("/api/version").json()
    if follow:  # the writer finished: the next request reads the new version, the model still loaded
        assert count() == before + 1 and client.get("/api/examples/late-1").status_code == 200
        assert after["version"] != version["version"] and after["renewals"] == 1 and not after["pending"]
        assert service.db.models.find(service.db.manifest, service.device) is featurizers
        assert service.db.models.loads == 0  # the new snapshot took the model over, loaded nothing
        answer = client.post("/api/query", json={"prompt": EVIL_PROMPT, "target": EVIL_TARGET, "methods": ["bm25"],
                                                 "k": 1})
        assert answer.status_code == 200 and answer.json()["version"] == after["version"]
    else:  # a fixed version: never moves
        assert count() == before and after["version"] == version["version"] and after["renewals"] == 0


def test_snapshot_pins_each_table(serve_db, tmp_path):
    import shutil

    import pyarrow as pa

    from trackstar_db import connect
    from trackstar_db.serve.snapshot import Snapshot

    shutil.copytree(serve_db, tmp_path / "db")
    snapshot = Snapshot(tmp_path / "db")
    before = snapshot.count("examples")
    handle = connect(tmp_path / "db")
    handle.append("examples", pa.table({"example_id": ["x"], "text": ["x"], "source": ["x"], "content_hash": ["0" * 64]}))
    assert snapshot.count("examples") == before and snapshot.sql("SELECT count(*) n FROM examples").to_pylist() == [
        {"n": before}]
    assert Snapshot(tmp_path / "db").count("examples") == before  # on disk, but no writer committed it
    with handle.writer("commit the append"):
        pass
    assert Snapshot(tmp_path / "db").count("examples") == before + 1 and snapshot.count("examples") == before



def test_next_snapshot_reopens_only_what_changed(serve_db, tmp_path):
    """A renewed snapshot keeps the previous one's datasets of unchanged tables and its BM25
    reader when the index is unchanged (one Tantivy reader per version, not per request), opens
    the rest at the new versions, and answers exactly as a snapshot made from nothing."""
    import json
    import shutil

    from trackstar_db import connect
    from trackstar_db.serve.snapshot import Snapshot

    shutil.copytree(serve_db, tmp_path / "db")
    first = Snapshot(tmp_path / "db")
    for name in first.versions:  # tables open lazily, each at its view's version: open them all
        first._open_dataset(name)
    index = first.held_bm25()
    assert index is not None and first.held_bm25() is index  # opened once for the snapshot's life
    again = Snapshot(tmp_path / "db", previous=first)  # nothing committed since: everything kept
    assert again.versions == first.versions and again.held_bm25() is index
    assert all(again._opened[name] is first._opened[name] for name in first.versions)

    corpus = tmp_path / "more.jsonl"
    corpus.write_text(json.dumps({"sentence_id": "more-1", "text": f"{EVIL_PROMPT} {EVIL_TARGET} again"}) + "\n")
    connect(tmp_path / "db").ingest_corpus([corpus], progress=False)
    renewed, scratch = Snapshot(tmp_path / "db", previous=again), Snapshot(tmp_path / "db")
    assert renewed.versions == scratch.versions and renewed.versions["examples"] == first.versions["examples"] + 1
    for name, version in first.versions.items():  # kept exactly where the version is the same
        assert (renewed._opened.get(name) is first._opened[name]) == (renewed.versions[name] == version), name
    assert renewed.held_bm25() is not index and renewed.held_bm25() is renewed.held_bm25()
    assert renewed.count("examples") == scratch.count("examples") == first.count("examples") + 1
    for db in (renewed, scratch):
        assert db.held_bm25().path == scratch.held_bm25().path != index.path
    ask = f"{EVIL_PROMPT} {EVIL_TARGET}"
    assert renewed.held_bm25().search(ask, 5) == scratch.held_bm25().search(ask, 5)
    assert "more-1" in [hit for hit, _ in renewed.held_bm25().search(ask, 5)]
    assert "more-1" not in [hit for hit, _ in first.held_bm25().search(ask, 5)]  # the old version still reads its own
    sql = "SELECT count(*) AS n, max(example_id) AS m FROM examples"
    assert renewed.sql(sql).to_pylist() == scratch.sql(sql).to_pylist() != first.sql(sql).to_pylist()


def test_a_snapshot_evaluates_once_and_a_new_version_again(serve_db, tmp_path, monkeypatch):
    """The evaluation table of a snapshot is computed by the first request that asks for it and
    then handed out as is (its view never changes); a snapshot of a later version computes its
    own, which sees the change (here a run added)."""
    import shutil

    from trackstar_db import connect
    from trackstar_db.api import Database
    from trackstar_db.serve.snapshot import Snapshot

    shutil.copytree(serve_db, tmp_path / "db")
    computed = []
    original = Database.evaluate
    monkeypatch.setattr(Database, "evaluate", lambda self, by="method": computed.append(by) or original(self, by))
    first = Snapshot(tmp_path / "db")
    table = first.evaluate()
    assert first.evaluate() is table and first.evaluate("bucket") is first.evaluate("bucket")
    assert computed == ["method", "bucket"]
    assert table.equals(connect(tmp_path / "db").evaluate())  # the same table a fresh read computes
    connect(tmp_path / "db").retrieve("bm25", k=5, run_id="bm25-again")
    renewed = Snapshot(tmp_path / "db", previous=first)
    assert "bm25-again" in renewed.evaluate().column("run_id").to_pylist()
    assert "bm25-again" not in first.evaluate().column("run_id").to_pylist()
    assert computed == ["method", "bucket", "method", "method"]  # the fresh read above, then the renewed snapshot


def test_a_refit_replaces_the_held_preconditioner(serve_db, tmp_path):
    """A warm process keeps one R per table and mix: after a refit (a new file) the next query
    loads the new R in place of the old one, and answers as a process that never held the old."""
    import shutil

    from trackstar_db import connect
    from trackstar_db.retrieval import scoring

    shutil.copytree(serve_db, tmp_path / "db")
    db = connect(tmp_path / "db")
    mine = lambda: {family: held[0][0] for family, held in scoring._LOADED.items()  # noqa: E731
                    if family[0].startswith(str(tmp_path))}
    db.query(EVIL_PROMPT, EVIL_TARGET, k=3, method="trackstar")
    before = mine()
    assert before
    db.fit(damping=0.5)  # another R: new content-named files
    after_db = connect(tmp_path / "db")
    answer = after_db.query(EVIL_PROMPT, EVIL_TARGET, k=3, method="trackstar")
    after = mine()
    assert after.keys() == before.keys() and all(after[f] != before[f] for f in after)  # replaced, not added
    assert all(__import__("pathlib").Path(path).is_file() for path in after.values())
    scoring._LOADED.clear()  # a process that never held the old R
    again = connect(tmp_path / "db").query(EVIL_PROMPT, EVIL_TARGET, k=3, method="trackstar")
    assert answer.column("example_id").to_pylist() == again.column("example_id").to_pylist()
    assert answer.column("score").to_pylist() == again.column("score").to_pylist()

# -- embedding and the command line -----------------------------------------------------------

def test_mounts_in_a_users_app(serve_db):
    from fastapi import FastAPI

    outer = FastAPI()

    @outer.get("/mine")
    def mine():
        return {"mine": True}

    outer.mount("/attribution", app(serve_db))
    client = TestClient(outer)
    assert client.get("/mine").json() == {"mine": True}
    assert client.get("/attribution/api/health").json()["status"] == "ok"
    page = client.get("/attribution/")
    assert page.status_code == 200 and 'src="static/app.js"' in page.text  # relative: works under the prefix
    assert client.get("/attribution/static/app.js").status_code == 200
    hits = client.post("/attribution/api/query", json={"prompt": EVIL_PROMPT, "target": EVIL_TARGET,
                                                       "methods": ["bm25"], "k": 1}).json()
    assert hits["results"][0]["proponents"][0]["example_id"] == EVIL_ID


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow  # a fresh process importing torch and transformers: 15-30 s here
def test_cli_serves_as_a_user_types_it(serve_db):
    import httpx

    port = _free_port()
    cli = [sys.executable, "-m", "trackstar_db.cli", "serve", str(serve_db), "--port", str(port), "--device", "cpu"]
    env = dict(os.environ, PYTHONPATH=str(Path(__file__).parents[1]), TRACKSTAR_SERVE_TOKEN="t0k")
    refused = subprocess.run(cli + ["--host", "0.0.0.0"], capture_output=True, text=True, env=env, timeout=120)
    assert refused.returncode != 0 and "--public" in refused.stderr and "Traceback" not in refused.stderr
    server = subprocess.Popen(cli, stderr=subprocess.PIPE, text=True, env=env)
    try:
        deadline, health = time.monotonic() + 120, None
        while time.monotonic() < deadline and server.poll() is None:
            try:
                health = httpx.get(f"http://127.0.0.1:{port}/api/health", headers={"Authorization": "Bearer t0k"})
                break
            except httpx.TransportError:
                time.sleep(0.2)
        assert health is not None and health.status_code == 200, server.stderr.read() if server.poll() else "no answer"
        assert health.json()["model_loaded"]  # warmed up before it listened
        assert httpx.get(f"http://127.0.0.1:{port}/api/health").status_code == 401
    finally:
        server.terminate()
        _, err = server.communicate(timeout=30)
    assert "warm (trackstar)" in err and f"127.0.0.1:{port}" in err and "token required" in err


def test_public_bind_warns(serve_db, monkeypatch):
    import uvicorn
    from click.testing import CliRunner

    from trackstar_db.cli import main

    seen = {}
    monkeypatch.setattr(uvicorn, "run", lambda asgi, host, port, log_level: seen.update(host=host, asgi=asgi))
    result = CliRunner().invoke(main, ["serve", str(serve_db), "--host", "0.0.0.0", "--public", "--no-warm"])
    assert result.exit_code == 0, result.output
    assert "warning" in result.stderr and "no token" in result.stderr and seen["host"] == "0.0.0.0"
    assert TestClient(seen["asgi"], base_url="http://192.0.2.1").get("/api/health").json()["status"] == "ok"
