"""Which tokens of a proponent carry its score: per-token attribution of one (prompt, target).

`token_contributions(db, prompt, target, example_id, method)` recomputes the training example's
gradient split by token position (featurizer/per_token.py) and dots each part with the query
side of the scoring rung (retrieval/scoring.py), divided by the example's norm n_z, so the
`contribution` column sums to the example's score under that method (up to float rounding and
the stored vectors' dtype). Gradient methods only (bm25 and embedding have no gradient).

The answer is an Arrow table, one row per token position of the example as the featurizer sees
it (bos/eos included, cut at max_length): position, token_id, token, start, end (character span
in the example's text; null for special tokens or where the tokenizer gives no offsets),
contribution, and example_id, method.
"""

from __future__ import annotations

import pyarrow as pa
import pyarrow.compute as pc
import torch

from trackstar_db.errors import TrackstarError

from .methods import METHODS, get_method
from .runners import best_method
from .scoring import prepare

SCHEMA = pa.schema([("position", pa.int32()), ("token_id", pa.int64()), ("token", pa.string()),
                    ("start", pa.int32()), ("end", pa.int32()), ("contribution", pa.float64()),
                    ("example_id", pa.string()), ("method", pa.string())])


def _offsets(tokenizer, text: str, ids: list[int]) -> list[tuple[int | None, int | None]]:
    """Character spans of `ids` (the encoded example) in `text`, None where unknown."""
    spans: list[tuple[int | None, int | None]] = [(None, None)] * len(ids)
    try:
        encoded = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    except (NotImplementedError, ValueError, TypeError):  # slow tokenizers have no offsets
        return spans
    plain, offsets = list(encoded["input_ids"]), list(encoded["offset_mapping"])
    start = 1 if tokenizer.bos_token_id is not None and ids[:1] == [tokenizer.bos_token_id] else 0
    for i, (token, span) in enumerate(zip(plain, offsets)):
        if start + i < len(ids) and ids[start + i] == token:
            spans[start + i] = (int(span[0]), int(span[1]))
    return spans


def example_text(db, example_id: str) -> str:
    rows = db.table("examples", columns=["text"], filter=pc.field("example_id") == example_id)
    if rows.num_rows == 0:
        raise TrackstarError(f"{db.path}: no example {example_id!r} in table examples")
    return rows.column("text")[0].as_py()


class TokenAttributor:
    """Per-token contributions for many (query, proponent) pairs of one database, keeping each
    method's R and each query's vector between calls; the featurizers are the handle's warm ones
    (PromptAttributor, `db.models`)."""

    def __init__(self, db, device: str = "cpu"):
        from .adhoc import PromptAttributor  # heavy: transformers

        self.db = db
        self.attributor = PromptAttributor(db, device)
        self._scoring: dict[str, object] = {}
        self._query: dict[tuple[str, str, str], torch.Tensor] = {}

    def _spec(self, method: str | None):
        method = method or best_method(self.db)
        if method not in METHODS:
            raise TrackstarError(f"per-token attribution needs a gradient method ({', '.join(METHODS)}), "
                                 f"not {method!r}")
        return get_method(method)

    def __call__(self, prompt: str, target: str, example_id: str, method: str | None = None,
                 text: str | None = None) -> pa.Table:
        """Each token's part of `example_id`'s score (see the module docstring); `text` saves a lookup."""
        from trackstar_db.featurizer.per_token import per_token_vectors, token_scores  # heavy: transformers
        from trackstar_db.featurizer.tokenize import collate, encode_text, pad_id  # heavy: transformers

        spec = self._spec(method)
        featurizer, tokenizer = self.attributor.featurizer(spec.table)
        if featurizer.task.masked:  # the token offsets below assume the plain-text encoding
            raise TrackstarError(f"per-token contributions need a database whose loss covers every token; this "
                                 f"one's loss is {featurizer.task.examples!r} (featurizer/task.py)")
        if spec.name not in self._scoring:
            self._scoring[spec.name] = prepare(self.db, spec)
        scoring = self._scoring[spec.name]
        key = (prompt, target, spec.name)
        if key not in self._query:
            g_q = self.attributor.gradient(prompt, target, spec.table).to(featurizer.device)
            self._query[key] = scoring.query_side(g_q)[0].cpu()
        text = example_text(self.db, example_id) if text is None else text
        item = encode_text(tokenizer, text, featurizer.config.max_length)
        parts = per_token_vectors(featurizer, collate([item], pad_id(tokenizer)), [spec.table])[spec.table]
        norm = torch.ones(())
        if spec.unit_norm:
            whole = parts.sum(0, keepdim=True)
            seen = scoring.preconditioner.apply(whole, spec.train_power) if spec.train_power != 0 else whole
            norm = torch.linalg.vector_norm(seen.double())
        values = token_scores(parts, self._query[key], norm).tolist()
        ids = item.input_ids[: len(values)]
        spans = _offsets(tokenizer, text, ids)
        n = len(ids)
        return pa.table({
            "position": pa.array(range(n), pa.int32()), "token_id": pa.array(ids, pa.int64()),
            "token": pa.array(tokenizer.convert_ids_to_tokens(ids), pa.string()),
            "start": pa.array([s for s, _ in spans], pa.int32()), "end": pa.array([e for _, e in spans], pa.int32()),
            "contribution": pa.array(values, pa.float64()),
            "example_id": pa.array([example_id] * n, pa.string()), "method": pa.array([spec.name] * n, pa.string()),
        }, schema=SCHEMA)


def token_contributions(db, prompt: str, target: str, example_id: str, method: str | None = None,
                        *, device: str = "cpu") -> pa.Table:
    """Each token's part of `example_id`'s score for `target` after `prompt` under `method`
    (default: the best rung the database serves)."""
    return TokenAttributor(db, device)(prompt, target, example_id, method)


def strongest(tokens: pa.Table, top: int = 5) -> list[tuple[str, float]]:
    """The `top` (token, contribution) pairs of largest magnitude, strongest first."""
    rows = sorted(zip(tokens.column("token").to_pylist(), tokens.column("contribution").to_pylist()),
                  key=lambda r: -abs(r[1]))
    return rows[:top]


def hit_tokens(db, prompt: str, target: str, hits: pa.Table, device: str = "cpu") -> pa.Table:
    """token_contributions of every row of a `Database.query` answer, with its kind and rank
    prepended (one row per token per hit)."""
    parts = []
    with db.reading():  # one read view for every hit (store/read_view.py)
        contributions = TokenAttributor(db, device)
        for hit in hits.select(["kind", "rank", "example_id", "method"]).to_pylist():
            tokens = contributions(prompt, target, hit["example_id"], hit["method"])
            parts.append(tokens.add_column(0, "rank", pa.array([hit["rank"]] * tokens.num_rows, pa.int32()))
                         .add_column(0, "kind", pa.array([hit["kind"]] * tokens.num_rows, pa.string())))
    if not parts:
        return SCHEMA.empty_table().add_column(0, "rank", pa.array([], pa.int32())).add_column(0, "kind", pa.array([], pa.string()))
    return pa.concat_tables(parts)
