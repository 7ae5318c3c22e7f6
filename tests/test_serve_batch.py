"""Many users at once: queries answered together by one model pass (PromptAttributor.attribute_many,
service.ModelWorker), each answer the one it gets alone; the JSON-lines batch endpoint; the limits
(k and prompt bounds shared with the library, the queue, the timeout, a log line per refusal); and
BM25 hits resolved against the snapshot's own examples."""

from __future__ import annotations

import asyncio
import json
import logging
import shutil
import threading
import time

import pytest

pytest.importorskip("fastapi")
pytest.importorskip("httpx")

from fastapi.testclient import TestClient  # noqa: E402
from serve_db import EVIL_ID, EVIL_PROMPT, EVIL_TARGET, build_serve_db  # noqa: E402

from trackstar_db.serve import app  # noqa: E402


@pytest.fixture(scope="module")
def serve_db(tiny_db_template, tmp_path_factory):
    """The serve database with an ANN index of trackstar (flat: exact within its partitions)."""
    from trackstar_db import connect
    from trackstar_db.retrieval.ann_build import build_index

    path = build_serve_db(tiny_db_template, tmp_path_factory.mktemp("batch"))
    build_index(connect(path), "trackstar", "ivf_flat", num_partitions=4, progress=False)
    return path


@pytest.fixture(scope="module")
def prompts(serve_db):
    from trackstar_db import connect

    rows = connect(serve_db).table("queries", columns=["prompt", "target"]).slice(0, 4).to_pylist()
    return [(r["prompt"], r["target"]) for r in rows] + [(EVIL_PROMPT, EVIL_TARGET)]


def _same(batched, alone) -> None:
    """The same hits in the same order with the same evidence, scores equal up to the float
    rounding of a batched matrix product (MKL rounds [n, d] @ X^T and [1, d] @ X^T differently,
    by a few ulp) and of the query gradients featurized in one padded batch (float32 sums in
    another order: relative differences up to about 1e-5 measured, 1e-4 allowed). Examples whose scores tie in exact arithmetic (the tiny corpus holds duplicate
    sentences, whose stored gradients are bit-identical) may come in another order: where two ids
    differ at a rank, their texts are the same."""
    a, b = (rows if isinstance(rows, list) else rows.to_pylist() for rows in (batched, alone))
    assert len(a) == len(b)
    key = [f for f in ("kind", "rank", "text", "label") if a and f in a[0]]
    assert [tuple(r[f] for f in key) for r in a] == [tuple(r[f] for f in key) for r in b]
    assert [r["score"] for r in a] == pytest.approx([r["score"] for r in b], rel=1e-4, abs=1e-7)
    swapped = sum(x["example_id"] != y["example_id"] for x, y in zip(a, b))
    assert swapped <= len(a) // 2


def test_a_batch_of_mixed_queries_answers_each_as_alone(serve_db, prompts):
    """Mixed methods (two gradient variants, a baseline, BM25, ANN), k and targets in one call."""
    from trackstar_db import connect
    from trackstar_db.retrieval.adhoc import Ask
    from trackstar_db.retrieval.ann import AnnOptions

    db = connect(serve_db)
    attributor = db.prompt_attributor("cpu")
    asks = []
    for n, (prompt, target) in enumerate(prompts):
        asks += [Ask(prompt, target, "trackstar", k=1 + n), Ask(prompt, target, "grad-cos", k=5 - n % 3),
                 Ask(prompt, target, "bm25", k=3), Ask(prompt, target, "grad-dot", k=2 + n % 2),
                 Ask(prompt, target, "trackstar", k=4, ann=AnnOptions(nprobes=4))]
    asks += [Ask(prompts[0][0], "a different target", "trackstar", k=6),  # same prompt, other target
             Ask(prompts[1][0], prompts[1][1], "tracin-cp", k=2),        # refused: its error in its place
             Ask(prompts[1][0], prompts[1][1], "trackstar", k=0)]        # refused by the option rule
    calls = []
    featurize = attributor.featurizer("corrected")[0].featurize
    attributor.featurizer("corrected")[0].featurize = lambda batch, **kw: calls.append(len(batch["input_ids"])) \
        or featurize(batch, **kw)
    answers = attributor.attribute_many(asks)
    attributor.featurizer("corrected")[0].featurize = featurize
    assert calls == [len(prompts) + 1]  # every corrected-variant query gradient in one featurize call
    from trackstar_db.errors import ParameterError, TrackstarError

    assert isinstance(answers[-2], TrackstarError) and "tracin" in str(answers[-2]).lower()
    assert isinstance(answers[-1], ParameterError) and answers[-1].parameter == "k"
    for ask, answer in zip(asks[:-2], answers[:-2]):
        alone = connect(serve_db).query(ask.prompt, ask.target, k=ask.k, method=ask.method, ann=ask.ann)
        assert answer.column("method").unique().to_pylist() == [ask.method]
        assert max(answer.column("rank").to_pylist()) == ask.k or ask.method == "bm25"  # BM25: words must match
        _same(answer, alone)


