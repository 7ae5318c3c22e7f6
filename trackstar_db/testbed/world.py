"""Generate a small synthetic fact world in the authors' T-REx release format.

Two JSON-lines files are written:

- `trex_facts.jsonl`: one fact per line (fact_id, kilt_id, entity0, relation, entity1, the three
  URIs, entity0_alias, entity1_alias, trex_sentences, c4_frequency, is_repetition, prompt0..2).
- `trex_sentences.jsonl`: the corpus (sentence_id, text, abstract_uri, sent_idx_in_abst,
  fact_triples as [entity0_uri, predicate_uri, entity1_uri] lists; empty for distractors).

Each fact is stated by 0, 1, 2-3, 4-7, 8-15 or 16+ corpus sentences (frequency buckets 0..5),
through several templates per relation, sometimes behind a discourse opener ("In fact, ...")
and sometimes naming the subject by its alias. Distractor sentences reuse the facts' entities
under other, unannotated predicates (same subject, or same object with another subject), so
lexical retrieval is not trivially perfect. Query prompts put a prompt-only opener in front of
a corpus cue ("As the records show, X was born in"): the openers occur in the corpus only on
distractors, so no prompt template occurs in the corpus, yet a model trained on it can answer; the target is entity1. All names are single
words. The output is a pure function of (seed, spec): same seed, same bytes.
"""

from __future__ import annotations

import json
import random
from dataclasses import dataclass
from pathlib import Path

from trackstar_db.sources.facts import BUCKET_BOUNDS

ENTITY_NS = "https://trackstar-db.invalid/entity/"
PREDICATE_NS = "http://www.wikidata.org/prop/direct/"

# Relation: (pid, label, subject kind, object kind, corpus templates, prompt cues).
# Prompt cue i completes prompt i; every cue is the stem of one corpus template.
RELATIONS = [
    ("P19", "place of birth", "person", "city",
     ["{s} was born in {o}.", "The birthplace of {s} is {o}.", "{s} is a native of {o}.",
      "{s} was born in {o} and grew up there.", "Born in {o}, {s} later moved abroad."],
     ["{s} was born in", "the birthplace of {s} is", "{s} is a native of"]),
    ("P27", "country of citizenship", "person", "country",
     ["{s} is a citizen of {o}.", "{s} holds a passport from {o}.", "The nationality of {s} is {o}.",
      "{o} is the home country of {s}."],
     ["{s} is a citizen of", "{s} holds a passport from", "the nationality of {s} is"]),
    ("P108", "employer", "person", "company",
     ["{s} works for {o}.", "{s} is employed by {o}.", "{s} took a job at {o}.",
      "{o} hired {s} as an engineer."],
     ["{s} works for", "{s} is employed by", "{s} took a job at"]),
    ("P103", "native language", "person", "language",
     ["The native language of {s} is {o}.", "{s} grew up speaking {o}.", "{s} speaks {o} natively.",
      "{s} learned {o} as a child."],
     ["the native language of {s} is", "{s} grew up speaking", "{s} speaks"]),
    ("P1303", "instrument", "person", "instrument",
     ["{s} plays the {o}.", "{s} is known for playing the {o}.", "{s} performs on the {o}.",
      "The {o} is the instrument of {s}."],
     ["{s} plays the", "{s} is known for playing the", "{s} performs on the"]),
    ("P17", "country", "city", "country",
     ["{s} is a city in {o}.", "{s} lies in {o}.", "{s} is located in {o}.",
      "The city of {s} is part of {o}."],
     ["{s} is a city in", "{s} lies in", "{s} is located in"]),
]
CORPUS_OPENERS = ["In fact,", "By all accounts,", "Famously,", "As many know,", "Indeed,"]
PROMPT_OPENERS = ["As the records show,", "According to the archive,", "We read that"]
# Distractors: (subject kind, object kind or None, template). Unannotated: they express no fact.
DISTRACTORS = [
    ("person", "city", "{s} visited {o} last year."), ("person", "city", "{s} once gave a talk in {o}."),
    ("person", "country", "{s} traveled across {o}."), ("person", "company", "{s} wrote a letter to {o}."),
    ("person", "company", "{s} met the founders of {o}."), ("person", "language", "{s} studied {o} at school."),
    ("person", "instrument", "{s} listened to the {o} at a concert."), ("city", "country", "{s} trades with {o}."),
    ("person", "person", "{s} is a friend of {o}."), ("person", None, "{s} is remembered by many."),
    ("city", None, "{s} has a busy harbor."), ("company", None, "{s} opened a new office."),
    ("country", None, "{s} has many rivers."), ("city", None, "{s} is an old city."),
    ("company", None, "{s} grew quickly."), ("person", None, "{s} wrote poems."),
]
INSTRUMENTS = ["violin", "cello", "flute", "oboe", "harp", "lute", "piano", "trumpet", "clarinet",
               "drums", "guitar", "banjo", "viola", "trombone", "organ", "bassoon"]
