"""BLAS threads sized to the problem.

On a few cores, handing a small product or factorization to several BLAS threads costs more
than it computes: on the 2-core machine we measure on, a 256² product took 0.5 ms on one
thread and 8 ms on two, a 128² Cholesky 0.14 ms and up to 50 ms. The calibration engine does
thousands of such operations on the narrow layers of a deep network, so work on fewer than
`PARALLEL_UNKNOWNS` unknowns runs on one thread; wide layers (a 2,304² eigen-decomposition,
a 4,096-wide linear layer) keep every thread, where two cores are about twice as fast.

LAPACK's threaded Cholesky is the exception: on the same machine a 1,152² float32 factor took
21 ms on two threads and 11.5 ms on one (2,304²: 96 and 107 ms). Two independent solves
(`concurrently`) on one thread each use the cores better than one solve after the other on
both.

On the VM of 2026-12-06, with OpenBLAS's idle threads asleep (see `onnx_thinet/__init__.py`),
small products no longer lose on two threads (256²: 0.66 ms on one, 0.57 ms on two; 576²:
7.5 and 3.6 ms) while small factorizations still do (a 256² Cholesky factor and solve: 0.87
and 1.5 ms); two threads for the narrow layers' statistics gained the U-Net 0.1-0.3 s of 7.5 s.
"""

from __future__ import annotations

import contextlib
import functools
import os
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor, wait
from typing import TypeVar

__all__ = ["PARALLEL_UNKNOWNS", "blas_threads_for", "concurrently"]

T = TypeVar("T")

PARALLEL_UNKNOWNS = 1024


@functools.cache
def _controller():
    from threadpoolctl import ThreadpoolController

    return ThreadpoolController()  # finds numpy's and scipy's BLAS once (a scan of loaded libraries)


@contextlib.contextmanager
def blas_threads_for(unknowns: int) -> Iterator[None]:
    """One BLAS thread inside the block for a problem of fewer than `PARALLEL_UNKNOWNS`
    unknowns; the caller's setting otherwise."""
    if unknowns >= PARALLEL_UNKNOWNS:
        yield
        return
    with _controller().limit(limits=1, user_api="blas"):
        yield


def concurrently(calls: Sequence[Callable[[], T]]) -> list[T]:
    """Run independent numpy/scipy calls at once (BLAS and LAPACK release the GIL), the BLAS
    threads split between them; results in order, the first exception re-raised after all
    have finished. The first runs in the caller's thread, the rest in `_workers`: long-lived
    threads, so that each keeps reusing one malloc arena (a fresh thread per call spread its
    buffers over new arenas: VGG-16 at 256 images peaked 100 MiB higher). Not for nesting."""
    if len(calls) < 2:
        return [call() for call in calls]
    threads = max(_blas_threads() // len(calls), 1)
    with _controller().limit(limits=threads, user_api="blas"):
        futures = [_workers().submit(call) for call in calls[1:]]
        try:
            first = calls[0]()
        finally:
            wait(futures)
        return [first, *(future.result() for future in futures)]


@functools.cache
def _workers() -> ThreadPoolExecutor:
    return ThreadPoolExecutor(max_workers=max(os.cpu_count() or 2, 2) - 1, thread_name_prefix="onnx-thinet")


if hasattr(os, "register_at_fork"):  # a forked child has none of the parent's threads: a pool of its own
    os.register_at_fork(after_in_child=_workers.cache_clear)


def _blas_threads() -> int:
    """The BLAS threads in effect now (the largest over the libraries loaded)."""
    counts = [info["num_threads"] for info in _controller().info() if info.get("user_api") == "blas"]
    return max(counts, default=1)
