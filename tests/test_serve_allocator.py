"""serve/allocator.py: the server process keeps glibc's mmap threshold fixed, so freed scan
buffers leave the process (the soak's memory, issue 34)."""

import subprocess
import sys

import pytest

PROBE = r"""
import sys
import numpy as np
from trackstar_db.serve.allocator import keep_mmap_threshold

def rss():
    return next(int(l.split()[1]) for l in open("/proc/self/status") if l.startswith("VmRSS:")) / 1024

fixed = keep_mmap_threshold() if sys.argv[1] == "fixed" else False
np.ones((3 << 20) // 8)  # one 3 MiB buffer freed: glibc's dynamic threshold now rises past it
base = rss()
kept = []
for _ in range(4):  # 8 "requests" scan at once (3 MiB each), then free; a small cache entry outlives each round
    held = [np.ones((3 << 20) // 8) for _ in range(8)]
    kept.append([np.ones(4 << 10) for _ in range(16)])
    del held
print(fixed, round(rss() - base, 1))
"""


def _held_after(mode: str) -> tuple[bool, float]:
    out = subprocess.run([sys.executable, "-c", PROBE, mode], capture_output=True, text=True, check=True)
    fixed, held = out.stdout.split()
    return fixed == "True", float(held)


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's mallopt")
def test_freed_large_buffers_leave_the_process():
    fixed, held = _held_after("fixed")
    if not fixed:
        pytest.skip("not glibc (mallopt refused): nothing to fix")
    _, dynamic = _held_after("dynamic")
    assert held < 12, f"{held:.1f} MiB still resident after freeing the large buffers (dynamic threshold: {dynamic:.1f})"
    assert held < dynamic, (held, dynamic)  # the control: glibc's dynamic threshold keeps them


def test_a_users_setting_rules(monkeypatch):
    from trackstar_db.serve.allocator import keep_mmap_threshold

    monkeypatch.setenv("MALLOC_MMAP_THRESHOLD_", "65536")
    assert keep_mmap_threshold() is False
