"""Plain data describing prunable channel groups, and where a group's channels sit in a tensor.

A tensor axis carries a group's channels in a `Layout`: the axis is `outer` blocks of `total`
channel-like entries, each entry spread over `inner` consecutive positions, so that

    position = (o * total + entry) * inner + j.

Group channels occupy entries through `segments`: channels [lo, hi) sit at entries
offset .. offset + (hi - lo). A plain conv output is one segment covering all entries; a
Concat shifts segments and adds foreign entries; a Split keeps part of the segments; a
Flatten grows `outer` or `inner`. Every cut (a conv weight, a BN vector, a flattened Gemm
weight, a concatenated consumer) is "delete the positions of the removed channels".
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from onnx_thinet.channels.consumers import ConsumerKind, consumer_kind

__all__ = [
    "AttrUpdate",
    "ChannelGroup",
    "Consumer",
    "Coupled",
    "Layout",
    "ParamSlice",
    "Segment",
    "ShapeFix",
    "Skipped",
    "channel_indicator",
    "removed_positions",
    "slice_channels",
    "without_positions",
]


@dataclass(frozen=True)
class Segment:
    """Group channels [lo, hi) sit at entries offset .. offset + (hi - lo) of each block."""

    offset: int
    lo: int
    hi: int


@dataclass(frozen=True)
class Layout:
    """Where a group's channels sit on an axis: `segments` of a block of `total` entries, each
    entry spread over `inner` positions, the block repeated `outer` times (module docstring)."""

    segments: tuple[Segment, ...]
    total: int
    inner: int = 1

    @classmethod
    def full(cls, channels: int) -> Layout:
        return cls((Segment(0, 0, channels),), channels, 1)

    def outer(self, length: int) -> int | None:
        """Blocks along an axis of `length`, or None when the layout does not fit it."""
        block = self.total * self.inner
        if block <= 0 or length % block:
            return None
        return length // block

    def positions(self, channels: np.ndarray, length: int) -> tuple[np.ndarray, np.ndarray]:
        """Positions along an axis of `length` of the given group channels, and their channel ids."""
        outer = self.outer(length)
        if outer is None:
            raise ValueError(f"axis of length {length} does not fit {self}")
        channels = np.asarray(channels, dtype=np.int64)
        pos, ids = [], []
        for seg in self.segments:
            chosen = channels[(channels >= seg.lo) & (channels < seg.hi)]
            entry = seg.offset + chosen - seg.lo
            grid = (np.arange(outer)[:, None, None] * self.total + entry[None, :, None]) * self.inner
            grid = grid + np.arange(self.inner)[None, None, :]
            pos.append(grid.ravel())
            ids.append(np.broadcast_to(chosen[None, :, None], grid.shape).ravel())
        if not pos:
            return np.zeros(0, np.int64), np.zeros(0, np.int64)
        return np.concatenate(pos), np.concatenate(ids)

    def shifted(self, base: int, total: int) -> Layout:
        """The layout after a Concat that puts this tensor's entries at `base` of `total`."""
        segs = tuple(Segment(s.offset + base, s.lo, s.hi) for s in self.segments)
        return Layout(segs, total, self.inner)

    def window(self, start: int, stop: int) -> Layout | None:
        """The layout of entries [start, stop) (a Split output), or None if no channel is there."""
        segs = []
        for s in self.segments:
            first, last = max(s.offset, start), min(s.offset + s.hi - s.lo, stop)
            if first < last:
                segs.append(Segment(first - start, s.lo + first - s.offset, s.lo + last - s.offset))
        return Layout(tuple(segs), stop - start, self.inner) if segs else None

    def merged(self, other: Layout) -> Layout | None:
        """Two flows of the same group on one tensor (a Concat reading both): their union."""
        if (self.total, self.inner) != (other.total, other.inner):
            return None
        return Layout(self.segments + other.segments, self.total, self.inner)


@dataclass(frozen=True)
class ParamSlice:
    """Initializer feeding `node` at `input_index` whose `axis` is laid out as `layout`."""

    node: str
    input_index: int
    axis: int
    layout: Layout


