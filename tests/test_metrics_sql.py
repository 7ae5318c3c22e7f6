"""queries/*.sql (run by trackstar_db.evaluation.metrics_sql) against an independent pure-Python computation."""

from statistics import mean

import pyarrow as pa
import pytest

from trackstar_db.errors import TrackstarError
from trackstar_db.evaluation.metrics_sql import run_sql_file
from trackstar_db.evaluation.metrics_sql import summary as summary_table
from trackstar_db.store import schema

TRUTH = {"f1": {"a", "b"}, "f2": {"c"}, "f4": {"d"}}  # f3 has no ground-truth example
BUCKET = {"f1": 0, "f2": 1, "f3": 1, "f4": None}
QUERIES = {"q1": "f1", "q2": "f2", "q3": "f3", "q4": "f4", "q5": None, "q6": "f1"}
RUNS = {  # run -> (method, {query: proponent ids by rank}), opponents separately
    "A": ("bm25", {"q1": ["x", "b", "a"], "q2": ["c"], "q3": ["a"], "q6": [f"n{i}" for i in range(10)] + ["a", "b"],
                   "q5": ["a"]}),
    "B": ("trackstar", {"q1": ["a", "x"], "q2": ["x", "y"], "q4": ["z", "z2", "d"]}),
}
OPPONENTS = {("A", "q4"): ["d"], ("B", "q2"): ["c"]}  # correct examples, but opponents never count
PATCH = {  # (run, query) -> p_before, [p_after by rank]
    ("A", "q1"): (0.2, [0.3, 0.1, 0.2, 0.25, 0.2]),
    ("A", "q2"): (0.5, [0.5, 0.6, 0.9, 0.5, 0.4]),
    ("B", "q1"): (0.2, [0.4]),
}


def tables(model_correct=None):
    rows = []
    for run, (method, lists) in RUNS.items():
        for q, ids in lists.items():
            # equal scores on purpose (ties): the stored rank decides
            rows += [dict(run_id=run, method=method, query_id=q, kind="proponent", rank=r, example_id=e, score=1.0)
                     for r, e in enumerate(ids, 1)]
    for (run, q), ids in OPPONENTS.items():
        rows += [dict(run_id=run, method=RUNS[run][0], query_id=q, kind="opponent", rank=r, example_id=e,
                      score=-1.0) for r, e in enumerate(ids, 1)]
    patch = [dict(run_id=run, query_id=q, rank=r, example_id=f"e{r}", p_before=before, p_after=after)
             for (run, q), (before, afters) in PATCH.items() for r, after in enumerate(afters, 1)]
    facts = [dict(fact_id=f, subject="s", relation="r", object="o", fact_key=f, frequency_bucket=b)
             for f, b in BUCKET.items()]
    queries = [dict(query_id=q, fact_id=f, prompt="p", target="t", template="prompt0") for q, f in QUERIES.items()]
    truth = [dict(fact_id=f, example_id=e) for f, es in TRUTH.items() for e in sorted(es)] + [
        dict(fact_id="f1", example_id="a")]  # a duplicate ground-truth row must not matter
    out = {name: schema.conform(pa.Table.from_pylist(data), schema.arrow_schema(name)) for name, data in
           [("retrievals", rows), ("tail_patch", patch), ("facts", facts), ("queries", queries),
            ("ground_truth", truth)]}
    if model_correct is not None:
        out["model_correct"] = pa.table({"query_id": list(model_correct), "correct": list(model_correct.values())})
    return out


def first_correct(run, q):
    ids = RUNS[run][1].get(q, [])
    return next((r for r, e in enumerate(ids, 1) if e in TRUTH.get(QUERIES[q], ())), None)


def reference(run, keep=lambda q: True):
    evaluated = [q for q, f in QUERIES.items() if f in TRUTH and keep(q)]
    ranks = [first_correct(run, q) for q in evaluated]
    return dict(n_queries=len(evaluated),
                n_no_ground_truth=sum(1 for q, f in QUERIES.items() if f is not None and f not in TRUTH and keep(q)),
                mrr=mean([1 / r if r else 0 for r in ranks]) if ranks else None,
                recall_at_10=mean([1.0 if r and r <= 10 else 0.0 for r in ranks]) if ranks else None)


