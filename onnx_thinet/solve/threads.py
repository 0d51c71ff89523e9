"""BLAS threads sized to the problem.

On a few cores, handing a small product or factorization to several BLAS threads costs more
than it computes: on the 2-core machine we measure on, a 256² product took 0.5 ms on one
thread and 8 ms on two, a 128² Cholesky 0.14 ms and up to 50 ms. The calibration engine does
thousands of such operations on the narrow layers of a deep network, so work on fewer than
`PARALLEL_UNKNOWNS` unknowns runs on one thread; wide layers (a 2,304² eigen-decomposition,
a 4,096-wide linear layer) keep every thread, where two cores are about twice as fast.
"""

from __future__ import annotations

import contextlib
import functools
from collections.abc import Iterator

__all__ = ["PARALLEL_UNKNOWNS", "blas_threads_for"]

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
