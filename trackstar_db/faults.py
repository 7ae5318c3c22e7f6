"""Named fault points, so tests can kill a command exactly where a crash hurts most.

TRACKSTAR_FAULT=name[:n] makes the n-th `point(name)` of the process (default the first) end it
with SIGKILL, as `kill -9` would. TRACKSTAR_FAULT_SLEEP=name:seconds makes every `point(name)`
sleep instead (tests widen a race window with it). TRACKSTAR_FAULT_ENOSPC=name[:n] makes the
n-th `point(name)` raise OSError(ENOSPC), as a full disk would at that write. Unset (always,
outside tests) a point costs three dict lookups.
"""

from __future__ import annotations

import errno
import os
import signal
import time

_reached: dict[str, int] = {}


def point(name: str) -> None:
    pause = os.environ.get("TRACKSTAR_FAULT_SLEEP")
    if pause and pause.rpartition(":")[0] == name:
        time.sleep(float(pause.rpartition(":")[2]))
    if _due(os.environ.get("TRACKSTAR_FAULT_ENOSPC"), name, "enospc"):
        raise OSError(errno.ENOSPC, f"No space left on device (injected at {name})")
    if _due(os.environ.get("TRACKSTAR_FAULT"), name, "kill"):
        os.kill(os.getpid(), signal.SIGKILL)


def _due(spec: str | None, name: str, kind: str) -> bool:
    """Is this the n-th reach of the point `spec` names?"""
    if not spec:
        return False
    target, _, nth = spec.partition(":")
    if target != name:
        return False
    _reached[(kind, name)] = _reached.get((kind, name), 0) + 1
    return _reached[(kind, name)] == int(nth or 1)
