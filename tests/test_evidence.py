"""Evidence on query hits: the text checks against brute force, BM25 per example against the
index's own search, and `query --verify` against stored `tail-patch` for the same examples."""

import json
import random

import pyarrow.compute as pc
import pytest
from click.testing import CliRunner

from trackstar_db.retrieval.evidence import contains, label, longest_shared_span, text_evidence, words


def _brute_span(a, b):
    return max([n for i in range(len(a)) for j in range(len(b)) for n in range(1, min(len(a) - i, len(b) - j) + 1)
                if a[i:i + n] == b[j:j + n]], default=0)


def test_longest_shared_span_and_contains_match_brute_force():
    rng = random.Random(0)
    for _ in range(300):
        a = [rng.choice("abcd") for _ in range(rng.randint(0, 12))]
        b = [rng.choice("abcd") for _ in range(rng.randint(0, 8))]
        assert longest_shared_span(a, b) == _brute_span(a, b)
        needle = b[:rng.randint(0, 3)]
        assert contains(a, needle) == (bool(needle) and any(a[i:i + len(needle)] == needle for i in range(len(a))))


def test_text_evidence_and_labels():
    texts = ["Paris is the capital of France.", "Parisian food", "The capital of France is big.",
             "Ada lives in Paris.", "The capital of Spain is Paris."]
    columns = text_evidence("The capital of France is", "Paris", texts, subject="France")
    assert columns["has_target"] == [True, False, False, True, True]  # whole words: 'Parisian' is not 'Paris'
    assert columns["has_subject"] == [True, False, True, False, False]
    assert columns["shared_span"] == [4, 0, 5, 1, 3]  # "the capital of france"; "the capital of france is"
    assert columns["states_it"] == [True, False, False, False, False]  # a known subject must be there
    unknown = text_evidence("The capital of France is", "Paris", texts)
    assert unknown["has_subject"] == [None] * 5
    assert unknown["states_it"] == [True, False, False, False, True]  # no subject known: 3+ shared words
    assert words("Ça, c'est Paris!") == ["ça", "c", "est", "paris"]
    assert [label(s, m) for s, m in [(True, True), (True, False), (False, True), (False, False)]] == \
        ["both", "states it", "moves the model", "neither"]
    assert label(True, None) == "states it (not verified)" and label(False, None) == "not verified"


def test_bm25_scores_of_equals_the_index_search(tiny_db):
    from trackstar_db.store.bm25 import BM25Index

    index = BM25Index(tiny_db.path)
    text = tiny_db.table("queries").to_pylist()[0]
    query = f"{text['prompt']} {text['target']}"
    hits = index.search(query, 8)
    ids = [e for e, _ in hits[2:6]] + ["no-such-example"]
    scores = index.scores_of(query, ids)
    assert scores == {**{e: pytest.approx(s, rel=1e-6) for e, s in hits[2:6]}, "no-such-example": 0.0}


