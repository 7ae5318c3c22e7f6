"""Plant contradictions in a generated fact world: some sentences state a fact with the wrong
object, so each one disagrees with the other sentences of its fact. Self-influence
(selection/self_influence.py) should rank them at the top; benchmarks/bench_select.py measures it.

`plant_contradictions(world, n, seed)` rewrites world.sentences_path in place: it picks n
sentences of distinct facts stated at least `min_count` times (so the truth is the majority),
swaps the object for another object of the same relation, drops the sentence's fact
annotation on both sides (it no longer states the fact) and returns the ids of the planted sentences.
"""

from __future__ import annotations

import json
import random
import re

from .world import WorldFiles, _write_jsonl


def plant_contradictions(world: WorldFiles, n: int, seed: int = 0, min_count: int = 4) -> list[str]:
    facts = [json.loads(line) for line in world.facts_path.read_text(encoding="utf-8").splitlines()]
    sentences = [json.loads(line) for line in world.sentences_path.read_text(encoding="utf-8").splitlines()]
    objects: dict[str, list[str]] = {}
    for fact in facts:
        objects.setdefault(fact["relation"], [])
        if fact["entity1"] not in objects[fact["relation"]]:
            objects[fact["relation"]].append(fact["entity1"])
    by_id = {s["sentence_id"]: s for s in sentences}
    rng = random.Random(seed)
    candidates = [f for f in facts if len(f["trex_sentences"]) >= min_count and len(objects[f["relation"]]) > 1]
    if len(candidates) < n:
        raise ValueError(f"plant_contradictions: {len(candidates)} facts stated >= {min_count} times, asked for {n}")
    planted = []
    for fact in rng.sample(candidates, n):
        sentence = by_id[rng.choice(fact["trex_sentences"])]
        wrong = rng.choice([o for o in objects[fact["relation"]] if o != fact["entity1"]])
        sentence["text"] = re.sub(rf"\b{re.escape(fact['entity1'])}\b", wrong, sentence["text"])
        sentence["fact_triples"] = []
        fact["trex_sentences"].remove(sentence["sentence_id"])
        planted.append(sentence["sentence_id"])
    _write_jsonl(world.sentences_path, sentences)
    _write_jsonl(world.facts_path, facts)
    return planted
