"""Named fault points, so tests can kill a command exactly where a crash hurts most.

TRACKSTAR_FAULT=name[:n] makes the n-th `point(name)` of the process (default the first) end it
with SIGKILL, as `kill -9` would. TRACKSTAR_FAULT_SLEEP=name:seconds makes every `point(name)`
sleep instead (tests widen a race window with it). Unset (always, outside tests) a point costs
two dict lookups.
"""

from __future__ import annotations

import os
import signal

_reached: dict[str, int] = {}


def point(name: str) -> None:
    pause = os.environ.get("TRACKSTAR_FAULT_SLEEP")
    if pause and pause.rpartition(":")[0] == name:
        import time

        time.sleep(float(pause.rpartition(":")[2]))
    spec = os.environ.get("TRACKSTAR_FAULT")
    if not spec:
        return
    target, _, nth = spec.partition(":")
    if target != name:
        return
    _reached[name] = _reached.get(name, 0) + 1
    if _reached[name] >= int(nth or 1):
        os.kill(os.getpid(), signal.SIGKILL)