def tailpatch_reference(run, k):
    per_query = []
    depth = max(len(afters) for (r, _), (_, afters) in PATCH.items() if r == run)
    if depth < k:
        return None
    for (r, q), (before, afters) in PATCH.items():
        if r == run:
            per_query.append(mean([(a - before) * 100 for a in afters[:k]]))
    return mean(per_query)


def test_summary_matches_reference():
    summary = {row["run_id"]: row for row in summary_table(tables()).to_pylist()}
    assert list(summary) == ["A", "B"]  # bm25 before trackstar
    for run in RUNS:
        want = reference(run)
        got = summary[run]
        assert got["method"] == RUNS[run][0]
        assert (got["n_queries"], got["n_no_ground_truth"]) == (want["n_queries"], want["n_no_ground_truth"])
        assert got["mrr"] == pytest.approx(want["mrr"])
        assert got["recall_at_10"] == pytest.approx(want["recall_at_10"])
        for k in (1, 3, 5, 10):
            want_k = tailpatch_reference(run, k)
            assert got[f"tailpatch_at_{k}"] == (pytest.approx(want_k) if want_k is not None else None)
    assert summary["A"]["list_length"] == 12


def test_mrr_and_recall_by_bucket_and_correctness():
    correct = {"q1": True, "q2": False, "q6": True}
    mrr = run_sql_file("mrr.sql", tables(correct)).to_pylist()
    recall = run_sql_file("recall.sql", tables(correct)).to_pylist()
    for run in RUNS:
        for split, value, keep in [
            ("all", "all", lambda q: True),
            ("frequency_bucket", "0", lambda q: BUCKET.get(QUERIES[q]) == 0),
            ("frequency_bucket", "1", lambda q: BUCKET.get(QUERIES[q]) == 1),
            ("frequency_bucket", "unknown", lambda q: BUCKET.get(QUERIES[q]) is None),
            ("model_correct", "true", lambda q: correct.get(q) is True),
            ("model_correct", "false", lambda q: correct.get(q) is False),
            ("model_correct", "unknown", lambda q: q not in correct),
        ]:
            want = reference(run, lambda q: QUERIES[q] is not None and keep(q))
            (m,) = [r for r in mrr if (r["run_id"], r["split"], r["split_value"]) == (run, split, value)]
            (c,) = [r for r in recall if (r["run_id"], r["split"], r["split_value"]) == (run, split, value)]
            assert (m["n_queries"], m["n_no_ground_truth"]) == (want["n_queries"], want["n_no_ground_truth"])
            assert m["mrr"] == (pytest.approx(want["mrr"]) if want["mrr"] is not None else None), (run, value)
            assert c["recall_at_10"] == (pytest.approx(want["recall_at_10"])
                                         if want["recall_at_10"] is not None else None)
    (a,) = [r for r in mrr if (r["run_id"], r["split"]) == ("B", "all")]
    assert a["n_empty_lists"] == 2  # q3 and q6 have no proponents in run B


