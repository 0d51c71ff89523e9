"""Sufficient statistics of a multi-output regression, gathered batch by batch (no ONNX in here).

A refit needs either the moments of its sampled rows (PᵀP, PᵀT and sums) or, when the rows are
fewer than the inputs, the rows themselves; the solvers in `solvers.py` take either.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

__all__ = ["FLOAT32_DIMS", "FLOAT32_MOMENT_DIMS", "FitMoments", "FitSamples"]

# Layers with fewer unknowns (the exactness oracles') score the ridge with exact solves.
FLOAT32_DIMS = 1024
# Moment blocks are summed in float32 from this many unknowns on (into float64 across blocks).
# From 256 rather than 1,024: the U-Net's refit moments took 1.7-1.8 s against 2.2-2.5 s, with
# the same held-out output error to five digits (ResNet-50's too).
FLOAT32_MOMENT_DIMS = 256


@dataclass
class FitMoments:
    """Running moments of a multi-output regression T ≈ P W + 1 bᵀ: PᵀP, PᵀT, ΣP, ΣT, ‖T‖², n."""

    dims: int
    outputs: int
    gram: np.ndarray = field(init=False)
    cross: np.ndarray = field(init=False)
    input_sum: np.ndarray = field(init=False)
    target_sum: np.ndarray = field(init=False)
    target_sq: float = 0.0
    count: int = 0

    def __post_init__(self) -> None:
        self.gram = np.zeros((self.dims, self.dims))
        self.cross = np.zeros((self.dims, self.outputs))
        self.input_sum = np.zeros(self.dims)
        self.target_sum = np.zeros(self.outputs)

    def add(self, inputs: np.ndarray, targets: np.ndarray) -> None:
        step = max(1, (1 << 23) // max(self.dims + self.outputs, 1))  # copies of 64 MB at most
        for start in range(0, len(inputs), step):
            self._add_block(inputs[start : start + step], targets[start : start + step])

    def _add_block(self, inputs: np.ndarray, targets: np.ndarray) -> None:
        """Products in float64, or, with ≥ 256 unknowns, float32 within a block of a few
        thousand rows (twice as fast; relative error ~1e-6, far below the smallest ridge the
        grid tries besides 0) summed into float64 across blocks."""
        dtype = np.float32 if self.dims >= FLOAT32_MOMENT_DIMS else np.float64
        p = np.asarray(inputs, dtype=dtype)
        t = np.asarray(targets, dtype=dtype)
        self.gram += p.T @ p
        self.cross += p.T @ t
        self.input_sum += p.sum(axis=0, dtype=np.float64)
        self.target_sum += t.sum(axis=0, dtype=np.float64)
        self.target_sq += float(np.einsum("ij,ij->", t, t, dtype=np.float64))
        self.count += len(p)

    def __add__(self, other: FitMoments) -> FitMoments:
        out = FitMoments(self.dims, self.outputs)
        out.gram, out.cross = self.gram + other.gram, self.cross + other.cross
        out.input_sum, out.target_sum = self.input_sum + other.input_sum, self.target_sum + other.target_sum
        out.target_sq, out.count = self.target_sq + other.target_sq, self.count + other.count
        return out


@dataclass
class FitSamples:
    """The rows themselves, for a regression with fewer rows than inputs (a wide linear layer).

    With n < dims rows, an n×n kernel replaces the dims² moment matrix: memory n·dims, not
    dims² (25,088² float64 is 5 GB for VGG-16's first FC layer), and the same solution.
    """

    dims: int
    outputs: int
    inputs: list[np.ndarray] = field(default_factory=list)
    targets: list[np.ndarray] = field(default_factory=list)

    def add(self, inputs: np.ndarray, targets: np.ndarray) -> None:
        self.inputs.append(np.asarray(inputs, dtype=np.float64))
        self.targets.append(np.asarray(targets, dtype=np.float64))

    def __add__(self, other: FitSamples) -> FitSamples:
        return FitSamples(self.dims, self.outputs, self.inputs + other.inputs, self.targets + other.targets)

    def rows(self, columns: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        p = np.concatenate(self.inputs) if self.inputs else np.zeros((0, self.dims))
        t = np.concatenate(self.targets) if self.targets else np.zeros((0, self.outputs))
        return p[:, columns], t

    @property
    def count(self) -> int:
        return sum(len(p) for p in self.inputs)

    @property
    def target_sq(self) -> float:
        return float(sum(np.sum(t * t) for t in self.targets))
