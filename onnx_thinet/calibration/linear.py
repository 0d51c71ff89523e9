"""Exact ThiNet statistics of a linear reader (Gemm, MatMul): every row and every output unit.

Sampling (row, unit) pairs, as convolutions are sampled, costs samples × inputs per batch, and a
wide layer needs many samples: VGG-16's 4096-wide FC layers drew 82,000 samples × 4,096 inputs
per batch, minutes of float64 products. For a linear reader the sum over all units has a closed
form, so it is computed exactly and scaled to the number of samples the sampler would have
drawn: the solvers see statistics of the same scale, without the sampling noise.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
from scipy.linalg import blas

from onnx_thinet.channels.layout import Layout
from onnx_thinet.solve.moments import FLOAT32_DIMS

__all__ = ["LinearChannelMoments", "channel_positions"]

_CHUNK_ELEMENTS = 1 << 24  # float32 entries of one block of per-unit contributions (64 MB)


def channel_positions(layout: Layout, channels: int, length: int) -> np.ndarray:
    """(channels, m): the m input positions of each group channel, in order (a Flatten gives m > 1)."""
    pos, ids = layout.positions(np.arange(channels), length)
    order = np.lexsort((pos, ids))
    return pos[order].reshape(channels, -1)


@dataclass
class LinearChannelMoments:
    """Per-channel contribution moments of one linear reader, summed over all rows and units.

    For row a and unit f, channel c contributes z_c = Σ_{k ∈ c} a_k W[k, f]. With one position per
    channel, Σ_f z zᵀ = (a aᵀ) ∘ (W Wᵀ); with m positions (a Flatten), z is a batched product.
    `scale` (samples per row / units) turns the exact sums into the sampler's expected ones.
    """

    positions: np.ndarray
    weight: np.ndarray  # [K, F]
    scale: float
    _outer: np.ndarray | None = field(default=None, init=False, repr=False)
    _blocks: np.ndarray | None = field(default=None, init=False, repr=False)
    _inputs_gram: np.ndarray | None = field(default=None, init=False, repr=False)  # Σ a aᵀ, one position each

    def add(self, entry, rows: np.ndarray, targets: np.ndarray, samples: int) -> None:
        """Add one batch: `rows` [R, K] inputs, `targets` [R, F] the group's share to reconstruct."""
        rows = np.asarray(rows, dtype=np.float32)
        targets = np.asarray(targets, dtype=np.float32)
        if self.positions.shape[1] == 1:
            self._add_inputs_gram(rows[:, self.positions[:, 0]].astype(np.float64))
        else:
            entry.gram += self.scale * self._gram(rows)
        along = (rows * (targets @ self.weight.T)).sum(axis=0, dtype=np.float64)
        entry.corr += self.scale * along[self.positions].sum(axis=1)
        entry.target_sq += self.scale * float(np.sum(np.square(targets, dtype=np.float64)))
        entry.samples += samples

    def _add_inputs_gram(self, picked: np.ndarray) -> None:
        """Σ a aᵀ += pickedᵀ picked, written in place by BLAS. A batch has a few rows and the
        product is channels² (4,096² on VGG-16): numpy's `picked.T @ picked` mirrors its
        triangle into a new array and the sum adds it (143 ms a batch, against 7 ms)."""
        channels = picked.shape[1]
        if self._inputs_gram is None:
            self._inputs_gram = np.zeros((channels, channels), order="F")
        if len(picked):
            columns = picked.T  # Fortran order, as BLAS reads it: no copy
            self._inputs_gram = blas.dgemm(1.0, columns, columns, beta=1.0, c=self._inputs_gram, trans_b=1,
                                           overwrite_c=1)

    def finish(self, entry) -> None:
        """Add the batches' Σ (a aᵀ) ∘ (W Wᵀ) to `entry` (one position per channel)."""
        if self._inputs_gram is not None:
            gram = self._inputs_gram.T  # symmetric: the same values, in entry's (C) order
            gram *= self._unit_outer()
            gram *= self.scale
            entry.gram += gram
            self._inputs_gram = None

    def _gram(self, rows: np.ndarray) -> np.ndarray:
        """Σ_f z zᵀ of one batch, z a batched product (m positions per channel)."""
        channels = len(self.positions)
        blocks = rows[:, self.positions].transpose(1, 0, 2)  # [C, R, m]
        weight = self._weight_blocks()  # [C, m, F]
        step = max(1, _CHUNK_ELEMENTS // max(channels * weight.shape[2], 1))
        gram = np.zeros((channels, channels))
        for start in range(0, blocks.shape[1], step):
            z = np.matmul(blocks[:, start : start + step], weight).reshape(channels, -1)
            gram += (z @ z.T).astype(np.float64)
        return gram

    def _weight_blocks(self) -> np.ndarray:
        """W by channel, [C, m, F]: a strided view when positions step evenly (the NCHW and NHWC
        Flatten layouts), else one copy."""
        if self._blocks is None:
            channels, width = self.positions.shape
            first = int(self.positions[0, 0])
            across = int(self.positions[1, 0]) - first if channels > 1 else 0
            along = int(self.positions[0, 1]) - first if width > 1 else 0
            grid = first + across * np.arange(channels)[:, None] + along * np.arange(width)[None, :]
            if np.array_equal(self.positions, grid) and across >= 0 and along >= 0:
                row, col = self.weight.strides
                self._blocks = np.lib.stride_tricks.as_strided(
                    self.weight[first:], shape=(channels, width, self.weight.shape[1]),
                    strides=(across * row, along * row, col), writeable=False)
            else:
                self._blocks = self.weight[self.positions]
        return self._blocks

    def _unit_outer(self) -> np.ndarray:
        """W Wᵀ over the units; float32 products from 1,024 channels on, as the refit's moments
        (a 4,096-wide FC layer: 137 GFLOP, twice as fast)."""
        if self._outer is None:
            dtype = np.float32 if len(self.positions) >= FLOAT32_DIMS else np.float64
            picked = self.weight[self.positions[:, 0]].astype(dtype)
            self._outer = (picked @ picked.T).astype(np.float64)
        return self._outer
