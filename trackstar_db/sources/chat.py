"""Chat records: a `messages` list (role, content) rendered with the tokenizer's own chat template.

The stored text is the template's rendering of the whole conversation; its loss spans
(featurizer/task.py, loss "chat") are the assistant turns as the template renders them: for
assistant message i, from the end of render(messages[:i], add_generation_prompt=True) to the end
of render(messages[:i + 1]), i.e. the content and the template's end-of-turn marker. The
template must render each prefix of a conversation as a prefix of the whole (every common
template does); one that does not is refused rather than guessed at.

The template comes from the database's model directory (tokenizer_config.json's chat_template,
or chat_template.jinja beside it), read offline, or from a file given with --chat-template.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from trackstar_db.errors import ParameterError, RecordError, TrackstarError
from trackstar_db.models.context import cap_tokenizer, token_limit
from trackstar_db.models.load import open_config, open_tokenizer
from trackstar_db.store.checkpoints import source as model_source


@dataclass
class ChatRenderer:
    """Renders chat records for one database: its tokenizer (with a template) and the cut."""

    tokenizer: object
    cap: int | None

    def __call__(self, record: dict, field: str, path, line: int) -> tuple[str, list[int]]:
        """(text, loss spans) of the record's conversation; RecordError naming the field."""
        text, spans = render(self.tokenizer, messages_of(record, field, path, line), path, line)
        check_fits(self.tokenizer, text, spans, self.cap, path, line)
        return text, spans


def chat_renderer(db, template_file: str | Path | None = None) -> ChatRenderer:
    tokenizer = chat_tokenizer(db, template_file)
    return ChatRenderer(tokenizer, context_cap(db, tokenizer))

def chat_tokenizer(db, template_file: str | Path | None = None):
    """The database model's tokenizer with a chat template (its own, or `template_file`'s)."""
    if not db.manifest.get("model"):
        raise TrackstarError(f"{db.path}: chat records are rendered with the model's chat template; record the "
                             f"model first ('trackstar-db init {db.path} --model DIR')")

    point = model_source(db)
    tokenizer = open_tokenizer(point)
    source = point.tokenizer_path()
    if template_file is not None:
        try:
            tokenizer.chat_template = Path(template_file).read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as exc:
            raise TrackstarError(f"{template_file}: cannot read the chat template ({exc})") from None
    if not getattr(tokenizer, "chat_template", None):
        raise ParameterError("chat_template", f"not given, and the tokenizer ({source}) has no chat template: "
                                              "give a Jinja template file, or set 'chat_template' in tokenizer_config.json (or "
                                              "add chat_template.jinja)")
    return tokenizer


def context_cap(db, tokenizer) -> int | None:
    """Tokens a featurized chat keeps: the stored (or default) max_length, capped at the model's
    context (models/context.cap_tokenizer), as the gradient run will cut it."""
    from trackstar_db.featurizer.config import FeaturizerConfig  # heavy: torch

    entry = db.manifest.get("featurizer") or {}
    max_length = entry.get("config", {}).get("max_length", FeaturizerConfig().max_length)
    try:
        return cap_tokenizer(tokenizer, open_config(db.model_info()["path"]), max_length)
    except (TrackstarError, ValueError):  # an adapter directory has no config.json of its own
        return token_limit(tokenizer, max_length)


def check_fits(tokenizer, text: str, spans: list[int], cap: int | None, path, line: int) -> None:
    """Refuse a chat whose assistant tokens all lie beyond the cut (its loss would be empty)."""
    from trackstar_db.featurizer.task import Task  # heavy: torch
    from trackstar_db.featurizer.tokenize import IGNORE  # heavy: torch

    if cap is not None and all(label == IGNORE for label in Task("chat").encode_example(tokenizer, text, spans, cap).labels):
        raise RecordError(path, line, f"no assistant token lies within the first {cap} tokens the model keeps")


def messages_of(record: dict, field: str, path, line: int) -> list[dict]:
    """The record's messages as [{'role', 'content'}], checked; RecordError naming the field.
    Roles are the template's business (it renders them or raises); the loss is on 'assistant'."""
    messages = record.get(field)
    if messages is None:
        raise RecordError(path, line, f"missing field {field!r}")
    if not isinstance(messages, (list, tuple)) or not messages:
        raise RecordError(path, line, f"field {field!r} must be a non-empty list of {{role, content}} messages")
    out = []
    for i, message in enumerate(messages):
        if not isinstance(message, dict) or not isinstance(message.get("role"), str) \
                or not isinstance(message.get("content"), str):
            raise RecordError(path, line, f"field {field!r}[{i}] must be an object with string 'role' and 'content'")
        if message["role"] == "assistant" and not message["content"].strip():
            raise RecordError(path, line, f"field {field!r}[{i}]: the assistant turn is empty")
        out.append({"role": message["role"], "content": message["content"]})
    if not any(m["role"] == "assistant" for m in out):
        raise RecordError(path, line, f"field {field!r} has no assistant turn (the loss is on the assistant turns)")
    return out


def _render(tokenizer, messages: list[dict], path, line: int, generation: bool = False) -> str:
    try:
        return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=generation)
    except Exception as exc:  # the template's own error (jinja raise_exception, a bad role order...)
        text = str(exc).strip().splitlines()
        raise RecordError(path, line, f"the chat template cannot render this conversation "
                                      f"({text[0] if text else type(exc).__name__})") from None


def render(tokenizer, messages: list[dict], path, line: int) -> tuple[str, list[int]]:
    """(the conversation rendered, loss spans [start, end, ...] of its assistant turns)."""
    text = _render(tokenizer, messages, path, line)
    spans: list[int] = []
    for i, message in enumerate(messages):
        if message["role"] != "assistant":
            continue
        before = _render(tokenizer, messages[:i], path, line, generation=True) if i else ""
        upto = _render(tokenizer, messages[: i + 1], path, line)
        if not (text.startswith(upto) and upto.startswith(before)) or (spans and len(before) < spans[-1]):
            raise RecordError(path, line, "the chat template does not render the conversation's turns as prefixes "
                                          "of it, so the assistant turns cannot be located; give another chat template file")
        if len(upto) > len(before):
            spans += [len(before), len(upto)]
    if not spans:
        raise RecordError(path, line, "the chat template renders no assistant text for this conversation")
    return text, spans
