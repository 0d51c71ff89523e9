"""Where a reader is sampled, and the inputs it sees there: conv windows and linear rows.

Positions are drawn once per batch; the windows under them are gathered from the activation
without copying it, zero padding included.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import onnx
from onnx import helper

__all__ = [
    "ConvGeometry",
    "Positions",
    "conv_contributions",
    "conv_geometry",
    "conv_output_rows",
    "conv_output_samples",
    "conv_patches",
    "conv_positions",
    "linear_contributions",
    "linear_positions",
]


@dataclass(frozen=True)
class ConvGeometry:
    strides: tuple[int, int]
    dilations: tuple[int, int]
    pads_begin: tuple[int, int]
    out_size: tuple[int, int]


def conv_geometry(node: onnx.NodeProto, x_shape, w_shape) -> ConvGeometry:
    """Strides, dilations, explicit begin pads and output size of a 1-D or 2-D Conv."""
    attrs = {a.name: helper.get_attribute_value(a) for a in node.attribute}
    spatial = len(w_shape) - 2
    strides = list(attrs.get("strides", [1] * spatial))
    dilations = list(attrs.get("dilations", [1] * spatial))
    kernel = list(w_shape[2:])
    size = list(x_shape[2:])
    auto_pad = attrs.get("auto_pad", b"NOTSET")
    auto_pad = auto_pad.decode() if isinstance(auto_pad, bytes) else auto_pad
    pads = list(attrs.get("pads", [0] * (2 * spatial)))
    if auto_pad in ("SAME_UPPER", "SAME_LOWER"):
        pads = [0] * (2 * spatial)
        for i in range(spatial):
            out = -(-size[i] // strides[i])
            total = max((out - 1) * strides[i] + (kernel[i] - 1) * dilations[i] + 1 - size[i], 0)
            small = total // 2
            pads[i], pads[i + spatial] = (small, total - small) if auto_pad == "SAME_UPPER" else (total - small, small)
    elif auto_pad == "VALID":
        pads = [0] * (2 * spatial)
    out_size = [
        (size[i] + pads[i] + pads[i + spatial] - (kernel[i] - 1) * dilations[i] - 1) // strides[i] + 1
        for i in range(spatial)
    ]
    if spatial == 1:
        return ConvGeometry((1, strides[0]), (1, dilations[0]), (0, pads[0]), (1, out_size[0]))
    return ConvGeometry(tuple(strides), tuple(dilations), (pads[0], pads[1]), tuple(out_size))


@dataclass(frozen=True)
class Positions:
    """Sampled outputs: for each sample its row (image), output unit and, for convs, window."""

    row: np.ndarray
    unit: np.ndarray
    top: np.ndarray | None = None
    left: np.ndarray | None = None


def conv_positions(
    images: int, filters: int, geometry: ConvGeometry, per_image: int, rng: np.random.Generator
) -> Positions:
    row = np.repeat(np.arange(images), per_image)
    oh, ow = geometry.out_size
    return Positions(
        row=row,
        unit=rng.integers(0, filters, size=row.size),
        top=rng.integers(0, oh, size=row.size) * geometry.strides[0] - geometry.pads_begin[0],
        left=rng.integers(0, ow, size=row.size) * geometry.strides[1] - geometry.pads_begin[1],
    )


def conv_contributions(
    x: np.ndarray, weight: np.ndarray, geometry: ConvGeometry, at: Positions
) -> np.ndarray:
    """x̂ per input channel at sampled (filter, location) outputs of a group=1 Conv.

    Returns (S, C_in): Σ over the kernel window of W[f, c] · x[c, window], zero padding
    included, so each row sums to the conv output minus bias.
    """
    x = x[:, :, None, :] if x.ndim == 3 else x
    pixel, inside = _window_pixels(x.shape, weight.shape, geometry, at)
    if _dense(pixel, x.shape):
        return _contributions_channels_last(x, weight, pixel, inside, at)
    patches = _masked(_gather_elements(x, pixel, np.arange(x.shape[1])), inside)
    weight = weight.reshape(weight.shape[0], weight.shape[1], -1)
    patches = patches.reshape(len(patches), patches.shape[1], -1)
    out = np.empty(patches.shape[:2], np.float64)
    step = max(1, _GATHER_ELEMENTS // max(patches.shape[1] * patches.shape[2], 1))
    for start in range(0, len(patches), step):
        rows = slice(start, start + step)
        out[rows] = np.einsum("sck,sck->sc", patches[rows], weight[at.unit[rows]])
    return out


def _contributions_channels_last(x: np.ndarray, weight: np.ndarray, pixel: np.ndarray, inside: np.ndarray,
                                 at: Positions) -> np.ndarray:
    """`conv_contributions` from whole pixels of a channels-last copy, windows and filters kept
    as (S, kh·kw, C): no transposing copy of the gathered windows into (S, C, kh, kw) (ResNet-50's
    7² layer, 5,120 samples of 512 channels: 122 → 82 ms)."""
    c = x.shape[1]
    table = _pixel_table(x)
    filters = np.ascontiguousarray(weight.reshape(weight.shape[0], c, -1).transpose(0, 2, 1))  # (F, k, C)
    pixel, inside = pixel.reshape(len(pixel), -1), inside.reshape(len(inside), -1)
    out = np.empty((len(pixel), c), np.float64)
    step = max(1, _GATHER_ELEMENTS // max(pixel.shape[1] * c, 1))
    for start in range(0, len(pixel), step):
        block = slice(start, start + step)
        windows = table[pixel[block]]  # (s, k, C)
        border = np.flatnonzero(~inside[block].all(axis=1))
        if len(border):
            windows[border] = np.where(inside[block][border][:, :, None], windows[border], 0)
        out[block] = np.einsum("skc,skc->sc", windows, filters[at.unit[block]])
    return out


def conv_output_samples(y: np.ndarray, geometry: ConvGeometry, at: Positions,
                        units: np.ndarray) -> np.ndarray | None:
    """A conv's output `y` (N, F, ...) at each sampled window and the filter `units[s]` of that
    sample, (S,); None when `y` does not have the geometry's output size."""
    places = _output_places(y, geometry, at)
    if places is None:
        return None
    y, oy, ox = places
    return y[at.row, units, oy, ox]


