"""Evidence on each hit of a one-prompt query: does it state the answer, does it move the model?

Text evidence (cheap, every hit; `text_evidence`), on word tokens (lower-cased \\w+ runs, the
words BM25 indexes):
    bm25         the hit's BM25 score for prompt + target (0 when it shares no word)
    has_target   the target's words occur in the hit, contiguously
    has_subject  the subject's words do (the subject of the stored fact whose query has this
                 prompt and target; NULL when no stored query matches)
    shared_span  length of the longest run of words the hit shares verbatim with prompt + target
    states_it    has_target and has_subject where the subject is known, else has_target and
                 shared_span >= STATES_SPAN

Influence evidence (`verify`, proponents only, on request): the tail-patch effect measured on
the spot by tailpatch.TailPatcher, the code path of stored tail-patch runs:
    delta_p      P(target | prompt) after one optimizer step on the hit, minus before
    verify_ms    what measuring it cost
    baseline_delta_p  the median delta_p of steps on BASELINE_EXAMPLES examples drawn at random
                 from the corpus (seeded by prompt and target): what any step does to P(target)
                 (an optimizer step keeps its momentum, so even an unrelated example moves it)
    moves_model  delta_p - baseline_delta_p >= MOVES_MIN (NULL when not verified)

label: 'both', 'states it', 'moves the model' or 'neither' when verified; without --verify,
'states it (not verified)' or 'not verified'.
"""

from __future__ import annotations

import hashlib
import re
import statistics
import time

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

STATES_SPAN = 3      # words shared verbatim with prompt + target that count as stating it
MOVES_MIN = 1e-3     # delta P(target) above the random-step baseline (0.1 percentage point) that moves the model
BASELINE_EXAMPLES = 8
_WORD = re.compile(r"\w+", re.UNICODE)


def words(text: str) -> list[str]:
    return _WORD.findall((text or "").lower())


def contains(haystack: list[str], needle: list[str]) -> bool:
    """Whether `needle` occurs contiguously in `haystack` (both word lists); False for an empty needle."""
    n = len(needle)
    return n > 0 and any(haystack[i:i + n] == needle for i in range(len(haystack) - n + 1))


def longest_shared_span(a: list[str], b: list[str]) -> int:
    """Length of the longest contiguous run of words common to `a` and `b` (dynamic programming)."""
    best, previous = 0, [0] * (len(b) + 1)
    for word in a:
        current = [0] * (len(b) + 1)
        for j, other in enumerate(b, 1):
            if word == other:
                current[j] = previous[j - 1] + 1
                best = max(best, current[j])
        previous = current
    return best


def subject_of(db, prompt: str, target: str) -> str | None:
    """The subject of the stored fact whose query is exactly (prompt, target), else None."""
    if db.count("queries") == 0 or db.count("facts") == 0:
        return None
    rows = db.table("queries", columns=["fact_id"], filter=(pc.field("prompt") == prompt)
                    & (pc.field("target") == target) & pc.field("fact_id").is_valid())
    if rows.num_rows == 0:
        return None
    facts = db.table("facts", columns=["subject"], filter=pc.field("fact_id") == rows.column("fact_id")[0].as_py())
    return facts.column("subject")[0].as_py() if facts.num_rows else None


def text_evidence(prompt: str, target: str, texts: list[str], subject: str | None = None,
                  bm25: list[float] | None = None) -> dict[str, list]:
    """The text columns for hits with `texts` (bm25: their scores, if known)."""
    query, target_words = words(f"{prompt} {target}"), words(target)
    subject_words = words(subject) if subject else None
    out = {"bm25": bm25 if bm25 is not None else [None] * len(texts), "has_target": [], "has_subject": [],
           "shared_span": [], "states_it": []}
    for text in texts:
        hit = words(text)
        has_target = contains(hit, target_words)
        has_subject = None if subject_words is None else contains(hit, subject_words)
        span = longest_shared_span(hit, query)
        out["has_target"].append(has_target)
        out["has_subject"].append(has_subject)
        out["shared_span"].append(span)
        out["states_it"].append(has_target and (has_subject if has_subject is not None else span >= STATES_SPAN))
    return out


def label(states_it: bool, moves_model: bool | None) -> str:
    if moves_model is None:
        return "states it (not verified)" if states_it else "not verified"
    return {(True, True): "both", (True, False): "states it", (False, True): "moves the model",
            (False, False): "neither"}[(bool(states_it), bool(moves_model))]


