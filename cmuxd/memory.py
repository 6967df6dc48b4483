"""Give freed memory back to the system in the long-lived daemon processes.

glibc raises its mmap threshold after a large block is freed, so the next multi-megabyte
request frames (a 4 MiB pty.write, its base64 and its decoded bytes) come from the heap and
stay there after they are freed: a worker fed a stream of large writes grew by 100 MiB and
kept it. A fixed threshold puts every block over 128 KiB in a mapping of its own, returned
to the system on free.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import sys

M_MMAP_THRESHOLD = -3
THRESHOLD = 128 * 1024


def return_large_blocks() -> bool:
    """Fix glibc's mmap threshold; False where there is no glibc (macOS, musl)."""
    if not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        return bool(libc.mallopt(M_MMAP_THRESHOLD, THRESHOLD))
    except (OSError, AttributeError):
        return False
