"""The context rule, in one place: how many tokens an encoding keeps.

An encoding keeps min(max_length, the tokenizer's model_max_length) tokens, and the model
factory (load.open_model) sets model_max_length to the model's own context (n_positions /
max_position_embeddings / ...), so nothing is longer than the model can read. `token_limit` of a
featurizer's max_length is the 'context_cap' a manifest records. Plain Python: no torch here.
"""

from __future__ import annotations

_NO_LIMIT = 10**8  # transformers' "no model_max_length" is 1e30
_CONTEXT_KEYS = ("n_positions", "max_position_embeddings", "n_ctx", "max_sequence_length", "seq_length")


def model_context(model_config) -> int | None:
    """The model's context in tokens (n_positions, max_position_embeddings, ...), or None if unknown."""
    for key in _CONTEXT_KEYS:
        value = getattr(model_config, key, None)
        if isinstance(value, int) and value > 0:
            return value
    return None


def cap_tokenizer(tokenizer, model_config, max_length: int | None = None) -> int | None:
    """Set tokenizer.model_max_length to the model's context; returns the cut encodings get
    (min of max_length and the context)."""
    context = model_context(model_config)
    if context is not None:
        tokenizer.model_max_length = context
    return token_limit(tokenizer, max_length)


def token_limit(tokenizer, max_length: int | None = None) -> int | None:
    """Tokens an encoding keeps: min(max_length, tokenizer.model_max_length when that is set)."""
    limits = [n for n in (max_length, getattr(tokenizer, "model_max_length", None))
              if isinstance(n, int) and 0 < n < _NO_LIMIT]
    return min(limits) if limits else None
