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

With no method given, the best rung the database can serve answers: trackstar with a task R,
else r-train, else opt-cos, else grad-cos; the table's `method` column says which.
"""

from __future__ import annotations

import pyarrow as pa
import pyarrow.compute as pc

from trackstar_db import defaults
from trackstar_db.errors import ParameterError, TrackstarError
from trackstar_db.ladder import LADDER, METHODS, lookup

from . import embedding, runners

PREFERENCE = ("trackstar", "r-train", "opt-cos", "grad-cos")


def best_method(db) -> str:
    """The first rung of PREFERENCE whose tables and R this database holds."""
    fitted = db.manifest.get("preconditioners", {})
    for name in PREFERENCE:
        spec = METHODS[name]
        table = db.gradient_table("train", corrected=spec.table == "corrected")
        if not table.exists():
            continue
        if spec.preconditioner and table.preconditioner_key(spec.preconditioner) not in fitted:
            continue
        return name
    raise TrackstarError(f"{db.path}: no gradient method can answer yet; run 'trackstar-db ingest gradients {db.path}'")


class PromptAttributor:
    """Answers one-prompt queries for a database, keeping one featurizer per gradient variant
    loaded between calls (loading a checkpoint costs far more than featurizing one prompt)."""

    def __init__(self, db, device: str = "cpu"):
        self.db, self.device = db, device
        self._featurizers: dict[str, tuple] = {}  # variant -> (Featurizer, tokenizer)
        self._patcher = None  # tailpatch.TailPatcher for verify, made by the first verify

    def featurizer(self, variant: str):
        """(Featurizer, tokenizer) making `variant` with the stored recipe (settings and model
        dtype), from the database's model source (gradients/loader.database_featurizer)."""
        if variant not in self._featurizers:
            from trackstar_db.gradients.loader import database_featurizer, stored_config

            config = stored_config(self.db)
            if config is None:
                raise TrackstarError(f"{self.db.path}: no gradients stored yet; run 'trackstar-db ingest gradients'")
            uncorrected = variant == "uncorrected" and config.correction != "none"
            self._featurizers[variant] = database_featurizer(self.db, config, device=self.device,
                                                             uncorrected=uncorrected)
        return self._featurizers[variant]

    def gradient(self, prompt: str, target: str, variant: str, control_target: str | None = None):
        """[1, d] raw query gradient of (prompt, target) in `variant`; with `control_target`, of
        loss(target) - loss(control_target) after the same prompt."""
        from trackstar_db.featurizer.tokenize import collate, pad_id

        featurizer, tokenizer = self.featurizer(variant)
        targets = [target] if control_target is None else [target, control_target]
        items = [featurizer.task.encode_query(tokenizer, prompt, t, featurizer.config.max_length) for t in targets]
        vectors = featurizer.featurize(collate(items, pad_id(tokenizer))).vectors[variant]
        return vectors if control_target is None else vectors[:1] - vectors[1:2]

    def patcher(self):
        """The tail-patcher of `verify` (tailpatch/runs.load_patcher), loaded once."""
        if self._patcher is None:
            from trackstar_db.tailpatch.runs import load_patcher

            self._patcher = load_patcher(self.db, device=self.device)
        return self._patcher

    def attribute(self, prompt: str, target: str, method: str | None = None, k: int = defaults.K_QUERY, ann=None,
                  verify: bool = False, control_target: str | None = None) -> pa.Table:
        """Proponents (and opponents, for gradient methods) of `target` given `prompt`, with texts
        and evidence (retrieval/evidence.py); `verify`: each proponent's tail-patch effect measured
        now; `ann` (retrieval.ann.AnnOptions): from the method's ANN index instead of the exact scan;
        `control_target`: attribute loss(target) - loss(control_target) (module docstring)."""
        db = self.db
        if not prompt.strip() or not target.strip():
            raise ParameterError("prompt" if not prompt.strip() else "target", "must be non-empty")
        if control_target is not None and (not control_target.strip() or control_target == target):
            raise ParameterError("control_target", "must be non-empty and differ from target")
        from trackstar_db.option_checks import K_MAX, count

        count("k", k, 1, K_MAX)
        if db.count("examples") == 0:
            raise TrackstarError(f"{db.path}: the database has no examples")
        entry = lookup(method or best_method(db))
        if not entry.serves_prompt:
            raise TrackstarError(entry.refuses_prompt)
        if control_target is not None and entry.spec is None:
            raise ParameterError("control_target", f"needs a gradient method (a difference of loss gradients), "
                                                   f"not {entry.name}")
        vectors = self.gradient(prompt, target, entry.spec.table, control_target) if entry.spec is not None else None
        request = runners.Request(["adhoc"], [embedding.query_text(prompt, target)], k, self.device,
                                  query_vectors=vectors, ann=ann)
        rows = runners.run(db, entry, request).to_arrow(["adhoc"], "adhoc", entry.name)
        rows = rows.select(["kind", "rank", "example_id", "score", "method"])
        ids = rows.column("example_id").to_pylist()
        text_of = {}
        if ids:
            texts = db.table("examples", columns=["example_id", "text"],
                             filter=pc.field("example_id").isin(sorted(set(ids))))
            text_of = dict(zip(texts.column("example_id").to_pylist(), texts.column("text").to_pylist()))
        rows = rows.append_column("text", pa.array([text_of.get(i) for i in ids], pa.string()))
        from .evidence import with_evidence

        return with_evidence(db, prompt, target, rows, self.patcher() if verify else None)


__all__ = ["PromptAttributor", "best_method", "LADDER"]