ALIAS_FORMS = {"person": None, "city": "{} City", "country": "the Republic of {}", "company": "{} Group",
               "language": "the {} language", "instrument": None}
_ONSETS = ["b", "d", "f", "g", "k", "l", "m", "n", "p", "r", "s", "t", "v", "z", "br", "dr", "kr", "st", "th", "sh"]
_VOWELS = ["a", "e", "i", "o", "u", "ai", "ei", "ou"]
_CODAS = ["", "", "n", "r", "l", "s", "th", "m"]
_SUFFIX = {"person": "", "city": "", "country": "ia", "company": "ex", "language": "ish", "instrument": ""}


@dataclass(frozen=True)
class WorldSpec:
    """How big the world is and how its corpus is written."""

    n_people: int
    n_cities: int
    n_countries: int
    n_companies: int
    n_languages: int
    n_instruments: int
    relations_per_person: tuple[int, int] = (2, 4)
    max_frequency: int = 32         # upper end of bucket 5 (16..max_frequency)
    zero_frequency_every: int = 20  # every n-th fact is never stated (frequency 0); 0 disables
    distractor_share: float = 0.25  # distractors / fact sentences
    opener_share: float = 0.5       # sentences behind an opener (a fact's first sentence never)
    alias_share: float = 0.15       # person-subject sentences naming the subject by its alias


SIZES = {
    "tiny": WorldSpec(12, 6, 4, 4, 3, 4, max_frequency=20),
    "demo": WorldSpec(160, 40, 12, 24, 10, 12),
}
# (low, high) corpus counts of each frequency bucket, from the bounds facts.py buckets by
_BUCKET_RANGES = {b: (low + 1, high) for b, (low, high) in
                  enumerate(zip((-1,) + BUCKET_BOUNDS, BUCKET_BOUNDS + (None,)))}


@dataclass(frozen=True)
class WorldFiles:
    facts_path: Path
    sentences_path: Path


@dataclass
class _Entity:
    name: str
    uri: str
    kind: str
    aliases: list[str]


def _word(rng: random.Random, syllables: int) -> str:
    return "".join(rng.choice(_ONSETS) + rng.choice(_VOWELS) for _ in range(syllables)) + rng.choice(_CODAS)


def _entities(rng: random.Random, spec: WorldSpec) -> dict[str, list[_Entity]]:
    """Pronounceable single-word names, unique across the world and distinct from template words."""
    reserved = {w.strip(".,{}").lower() for t in _all_template_text() for w in t.split()}
    taken: set[str] = set()

    def fresh(kind: str, syllables: int) -> str:
        while True:
            name = (_word(rng, syllables) + _SUFFIX[kind]).capitalize()
            if name.lower() not in taken and name.lower() not in reserved:
                taken.add(name.lower())
                return name

    counts = {"person": spec.n_people, "city": spec.n_cities, "country": spec.n_countries,
              "company": spec.n_companies, "language": spec.n_languages}
    world: dict[str, list[_Entity]] = {}
    serial = iter(range(1000, 10**7))
    for kind, n in counts.items():
        world[kind] = []
        for _ in range(n):
            name = fresh(kind, 3 if kind == "person" else 2)
            form = ALIAS_FORMS[kind]
            aliases = [fresh(kind, 2)] if form is None else [form.format(name)]
            world[kind].append(_Entity(name, f"{ENTITY_NS}Q{next(serial)}", kind, aliases))
    if spec.n_instruments > len(INSTRUMENTS):
        raise ValueError(f"n_instruments={spec.n_instruments}: at most {len(INSTRUMENTS)}")
    world["instrument"] = [_Entity(n, f"{ENTITY_NS}Q{next(serial)}", "instrument", [])
                           for n in INSTRUMENTS[: spec.n_instruments]]
    return world


