"""Turn texts and (prompt, target) queries into padded model batches.

One encoding is shared by training, featurizing, tail-patch and accuracy checks, so a query's
target tokens are the same everywhere:

- a training example: [bos] + tokens(text) [+ eos]; loss on every token after the first.
- a query: [bos] + tokens(prompt) + tokens(sep + target); loss on the target tokens only.
  sep is a single space unless the prompt already ends with whitespace.

Batches are right-padded; padded positions carry label -100 and attention 0, so results do not
depend on batch composition.

Nothing is longer than the model's context: the cut is models/context.token_limit (min of
max_length and the tokenizer's model_max_length, which the model factory sets to the model's
own context). A text keeps its start; a query keeps its end (the prompt is cut from the left,
the target is kept whole).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from trackstar_db.models.context import token_limit

IGNORE = -100


@dataclass
class Encoded:
    """One example before padding: token ids and per-token labels (IGNORE where no loss)."""

    input_ids: list[int]
    labels: list[int]


def _ids(tokenizer, text: str) -> list[int]:
    return list(tokenizer(text, add_special_tokens=False, verbose=False)["input_ids"])


def _prefix(tokenizer) -> list[int]:
    return [tokenizer.bos_token_id] if tokenizer.bos_token_id is not None else []


def encode_text(tokenizer, text: str, max_length: int | None = None) -> Encoded:
    """A training example: loss over the whole text (its start, when longer than the cut)."""
    max_length = token_limit(tokenizer, max_length)
    ids = _prefix(tokenizer) + _ids(tokenizer, text)
    if tokenizer.eos_token_id is not None:
        ids.append(tokenizer.eos_token_id)
    if max_length is not None:
        ids = ids[:max_length]
    labels = list(ids)
    if _prefix(tokenizer):
        labels[0] = IGNORE  # nothing predicts bos
    return Encoded(ids, labels)


def target_separator(prompt: str) -> str:
    return "" if (not prompt or prompt[-1].isspace()) else " "


def encode_query(tokenizer, prompt: str, target: str, max_length: int | None = None) -> Encoded:
    """A query: the prompt is context, the loss is on the target tokens only.

    When `max_length` (or the model's context) cuts, the prompt is truncated from the left so
    the target survives; a target that alone fills the context is refused.
    """
    max_length = token_limit(tokenizer, max_length)
    prompt_ids = _prefix(tokenizer) + _ids(tokenizer, prompt)
    target_ids = _ids(tokenizer, target_separator(prompt) + target)
    if not target_ids:
        raise ValueError(f"target {target!r} encodes to no tokens")
    if max_length is not None and len(target_ids) >= max_length:
        raise ValueError(f"target {target[:40]!r} is {len(target_ids)} tokens; the model's context keeps {max_length}")
    if max_length is not None and len(prompt_ids) + len(target_ids) > max_length:
        keep = max(max_length - len(target_ids), 1)
        prompt_ids = prompt_ids[-keep:]
    return Encoded(prompt_ids + target_ids, [IGNORE] * len(prompt_ids) + target_ids)


def collate(items: list[Encoded], pad_id: int = 0) -> dict[str, torch.Tensor]:
    """Right-pad to the longest item: input_ids, attention_mask, labels, each [batch, tokens]."""
    width = max(len(item.input_ids) for item in items)
    input_ids = torch.full((len(items), width), pad_id, dtype=torch.long)
    labels = torch.full((len(items), width), IGNORE, dtype=torch.long)
    attention = torch.zeros((len(items), width), dtype=torch.long)
    for row, item in enumerate(items):
        n = len(item.input_ids)
        input_ids[row, :n] = torch.tensor(item.input_ids)
        labels[row, :n] = torch.tensor(item.labels)
        attention[row, :n] = 1
    return {"input_ids": input_ids, "attention_mask": attention, "labels": labels}


def pad_id(tokenizer) -> int:
    for candidate in (tokenizer.pad_token_id, tokenizer.eos_token_id, 0):
        if candidate is not None:
            return candidate
    return 0


def per_example_loss(logits: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean next-token loss per example and its token count.

    logits [batch, tokens, vocab], labels [batch, tokens] (label at position t is predicted by
    logits at t-1). Returns loss [batch] (float32) and n_tokens [batch] (long).
    """
    shift_logits = logits[:, :-1, :].float()
    shift_labels = labels[:, 1:]
    token_loss = torch.nn.functional.cross_entropy(
        shift_logits.reshape(-1, shift_logits.shape[-1]),
        shift_labels.reshape(-1),
        ignore_index=IGNORE,
        reduction="none",
    ).view(shift_labels.shape)
    n_tokens = (shift_labels != IGNORE).sum(dim=1)
    loss = token_loss.sum(dim=1) / n_tokens.clamp(min=1)
    return loss, n_tokens
