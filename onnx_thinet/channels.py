"""Plain data describing prunable channel groups, and the index arithmetic of channel layouts.

A tensor carries a group's channels along one axis. After a Flatten or Reshape the axis can
hold several copies of the channel dimension (`outer`) and several positions per channel
(`inner`): index = (o * channels + c) * inner + j. Every slice is expressed in that layout, so
a conv weight, a BN vector and a flattened Gemm weight are cut by one function.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

__all__ = [
    "AttrUpdate",
    "ChannelGroup",
    "Consumer",
    "Coupled",
    "ParamSlice",
    "ShapeFix",
    "Skipped",
    "channel_positions",
    "slice_channels",
    "sum_per_channel",
]


@dataclass(frozen=True)
class ParamSlice:
    """Initializer feeding `node` at `input_index`, cut along `axis` in the (outer, C, inner) layout."""

    node: str
    input_index: int
    axis: int
    inner: int = 1


@dataclass(frozen=True)
class AttrUpdate:
    """An integer attribute that counts channels (a depthwise Conv's `group`): becomes kept·inner."""

    node: str
    attribute: str
    inner: int = 1


@dataclass(frozen=True)
class ShapeFix:
    """A Reshape's constant shape entry that encodes the channel count: scaled to the kept count."""

    node: str
    input_index: int
    position: int


@dataclass(frozen=True)
class Consumer:
    """A layer that reads the group's channels as its input channels and is rescaled by ThiNet.

    `kind` is "conv" (input patches) or "linear" (Gemm/MatMul, weight as [K, F] after
    `transpose`). `weight` names the node input holding the weight, cut along `axis`;
    `bias_index` is where a bias input goes (None for MatMul, which has none).
    """

    node: str
    kind: str
    input: str
    weight: ParamSlice
    transpose: bool = False
    bias_index: int | None = 2


@dataclass(frozen=True)
class ChannelGroup:
    """A producer's output channels, everything sliced with them, and the layers that read them."""

    producer: str
    producer_op: str
    channels: int
    output: str
    slices: tuple[ParamSlice, ...]
    consumers: tuple[Consumer, ...]
    attr_updates: tuple[AttrUpdate, ...] = ()
    shape_fixes: tuple[ShapeFix, ...] = ()
    path: tuple[str, ...] = ()


@dataclass(frozen=True)
class Coupled:
    """Channels kept because another tensor is tied to them (residual Add, Concat, gating Mul)."""

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


def channel_positions(keep: np.ndarray, channels: int, length: int, inner: int) -> np.ndarray:
    """Indices along an axis of `length` that belong to the kept channels."""
    outer, rest = divmod(length, channels * inner)
    if rest or outer < 1:
        raise ValueError(f"axis of length {length} is not a multiple of {channels}x{inner}")
    keep = np.asarray(keep, dtype=np.int64)
    base = np.arange(outer)[:, None, None] * channels + keep[None, :, None]
    return (base * inner + np.arange(inner)[None, None, :]).ravel()


def slice_channels(
    array: np.ndarray, keep: np.ndarray, channels: int, axis: int, inner: int = 1
) -> np.ndarray:
    """`array` with only the kept channels along `axis` (layout (outer, channels, inner))."""
    idx = channel_positions(keep, channels, array.shape[axis], inner)
    return np.take(array, idx, axis=axis)


def sum_per_channel(values: np.ndarray, channels: int, inner: int = 1) -> np.ndarray:
    """Collapse the last axis (layout (outer, channels, inner)) to one value per channel."""
    lead = values.shape[:-1]
    return values.reshape(*lead, -1, channels, inner).sum(axis=(-3, -1))
