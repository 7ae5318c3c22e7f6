"""Progress bars, shown only where someone is watching long work.

`progress=None` (every library default) means: a bar when stderr is a terminal, once the work
has run `defaults.PROGRESS_DELAY_S`; `True` shows one at once, `False` never. TRACKSTAR_PROGRESS=1
or 0 overrides the terminal test. So a script that calls `db.query()` writes nothing to stderr,
and `trackstar-db` in a terminal shows bars for long steps. transformers' own bars ("Loading
weights") follow the same rule through `quiet_transformers`.
"""

from __future__ import annotations

import contextlib
import os
import sys

from trackstar_db import defaults


def wanted(progress: bool | None = None) -> bool:
    """Whether to show progress: `progress` when given, else TRACKSTAR_PROGRESS, else stderr is a terminal."""
    if progress is not None:
        return bool(progress)
    env = os.environ.get("TRACKSTAR_PROGRESS")
    if env:
        return env.lower() not in ("0", "false", "no")
    return sys.stderr.isatty()


def bar(iterable=None, *, progress: bool | None = None, **kwargs):
    """A tqdm bar (tqdm's arguments) that follows `wanted(progress)`; asked-for bars show at once."""
    from tqdm.auto import tqdm  # heavy: tqdm

    return tqdm(iterable, disable=not wanted(progress), delay=0 if progress else defaults.PROGRESS_DELAY_S, **kwargs)


@contextlib.contextmanager
def quiet_transformers(progress: bool | None = None):
    """transformers' own progress bars off inside the block unless progress is wanted; restored after."""
    if wanted(progress):
        yield
        return
    from transformers.utils import logging  # heavy: transformers

    enabled = logging.is_progress_bar_enabled()
    logging.disable_progress_bar()
    try:
        yield
    finally:
        if enabled:
            logging.enable_progress_bar()