def test_waiting_queries_share_one_model_pass_over_http(serve_db, prompts):
    """Queries sent while the model thread is busy are answered by one pass; each equals the lone answer."""
    client = TestClient(app(serve_db, batch_wait=0.5, max_batch=8), raise_server_exceptions=False)
    service = client.app.state.service
    lone = {}
    bodies = [{"prompt": p, "target": t, "methods": ["trackstar", "bm25"], "k": 2 + n} for n, (p, t) in
              enumerate(prompts)]
    for body in bodies:
        lone[body["prompt"]] = client.post("/api/query", json=body).json()
    service.worker.batches.clear()
    answers = {}

    def ask(body):
        answers[body["prompt"]] = client.post("/api/query", json=body).json()

    threads = [threading.Thread(target=ask, args=(b,)) for b in bodies]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    sizes = service.worker.batches
    assert sum(n * count for n, count in sizes.items()) == len(bodies) and max(sizes) > 1, sizes
    assert any(answers[b["prompt"]]["batch"] > 1 for b in bodies)
    for body in bodies:
        for mine, theirs in zip(answers[body["prompt"]]["results"], lone[body["prompt"]]["results"]):
            for kind in ("proponents", "opponents"):
                _same(mine[kind], theirs[kind])
    assert client.get("/api/health").json()["batches"]


def test_worker_waits_for_as_many_as_recent_batches_held():
    """A lone query never waits for company; once batches of four were seen, queries arriving a
    few milliseconds apart are gathered into one batch of four again, not split."""
    from trackstar_db.serve.service import ModelWorker

    worker = ModelWorker(max_queued=16, max_batch=8, batch_wait=0.5)
    sizes, gate, started = [], threading.Event(), threading.Event()

    def batch(items):
        sizes.append(len(items))
        started.set()
        gate.wait(5)
        return [item * 10 for item in items]

    async def main():
        begin = time.perf_counter()
        assert await worker.query(batch, 1) == 10  # alone: no wait for company
        alone = time.perf_counter() - begin
        gate.clear()
        started.clear()
        blocker = asyncio.ensure_future(worker.query(batch, 0))  # the model thread busy ...
        assert await asyncio.to_thread(started.wait, 5)
        four = [asyncio.ensure_future(worker.query(batch, n)) for n in (1, 2, 3, 4)]  # ... while four wait
        await asyncio.sleep(0.05)
        gate.set()
        assert await asyncio.gather(blocker, *four) == [0, 10, 20, 30, 40]
        later = []
        for n in (5, 6, 7, 8):  # arriving 20 ms apart: gathered, since the last batch held four
            later.append(asyncio.ensure_future(worker.query(batch, n)))
            await asyncio.sleep(0.02)
        assert await asyncio.gather(*later) == [50, 60, 70, 80]
        return alone

    gate.set()
    alone = asyncio.run(main())
    worker.close()
    assert alone < 0.4 and sizes == [1, 1, 4, 4], (alone, sizes)

    # two clients in turn: B arrives while A's query runs, so B waits for A's next one to join it
    worker, sizes = ModelWorker(max_queued=16, max_batch=8, batch_wait=0.5), []

    async def ping_pong():
        gate.clear()
        started.clear()
        first = asyncio.ensure_future(worker.query(batch, 1))
        assert await asyncio.to_thread(started.wait, 5)
        second = asyncio.ensure_future(worker.query(batch, 2))
        await asyncio.sleep(0.05)
        gate.set()
        assert await first == 10
        await asyncio.sleep(0.02)  # A answered, asks again a moment later
        return await asyncio.gather(second, worker.query(batch, 3))

    assert asyncio.run(ping_pong()) == [20, 30]
    worker.close()
    assert sizes == [1, 2], sizes


def test_unbatched_server_answers_one_at_a_time(serve_db, prompts):
    client = TestClient(app(serve_db, max_batch=1), raise_server_exceptions=False)
    body = {"prompt": prompts[0][0], "target": prompts[0][1], "methods": ["grad-cos"], "k": 3}
    assert client.post("/api/query", json=body).json()["batch"] == 1
    assert set(client.app.state.service.worker.batches) <= {1}