def conv_output_rows(y: np.ndarray, geometry: ConvGeometry, at: Positions,
                     filters: np.ndarray) -> np.ndarray | None:
    """A conv's output `y` (N, F, ...) at the sampled windows for the given filters,
    (S, len(filters)); None when `y` does not have the geometry's output size."""
    places = _output_places(y, geometry, at)
    if places is None:
        return None
    y, oy, ox = places
    # one take from flat offsets: 2.5-3x numpy's four broadcast index arrays (ResNet-50's and
    # VGG-16's refit rows: 24 → 8.5 ms for 5,760 windows of 256 filters)
    _, f, h, w = y.shape
    place = at.row.astype(np.int64) * (f * h * w) + oy.astype(np.int64) * w + ox
    return np.take(np.ascontiguousarray(y).reshape(-1),
                   place[:, None] + np.asarray(filters, dtype=np.int64)[None, :] * (h * w))


def _output_places(y: np.ndarray, geometry: ConvGeometry, at: Positions):
    if y.ndim == 3:
        y = y[:, :, None, :]
    if y.ndim != 4 or tuple(y.shape[2:]) != tuple(geometry.out_size):
        return None
    oy = (at.top + geometry.pads_begin[0]) // geometry.strides[0]
    ox = (at.left + geometry.pads_begin[1]) // geometry.strides[1]
    return y, oy, ox


_GATHER_ELEMENTS = 1 << 22  # gathered entries per block (int64 indices: 32 MB)


def conv_patches(x: np.ndarray, weight_shape, geometry: ConvGeometry, at: Positions,
                 channels: np.ndarray | None = None) -> np.ndarray:
    """The input windows (S, C_in, kh, kw) under sampled outputs, zero padding included, of
    all input channels or of `channels` alone.

    No padded copy of the activation (0.4 GB per batch on VGG-16's first layers): places in the
    padding are clipped, gathered and zeroed; the work is in proportion to the windows.
    """
    x = x[:, :, None, :] if x.ndim == 3 else x
    pixel, inside = _window_pixels(x.shape, weight_shape, geometry, at)
    picked = None if channels is None else np.asarray(channels, np.int64)
    if _dense(pixel, x.shape):
        out = _gather_pixels(x, pixel, picked)
    else:
        out = _gather_elements(x, pixel, np.arange(x.shape[1]) if picked is None else picked)
    return _masked(out, inside)


