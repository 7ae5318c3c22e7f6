"""Mark the words of a retrieved text that also occur in the query (prompt and target).

Words are runs of letters/digits (`\\w+`), compared case-insensitively; stopwords and
one-character words never count. One function finds the spans; `render` dresses them: the
explorer's HTML (report/explorer.py: marked_html) in <mark>, the terminal with click, so both show
the same words.
"""

from __future__ import annotations

import re
from typing import Iterable

import click

WORD = re.compile(r"\w+")
STOPWORDS = frozenset("""
a an and are as at be been but by did do does for from had has have he her his i in is it its
of on or she that the their them they this to was were which who whom will with you your not
no so than then there these those into over also our we us him my me can could would
""".split())


def _keep(word: str) -> bool:
    return len(word) > 1 and word not in STOPWORDS


def words(text: str) -> set[str]:
    """The countable words of `text`, lower-cased."""
    return {w for w in (m.group().lower() for m in WORD.finditer(text)) if _keep(w)}


def shared_words(text: str, reference_texts: Iterable[str]) -> set[str]:
    """Words of `text` that occur in any of `reference_texts` (lower-cased)."""
    reference: set[str] = set()
    for ref in reference_texts:
        reference |= words(ref)
    return words(text) & reference


def spans(text: str, reference_texts: Iterable[str]) -> list[tuple[int, int]]:
    """[(start, end)] character spans of the words of `text` shared with `reference_texts`."""
    shared = shared_words(text, reference_texts)
    return [m.span() for m in WORD.finditer(text) if m.group().lower() in shared]


def render(text: str, marks: list[tuple[int, int]], plain, marked) -> str:
    out, at = [], 0
    for start, end in marks:
        out += [plain(text[at:start]), marked(text[start:end])]
        at = end
    out.append(plain(text[at:]))
    return "".join(out)


def to_terminal(text: str, reference_texts: Iterable[str], color: str = "yellow") -> str:
    """`text` with shared words bold and coloured (ANSI; click strips it when not a terminal)."""
    return render(text, spans(text, reference_texts), str,
                   lambda w: click.style(w, fg=color, bold=True))
