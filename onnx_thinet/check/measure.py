"""Relative error, defined once: the check layer, evaluation and the PyTorch round trip share it.

Two measures, both with names used in reports: `relative_error` (‖Δ‖ / ‖reference‖, the
report's `output_rel_error`) and `max_relative_error` (max |Δ| / max |reference|, the
tolerance of element-wise round trips). `ErrorSums` accumulates both over batches.
Pure numpy: importable from any layer.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

__all__ = ["ErrorSums", "max_relative_error", "relative_error"]


def relative_error(reference: np.ndarray, candidate: np.ndarray) -> float:
    """‖candidate − reference‖ / ‖reference‖ (inf when the shapes differ)."""
    sums = ErrorSums()
    if not sums.add(reference, candidate):
        return math.inf
    return sums.rel_error


def max_relative_error(reference: np.ndarray, candidate: np.ndarray) -> float:
    """max |candidate − reference| / max |reference| (inf when the shapes differ)."""
    sums = ErrorSums()
    if not sums.add(reference, candidate):
        return math.inf
    return sums.max_rel_error


@dataclass
class ErrorSums:
    """Running sums of the differences between reference and candidate outputs."""

    diff_sq: float = 0.0
    ref_sq: float = 0.0
    abs_sum: float = 0.0
    max_abs: float = 0.0
    ref_max: float = 0.0
    elements: int = 0

    def add(self, reference: np.ndarray, candidate: np.ndarray) -> bool:
        """Add one pair of arrays; False (and nothing added) when their shapes differ."""
        ref = np.asarray(reference, dtype=np.float64)
        delta = np.asarray(candidate, dtype=np.float64) - ref if ref.shape == np.shape(candidate) else None
        if delta is None:
            return False
        self.diff_sq += float(np.sum(delta**2))
        self.ref_sq += float(np.sum(ref**2))
        self.abs_sum += float(np.abs(delta).sum())
        self.max_abs = max(self.max_abs, float(np.abs(delta).max(initial=0.0)))
        self.ref_max = max(self.ref_max, float(np.abs(ref).max(initial=0.0)))
        self.elements += delta.size
        return True

    @property
    def rel_error(self) -> float:
        """‖Δ‖ / ‖reference‖; ‖Δ‖ itself when the reference is all zeros."""
        return math.sqrt(self.diff_sq / self.ref_sq) if self.ref_sq > 0 else math.sqrt(self.diff_sq)

    @property
    def max_rel_error(self) -> float:
        """max |Δ| / max |reference|; max |Δ| itself when the reference is all zeros."""
        return self.max_abs / self.ref_max if self.ref_max > 0 else self.max_abs

    @property
    def mean_abs_error(self) -> float | None:
        return self.abs_sum / self.elements if self.elements else None
