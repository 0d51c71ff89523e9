"""Consumer kinds: how a layer that reads a group's channels stores its weight and reads them.

ThiNet rescales the readers of a group (the layers whose input channels are the group's
channels). Each kind says, once, what every stage needs to know about such a reader:

- where the channels sit in its input (`channel_axis`),
- its weight in a *working form*, the same for all kinds of a family: `[F, C, k...]` for
  windowed readers (Conv, ConvTranspose read as the stride-1 conv it equals), `[K, F]` for
  row readers (Gemm, MatMul), and back (`working`, `stored`),
- which axis of the working form holds the output filters (`filter_axis`).

Adding a reader op is adding one kind here and one channel rule.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

__all__ = ["CONV", "CONV_TRANSPOSE", "LINEAR", "ConsumerKind", "consumer_kind", "transposed_conv_as_conv"]


@dataclass(frozen=True, eq=False)
class ConsumerKind:
    """A reader family; `windowed` readers are sampled by input windows, the others by rows.

    A kind equals its name (`kind == "conv"`), so code written against the old string field
    keeps working while it moves to the methods below.
    """

    name: str
    windowed: bool

    def __eq__(self, other: object) -> bool:
        if isinstance(other, str):
            return self.name == other
        return isinstance(other, ConsumerKind) and (self.name, self.windowed) == (other.name, other.windowed)

    def __hash__(self) -> int:
        return hash(self.name)

    def channel_axis(self, ndim: int) -> int:
        return 1 if self.windowed else ndim - 1

    @property
    def filter_axis(self) -> int:
        """Axis of the working form that indexes output filters."""
        return 0 if self.windowed else 1

    def working(self, stored: np.ndarray, transpose: bool = False) -> np.ndarray:
        """The stored weight in working form (`transpose`: a Gemm with transB stores [F, K])."""
        return stored.T if transpose else stored

    def stored(self, working: np.ndarray, transpose: bool = False) -> np.ndarray:
        return working.T if transpose else working

    def from_matrix(self, matrix: np.ndarray, stored_shape, transpose: bool = False) -> np.ndarray:
        """A refit [K_kept·window, F] matrix as the stored weight (input channels already cut)."""
        if not self.windowed:
            return self.stored(matrix, transpose)
        filters = matrix.shape[1]
        kernel = tuple(stored_shape[2:])
        working = matrix.T.reshape(filters, -1, *kernel)
        return self.stored(working)

    def conv_attributes(self, attrs: dict) -> dict:
        """A windowed reader's attributes as those of the Conv it is sampled as."""
        return attrs

    def conv_input(self, x: np.ndarray, attrs: dict) -> np.ndarray:
        """A windowed reader's input as the input of the Conv it is sampled as."""
        return x


@dataclass(frozen=True, eq=False)
class _TransposedConv(ConsumerKind):
    """ConvTranspose stores [C_in, F, k...]; it equals a stride-1 conv with the kernel flipped."""

    def conv_attributes(self, attrs: dict) -> dict:
        kernel = tuple(attrs["kernel_shape"])
        dummy = np.zeros((1, 1, *([1] * len(kernel))), np.float32)
        pads = transposed_conv_as_conv(dummy, kernel, *_transposed_geometry(attrs))[1]
        return {"kernel_shape": list(kernel), "dilations": list(_transposed_geometry(attrs)[1]), "pads": pads}

    def conv_input(self, x: np.ndarray, attrs: dict) -> np.ndarray:
        return transposed_conv_as_conv(x, tuple(attrs["kernel_shape"]), *_transposed_geometry(attrs))[0]

    def working(self, stored: np.ndarray, transpose: bool = False) -> np.ndarray:
        spatial = tuple(range(2, stored.ndim))
        return np.flip(stored, axis=spatial).swapaxes(0, 1)

    def stored(self, working: np.ndarray, transpose: bool = False) -> np.ndarray:
        spatial = tuple(range(2, working.ndim))
        return np.ascontiguousarray(np.flip(working.swapaxes(0, 1), axis=spatial))


CONV = ConsumerKind("conv", windowed=True)
LINEAR = ConsumerKind("linear", windowed=False)
CONV_TRANSPOSE = _TransposedConv("conv_transpose", windowed=True)


def consumer_kind(name: str) -> ConsumerKind:
    """The kind of a name ("conv", "conv_transpose", "linear")."""
    kinds = {k.name: k for k in (CONV, CONV_TRANSPOSE, LINEAR)}
    if name not in kinds:
        raise ValueError(f"unknown consumer kind {name!r} (known: {', '.join(kinds)})")
    return kinds[name]


def _transposed_geometry(attrs: dict) -> tuple:
    """(strides, dilations, pads, output_padding) of a ConvTranspose, defaults filled in."""
    spatial = len(attrs["kernel_shape"])
    return (tuple(attrs.get("strides", [1] * spatial)), tuple(attrs.get("dilations", [1] * spatial)),
            tuple(attrs.get("pads", [0] * (2 * spatial))), tuple(attrs.get("output_padding", [0] * spatial)))


def transposed_conv_as_conv(
    x: np.ndarray, kernel: tuple[int, ...], strides, dilations, pads, output_padding
) -> tuple[np.ndarray, list[int]]:
    """The input and pads of the stride-1 conv that a ConvTranspose equals.

    Zeros go between input pixels (stride - 1 of them) and the pads become
    dilation·(k - 1) - pad at the begin and that plus output_padding at the end.
    Returns (x with zeros inserted, pads [begin..., end...]).
    """
    spatial = len(kernel)
    size = [(n - 1) * s + 1 for n, s in zip(x.shape[2:], strides)]
    up = np.zeros((*x.shape[:2], *size), dtype=x.dtype)
    up[(slice(None), slice(None), *(slice(None, None, s) for s in strides))] = x
    begin = [d * (k - 1) - pads[i] for i, (d, k) in enumerate(zip(dilations, kernel))]
    end = [d * (k - 1) - pads[spatial + i] + output_padding[i]
           for i, (d, k) in enumerate(zip(dilations, kernel))]
    return up, begin + end
