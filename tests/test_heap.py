"""Freed memory reused inside `reused_heap`, and handed back when asked or on the way out."""

from __future__ import annotations

import ctypes
import ctypes.util
import resource

import pytest

from onnx_thinet.calibration import heap
from onnx_thinet.calibration.heap import release_heap_over, resident_bytes, reused_heap

pytestmark = pytest.mark.skipif(heap._LIBC is None, reason="glibc's malloc only (or the user tuned it)")

SIZE = 96 * 2**20  # above glibc's largest mmap threshold (32 MB)
PAGES = SIZE // 4096
_C = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")  # a handle of our own to type
_C.malloc.restype, _C.malloc.argtypes, _C.free.argtypes = ctypes.c_void_p, [ctypes.c_size_t], [ctypes.c_void_p]


def _faults_of_a_fresh_array() -> int:
    """Minor page faults taken by malloc-ing and filling one large buffer (as onnxruntime's
    arenas do; numpy asks for huge pages, which fault less either way)."""
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    buffer = _C.malloc(SIZE)
    ctypes.memset(buffer, 1, SIZE)
    faults = resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before
    _C.free(buffer)
    return faults


def test_a_freed_array_is_reused_without_faulting_its_pages_again():
    _faults_of_a_fresh_array()
    assert _faults_of_a_fresh_array() > PAGES // 2  # outside: a fresh mapping every time
    with reused_heap():
        _faults_of_a_fresh_array()
        assert _faults_of_a_fresh_array() < PAGES // 10
    assert _faults_of_a_fresh_array() > PAGES // 2  # glibc's policy is back


def test_leaving_hands_the_free_memory_back():
    with reused_heap():
        with reused_heap():  # nested: the outer use keeps the setting
            _faults_of_a_fresh_array()
        assert _faults_of_a_fresh_array() < PAGES // 10
        held = resident_bytes()
    assert resident_bytes() < held - SIZE // 2


def test_release_over_a_limit_trims_only_above_it():
    with reused_heap():
        _faults_of_a_fresh_array()
        release_heap_over(resident_bytes() * 2)
        assert _faults_of_a_fresh_array() < PAGES // 10  # under the limit: kept
        held = resident_bytes()
        release_heap_over(0)
        assert resident_bytes() < held - SIZE // 2