def _window_pixels(x_shape, weight_shape, geometry: ConvGeometry, at: Positions) -> tuple[np.ndarray, np.ndarray]:
    """Each window's places as indices into the N·H·W pixels (clipped into the map), (S, kh, kw),
    and which of them lie inside it (the others are padding)."""
    _, _, h, w = x_shape
    kh, kw = (1, weight_shape[2]) if len(weight_shape) == 3 else tuple(weight_shape[2:])
    (dh, dw) = geometry.dilations
    ys = at.top[:, None].astype(np.int64) + np.arange(kh) * dh  # (S, kh), padding: outside [0, h)
    xs = at.left[:, None].astype(np.int64) + np.arange(kw) * dw
    inside = ((ys >= 0) & (ys < h))[:, :, None] & ((xs >= 0) & (xs < w))[:, None, :]  # (S, kh, kw)
    pixel = (np.clip(ys, 0, h - 1) * w)[:, :, None] + np.clip(xs, 0, w - 1)[:, None, :]
    pixel += (at.row.astype(np.int64) * (h * w))[:, None, None]
    return pixel, inside


def _dense(pixel: np.ndarray, x_shape) -> bool:
    """Windows that cover a batch's places often enough to gather them as whole pixels."""
    n, _, h, w = x_shape
    return pixel.size * PIXEL_GATHER_COVERAGE >= n * h * w


def _masked(out: np.ndarray, inside: np.ndarray) -> np.ndarray:
    """Windows (S, C, kh, kw) with their places in the padding zeroed."""
    border = np.flatnonzero(~inside.all(axis=(1, 2)))  # windows reaching into the padding
    if len(border):  # only they are masked (a quarter of a 14² map's windows; a pass over all took 3x)
        out[border] = np.where(inside[border][:, None], out[border], 0)
    return out


# Windows covering at least 1/6 of a batch's places (counted with their overlaps) are gathered
# pixel by pixel from a channels-last copy (1.2-2.8x faster on ResNet-50's and VGG-16's late
# layers); sparser ones element by element, which copies nothing (VGG-16's 224² layers).
PIXEL_GATHER_COVERAGE = 6


def _gather_pixels(x: np.ndarray, pixel: np.ndarray, channels: np.ndarray | None) -> np.ndarray:
    """Windows as whole pixels (a channel vector each) of a channels-last copy of all channels
    or of `channels`, (S, C, kh, kw)."""
    table = _pixel_table(x, channels)
    out = np.empty((len(pixel), table.shape[1], *pixel.shape[1:]), dtype=x.dtype)
    step = max(1, _GATHER_ELEMENTS // max(out[0].size, 1))
    for start in range(0, len(pixel), step):
        block = slice(start, start + step)
        rows = table[pixel[block].reshape(-1)]
        out[block] = rows.reshape(*pixel[block].shape, -1).transpose(0, 3, 1, 2)
    return out


def _pixel_table(x: np.ndarray, channels: np.ndarray | None = None) -> np.ndarray:
    """A channels-last copy of `x` (of all channels or of `channels`), one row per pixel."""
    n, _, h, w = x.shape
    last = x.transpose(0, 2, 3, 1)
    return (np.ascontiguousarray(last) if channels is None else last[..., channels]).reshape(n * h * w, -1)


def _gather_elements(x: np.ndarray, pixel: np.ndarray, channels: np.ndarray) -> np.ndarray:
    """Windows one element at a time from the flat input, in blocks, (S, C, kh, kw)."""
    n, c, h, w = x.shape
    spot = pixel + (pixel // (h * w)) * ((c - 1) * h * w)  # image offsets count every channel
    per_channel = channels * (h * w)
    flat = x.reshape(-1)
    out = np.empty((len(spot), len(channels), *spot.shape[1:]), dtype=x.dtype)
    step = max(1, _GATHER_ELEMENTS // max(out[0].size, 1))
    for start in range(0, len(spot), step):
        block = slice(start, start + step)
        np.take(flat, spot[block, None] + per_channel[None, :, None, None], out=out[block])
    return out


def linear_positions(rows: int, units: int, per_row: int, rng: np.random.Generator) -> Positions:
    row = np.repeat(np.arange(rows), per_row)
    return Positions(row=row, unit=rng.integers(0, units, size=row.size))


def linear_contributions(a: np.ndarray, weight: np.ndarray, at: Positions) -> np.ndarray:
    """x̂_k = a[row, k] · W[k, f] at the sampled (row, unit) outputs; (S, K)."""
    rows = a.reshape(-1, a.shape[-1]).astype(np.float64)
    return rows[at.row] * weight[:, at.unit].T