def test_summary_by_split_matches_reference():
    """summary_by_split.sql (which reuses mrr/recall/tail_patch_metrics) against the Python reference."""
    correct = {"q1": True, "q2": False, "q6": True}
    rows = run_sql_file("summary_by_split.sql", tables(correct)).to_pylist()
    groups = [("frequency_bucket", "0", lambda q: BUCKET.get(QUERIES[q]) == 0),
              ("frequency_bucket", "1", lambda q: BUCKET.get(QUERIES[q]) == 1),
              ("model_correct", "true", lambda q: correct.get(q) is True),
              ("model_correct", "false", lambda q: correct.get(q) is False)]
    assert {r["split"] for r in rows} == {"frequency_bucket", "model_correct"}  # never the 'all' rows
    for run in RUNS:
        for split, value, keep in groups:
            want = reference(run, lambda q: QUERIES[q] is not None and keep(q))
            (got,) = [r for r in rows if (r["run_id"], r["split"], r["split_value"]) == (run, split, value)]
            assert got["method"] == RUNS[run][0]
            assert (got["n_queries"], got["n_no_ground_truth"]) == (want["n_queries"], want["n_no_ground_truth"])
            assert got["mrr"] == (pytest.approx(want["mrr"]) if want["mrr"] is not None else None)
            assert got["recall_at_10"] == (pytest.approx(want["recall_at_10"])
                                           if want["recall_at_10"] is not None else None)
            patched = [(before, afters) for (r, q), (before, afters) in PATCH.items() if r == run and keep(q)]
            assert got["n_tailpatch_queries"] == len(patched)
            if patched and len(patched[0][1]) >= 1:
                want_1 = mean([(afters[0] - before) * 100 for before, afters in patched])
                assert got["tailpatch_at_1"] == pytest.approx(want_1)
    order = [r["method"] for r in rows if r["split"] == "frequency_bucket"]
    assert order == sorted(order, key=["bm25", "trackstar"].index)  # the method list's order


def test_tail_patch_sql():
    rows = run_sql_file("tail_patch_metrics.sql", tables()).to_pylist()
    (a,) = [r for r in rows if (r["run_id"], r["split"]) == ("A", "all")]
    assert a["n_queries"] == 2
    assert a["tailpatch_at_3"] == pytest.approx(tailpatch_reference("A", 3))
    assert a["tailpatch_at_10"] is None


def test_missing_tables_and_errors():
    only = {k: v for k, v in tables().items() if k in ("retrievals", "queries", "ground_truth")}
    summary = summary_table(only).to_pylist()
    assert [r["tailpatch_at_1"] for r in summary] == [None, None]
    assert summary[0]["mrr"] == pytest.approx(reference("A")["mrr"])
    assert summary_table({}).num_rows == 0
    with pytest.raises(TrackstarError, match="unknown table"):
        summary_table({"retrieval": only["retrievals"]})


def test_metrics_do_not_depend_on_the_order_rows_are_stored_in():
    """The same rows in another order (another node's scan, a compacted table) give the same table
    to the last bit: float averages are summed in query order, not in arrival order."""
    import random

    rng = random.Random(0)
    n = 400
    first = [rng.randint(1, 60) for _ in range(n)]  # 1/rank: sums that depend on their order
    rows = [dict(run_id="A", method="bm25", query_id=f"q{i:04d}", kind="proponent", rank=r, score=1.0,
                 example_id=f"t{i}" if r == first[i] else f"x{i}.{r}") for i in range(n) for r in range(1, first[i] + 1)]
    patch = [dict(run_id="A", query_id=f"q{i:04d}", rank=r, example_id=f"x{i}.{r}", p_before=rng.random(),
                  p_after=rng.random()) for i in range(n) for r in range(1, 4)]
    given = {"retrievals": rows, "tail_patch": patch,
             "facts": [dict(fact_id=f"f{i}", subject="s", relation="r", object="o", fact_key=f"f{i}",
                            frequency_bucket=i % 6) for i in range(n)],
             "queries": [dict(query_id=f"q{i:04d}", fact_id=f"f{i}", prompt="p", target="t", template="prompt0")
                         for i in range(n)],
             "ground_truth": [dict(fact_id=f"f{i}", example_id=f"t{i}") for i in range(n)]}
    wanted = None
    for attempt in range(6):
        if attempt:
            given = {name: rng.sample(data, len(data)) for name, data in given.items()}
        arrow = {name: schema.conform(pa.Table.from_pylist(data), schema.arrow_schema(name)) for name, data in given.items()}
        got = run_sql_file("summary_by_split.sql", arrow).to_pylist() + summary_table(arrow).to_pylist()
        assert got == (wanted := wanted or got)
    assert got[-1]["mrr"] == pytest.approx(sum(1 / r for r in first) / n)
