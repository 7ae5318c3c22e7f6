"""The task contract: what loss a database attributes and which weight matrices it tracks.

One `Task` object says what a model is looked at for (kronfluence's Task plays the same part):

- examples: the loss of a training example, the same for every row of the examples table:
    "all"         every token of the text (the default, and every database written before
                  the task existed),
    "completion"  the tokens after a prompt (a prompt/completion record; the stored text is
                  prompt + separator + completion),
    "chat"        the assistant turns of a conversation rendered with the tokenizer's chat
                  template (the stored text is the rendering).
  A masked example stores the character spans that carry loss (examples.loss_spans: start, end
  pairs); the encoder turns them into pieces (tokenize.encode_segments), the same mechanism
  that gives a query its loss on the target after the prompt.
- queries: always "target" (the prompt is context); recorded so the manifest states both sides.
- modules: fnmatch patterns over parameter names selecting the tracked matrices (tracked.py);
  None tracks every Linear, Conv1D and Embedding weight.

The manifest holds it as "task"; a manifest without the field is the default task.
"""

from __future__ import annotations

from dataclasses import dataclass
from fnmatch import fnmatchcase

import torch

from trackstar_db.errors import TrackstarError

from .tokenize import IGNORE, Encoded, encode_query, encode_segments, encode_text

EXAMPLE_LOSSES = ("all", "completion", "chat")
QUERY_LOSS = "target"
MANIFEST_KEY = "task"


@dataclass(frozen=True)
class Task:
    examples: str = "all"
    modules: tuple[str, ...] | None = None

    def __post_init__(self):
        if self.examples not in EXAMPLE_LOSSES:
            raise TrackstarError(f"task examples must be one of {', '.join(EXAMPLE_LOSSES)}, not {self.examples!r}")
        if self.modules is not None:
            modules = tuple(self.modules)
            if not modules or not all(isinstance(m, str) and m for m in modules):
                raise TrackstarError(f"task modules must be a non-empty list of name patterns, not {self.modules!r}")
            object.__setattr__(self, "modules", modules)

    @property
    def masked(self) -> bool:
        """True when a training example's loss covers only the tokens its spans select."""
        return self.examples != "all"

    def to_dict(self) -> dict:
        return {"examples": self.examples, "queries": QUERY_LOSS,
                "modules": list(self.modules) if self.modules is not None else None}

    @classmethod
    def from_dict(cls, data: dict | None) -> "Task":
        data = dict(data or {})
        if data.pop("queries", QUERY_LOSS) != QUERY_LOSS:
            raise ValueError(f"task: a query's loss is on its {QUERY_LOSS!r}; nothing else is supported")
        unknown = sorted(set(data) - {"examples", "modules"})
        if unknown:
            raise ValueError(f"task: unknown field(s) {unknown}")
        return cls(**data)

    def encode_example(self, tokenizer, text: str, spans: list[int] | None = None,
                       max_length: int | None = None) -> Encoded:
        """A training example under this task; spans: its loss spans (None for loss "all")."""
        if not self.masked:
            if spans is not None:
                raise ValueError("a loss-masked example under a task whose loss covers every token")
            return encode_text(tokenizer, text, max_length)
        if spans is None:
            raise ValueError(f"an example without loss spans under a task whose loss is {self.examples!r}")
        if self.examples == "completion":
            return encode_segments(tokenizer, segments(text, spans), max_length, eos=True, keep="end")
        return encode_segments(tokenizer, segments(text, spans), max_length, bos=False)

    @staticmethod
    def encode_query(tokenizer, prompt: str, target: str, max_length: int | None = None) -> Encoded:
        """A query: loss on the target after the prompt (the same pieces as a completion)."""
        return encode_query(tokenizer, prompt, target, max_length)

    def tracks(self, name: str) -> bool:
        """Whether the parameter `name` is one the task tracks (before the kind filter)."""
        return self.modules is None or any(fnmatchcase(name, pattern) for pattern in self.modules)

    @staticmethod
    def loss(logits: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return per_example_loss(logits, labels)


DEFAULT = Task()


def task_of(manifest: dict) -> Task:
    """The task a manifest records; the default task when it records none (older databases)."""
    return Task.from_dict(manifest.get(MANIFEST_KEY))


def record_task(db, task: Task) -> None:
    """Write `task` into the database's manifest (under its writer lock). The tracked modules are
    fixed by the first gradient run: a change after it is refused."""
    stored = db.manifest.get("featurizer")
    if stored is not None and task.modules != task_of(db.manifest).modules:
        raise TrackstarError(f"{db.path}: the tracked modules are fixed by the first gradient run "
                             f"({len(stored.get('tracked', []))} matrices); featurize into a new database to track others")
    if db.manifest.get(MANIFEST_KEY) != task.to_dict():
        db.update_manifest(lambda manifest: manifest.__setitem__(MANIFEST_KEY, task.to_dict()))


def segments(text: str, spans: list[int]) -> list[tuple[str, bool]]:
    """The pieces of `text` cut at its loss spans [start0, end0, start1, end1, ...] (character
    offsets, increasing): (piece, carries loss)."""
    if len(spans) % 2 or any(b < a for a, b in zip(spans, spans[1:])) or (spans and not 0 <= spans[0] <= spans[-1] <= len(text)):
        raise ValueError(f"loss spans {spans!r} are not increasing start/end pairs inside a text of {len(text)} characters")
    pieces, at = [], 0
    for start, end in zip(spans[::2], spans[1::2]):
        pieces += [(text[at:start], False), (text[start:end], True)]
        at = end
    pieces.append((text[at:], False))
    return [(piece, carries) for piece, carries in pieces if piece]


def per_example_loss(logits: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean next-token loss per example over the tokens whose label is not IGNORE, and their count.

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
