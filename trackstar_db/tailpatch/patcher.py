"""Tail-patch influence (docs/method.md section 3): one optimizer step on one proponent, then P(target | prompt).

For a query q and a proponent z: from the final checkpoint, take ONE step of the model's own
optimizer (torch.optim.AdamW for 'adamw', torch.optim.Adam for 'adam': the real torch classes,
loaded with the saved exp_avg / exp_avg_sq / step, betas, eps, weight_decay, at the saved final
learning rate unless TailPatchConfig.lr overrides it) on the loss of z alone, the database's
task's loss (featurizer/task.py: every token, or a completion's / a chat's assistant tokens), measure p_after = P(target | prompt) =
exp(-sum of target-token NLL) (tokenize.encode_query), then restore parameters and optimizer
state exactly. p_before is the same probability at the checkpoint. Dropout is off (eval mode)
for the step and the measurement, and there is no gradient clipping.

Speed: the step depends on the example only, so work is grouped by example: each distinct
proponent is stepped once and every query that has it among its top-k (in any run) is measured
under the patched weights in batched forward passes. Results are cached per (query_id,
example_id) on the TailPatcher, so further runs reuse them.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Mapping, Sequence

import pyarrow as pa
import torch

from trackstar_db import defaults
from trackstar_db.errors import TrackstarError
from trackstar_db.featurizer.optimizer_state import OptimizerState
from trackstar_db.featurizer.tokenize import (
    collate,
    encode_query,
    pad_id,
)
from trackstar_db.featurizer.task import Task, per_example_loss
from trackstar_db.option_checks import COUNT, K, POSITIVE_NUMBER, check_fields, ruled
from trackstar_db.progress import bar
from trackstar_db.store import schema as _schema

# (query_id, prompt, target, [(rank, example_id, text), ...]): one query and its proponents
Pair = tuple[str, str, str, Sequence[tuple[int, str, str]]]
OPTIMIZERS = {"adamw": torch.optim.AdamW, "adam": torch.optim.Adam}


@dataclass(frozen=True)
class TailPatchConfig:
    """k: proponents patched per query (ranks 1..k); batch_size: queries per forward pass;
    lr: learning rate of the step (None: the saved final lr); max_length: token cut."""

    k: int = ruled(K, defaults.K_TAIL_PATCH)
    batch_size: int = ruled(COUNT, 32)
    lr: float | None = ruled(POSITIVE_NUMBER, None)
    max_length: int | None = ruled(COUNT, None)

    def __post_init__(self):
        check_fields(self)


class TailPatcher:
    """Holds the model, one optimizer loaded with the saved state, and the measurement cache."""

    def __init__(self, model: torch.nn.Module, tokenizer, state: OptimizerState,
                 config: TailPatchConfig = TailPatchConfig(), task: Task | None = None,
                 spans: Mapping[str, list[int]] | None = None):
        """task: the database's (featurizer/task.py), whose loss the step takes; spans: the loss
        spans of loss-masked examples, by example_id."""
        if state.optimizer not in OPTIMIZERS:
            raise TrackstarError(f"tail-patch: optimizer {state.optimizer!r} is not supported "
                                 f"(supported: {', '.join(OPTIMIZERS)})")
        self.model, self.tokenizer, self.config = model, tokenizer, config
        self.task, self.spans = task or Task(), spans if spans is not None else {}
        self.pad = pad_id(tokenizer)
        self.device = next(model.parameters()).device
        self.params = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
        lr = state.lr if config.lr is None else config.lr
        self.optimizer = OPTIMIZERS[state.optimizer]([p for _, p in self.params], lr=lr,
                                                     betas=(state.beta1, state.beta2), eps=state.eps,
                                                     weight_decay=state.weight_decay)
        self.saved: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = []  # (param, exp_avg, exp_avg_sq)
        for name, p in self.params:
            m, v = state.moment("exp_avg", name), state.moment("exp_avg_sq", name)
            if m is None or v is None:
                raise TrackstarError(f"tail-patch: optimizer state has no exp_avg/exp_avg_sq for parameter {name!r}")
            if m.shape != p.shape or v.shape != p.shape:
                raise TrackstarError(f"tail-patch: optimizer state of {name!r} has shape {list(m.shape)}, "
                                     f"the parameter {list(p.shape)}")
            self.saved.append((p.detach().clone(), m.to(p), v.to(p)))
            self.optimizer.state[p] = {"step": torch.tensor(float(state.step)), "exp_avg": m.to(p).clone(),
                                       "exp_avg_sq": v.to(p).clone()}
        self.step = state.step
        self.p_before: dict[str, float] = {}
        self.p_after: dict[tuple[str, str], float] = {}

    # -- the two measurements ------------------------------------------------------------------
    def _probabilities(self, queries: list[tuple[str, str]]) -> list[float]:
        """P(target | prompt) of each (prompt, target), batch_size queries per forward pass."""
        out: list[float] = []
        for start in range(0, len(queries), self.config.batch_size):
            items = [encode_query(self.tokenizer, prompt, target, self.config.max_length)
                     for prompt, target in queries[start:start + self.config.batch_size]]
            batch = {k: v.to(self.device) for k, v in collate(items, self.pad).items()}
            with torch.no_grad():
                logits = self.model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
            loss, n_tokens = per_example_loss(logits, batch["labels"])  # mean target NLL [b], tokens [b]
            out += torch.exp(-(loss.double() * n_tokens)).tolist()
        return out

    def backward_on(self, text: str, spans: list[int] | None = None) -> dict[str, torch.Tensor]:
        """The gradient of the task's loss of `text` alone (the one the step takes), left in each
        parameter's .grad and returned by parameter name."""
        batch = {k: v.to(self.device) for k, v in
                 collate([self.task.encode_example(self.tokenizer, text, spans, self.config.max_length)],
                         self.pad).items()}
        self.optimizer.zero_grad(set_to_none=True)
        with torch.enable_grad():
            logits = self.model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
            per_example_loss(logits, batch["labels"])[0][0].backward()
        return {name: p.grad for name, p in self.params}

    def _step_on(self, text: str, spans: list[int] | None = None) -> None:
        """One optimizer step on the task's loss of `text` alone, from the saved state."""
        for (_, p), (p0, m0, v0) in zip(self.params, self.saved):
            state = self.optimizer.state[p]
            state["exp_avg"].copy_(m0)
            state["exp_avg_sq"].copy_(v0)
            state["step"].fill_(float(self.step))
        self.backward_on(text, spans)
        self.optimizer.step()

    def _restore(self) -> None:
        with torch.no_grad():
            for (_, p), (p0, _, _) in zip(self.params, self.saved):
                p.copy_(p0)
        self.optimizer.zero_grad(set_to_none=True)

    # -- runs ----------------------------------------------------------------------------------
    def run(self, runs: Mapping[str, Sequence[Pair]]) -> pa.Table:
        """Tail-patch rows (schema/tail_patch.json) for every run: run_id -> pairs."""
        texts: dict[str, str] = {}
        queries: dict[str, tuple[str, str]] = {}
        todo: dict[str, list[str]] = {}  # example_id -> query_ids still to measure
        for pairs in runs.values():
            for query_id, prompt, target, proponents in pairs:
                if queries.setdefault(query_id, (prompt, target)) != (prompt, target):
                    raise TrackstarError(f"tail-patch: query {query_id!r} given with two different texts")
                for rank, example_id, text in proponents:
                    if rank > self.config.k:
                        continue
                    if texts.setdefault(example_id, text) != text:
                        raise TrackstarError(f"tail-patch: example {example_id!r} given with two different texts")
                    if (query_id, example_id) not in self.p_after and query_id not in todo.get(example_id, ()):
                        todo.setdefault(example_id, []).append(query_id)
        missing = [q for q in queries if q not in self.p_before]
        was_training = self.model.training
        self.model.eval()
        try:
            self.p_before.update(zip(missing, self._probabilities([queries[q] for q in missing])))
            for example_id, query_ids in bar(todo.items(), desc="tail-patch", unit="example"):
                try:
                    self._step_on(texts[example_id], self.spans.get(example_id))
                    after = self._probabilities([queries[q] for q in query_ids])
                finally:
                    self._restore()
                self.p_after.update({(q, example_id): p for q, p in zip(query_ids, after)})
        finally:
            self.model.train(was_training)
        rows = [dict(run_id=run_id, query_id=query_id, rank=rank, example_id=example_id,
                     p_before=self.p_before[query_id], p_after=self.p_after[(query_id, example_id)])
                for run_id, pairs in runs.items() for query_id, _, _, proponents in pairs
                for rank, example_id, _ in sorted(proponents) if rank <= self.config.k]
        schema = _schema.arrow_schema("tail_patch")
        return _schema.conform(pa.Table.from_pylist(rows, schema=schema) if rows else schema.empty_table(), schema)


def tail_patch(model: torch.nn.Module, tokenizer, optimizer_state: OptimizerState, pairs: Sequence[Pair],
               config: TailPatchConfig = TailPatchConfig(), run_id: str = "") -> pa.Table:
    """Tail-patch rows of one run; for several runs use TailPatcher(...).run({run_id: pairs})."""
    return TailPatcher(model, tokenizer, optimizer_state, config).run({run_id: pairs})
