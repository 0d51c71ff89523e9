"""Freed memory kept for reuse while slimming (glibc's malloc, Linux).

glibc serves every allocation above its mmap threshold (at most 32 MB) with a fresh mapping
and unmaps it on free. A slim run makes and drops an onnxruntime session per segment, each
with an arena of its own, and large buffers batch after batch, so the same memory is faulted
in again and again, a page at a time, zeroed by the kernel: ResNet-50 at 64 images took
1.45 M page faults, about 6 s of its 40 s on a 2-core VM (0.56 M and 34 s inside). Inside
`reused_heap`, large allocations come from the heap and freed memory stays there for the next
one. `release_heap_over`, called between a pass's phases, hands what is free back to the
system once the resident set passes a limit: kept memory must not push a run over its budget.
"""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import os
import platform
import threading
from collections.abc import Iterator

__all__ = ["release_heap_over", "resident_bytes", "reused_heap"]

_M_TRIM_THRESHOLD = -1
_M_MMAP_MAX = -4
# glibc's defaults, restored on the way out (its thresholds then stay where they are instead
# of adapting to the sizes freed, as they do after any mallopt)
_DEFAULT_TRIM_THRESHOLD = 128 * 1024
_DEFAULT_MMAP_MAX = 65536
_NEVER_TRIM = 2**31 - 1  # mallopt takes an int

_lock = threading.Lock()
_depth = 0


def _glibc():
    """The C library when it is glibc and the user has not tuned malloc, else None."""
    if platform.system() != "Linux" or platform.libc_ver()[0] != "glibc":
        return None
    if os.environ.get("GLIBC_TUNABLES") or any(k.startswith("MALLOC_") for k in os.environ):
        return None  # the user's own malloc settings win
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        return libc if hasattr(libc, "mallopt") and hasattr(libc, "malloc_trim") else None
    except OSError:
        return None


_LIBC = _glibc()


@contextlib.contextmanager
def reused_heap() -> Iterator[None]:
    """Within: no mmap for large allocations and no trimming of the heap; nested uses and
    threads share one setting, restored (and the free memory returned) when the last leaves."""
    global _depth
    if _LIBC is None:
        yield
        return
    with _lock:
        if _depth == 0:
            _LIBC.mallopt(_M_MMAP_MAX, 0)
            _LIBC.mallopt(_M_TRIM_THRESHOLD, _NEVER_TRIM)
        _depth += 1
    try:
        yield
    finally:
        with _lock:
            _depth -= 1
            if _depth == 0:
                _LIBC.mallopt(_M_MMAP_MAX, _DEFAULT_MMAP_MAX)
                _LIBC.mallopt(_M_TRIM_THRESHOLD, _DEFAULT_TRIM_THRESHOLD)
                _LIBC.malloc_trim(0)


def resident_bytes() -> int:
    """The process's resident set now (0 where /proc is not there)."""
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):
        return 0


def release_heap_over(limit: int) -> None:
    """Return the heap's free memory to the system when the resident set is over `limit` bytes
    (a no-op outside glibc)."""
    if _LIBC is not None and resident_bytes() > limit:
        _LIBC.malloc_trim(0)