@dataclass(frozen=True)
class AttrUpdate:
    """An integer attribute counting positions of an axis (a depthwise Conv's `group`), or
    `per` positions each (a grouped Conv's `group`: input channels / channels per group)."""

    node: str
    attribute: str
    layout: Layout
    length: int
    per: int = 1


@dataclass(frozen=True)
class ShapeFix:
    """A constant shape or split-size entry that counts positions of a channel-carrying axis.

    The entry loses as many positions as the removed channels occupy on that axis.
    """

    node: str
    input_index: int  # -1: the node's `split` attribute (Split before opset 13)
    position: int
    layout: Layout
    length: int


@dataclass(frozen=True)
class Consumer:
    """A layer that reads the group's channels as its input channels and is rescaled by ThiNet.

    `kind` says how it stores its weight and reads its input (`consumers.CONV`,
    `CONV_TRANSPOSE`, `LINEAR` for Gemm/MatMul, `transpose` for Gemm's transB). `weight` names
    the node input holding the weight, cut along its axis; `bias_index` is where a bias input
    goes (None for MatMul, which has none).
    """

    node: str
    kind: ConsumerKind
    input: str
    weight: ParamSlice
    transpose: bool = False
    bias_index: int | None = 2
    # input channels [lo, hi) of the weight that `input` feeds, when `input` is one input of
    # the Concat the layer reads (a reader read narrowly, see `calibration.narrowing`); None: all
    span: tuple[int, int] | None = None

    def __post_init__(self) -> None:
        if isinstance(self.kind, str):  # a rule written against the old string field
            object.__setattr__(self, "kind", consumer_kind(self.kind))


@dataclass(frozen=True)
class ChannelGroup:
    """A producer's output channels, everything sliced with them, and the layers that read them.

    Producers tied by residual sums form one joint group: `producer` then names them all
    ("a + b") and `producers` lists them.
    """

    producer: str
    producer_op: str
    channels: int
    output: str
    slices: tuple[ParamSlice, ...]
    consumers: tuple[Consumer, ...]
    attr_updates: tuple[AttrUpdate, ...] = ()
    shape_fixes: tuple[ShapeFix, ...] = ()
    path: tuple[str, ...] = ()
    producers: tuple[str, ...] = ()  # every producer node; several when pruned jointly
    unit: int = 1  # filters per selectable channel: a grouped Conv reader is cut by whole groups


@dataclass(frozen=True)
class Coupled:
    """Channels kept because another tensor is tied to them (residual Add, gating Mul)."""

    producer: str
    channels: int
    node: str
    reason: str


@dataclass(frozen=True)
class Skipped:
    """A producer left alone because pruning it could not be proven safe."""

    producer: str
    node: str
    reason: str


def removed_positions(layout: Layout, kept: np.ndarray, channels: int, length: int) -> np.ndarray:
    removed = np.setdiff1d(np.arange(channels), np.asarray(kept, dtype=np.int64))
    return np.sort(layout.positions(removed, length)[0])


def slice_channels(array: np.ndarray, kept: np.ndarray, channels: int, axis: int, layout: Layout) -> np.ndarray:
    """`array` without the positions of removed channels along `axis` (foreign entries stay)."""
    return without_positions(array, removed_positions(layout, kept, channels, array.shape[axis]), axis)


def without_positions(array: np.ndarray, positions: np.ndarray, axis: int) -> np.ndarray:
    """`np.delete(array, positions, axis)`, as a `take` of the rest: np.delete is up to 5x
    slower on an inner axis (a 4,096² weight's columns: 63 ms against 15 ms)."""
    axis = axis % array.ndim
    keep = np.ones(array.shape[axis], dtype=bool)
    keep[np.asarray(positions, dtype=np.int64)] = False
    return np.take(array, np.flatnonzero(keep), axis=axis)


def channel_indicator(layout: Layout, channels: int, length: int) -> np.ndarray:
    """A (length, channels) 0/1 matrix: which positions of the axis belong to which channel."""
    pos, ids = layout.positions(np.arange(channels), length)
    matrix = np.zeros((length, channels))
    matrix[pos, ids] = 1.0
    return matrix
