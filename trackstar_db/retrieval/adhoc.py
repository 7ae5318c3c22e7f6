"""One prompt and target, attributed on the fly (`trackstar-db query`, `Database.query`).

The query's gradient is computed by the same featurizer as the stored ones and scored by the
same runner as stored runs (retrieval/runners.py). The answer is an Arrow table with columns
kind ('proponent' | 'opponent'), rank, example_id, score, method, text, and the evidence columns
of retrieval/evidence.py (bm25, has_target, has_subject, shared_span, states_it, delta_p,
verify_ms, moves_model, label; delta_p measured only with verify).

Contrastive queries (`control_target`): the query vector is the gradient of loss(target) -
loss(control), i.e. grad(loss_target) - grad(loss_control), both featurized in one batch (the
featurizer is linear in the gradient: correction and projection are linear maps); proponents then
make the target more likely relative to the control. Gradient methods only; the evidence columns
describe the target.

With no method given, the best rung the database can serve answers (runners.best_method:
trackstar with a task R, else r-train, else opt-cos, else grad-cos); the table's `method` column
says which.

Many queries at once (`PromptAttributor.attribute_many`, the server's batches): one featurize
call per gradient variant for all their query gradients, one scan (or ANN search) per method for
all its queries (a second stage: one re-scoring pass over their candidates), each answer the one
attribute() gives alone. Every hit's text comes from the
examples of the handle's read view (a pinned version, a server's snapshot); a hit on an example
outside it (a BM25 index newer than the view) gives way to the next one.
"""

from __future__ import annotations

from dataclasses import dataclass

import pyarrow as pa
import pyarrow.compute as pc
import torch

from trackstar_db import defaults
from trackstar_db.devices import resolve_device
from trackstar_db.errors import ParameterError, TrackstarError
from trackstar_db.featurizer.tokenize import collate, pad_id
from trackstar_db.gradients.loader import database_featurizer, stored_config
from trackstar_db.ladder import LADDER, lookup
from trackstar_db.models.cache import ModelKey
from trackstar_db.option_checks import K, K_MAX, TEXT, check
from trackstar_db.tailpatch.runs import load_patcher, stored_spans

from . import embedding, runners
from .evidence import with_evidence

ANSWER_COLUMNS = ["kind", "rank", "example_id", "score", "method"]  # then text and the evidence columns
FIRST_STAGE_COLUMNS = ("first_score", "first_rank", "first_method")  # a second stage's answer keeps its first
GRADIENT_BATCH = 16  # query gradients featurized in one call by attribute_many