def verify(patcher, prompt: str, target: str, hits: list[tuple[str, str]]) -> list[tuple[float, float]]:
    """(delta_p, milliseconds) of each (example_id, text) in `hits`, measured one at a time by
    `patcher` (tailpatch.TailPatcher: the same step and measurement as stored tail-patch; it
    caches per (prompt and target, example), so a repeated hit costs nothing)."""
    query_id = "adhoc:" + hashlib.sha1(f"{prompt}\x00{target}".encode()).hexdigest()
    patcher.run({"verify": [(query_id, prompt, target, [])]})  # P(target) before, measured once
    out = []
    for example_id, text in hits:
        started = time.perf_counter()
        rows = patcher.run({"verify": [(query_id, prompt, target, [(1, example_id, text)])]})
        row = rows.to_pylist()[0]
        out.append((row["p_after"] - row["p_before"], 1000 * (time.perf_counter() - started)))
    return out


def baseline_examples(db, prompt: str, target: str, n: int = BASELINE_EXAMPLES) -> list[tuple[str, str]]:
    """n (example_id, text) drawn at random from the corpus, the same for the same prompt and target."""
    ids = sorted(db.table("examples", columns=["example_id"]).column("example_id").to_pylist())
    seed = int.from_bytes(hashlib.sha1(f"{prompt}\x00{target}".encode()).digest()[:8], "little")
    picked = sorted(np.random.default_rng(seed).choice(len(ids), min(n, len(ids)), replace=False).tolist())
    rows = db.table("examples", columns=["example_id", "text"], filter=pc.field("example_id").isin([ids[i] for i in picked]))
    return sorted(zip(rows.column("example_id").to_pylist(), rows.column("text").to_pylist()))


def _baseline(db, patcher, prompt: str, target: str) -> float:
    return statistics.median(d for d, _ in verify(patcher, prompt, target, baseline_examples(db, prompt, target)))


def with_evidence(db, prompt: str, target: str, rows: pa.Table, patcher=None) -> pa.Table:
    """`rows` (a query's answer: kind, rank, example_id, text, ...) with the evidence columns;
    `patcher` given: its proponents are verified (delta_p, verify_ms, baseline_delta_p, moves_model)."""
    from trackstar_db.store.bm25 import BM25Index  # heavy: tantivy

    ids, texts = rows.column("example_id").to_pylist(), rows.column("text").to_pylist()
    bm25 = None
    if (db.path / "bm25" / "meta.json").is_file():
        by_id = BM25Index.reader(db).scores_of(f"{prompt} {target}", sorted(set(ids)))
        bm25 = [by_id[i] for i in ids]
    columns = text_evidence(prompt, target, texts, subject_of(db, prompt, target), bm25)
    delta, cost = [None] * len(ids), [None] * len(ids)
    if patcher is not None:
        at = [i for i, kind in enumerate(rows.column("kind").to_pylist()) if kind == "proponent"]
        measured = verify(patcher, prompt, target, [(ids[i], texts[i] or "") for i in at])
        for i, (d, ms) in zip(at, measured):
            delta[i], cost[i] = d, ms
    baseline = _baseline(db, patcher, prompt, target) if patcher is not None else None
    moves = [None if d is None else d - baseline >= MOVES_MIN for d in delta]
    types = {"bm25": pa.float64(), "has_target": pa.bool_(), "has_subject": pa.bool_(), "shared_span": pa.int32(),
             "states_it": pa.bool_()}
    for name, kind in types.items():
        rows = rows.append_column(name, pa.array(columns[name], kind))
    rows = rows.append_column("delta_p", pa.array(delta, pa.float64()))
    rows = rows.append_column("verify_ms", pa.array(cost, pa.float64()))
    rows = rows.append_column("baseline_delta_p", pa.array([baseline] * len(ids), pa.float64()))
    rows = rows.append_column("moves_model", pa.array(moves, pa.bool_()))
    return rows.append_column("label", pa.array([label(s, m) for s, m in zip(columns["states_it"], moves)], pa.string()))


def evidence_line(row: dict) -> str:
    """One line of a hit's evidence for the terminal (`trackstar-db query`)."""
    parts = [f"[{row['label']}]"]
    if row.get("bm25") is not None:
        parts.append(f"bm25 {row['bm25']:.2f}")
    parts.append(f"target {'yes' if row['has_target'] else 'no'}")
    if row.get("has_subject") is not None:
        parts.append(f"subject {'yes' if row['has_subject'] else 'no'}")
    parts.append(f"shared span {row['shared_span']} words")
    if row.get("delta_p") is not None:
        parts.append(f"tail-patch dP {100 * row['delta_p']:+.3f} pp vs {100 * row['baseline_delta_p']:+.3f} pp for "
                     f"a random example ({row['verify_ms']:.0f} ms)")
    return " · ".join(parts)