def test_batch_endpoint_json_lines(serve_db, prompts):
    client = TestClient(app(serve_db), raise_server_exceptions=False)
    lines = [{"prompt": p, "target": t, "methods": ["grad-cos"], "k": 3} for p, t in prompts]
    lines.insert(2, {"prompt": "a", "target": "b", "k": 10 ** 9})            # 422, as the single query
    lines.insert(3, {"prompt": "a", "target": "b", "methods": ["nope"]})     # 400
    body = "\n".join(json.dumps(line) for line in lines) + "\n\n"
    response = client.post("/api/query/batch", content=body, headers={"content-type": "application/x-ndjson"})
    assert response.status_code == 200 and response.headers["content-type"].startswith("application/x-ndjson")
    answers = [json.loads(line) for line in response.text.splitlines()]
    assert len(answers) == len(lines)
    assert answers[2]["status"] == 422 and answers[2]["line"] == 3 and "k" in answers[2]["error"]
    assert answers[3]["status"] == 400 and "unknown method" in answers[3]["error"]
    for line, answer in zip(lines, answers):
        if "error" in answer:
            single = client.post("/api/query", json=line)
            assert single.status_code == answer["status"] and single.json()["error"] in answer["error"]
            continue
        single = client.post("/api/query", json=line).json()
        assert answer["prompt"] == line["prompt"]
        _same(answer["results"][0]["proponents"], single["results"][0]["proponents"])
    empty = client.post("/api/query/batch", content=b"\n", headers={"content-type": "application/x-ndjson"})
    assert empty.status_code == 400 and "no JSON lines" in empty.json()["error"]


def test_limits_are_the_librarys(serve_db):
    from trackstar_db import connect
    from trackstar_db.errors import ParameterError
    from trackstar_db.option_checks import K_MAX, TEXT_MAX

    client = TestClient(app(serve_db), raise_server_exceptions=False)
    for body, field in (({"prompt": "a", "target": "b", "k": K_MAX + 1}, "k"),
                        ({"prompt": "x" * (TEXT_MAX + 1), "target": "b"}, "prompt")):
        response = client.post("/api/query", json=body)
        assert response.status_code == 422 and field in response.json()["error"]
        with pytest.raises(ParameterError) as refused:
            connect(serve_db).query(body["prompt"], body["target"], k=body.get("k", 10), method="bm25")
        assert refused.value.parameter == field


def test_timeout_and_refusals_are_logged(serve_db, caplog):
    from trackstar_db.serve.service import ModelWorker, TimedOut

    worker = ModelWorker(max_queued=4)
    release = threading.Event()

    async def main():
        with pytest.raises(TimedOut, match="timed out"):
            await worker.run(release.wait, 10, timeout=0.1)
        release.set()

    asyncio.run(main())
    worker.close()
    client = TestClient(app(serve_db, timeout=0.01), raise_server_exceptions=False)
    service = client.app.state.service
    slow = threading.Event()
    blocker = threading.Thread(target=lambda: asyncio.run(service.worker.run(slow.wait, 5)))
    blocker.start()  # the model thread busy: the next query waits past the timeout
    while service.worker.queued < 1:
        time.sleep(0.01)
    with caplog.at_level(logging.WARNING, logger="trackstar_db.serve"):
        response = client.post("/api/query", json={"prompt": "a", "target": "b", "methods": ["bm25"], "k": 1})
        client.post("/api/query", json={"prompt": "a", "target": "b", "k": -1})
    slow.set()
    blocker.join()
    assert response.status_code == 504 and "timed out" in response.json()["error"]
    lines = [r.getMessage() for r in caplog.records if r.name == "trackstar_db.serve"]
    assert any(line.startswith("refused POST /api/query: 504 timed out") for line in lines), lines
    assert any(line.startswith("refused POST /api/query: 422 k:") for line in lines), lines
    assert all("\n" not in line for line in lines)


def test_bm25_hits_come_from_the_snapshot(serve_db, tmp_path):
    """An example indexed after the snapshot (BM25 index newer than the pinned examples) is never
    a hit: every hit carries its text from the snapshot's examples, and k hits still come back."""
    import pyarrow as pa

    from trackstar_db import connect
    from trackstar_db.store.bm25 import BM25Index

    path = tmp_path / "db"
    shutil.copytree(serve_db, path)
    client = TestClient(app(path, follow=False), raise_server_exceptions=False)
    body = {"prompt": "Zuteil is located in", "target": "Kabresia", "methods": ["bm25"], "k": 3}
    before = client.post("/api/query", json=body).json()["results"][0]["proponents"]
    db = connect(path)
    text = "Zuteil is located in Kabresia, Zuteil Kabresia, located in Kabresia"
    with db.writer("test"):
        db.append("examples", pa.table({"example_id": ["late-1"], "text": [text], "source": ["late"],
                                        "content_hash": ["1" * 64]}))
        BM25Index(path).add(["late-1"], [text])
    newest = connect(path).query(body["prompt"], body["target"], k=3, method="bm25").column("example_id").to_pylist()
    assert newest[0] == "late-1" and newest[1:] == [h["example_id"] for h in before][:2]
    after = client.post("/api/query", json=body).json()["results"][0]["proponents"]
    assert len(before) == 3 and [h["example_id"] for h in after] == [h["example_id"] for h in before]
    assert all(h["text"] for h in after) and [h["rank"] for h in after] == [1, 2, 3]