def test_query_verify_gives_the_stored_tail_patch_delta(tiny_db):
    from trackstar_db.api import connect
    from trackstar_db.cli import main
    from trackstar_db.retrieval.runs import RetrieveOptions, retrieve
    from trackstar_db.tailpatch.runs import tail_patch_runs

    retrieve(tiny_db, "bm25", RetrieveOptions(k=5))
    stored = tail_patch_runs(tiny_db, ["bm25"], k=5, max_queries=2)
    query_id = stored.column("query_id")[0].as_py()
    query = tiny_db.table("queries", filter=pc.field("query_id") == query_id).to_pylist()[0]
    expected = {r["example_id"]: r["p_after"] - r["p_before"]
                for r in stored.filter(pc.equal(stored.column("query_id"), query_id)).to_pylist()}
    db = connect(tiny_db.path)
    rows = db.query(query["prompt"], query["target"], k=5, method="bm25", verify=True).to_pylist()
    assert {r["example_id"] for r in rows} == set(expected)
    from trackstar_db.retrieval.evidence import baseline_examples
    from trackstar_db.tailpatch.runs import load_patcher
    import statistics

    random_steps = load_patcher(tiny_db, k=1).run({"b": [(query_id, query["prompt"], query["target"], [
        (1, e, t)]) for e, t in baseline_examples(tiny_db, query["prompt"], query["target"])]})
    baseline = statistics.median(r["p_after"] - r["p_before"] for r in random_steps.to_pylist())
    for r in rows:
        assert r["delta_p"] == pytest.approx(expected[r["example_id"]], rel=1e-5, abs=1e-9)
        assert r["baseline_delta_p"] == pytest.approx(baseline, rel=1e-5, abs=1e-9)
        assert r["verify_ms"] > 0 and r["moves_model"] == (r["delta_p"] - r["baseline_delta_p"] >= 1e-3)
        assert r["label"] in ("both", "states it", "moves the model", "neither")
        assert r["bm25"] > 0 and r["has_subject"] is not None  # a stored query: its fact's subject is known
    plain = db.query(query["prompt"], query["target"], k=5, method="bm25").to_pylist()
    assert all(r["delta_p"] is None and r["label"] in ("not verified", "states it (not verified)") for r in plain)

    runner = CliRunner()
    args = ["query", str(tiny_db.path), "--prompt", query["prompt"], "--target", query["target"], "--k", "5",
            "--method", "bm25", "--verify"]
    text = runner.invoke(main, args)
    assert text.exit_code == 0, text.output
    assert text.output.count(" ms)") == 5 and "tail-patch dP" in text.output
    as_json = runner.invoke(main, args + ["--format", "json"])
    lines = [json.loads(line) for line in as_json.stdout.splitlines()]
    assert [r["label"] for r in lines] == [r["label"] for r in rows]
    assert {"bm25", "has_target", "has_subject", "shared_span", "states_it", "delta_p", "moves_model"} <= set(lines[0])


def test_explorer_labels_hits_from_text_and_stored_tail_patch(tmp_path):
    import pyarrow as pa

    from trackstar_db.report.explorer import build_pages, write_explorer

    retrievals = pa.Table.from_pylist([
        dict(run_id="r", method="bm25", query_id="q", kind="proponent", rank=i + 1, example_id=e, score=1.0 - i / 10)
        for i, e in enumerate(["both", "states", "moves", "neither", "unpatched"])])
    texts = {"both": "Ada Moreau was born in Lyon.", "states": "Ada Moreau, born in Lyon.", "moves": "Lyon is big.",
             "neither": "Nothing here.", "unpatched": "Nothing here either."}
    tables = {
        "retrievals": retrievals,
        "queries": pa.table({"query_id": ["q"], "fact_id": ["F1"], "prompt": ["Ada Moreau was born in"],
                             "target": ["Lyon"], "template": ["prompt0"]}),
        "examples": pa.table({"example_id": list(texts), "text": list(texts.values())}),
        "facts": pa.table({"fact_id": ["F1"], "subject": ["Ada Moreau"], "relation": ["born in"],
                           "frequency_bucket": pa.array([2], pa.int32())}),
        "tail_patch": pa.Table.from_pylist([dict(run_id="r", query_id="q", rank=i + 1, example_id=e, p_before=0.2,
                                                 p_after=0.2 + d)
                                            for i, (e, d) in enumerate([("both", 0.01), ("states", 0.0),
                                                                        ("moves", 0.02), ("neither", -0.01)])]),
    }
    page = build_pages(tables, ["r"], ["q"], k=5)[0]
    labels = {h["example_id"]: h["label"] for h in page["columns"][0]["proponent"]}
    assert labels == {"both": "both", "states": "states it", "moves": "moves the model", "neither": "neither",
                      "unpatched": "not verified"}
    html = (write_explorer(tmp_path, [page]).parent / "q-0001.html").read_text()
    assert html.count('class="lab ') == 5 and "moves the model" in html
