"""The long-lived server's allocator setting: large buffers go back to the kernel when freed.

glibc's malloc serves a request above its mmap threshold (128 KiB at start) with its own mapping
and unmaps it on free, but every such free raises the threshold to the freed size (up to 32 MiB).
In a server that scans the gradient tables on many threads at once, the scans' buffers (rows x d
floats, a few MiB each) then come from the heap arenas, where a freed buffer stays resident: the
process keeps the high-water mark of its concurrent scans, which grows with every example a
writer appends. Measured by benchmarks/soak_serve.py (RESULTS.md, issue 34): 4 minutes of
query clients beside a writer, a fresh server on the final database held 6.6% more than the
soak's start with the dynamic threshold and 1.0% with it fixed at MMAP_THRESHOLD.

`keep_mmap_threshold()` fixes it (mallopt(M_MMAP_THRESHOLD), which also turns the dynamic
adjustment off). `trackstar-db serve` calls it at start; an application that embeds the server
(serve.app) decides for its own process. Elsewhere than glibc, or where the user has set
MALLOC_MMAP_THRESHOLD_ (glibc's own variable, which then rules), it does nothing.
"""

from __future__ import annotations

import ctypes
import os
import sys

M_MMAP_THRESHOLD = -3  # glibc's mallopt parameter number (malloc.h)
MMAP_THRESHOLD = 256 << 10  # bytes: a buffer at least this large is mapped on its own and unmapped on free


def keep_mmap_threshold(threshold: int = MMAP_THRESHOLD) -> bool:
    """Fix glibc's mmap threshold at `threshold` bytes for this process; True when it was set."""
    if not sys.platform.startswith("linux") or "MALLOC_MMAP_THRESHOLD_" in os.environ:
        return False
    try:
        mallopt = ctypes.CDLL(None).mallopt
    except (OSError, AttributeError):  # not glibc (or no mallopt in the process)
        return False
    mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    return mallopt(M_MMAP_THRESHOLD, int(threshold)) == 1
