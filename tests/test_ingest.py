"""Corpus and fact ingest: idempotence, every kind of bad input, rollback, ground truth."""

import json

import pyarrow as pa
import pytest

from trackstar_db import Database, connect
from trackstar_db.errors import RecordError, TrackstarError
from trackstar_db.sources.corpus import CorpusOptions, ingest_corpus
from trackstar_db.sources.facts import frequency_bucket, ingest_facts
from trackstar_db.store.bm25 import BM25Index

SENTENCES = [
    {"sentence_id": "s1", "text": "Alice Zorn was born in Paris.", "abstract_uri": "A1", "sent_idx_in_abst": 0,
     "fact_triples": [["Q1", "P19", "Q2"]]},
    {"sentence_id": "s2", "text": "Bob Marr likes Rome.", "abstract_uri": "A2", "sent_idx_in_abst": 0, "fact_triples": []},
    {"sentence_id": "s3", "text": "Born in Paris, Alice Zorn painted.", "abstract_uri": "A1", "sent_idx_in_abst": 1,
     "fact_triples": [["Q1", "P19", "Q2"]]},
]
FACTS = [
    {"fact_id": "f1", "kilt_id": "k1", "entity0": "Alice Zorn", "relation": "place of birth", "entity1": "Paris",
     "entity0_uri": "Q1", "predicate_uri": "P19", "entity1_uri": "Q2", "entity0_alias": ["A. Zorn"],
     "entity1_alias": [], "trex_sentences": ["s1"], "c4_frequency": 2, "is_repetition": False,
     "prompt0": "Records say Alice Zorn was born in", "prompt1": "Alice Zorn comes from", "prompt2": "Alice Zorn, born in"},
    {"fact_id": "f2", "entity0": "Bob Marr", "relation": "place of birth", "entity1": "Oslo",
     "entity0_uri": "Q3", "predicate_uri": "P19", "entity1_uri": "Q4", "trex_sentences": [], "c4_frequency": 0,
     "prompt0": "Records say Bob Marr was born in"},
]


def write_jsonl(path, rows, extra_lines=()):
    with open(path, "wb") as handle:
        for row in rows:
            handle.write((json.dumps(row) + "\n").encode())
        for line in extra_lines:
            handle.write(line)
    return path


@pytest.fixture
def db(tmp_path):
    return Database.create(tmp_path / "db")


def test_ingest_twice_adds_nothing(db, tmp_path):
    path = write_jsonl(tmp_path / "s.jsonl", SENTENCES)
    first = ingest_corpus(db, [path], progress=False)
    second = ingest_corpus(db, [path], progress=False)
    assert (first.added, second.added, second.already_present) == (3, 0, 3)
    assert db.count("examples") == 3
    assert BM25Index(db.path).count() == 3
    row = db.table("examples", filter="example_id = 's1'").to_pylist()[0]
    assert row["fact_triples"] == ["Q1|P19|Q2"] and row["sent_idx"] == 0 and row["source"] == "s.jsonl"


def test_parquet_and_plain_records_with_custom_fields(db, tmp_path):
    import pyarrow.parquet as pq

    path = tmp_path / "plain.parquet"
    pq.write_table(pa.table({"doc": ["x1", "x2"], "body": ["first text", "second text"], "lang": ["en", "de"]}), path)
    report = ingest_corpus(db, [path], CorpusOptions(text_field="body", id_field="doc"), progress=False)
    assert report.added == 2
    rows = {r["example_id"]: r for r in db.table("examples").to_pylist()}
    assert rows["x2"]["text"] == "second text" and json.loads(rows["x2"]["metadata"]) == {"lang": "de"}


def test_records_without_id_get_a_stable_hash_id(db, tmp_path):
    path = write_jsonl(tmp_path / "p.jsonl", [{"text": "no id here"}, {"text": "another"}])
    ingest_corpus(db, [path], progress=False)
    ingest_corpus(db, [path], progress=False)
    ids = db.ids("examples", "example_id")
    assert len(ids) == 2 and all(len(i) == 20 for i in ids)


BAD_LINES = {
    "malformed": (b'{"sentence_id": "b1", "text": "oops"\n', "malformed JSON"),
    "missing_text": (b'{"sentence_id": "b1"}\n', "missing field 'text'"),
    "empty_text": (b'{"sentence_id": "b1", "text": "   "}\n', "field 'text' is empty"),
    "invalid_utf8": (b'{"sentence_id": "b1", "text": "caf\xe9"}\n', "invalid UTF-8"),
    "not_object": (b'["a", "b"]\n', "expected a JSON object"),
    "bad_triple": (b'{"sentence_id": "b1", "text": "t", "fact_triples": [["a", "b"]]}\n', "fact_triples entry"),
}