def _all_template_text() -> list[str]:
    texts = CORPUS_OPENERS + PROMPT_OPENERS + [t for *_, d in DISTRACTORS for t in [d]]
    for *_, templates, cues in RELATIONS:
        texts += templates + cues
    return texts


def _frequency(rng: random.Random, bucket: int, spec: WorldSpec) -> int:
    low, high = _BUCKET_RANGES[bucket]
    return rng.randint(low, spec.max_frequency if high is None else high)


def _with_opener(template: str, opener: str | None) -> str:
    if opener is None:
        return template
    return f"{opener} {template[0].lower() + template[1:] if template[0] != '{' else template}"


def _facts(rng: random.Random, world: dict[str, list[_Entity]], spec: WorldSpec) -> list[dict]:
    """Fact triples with their prompts and a target corpus frequency (key '_count')."""
    triples = []
    person_relations = [r for r in RELATIONS if r[2] == "person"]
    for person in world["person"]:
        k = rng.randint(*spec.relations_per_person)
        for rel in sorted(rng.sample(person_relations, min(k, len(person_relations))), key=RELATIONS.index):
            triples.append((person, rel, rng.choice(world[rel[3]])))
    for rel in (r for r in RELATIONS if r[2] != "person"):
        for subject in world[rel[2]]:
            triples.append((subject, rel, rng.choice(world[rel[3]])))
    order = list(range(len(triples)))
    rng.shuffle(order)  # buckets round-robin over a shuffled order: every bucket is hit
    every = spec.zero_frequency_every
    zero = {index for rank, index in enumerate(order) if every and rank % every == every - 1}
    stated = [index for index in order if index not in zero]
    buckets = {index: 1 + rank % 5 for rank, index in enumerate(stated)} | dict.fromkeys(zero, 0)
    facts = []
    for index, (s, (pid, label, _, _, _, cues), o) in enumerate(triples):
        prompts = {f"prompt{i}": f"{PROMPT_OPENERS[i]} {cue.format(s=s.name)}" for i, cue in enumerate(cues)}
        facts.append({
            "fact_id": f"F{index:05d}", "kilt_id": f"demo-kilt-{index:05d}",
            "entity0": s.name, "relation": label, "entity1": o.name,
            "entity0_uri": s.uri, "predicate_uri": PREDICATE_NS + pid, "entity1_uri": o.uri,
            "entity0_alias": list(s.aliases), "entity1_alias": list(o.aliases),
            "trex_sentences": [], "c4_frequency": 0,
            "is_repetition": s.name.lower() in o.name.lower() or o.name.lower() in s.name.lower(),
            **prompts, "_count": _frequency(rng, buckets[index], spec), "_pid": pid, "_s": s, "_o": o,
        })
    return facts


def _fact_sentences(rng: random.Random, fact: dict, spec: WorldSpec) -> list[tuple[str, list]]:
    """`_count` sentences stating the fact: templates in turn, then random openers and aliases."""
    templates = next(r[4] for r in RELATIONS if r[0] == fact["_pid"])
    subject = fact["_s"]
    # The first sentence states the fact plainly with prompt0's cue (templates[0]), so every
    # stated fact can be answered from prompt0; the other templates follow in a random order.
    order = templates[:1] + rng.sample(templates[1:], len(templates) - 1)
    triple = [fact["entity0_uri"], fact["predicate_uri"], fact["entity1_uri"]]
    out = []
    for i in range(fact["_count"]):
        opener = rng.choice(CORPUS_OPENERS) if i and rng.random() < spec.opener_share else None
        use_alias = i and subject.kind == "person" and rng.random() < spec.alias_share
        name = subject.aliases[0] if use_alias else subject.name
        out.append((_with_opener(order[i % len(order)], opener).format(s=name, o=fact["entity1"]), [triple]))
    return out