class PromptAttributor:
    """Answers one-prompt queries for a database. It holds no model itself: the featurizers and
    the tail-patcher it uses are the handle's warm ones (`db.models`, models/cache.py), loaded by
    the first call that needs them (loading a checkpoint costs far more than featurizing one
    prompt) and shared with token contributions, the second stage and the server."""

    def __init__(self, db, device: str = "cpu"):
        self.db, self.device = db, resolve_device(device)  # resolved: the cache's keys name the device it is

    def featurizer(self, variant: str):
        """(Featurizer, tokenizer) making `variant` with the stored recipe (settings and model
        dtype), from the database's model source (gradients/loader.database_featurizer), warm in
        the handle's model cache under the manifest's model, settings, `variant` and the device."""
        config = stored_config(self.db)
        if config is None:
            raise TrackstarError(f"{self.db.path}: no gradients stored yet; run 'trackstar-db ingest gradients'")
        uncorrected = variant == "uncorrected" and config.correction != "none"
        return self.db.models.get(ModelKey.of(self.db.manifest, variant, self.device),
                                  lambda: database_featurizer(self.db, config, device=self.device,
                                                              uncorrected=uncorrected))

    def gradient(self, prompt: str, target: str, variant: str, control_target: str | None = None):
        """[1, d] raw query gradient of (prompt, target) in `variant`; with `control_target`, of
        loss(target) - loss(control_target) after the same prompt."""
        featurizer, tokenizer = self.featurizer(variant)
        targets = [target] if control_target is None else [target, control_target]
        items = [featurizer.task.encode_query(tokenizer, prompt, t, featurizer.config.max_length) for t in targets]
        vectors = featurizer.featurize(collate(items, pad_id(tokenizer))).vectors[variant]
        return vectors if control_target is None else vectors[:1] - vectors[1:2]

    def patcher(self):
        """The tail-patcher of `verify` (tailpatch/runs.load_patcher), warm in the handle's model
        cache; its loss spans are read from this handle's view (tailpatch/runs.stored_spans)."""
        patcher = self.db.models.get(ModelKey.of(self.db.manifest, "tail-patch", self.device),
                                     lambda: load_patcher(self.db, device=self.device))
        patcher.spans = stored_spans(self.db, patcher.task)  # a server's next snapshot reuses the patcher
        return patcher

    def attribute(self, prompt: str, target: str, method: str | None = None, k: int = defaults.K_QUERY, ann=None,
                  verify: bool = False, rerank: str | None = None, candidates: int = defaults.CANDIDATES,
                  control_target: str | None = None) -> pa.Table:
        """Proponents (and opponents, for gradient methods) of `target` given `prompt`, with texts
        and evidence (retrieval/evidence.py); `verify`: each proponent's tail-patch effect measured
        now; `ann` (retrieval.ann.AnnOptions): from the method's ANN index instead of the exact scan;
        `rerank` ('kfac' | 'ekfac'): the method's top `candidates` re-scored through the Kronecker
        factors (retrieval/rerank.py; columns first_score, first_rank, first_method added);
        `control_target`: attribute loss(target) - loss(control_target) (module docstring)."""
        db = self.db
        entry, rerank = self._entry(prompt, target, method, k, rerank)
        if control_target is not None:
            if not isinstance(control_target, str) or not control_target.strip() or control_target == target:
                raise ParameterError("control_target", "must be non-empty and differ from target")
            if entry.spec is None:
                raise ParameterError("control_target", f"needs a gradient method (a difference of loss gradients), "
                                                       f"not {entry.name}")
            if rerank is not None:
                raise ParameterError("control_target", f"is not re-scored by the {rerank} second stage; "
                                                       "drop rerank or the control")
        fetch = k
        while True:  # hits on examples outside this read view (a BM25 index newer than it) give way
            vectors = (self.gradient(prompt, target, entry.spec.table, control_target)
                       if entry.spec is not None else None)
            request = runners.Request(["adhoc"], [embedding.query_text(prompt, target)], fetch, self.device,
                                      query_vectors=vectors, ann=ann, pairs=[(prompt, target)], rerank=rerank,
                                      candidates=candidates)
            result = runners.run(db, entry, request)
            rows = result.to_arrow(["adhoc"], "adhoc", rerank or entry.name)
            rows = rows.select(ANSWER_COLUMNS)
            if hasattr(result, "annotate"):  # the second stage: the first stage's score and rank beside
                rows = result.annotate(rows)
            rows, missing = _with_texts(db, rows, k)
            if min(K_MAX, k + missing) <= fetch:  # k hits left after the drop (or none more to ask for)
                break
            fetch = min(K_MAX, k + missing)

        return with_evidence(db, prompt, target, rows, self.patcher() if verify else None)

    def _entry(self, prompt: str, target: str, method: str | None, k: int, rerank: str | None = None):
        """(the registry entry answering a one-prompt query, the second stage or None), after its
        checks (ParameterError names the parameter; the rules are option_checks': K, TEXT).
        A second-stage method (kfac, ekfac) answers as the best rung's candidates re-scored."""
        for name, text in (("prompt", prompt), ("target", target)):
            problem = TEXT.problem(text)
            if problem:
                raise ParameterError(name, problem)
        check("k", K, k)
        if self.db.count("examples") == 0:
            raise TrackstarError(f"{self.db.path}: the database has no examples")
        entry, rerank = runners.stages(self.db, lookup(method or runners.best_method(self.db)), rerank)
        if not entry.serves_prompt:
            raise TrackstarError(entry.refuses_prompt)
        return entry, rerank

    def gradients(self, pairs: list[tuple[str, str]], variant: str) -> torch.Tensor:
        """[n, d] raw query gradients of (prompt, target) pairs in `variant`, featurized together
        (GRADIENT_BATCH at a time; each row is gradient()'s up to float rounding)."""
        featurizer, tokenizer = self.featurizer(variant)
        parts = []
        for start in range(0, len(pairs), GRADIENT_BATCH):
            items = [featurizer.task.encode_query(tokenizer, prompt, target, featurizer.config.max_length)
                     for prompt, target in pairs[start: start + GRADIENT_BATCH]]
            parts.append(featurizer.featurize(collate(items, pad_id(tokenizer))).vectors[variant])
        return torch.cat(parts)

    def attribute_many(self, asks: list["Ask"]) -> list:
        """attribute() of each ask, the model and the stored vectors visited once for all: one
        featurize call per gradient variant for every query gradient, then per method (and ANN
        setting) one scan or ANN search of all its queries with the largest k, each query's rows
        cut to its own k (the exact top-k of k is the first k of a larger one: ties break by
        position). Answers equal attribute()'s, scores up to float rounding of the batched
        products. A refused ask gets its TrackstarError in its place; the others are answered. The
        second stage (kfac, ekfac) re-scores the candidates of all its asks of one k in one pass
        (retrieval/rerank.py featurizes their union once); a contrastive ask is answered alone."""
        db = self.db
        out: list = [None] * len(asks)
        entries, seconds, groups, alone = {}, {}, {}, set()
        for i, ask in enumerate(asks):
            try:
                entries[i], seconds[i] = self._entry(ask.prompt, ask.target, ask.method, ask.k)
                if ask.control_target is not None:  # a contrast featurizes two targets: answered alone
                    del entries[i]
                    alone.add(i)
                    out[i] = self.attribute(ask.prompt, ask.target, ask.method, ask.k, ask.ann, ask.verify,
                                            control_target=ask.control_target)
                    continue
            except TrackstarError as exc:
                out[i] = exc
                continue
            # a second stage's candidates follow max(k, candidates): its asks share a pass per k
            key = (entries[i].name, repr(ask.ann), seconds[i], ask.k if seconds[i] else None)
            groups.setdefault(key, []).append(i)
        wanted: dict[str, dict] = {}  # variant -> {(prompt, target): row}
        for i, entry in entries.items():
            if entry.spec is not None:
                wanted.setdefault(entry.spec.table, {}).setdefault((asks[i].prompt, asks[i].target), None)
        vectors: dict[tuple, torch.Tensor] = {}
        for variant, pairs in wanted.items():
            try:
                rows = self.gradients(list(pairs), variant)
            except TrackstarError as exc:
                for i, entry in entries.items():
                    if entry.spec is not None and entry.spec.table == variant:
                        out[i] = exc
                continue
            vectors.update({(variant, *pair): rows[n] for n, pair in enumerate(pairs)})
        for members in groups.values():
            members = [i for i in members if out[i] is None]
            if not members:
                continue
            entry, ids = entries[members[0]], [f"q{i}" for i in members]
            stacked = None
            if entry.spec is not None:
                stacked = torch.stack([vectors[(entry.spec.table, asks[i].prompt, asks[i].target)] for i in members])
            second = seconds[members[0]]
            request = runners.Request(ids, [embedding.query_text(asks[i].prompt, asks[i].target) for i in members],
                                      max(asks[i].k for i in members), self.device, query_vectors=stacked,
                                      ann=asks[members[0]].ann, pairs=[(asks[i].prompt, asks[i].target) for i in members],
                                      rerank=second)
            try:
                answer = runners.run(db, entry, request)
                result = answer.to_arrow(ids, "adhoc", second or entry.name)
                if hasattr(answer, "annotate"):  # the second stage: the first stage's score and rank beside
                    result = answer.annotate(result)
            except TrackstarError as exc:
                for i in members:
                    out[i] = exc
                continue
            for i in members:
                mine = result.filter((pc.field("query_id") == f"q{i}") & (pc.field("rank") <= asks[i].k))
                out[i] = mine.select(ANSWER_COLUMNS + [c for c in FIRST_STAGE_COLUMNS if c in mine.column_names])

        text_of = _texts(db, [i for n, rows in enumerate(out) if isinstance(rows, pa.Table) and n not in alone
                              for i in rows.column("example_id").to_pylist()])
        for i, ask in enumerate(asks):
            if isinstance(out[i], pa.Table) and i not in alone:
                try:
                    rows, missing = _with_texts(db, out[i], ask.k, text_of)
                    if missing:  # hits outside the read view: the lone path asks for more
                        out[i] = self.attribute(ask.prompt, ask.target, ask.method, ask.k, ask.ann, ask.verify)
                    else:
                        out[i] = with_evidence(db, ask.prompt, ask.target, rows, self.patcher() if ask.verify else None)
                except TrackstarError as exc:
                    out[i] = exc
        return out


