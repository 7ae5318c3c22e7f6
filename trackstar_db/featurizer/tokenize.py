"""Turn texts, (prompt, target) queries and loss-masked examples into padded model batches.

One encoder (encode_segments: pieces of text that carry loss or not) is shared by training,
featurizing, tail-patch and accuracy checks, so a query's target tokens are the same everywhere:

- a training example: [bos] + tokens(text) [+ eos]; loss on every token after the first.
- a query: [bos] + tokens(prompt) + tokens(sep + target); loss on the target tokens only.
  sep is a single space unless the prompt already ends with whitespace.
- a prompt/completion example: as a query, + eos; loss on the completion and eos.
- a chat: the chat template's rendering, pieces split at the assistant turns (no bos/eos
  added: the template writes its own); loss on the assistant turns only.
Which of these a database's examples are is its task (featurizer/task.py), which also holds
the loss itself.

Batches are right-padded; padded positions carry label -100 and attention 0, so results do not
depend on batch composition.

Nothing is longer than the model's context: the cut is models/context.token_limit (min of
max_length and the tokenizer's model_max_length, which the model factory sets to the model's
own context). A text or a chat keeps
its start; a query or a completion keeps its end (the prompt is cut from the left; a query's
target is kept whole).
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


def encode_segments(tokenizer, segments: list[tuple[str, bool]], max_length: int | None = None, *,
                    bos: bool = True, eos: bool = False, keep: str = "start") -> Encoded:
    """Pieces of text, each carrying loss or not, tokenized one by one and joined: the one
    encoder behind texts, queries, prompt/completion examples and chats (featurizer/task.py).

    bos: prefix the tokenizer's bos (no loss); eos: append its eos, carrying loss when the last
    piece does. keep "start": cut from the right (a text keeps its start). keep "end": the
    loss-free tokens before the first loss-carrying one are cut from the left, keeping at least
    one, so the loss tokens survive; loss tokens that alone overflow are cut from the right.
    """
    max_length = token_limit(tokenizer, max_length)
    ids = _prefix(tokenizer) if bos else []
    loss = [False] * len(ids)
    for text, carries in segments:
        piece = _ids(tokenizer, text)
        ids += piece
        loss += [carries] * len(piece)
    if eos and tokenizer.eos_token_id is not None:
        ids.append(tokenizer.eos_token_id)
        loss.append(loss[-1] if loss else True)
    if max_length is not None and len(ids) > max_length:
        if keep == "end" and True in loss:
            first = loss.index(True)
            head = max(max_length - (len(ids) - first), 1)
            cut = slice(first - min(head, first), first - min(head, first) + max_length)
        else:
            cut = slice(0, max_length)
        ids, loss = ids[cut], loss[cut]
    return Encoded(ids, [t if carries else IGNORE for t, carries in zip(ids, loss)])


def encode_text(tokenizer, text: str, max_length: int | None = None) -> Encoded:
    """A training example: loss over the whole text (its start, when longer than the cut)."""
    return encode_segments(tokenizer, [(text, True)], max_length, eos=True)


def target_separator(prompt: str) -> str:
    return "" if (not prompt or prompt[-1].isspace()) else " "


def prompt_segments(prompt: str, target: str) -> list[tuple[str, bool]]:
    """A prompt and what follows it as pieces: the prompt without loss, then separator + target."""
    return [(prompt, False), (target_separator(prompt) + target, True)]


def encode_query(tokenizer, prompt: str, target: str, max_length: int | None = None) -> Encoded:
    """A query: the prompt is context, the loss is on the target tokens only.

    When `max_length` (or the model's context) cuts, the prompt is truncated from the left so
    the target survives; a target that alone fills the context is refused.
    """
    max_length = token_limit(tokenizer, max_length)
    target_ids = _ids(tokenizer, target_separator(prompt) + target)
    if not target_ids:
        raise ValueError(f"target {target!r} encodes to no tokens")
    if max_length is not None and len(target_ids) >= max_length:
        raise ValueError(f"target {target[:40]!r} is {len(target_ids)} tokens; the model's context keeps {max_length}")
    return encode_segments(tokenizer, prompt_segments(prompt, target), max_length, keep="end")


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