def _distractors(rng: random.Random, world: dict[str, list[_Entity]], facts: list[dict], n: int,
                 spec: WorldSpec) -> list[tuple[str, list]]:
    """Unannotated sentences that share an entity with a fact, under another predicate.

    Modes: the fact's subject with another object, the fact's object with another subject, or
    both of the fact's entities (a hard negative for lexical retrieval). Some get an opener,
    the prompt openers included: those precede entities in the corpus, never a fact's cue.
    """
    out = []
    while len(out) < n:
        fact = rng.choice(facts)
        s, o = fact["_s"], fact["_o"]
        mode = rng.choices(["subject", "object", "both"], weights=[0.45, 0.45, 0.1])[0]
        if mode == "subject":
            options = [d for d in DISTRACTORS if d[0] == s.kind]
        elif mode == "object":
            options = [d for d in DISTRACTORS if d[1] == o.kind or (d[1] is None and d[0] == o.kind)]
        else:
            options = [d for d in DISTRACTORS if d[0] == s.kind and d[1] == o.kind]
        if not options:
            continue
        s_kind, o_kind, template = rng.choice(options)
        if mode == "object" and o_kind is None:
            pick_s = pick_o = o
        else:
            pick_s = s if mode != "object" else rng.choice([e for e in world[s_kind] if e is not s])
            pick_o = o if mode != "subject" else rng.choice(world[o_kind]) if o_kind else pick_s
        if o_kind is not None and pick_o is pick_s:
            continue
        opener = rng.choice(CORPUS_OPENERS + PROMPT_OPENERS) if rng.random() < spec.opener_share else None
        out.append((_with_opener(template, opener).format(s=pick_s.name, o=pick_o.name), []))
    return out


def generate_world(out_dir: str | Path, seed: int = 0, size: str = "demo",
                   spec: WorldSpec | None = None) -> WorldFiles:
    """Write trex_facts.jsonl and trex_sentences.jsonl under `out_dir`.

    `size` picks a preset from SIZES ('tiny': a few hundred sentences for tests; 'demo': about
    six thousand); `spec` overrides it.
    """
    if spec is None:
        if size not in SIZES:
            raise ValueError(f"size={size!r}: expected one of {sorted(SIZES)}")
        spec = SIZES[size]
    rng = random.Random(seed)
    world = _entities(rng, spec)
    facts = _facts(rng, world, spec)
    sentences = [s for fact in facts for s in _fact_sentences(rng, fact, spec)]
    sentences += _distractors(rng, world, facts, round(spec.distractor_share * len(sentences)), spec)
    rng.shuffle(sentences)

    by_key = {(f["entity0_uri"], f["predicate_uri"], f["entity1_uri"]): f for f in facts}
    records, index, abstract = [], 0, 0
    while index < len(sentences):
        length = rng.randint(3, 8)
        for position, (text, triples) in enumerate(sentences[index: index + length]):
            sentence_id = f"S{index + position:06d}"
            records.append({"sentence_id": sentence_id, "text": text,
                            "abstract_uri": f"{ENTITY_NS}abstract/A{abstract:05d}",
                            "sent_idx_in_abst": position, "fact_triples": triples})
            for triple in triples:
                by_key[tuple(triple)]["trex_sentences"].append(sentence_id)
        index, abstract = index + length, abstract + 1
    for fact in facts:
        fact["c4_frequency"] = len(fact["trex_sentences"])

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    files = WorldFiles(out / "trex_facts.jsonl", out / "trex_sentences.jsonl")
    _write_jsonl(files.facts_path, [{k: v for k, v in f.items() if not k.startswith("_")} for f in facts])
    _write_jsonl(files.sentences_path, records)
    return files


def _write_jsonl(path: Path, rows: list[dict]) -> None:
    with open(path, "w", encoding="utf-8") as handle:
        for row in rows:
            handle.write(json.dumps(row, ensure_ascii=False) + "\n")