@dataclass(frozen=True)
class Ask:
    """One one-prompt query of a batch (PromptAttributor.attribute_many): attribute()'s arguments."""

    prompt: str
    target: str
    method: str | None = None
    k: int = defaults.K_QUERY
    ann: object | None = None
    verify: bool = False
    control_target: str | None = None


def _texts(db, ids) -> dict[str, str]:
    """{example_id: text} of those of `ids` in db's read view (one filtered read)."""
    if not ids:
        return {}
    texts = db.table("examples", columns=["example_id", "text"], filter=pc.field("example_id").isin(sorted(set(ids))))
    return dict(zip(texts.column("example_id").to_pylist(), texts.column("text").to_pylist()))


def _with_texts(db, rows: pa.Table, k: int, text_of: dict[str, str] | None = None) -> tuple[pa.Table, int]:
    """`rows` with each hit's text from the examples of db's read view (a snapshot's pinned
    version; `text_of` when already read), hits on examples outside it dropped and the ranks
    closed up; and how many were dropped, for the caller to ask for that many more."""
    ids = rows.column("example_id").to_pylist()
    if text_of is None:
        text_of = _texts(db, ids)
    missing = sum(1 for i in ids if i not in text_of)
    if missing:
        keep = pa.array([i in text_of for i in ids])
        rows = rows.filter(keep)
        ranks, seen = [], {}
        for kind in rows.column("kind").to_pylist():  # rows are by kind, best first
            seen[kind] = seen.get(kind, 0) + 1
            ranks.append(seen[kind])
        at = rows.schema.get_field_index("rank")
        rows = rows.set_column(at, "rank", pa.array(ranks, rows.schema.field(at).type))
        rows = rows.filter(pc.field("rank") <= k)
        ids = rows.column("example_id").to_pylist()
    rows = rows.append_column("text", pa.array([text_of.get(i) for i in ids], pa.string()))
    return rows, missing


__all__ = ["Ask", "PromptAttributor", "LADDER"]
