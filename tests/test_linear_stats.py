"""Exact linear-reader statistics equal the brute-force sums over every row and output unit."""

from __future__ import annotations

import numpy as np
import pytest

from onnx_thinet.calibration.collect import ConsumerStats
from onnx_thinet.calibration.linear import LinearChannelMoments, channel_positions
from onnx_thinet.channels.layout import Layout, Segment


def _brute(rows, weight, targets, positions):
    """Σ over every (row, unit) of z zᵀ, z·t and t², z_c = Σ_{k∈c} a_k W[k, f]."""
    channels = len(positions)
    gram, corr, target_sq = np.zeros((channels, channels)), np.zeros(channels), 0.0
    for r in range(len(rows)):
        for f in range(weight.shape[1]):
            z = np.array([np.sum(rows[r, p] * weight[p, f]) for p in positions], dtype=np.float64)
            gram += np.outer(z, z)
            corr += z * targets[r, f]
            target_sq += float(targets[r, f]) ** 2
    return gram, corr, target_sq


@pytest.mark.parametrize("layout, length", [
    (Layout.full(6), 6),                                    # one position per channel
    (Layout((Segment(0, 0, 4),), 4, inner=3), 12),          # NCHW flatten: 3 positions per channel
    (Layout((Segment(2, 0, 3),), 6, inner=1), 12),          # a Concat slice, repeated twice (NHWC)
    (Layout((Segment(0, 0, 2), Segment(3, 2, 4)), 5), 10),  # two slices: positions do not step evenly
])
def test_exact_moments_match_brute_force(layout, length):
    rng = np.random.default_rng(0)
    channels = max(seg.hi for seg in layout.segments)
    rows = rng.standard_normal((5, length)).astype(np.float32)
    weight = rng.standard_normal((length, 7)).astype(np.float32)
    targets = rng.standard_normal((5, 7)).astype(np.float32)
    positions = channel_positions(layout, channels, length)
    entry = ConsumerStats(channels)
    moments = LinearChannelMoments(positions, weight, scale=3 / 7)
    moments.add(entry, rows[:2], targets[:2], samples=6)
    moments.add(entry, rows[2:], targets[2:], samples=9)
    moments.finish(entry)
    gram, corr, target_sq = _brute(rows, weight, targets, positions)
    np.testing.assert_allclose(entry.gram, gram * 3 / 7, rtol=1e-5, atol=1e-4)
    np.testing.assert_allclose(entry.corr, corr * 3 / 7, rtol=1e-5, atol=1e-4)
    assert entry.target_sq == pytest.approx(target_sq * 3 / 7, rel=1e-6)
    assert entry.samples == 15
    assert sorted(positions.ravel()) == sorted(layout.positions(np.arange(channels), length)[0])


def test_wide_reader_moments_in_float32_products_match_float64():
    """From 1,024 channels on, W Wᵀ is a float32 product (VGG-16's 4,096-wide FC layers): the
    Gram stays within float32 rounding of the float64 sums."""
    rng = np.random.default_rng(1)
    channels, units = 1100, 40
    rows = np.abs(rng.standard_normal((6, channels))).astype(np.float32)
    weight = rng.standard_normal((channels, units)).astype(np.float32)
    positions = channel_positions(Layout.full(channels), channels, channels)
    entry = ConsumerStats(channels)
    moments = LinearChannelMoments(positions, weight, scale=1.0)
    moments.add(entry, rows, rows @ weight, samples=6)
    moments.finish(entry)
    a, w = rows.astype(np.float64), weight.astype(np.float64)
    expected = (a.T @ a) * (w @ w.T)
    np.testing.assert_allclose(entry.gram, expected, rtol=0, atol=1e-5 * np.abs(expected).max())
