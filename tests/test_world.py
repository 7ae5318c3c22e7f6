"""The generated fact world: determinism, release format, frequencies, annotations, prompts."""

from __future__ import annotations

import json
import re
from collections import defaultdict

import pytest

from trackstar_db.sources.facts import frequency_bucket
from trackstar_db.testbed.world import (
    PROMPT_OPENERS,
    RELATIONS,
    WorldSpec,
    generate_world,
)

FACT_FIELDS = {"fact_id": str, "kilt_id": str, "entity0": str, "relation": str, "entity1": str,
               "entity0_uri": str, "predicate_uri": str, "entity1_uri": str, "entity0_alias": list,
               "entity1_alias": list, "trex_sentences": list, "c4_frequency": int, "is_repetition": bool,
               "prompt0": str, "prompt1": str, "prompt2": str}
SENTENCE_FIELDS = {"sentence_id": str, "text": str, "abstract_uri": str, "sent_idx_in_abst": int,
                   "fact_triples": list}


def _read(path):
    return [json.loads(line) for line in open(path, encoding="utf-8")]


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    files = generate_world(tmp_path_factory.mktemp("world"), seed=0, size="tiny")
    return files, _read(files.facts_path), _read(files.sentences_path)


def test_same_seed_same_bytes_other_seed_differs(tmp_path, world):
    files = world[0]
    again = generate_world(tmp_path / "again", seed=0, size="tiny")
    other = generate_world(tmp_path / "other", seed=1, size="tiny")
    assert again.facts_path.read_bytes() == files.facts_path.read_bytes()
    assert again.sentences_path.read_bytes() == files.sentences_path.read_bytes()
    assert other.facts_path.read_bytes() != files.facts_path.read_bytes()
    assert other.sentences_path.read_bytes() != files.sentences_path.read_bytes()


def test_release_format_fields_and_types(world):
    _, facts, sentences = world
    for fields, rows in ((FACT_FIELDS, facts), (SENTENCE_FIELDS, sentences)):
        for row in rows:
            assert set(row) == set(fields)
            for name, kind in fields.items():
                assert isinstance(row[name], kind), (name, row[name])
    for fact in facts:
        assert all(isinstance(a, str) for a in fact["entity0_alias"] + fact["entity1_alias"])
    for sentence in sentences:
        assert all(isinstance(t, list) and len(t) == 3 and all(isinstance(u, str) for u in t)
                   for t in sentence["fact_triples"])
    assert len({f["fact_id"] for f in facts}) == len(facts)
    assert len({s["sentence_id"] for s in sentences}) == len(sentences)
    assert len({f["relation"] for f in facts}) >= 5


def test_abstracts_number_their_sentences(world):
    by_abstract = defaultdict(list)
    for sentence in world[2]:
        by_abstract[sentence["abstract_uri"]].append(sentence["sent_idx_in_abst"])
    assert all(sorted(idx) == list(range(len(idx))) for idx in by_abstract.values())


def test_frequencies_hit_every_bucket(world):
    buckets = {frequency_bucket(f["c4_frequency"]) for f in world[1]}
    assert {1, 2, 3, 4, 5} <= buckets


def test_frequency_and_sentence_lists_match_annotations(world):
    _, facts, sentences = world
    holders = defaultdict(list)
    for sentence in sentences:
        for triple in sentence["fact_triples"]:
            holders[tuple(triple)].append(sentence["sentence_id"])
    keys = set()
    for fact in facts:
        key = (fact["entity0_uri"], fact["predicate_uri"], fact["entity1_uri"])
        keys.add(key)
        assert fact["trex_sentences"] == holders.get(key, [])
        assert fact["c4_frequency"] == len(holders.get(key, []))
    assert set(holders) <= keys  # every annotation names a fact of the file


def test_annotated_sentences_name_both_entities(world):
    _, facts, sentences = world
    by_key = {(f["entity0_uri"], f["predicate_uri"], f["entity1_uri"]): f for f in facts}
    uses_alias = 0
    for sentence in sentences:
        for triple in sentence["fact_triples"]:
            fact = by_key[tuple(triple)]
            words = set(re.findall(r"\w+", sentence["text"]))
            assert fact["entity1"] in words
            assert {fact["entity0"], *fact["entity0_alias"]} & words
            uses_alias += fact["entity0"] not in words
    assert uses_alias > 0


def test_prompt_templates_absent_from_corpus(world):
    _, facts, sentences = world
    texts = [s["text"] for s in sentences]
    for fact in facts:
        for name in ("prompt0", "prompt1", "prompt2"):
            assert not any(fact[name] in text for text in texts), fact[name]
    patterns = []
    for *_, cues in RELATIONS:
        for opener, cue in zip(PROMPT_OPENERS, cues):
            patterns.append(re.compile(re.escape(f"{opener} {cue}").replace(re.escape("{s}"), r"\w+")))
    assert not any(p.search(text) for p in patterns for text in texts)


def test_prompt0_cue_precedes_the_object_in_the_corpus(world):
    """prompt0 minus its opener, then the object, is in a sentence stating the fact."""
    _, facts, sentences = world
    text = {s["sentence_id"]: s["text"].lower() for s in sentences}
    for fact in facts:
        cue = fact["prompt0"].removeprefix(PROMPT_OPENERS[0] + " ")
        assert cue != fact["prompt0"]
        stated = f"{cue} {fact['entity1']}".lower()
        if fact["trex_sentences"]:
            assert any(stated in text[i] for i in fact["trex_sentences"]), fact["prompt0"]


def test_distractors_share_entities_with_facts(world):
    _, facts, sentences = world
    subjects = {f["entity0"] for f in facts}
    objects = {f["entity1"] for f in facts}
    pairs = {(f["entity0"], f["entity1"]) for f in facts}
    distractors = [set(re.findall(r"\w+", s["text"])) for s in sentences if not s["fact_triples"]]
    assert distractors
    assert all(words & (subjects | objects) for words in distractors)
    assert any(words & subjects for words in distractors)
    assert any(words & objects and not words & subjects for words in distractors)
    assert any(any({a, b} <= words for a, b in pairs) for words in distractors)


def test_unknown_size_is_refused(tmp_path):
    with pytest.raises(ValueError, match="size"):
        generate_world(tmp_path, size="huge")


def test_spec_overrides_size(tmp_path):
    spec = WorldSpec(4, 3, 2, 2, 2, 2, max_frequency=16, zero_frequency_every=0)
    facts = _read(generate_world(tmp_path, seed=3, spec=spec).facts_path)
    assert len({f["entity0"] for f in facts if f["relation"] != "country"}) <= 4
    assert all(f["c4_frequency"] >= 1 for f in facts)
