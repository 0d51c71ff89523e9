"""Layout on its own: where a group's channels sit along an axis, and what a cut removes.

position = (o * total + entry) * inner + j; each case below is worked out by hand from
that formula, and the flattened-weight case is checked against numpy's own reshape.
"""

from __future__ import annotations

import numpy as np
import pytest

from onnx_thinet.channels.layout import (
    Layout,
    Segment,
    channel_indicator,
    removed_positions,
    slice_channels,
    without_positions,
)


def test_full_layout_is_the_identity():
    layout = Layout.full(4)
    assert layout == Layout((Segment(0, 0, 4),), 4, 1)
    pos, ids = layout.positions(np.array([3, 1]), 4)
    assert sorted(zip(pos.tolist(), ids.tolist())) == [(1, 1), (3, 3)]
    np.testing.assert_array_equal(removed_positions(layout, np.array([0, 2]), 4, 4), [1, 3])


def test_inner_blocks_spread_each_channel_over_consecutive_positions():
    """Flatten of [N, 3, 2, 2]: channel c owns positions 4c .. 4c + 3."""
    layout = Layout(Layout.full(3).segments, 3, inner=4)
    pos, ids = layout.positions(np.array([1]), 12)
    np.testing.assert_array_equal(pos, [4, 5, 6, 7])
    np.testing.assert_array_equal(ids, [1, 1, 1, 1])


def test_outer_blocks_repeat_the_channels():
    """An axis of 2 blocks of 3 channels x 4 positions: channel 1 sits in both blocks."""
    layout = Layout(Layout.full(3).segments, 3, inner=4)
    assert layout.outer(24) == 2 and layout.outer(12) == 1
    assert layout.outer(10) is None  # does not fit: the rules must not cut such an axis
    np.testing.assert_array_equal(np.sort(layout.positions(np.array([1]), 24)[0]),
                                  [4, 5, 6, 7, 16, 17, 18, 19])
    with pytest.raises(ValueError, match="does not fit"):
        layout.positions(np.array([0]), 10)


def test_concat_shifts_the_group_and_leaves_foreign_entries():
    """Two channels concatenated after three foreign ones and before one: entries 3 and 4 of 6."""
    layout = Layout.full(2).shifted(3, 6)
    assert layout == Layout((Segment(3, 0, 2),), 6, 1)
    kept_only_1 = slice_channels(np.arange(6.0), np.array([1]), 2, 0, layout)
    np.testing.assert_array_equal(kept_only_1, [0, 1, 2, 4, 5])


def test_split_window_keeps_the_channels_inside_it():
    layout = Layout.full(4).window(1, 3)
    assert layout == Layout((Segment(0, 1, 3),), 2, 1)
    pos, ids = layout.positions(np.arange(4), 2)
    assert sorted(zip(pos.tolist(), ids.tolist())) == [(0, 1), (1, 2)]
    assert Layout.full(2).shifted(0, 4).window(2, 4) is None  # only foreign entries there


def test_merged_flows_are_the_union_when_they_share_the_axis_shape():
    a = Layout((Segment(0, 0, 2),), 4, 1)
    b = Layout((Segment(2, 0, 2),), 4, 1)
    merged = a.merged(b)
    assert merged is not None and merged.segments == a.segments + b.segments
    np.testing.assert_array_equal(np.sort(merged.positions(np.array([1]), 4)[0]), [1, 3])
    assert a.merged(Layout((Segment(0, 0, 2),), 4, 2)) is None


def test_channel_indicator_marks_each_position_of_each_channel():
    layout = Layout.full(2).shifted(1, 3)  # one foreign entry first
    layout = Layout(layout.segments, 3, inner=2)
    expected = np.array([[0, 0], [0, 0], [1, 0], [1, 0], [0, 1], [0, 1]], dtype=float)
    np.testing.assert_array_equal(channel_indicator(layout, 2, 6), expected)
    both_blocks = channel_indicator(layout, 2, 12)
    np.testing.assert_array_equal(both_blocks.sum(axis=0), [4, 4])  # 2 blocks x 2 positions
    np.testing.assert_array_equal(both_blocks[:6], expected)


def test_cutting_a_flattened_gemm_weight_matches_numpy():
    """The oracle: a Gemm reading Flatten([N, C, H, W]) loses the rows of removed channels."""
    rng = np.random.default_rng(0)
    channels, hw, features = 5, 6, 3
    weight = rng.standard_normal((channels * hw, features))
    kept = np.array([0, 3, 4])
    layout = Layout(Layout.full(channels).segments, channels, inner=hw)
    got = slice_channels(weight, kept, channels, 0, layout)
    expected = weight.reshape(channels, hw, features)[kept].reshape(-1, features)
    np.testing.assert_array_equal(got, expected)
    removed = removed_positions(layout, kept, channels, channels * hw)
    assert np.all(np.diff(removed) > 0) and len(removed) == 2 * hw


@pytest.mark.parametrize("shape, axis", [((5, 7, 3), 0), ((5, 7, 3), 1), ((5, 7, 3), -1), ((4, 6), 1)])
def test_without_positions_is_np_delete(shape, axis):
    array = np.arange(np.prod(shape), dtype=np.float32).reshape(shape)
    positions = np.array([2, 0, 2])[: array.shape[axis]] % array.shape[axis]  # unsorted, repeated
    np.testing.assert_array_equal(without_positions(array, positions, axis), np.delete(array, positions, axis=axis))
    assert without_positions(array, np.zeros(0, np.int64), axis).shape == array.shape