@pytest.mark.parametrize("kind", sorted(BAD_LINES))
def test_bad_line_names_file_and_line_and_keeps_previous_rows(db, tmp_path, kind):
    ingest_corpus(db, [write_jsonl(tmp_path / "good.jsonl", SENTENCES[:1])], progress=False)
    line, message = BAD_LINES[kind]
    # good rows first, committed in batches of one, so the rollback has real work to undo
    bad = write_jsonl(tmp_path / "bad.jsonl", SENTENCES[1:], [line])
    with pytest.raises(RecordError) as info:
        ingest_corpus(db, [bad], CorpusOptions(batch_size=1), progress=False)
    assert "bad.jsonl:3: " in str(info.value) and message in str(info.value)
    assert db.ids("examples", "example_id") == {"s1"}
    assert BM25Index(db.path).count() == 1


def test_skip_bad_goes_on_and_lists_rejects(db, tmp_path):
    bad = write_jsonl(tmp_path / "bad.jsonl", SENTENCES, [b'{"sentence_id": "b1"}\n', b"not json\n"])
    report = ingest_corpus(db, [bad], CorpusOptions(skip_bad=True), progress=False)
    assert report.added == 3 and [e.line for e in report.rejected] == [4, 5]
    rejects = [json.loads(l) for l in (db.path / "rejects.jsonl").read_text().splitlines()]
    assert [r["line"] for r in rejects] == [4, 5] and rejects[0]["file"].endswith("bad.jsonl")


def test_missing_file_and_unknown_type(db, tmp_path):
    with pytest.raises(TrackstarError, match="no such file"):
        ingest_corpus(db, [tmp_path / "nope.jsonl"], progress=False)
    (tmp_path / "x.csv").write_text("a,b\n")
    with pytest.raises(TrackstarError, match="unknown file type"):
        ingest_corpus(db, [tmp_path / "x.csv"], progress=False)


def test_facts_queries_and_ground_truth(db, tmp_path):
    ingest_corpus(db, [write_jsonl(tmp_path / "s.jsonl", SENTENCES)], progress=False)
    report = ingest_facts(db, [write_jsonl(tmp_path / "f.jsonl", FACTS)], progress=False)
    assert (report.facts, report.queries) == (2, 4)
    queries = {q["query_id"]: q for q in db.table("queries").to_pylist()}
    assert queries["f1:prompt0"]["target"] == "Paris" and queries["f1:prompt2"]["template"] == "prompt2"
    # s1 via both routes, s3 via fact_triples only; f2 has no entailing example
    pairs = sorted((r["fact_id"], r["example_id"]) for r in db.table("ground_truth").to_pylist())
    assert pairs == [("f1", "s1"), ("f1", "s3")]
    facts = {f["fact_id"]: f for f in db.table("facts").to_pylist()}
    assert facts["f1"]["frequency_bucket"] == 2 and facts["f1"]["subject_aliases"] == ["A. Zorn"]
    assert ingest_facts(db, [tmp_path / "f.jsonl"], progress=False).facts == 0


def test_ground_truth_follows_a_later_corpus_ingest(db, tmp_path):
    ingest_facts(db, [write_jsonl(tmp_path / "f.jsonl", FACTS)], progress=False)
    assert db.count("ground_truth") == 0
    ingest_corpus(db, [write_jsonl(tmp_path / "s.jsonl", SENTENCES)], progress=False)
    assert db.count("ground_truth") == 2


def test_bad_fact_file_writes_nothing(db, tmp_path):
    bad = dict(FACTS[1], fact_id="f3")
    del bad["prompt0"]
    path = write_jsonl(tmp_path / "f.jsonl", [FACTS[0], bad])
    with pytest.raises(RecordError, match=r"f.jsonl:2: no prompt field"):
        ingest_facts(db, [path], progress=False)
    assert db.count("facts") == 0 and db.count("queries") == 0


def test_frequency_buckets():
    assert [frequency_bucket(n) for n in (0, 1, 2, 3, 4, 7, 8, 15, 16, 10**6)] == [0, 1, 2, 2, 3, 3, 4, 4, 5, 5]


def test_reopen_checks_format_version(db):
    manifest = json.loads((db.path / "manifest.json").read_text())
    manifest["format_version"] = 99
    (db.path / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(TrackstarError, match="format version 99"):
        connect(db.path)


def test_connect_refuses_non_database(tmp_path):
    with pytest.raises(TrackstarError, match="not a trackstar-db database"):
        connect(tmp_path)
    with pytest.raises(TrackstarError, match="no such database"):
        connect(tmp_path / "absent")
