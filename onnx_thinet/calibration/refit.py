"""Refit statistics: once the kept inputs are chosen, a second sweep samples each consumer's
kept input windows and the reference outputs there, so its whole weight and bias can be
re-fitted by least squares (cross-validated on two folds of images)."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import numpy as np
import onnx

from onnx_thinet.calibration.readers import (
    ReferenceReader,
    consumer_bias,
    consumer_weight,
    conv_view,
    kept_filters,
    reference_outputs,
    reference_weights,
)
from onnx_thinet.calibration.segments import SegmentRunner
from onnx_thinet.calibration.windows import Positions, conv_geometry, conv_patches, conv_positions
from onnx_thinet.channels.layout import ChannelGroup, Consumer, removed_positions, without_positions
from onnx_thinet.solve.moments import FitMoments, FitSamples
from onnx_thinet.solve.threads import blas_threads_for

if TYPE_CHECKING:
    from onnx_thinet.calibration.collect import ConsumerStats

__all__ = ["REFIT_ROWS_PER_UNKNOWN", "RefitStats", "refit_statistics"]


@dataclass
class RefitStats:
    """Statistics to re-fit a consumer's whole weight (and bias) by least squares.

    Rows are sampled consumer inputs p (a conv's flattened window, a linear layer's input row),
    targets are the consumer's outputs for every filter at that place. Rows of even and odd
    images go to two folds, so the ridge can be cross-validated.
    """

    dims: int
    outputs: int
    in_channels: int  # input positions of the consumer's channel axis (dims = in_channels·window)
    prior: np.ndarray  # the consumer's current weights as a [dims, outputs] matrix
    columns_kept: bool = False  # rows hold only the kept inputs (no columns to pick)
    expected_rows: int | None = None  # fewer rows than dims: keep the rows, not a dims² matrix
    folds: tuple[FitMoments | FitSamples, FitMoments | FitSamples] = field(init=False)

    def __post_init__(self) -> None:
        few = self.expected_rows is not None and self.expected_rows < self.dims
        kind = FitSamples if few else FitMoments
        self.folds = (kind(self.dims, self.outputs), kind(self.dims, self.outputs))

    def add(self, inputs: np.ndarray, targets: np.ndarray, odd: np.ndarray) -> None:
        for fold, rows in zip(self.folds, _fold_rows(np.asarray(odd, dtype=bool))):
            part = inputs[rows]
            if len(part):
                fold.add(part, targets[rows])

    @property
    def total(self) -> FitMoments:
        return self.folds[0] + self.folds[1]


def _fold_rows(odd: np.ndarray) -> tuple[slice | np.ndarray, slice | np.ndarray]:
    """The rows of each fold: slices (views, no copy of VGG-16's 30 MB of windows per batch)
    when the rows come grouped by fold, else masks."""
    change = np.flatnonzero(odd[1:] != odd[:-1])
    if len(change) > 1:
        return ~odd, odd
    split = int(change[0]) + 1 if len(change) else len(odd)
    first, rest = slice(0, split), slice(split, len(odd))
    if not len(odd) or not odd[0]:
        return first, rest
    return rest, first


REFIT_ROWS_PER_UNKNOWN = 10  # sampled windows per refit unknown, over the calibration set


def refit_statistics(
    model: onnx.ModelProto,
    group: ChannelGroup,
    kept: np.ndarray,
    stats: dict[str, ConsumerStats],
    current: SegmentRunner,
    reference: SegmentRunner | None = None,
    reference_model: onnx.ModelProto | None = None,
    *,
    seed: int = 0,
    kept_outputs: dict[str, np.ndarray] | None = None,
) -> None:
    """Second sweep, once `kept` is chosen: statistics to refit each consumer on the kept inputs.

    Only the kept input positions are sampled, so the moments are (kept · window)² instead of
    the full layer's; the targets are every output of the (reference) consumer at that place.
    Attaches a RefitStats (`columns_kept=True`) to stats[consumer.node].
    """
    consumers = list(group.consumers)
    source, source_model = (reference, reference_model) if reference is not None else (current, model)
    weights = reference_weights(source_model, consumers, kept_outputs if reference else None)
    biases = {c.node: kept_filters(consumer_bias(source_model, c), c,
                                   (kept_outputs or {}).get(c.node) if reference else None, bias=True)
              for c in consumers}
    outputs = reference_outputs(reference_model, consumers) if reference is not None else {}
    if outputs:
        reference.ensure(reference_model, sorted(outputs.values()))  # stored by the first sweep
    nodes = {n.name: n for n in model.graph.node}
    rng = np.random.default_rng(seed)
    images = len(current.batching.indices)
    for batch in range(current.batching.count):
        first = current.batching.first_image(batch)
        for consumer in consumers:
            x = current.get(consumer.input, batch)
            if consumer.node in outputs:
                ref = ReferenceReader(None, weights[consumer.node], source.get(outputs[consumer.node], batch),
                                      filters=(kept_outputs or {}).get(consumer.node))
            else:
                ref = source.get(consumer.input, batch) if reference is not None else x
            axis = consumer.kind.channel_axis(x.ndim)
            lost = removed_positions(consumer.weight.layout, kept, group.channels, x.shape[axis])
            window = int(np.prod(weights[consumer.node].shape[2:])) if consumer.kind.windowed else 1
            entry = stats[consumer.node]
            own = _own_weight(model, consumer, weights[consumer.node], x) if entry.refit is None else None
            with blas_threads_for((x.shape[axis] - len(lost)) * window):  # the refit's unknowns
                _add_refit(entry, consumer, nodes[consumer.node], x, ref, weights[consumer.node],
                           biases[consumer.node], own, lost, images, rng, first)


def _own_weight(model: onnx.ModelProto, consumer: Consumer, weight: np.ndarray, x: np.ndarray) -> np.ndarray:
    """What the refit shrinks toward: the consumer's weight in the pruned copy, on the inputs
    it reads now. While its input still has all the reference's channels, that is the
    reference's `weight` (nothing has cut or refitted it yet: no copy of VGG-16's 411 MB FC
    weight); once an earlier pass cut other channels of a Concat it reads, only the pruned
    copy's weight lines up with them."""
    axis, weight_axis = consumer.kind.channel_axis(x.ndim), 1 if consumer.kind.windowed else 0
    if weight.shape[weight_axis] == x.shape[axis]:
        return weight
    return consumer_weight(model, consumer)


def _add_refit(entry: ConsumerStats, consumer: Consumer, node, x, ref, weight, bias, own, lost,
               images: int, rng, first_image: int) -> None:
    """Sample the kept positions of consumer inputs `x` (all but `lost`) at random places;
    targets are all outputs there. `ref` is the reference input, or a `ReferenceReader`
    that knows the reference output; `weight` is the reference's, `own` the pruned copy's."""
    axis = consumer.kind.channel_axis(x.ndim)
    if consumer.kind.windowed:
        view = conv_view(consumer, node)
        kept = np.setdiff1d(np.arange(x.shape[axis]), lost)
        ref = ref if isinstance(ref, ReferenceReader) else view.input(ref)
        inputs, targets, image = _conv_refit_rows(view.node, view.input(x), ref, weight, bias, images, rng, kept)
    else:
        inputs, targets, image = _linear_refit_rows(without_positions(x, lost, axis), ref, weight, bias)
    if entry.refit is None:
        _start_refit(entry, consumer, own, lost, len(inputs), images, x.shape[0])
    entry.refit.add(inputs, targets, (first_image + image) % 2 == 1)


def _start_refit(entry: ConsumerStats, consumer: Consumer, own, lost, rows: int, images: int,
                 batch: int) -> None:
    """The consumer's RefitStats, made on its first batch of `rows` rows; its prior is a copy of
    `own` (`_own_weight`) on the inputs it keeps."""
    if consumer.kind.windowed:
        prior = without_positions(own, lost, 1)
        in_channels = prior.shape[1]
        prior = prior.reshape(prior.shape[0], -1).T
    else:
        prior = without_positions(own, lost, 0)
        in_channels = prior.shape[0]
    entry.refit = RefitStats(prior.shape[0], prior.shape[1], in_channels, prior.astype(np.float64),
                             columns_kept=True, expected_rows=_refit_rows_expected(rows, images, batch))


def _conv_refit_rows(node, x, ref, weight, bias, images: int, rng, kept: np.ndarray):
    """Windows of the `kept` input channels and the reference conv's outputs at the same places
    (read from its stored output when `ref` is a `ReferenceReader`, else computed from the
    reference input `ref`)."""
    kept_shape = (weight.shape[0], len(kept), *weight.shape[2:])
    dims = int(np.prod(kept_shape[1:]))
    geometry = conv_geometry(node, x.shape, kept_shape)
    places = int(np.prod(geometry.out_size))
    per_image = min(places, max(10, math.ceil(REFIT_ROWS_PER_UNKNOWN * dims / max(images, 1))))
    at = _grouped_by_parity(conv_positions(x.shape[0], 1, geometry, per_image, rng))
    inputs = conv_patches(x, kept_shape, geometry, at, channels=kept).reshape(len(at.row), -1)
    if isinstance(ref, ReferenceReader):
        return inputs, ref.rows(geometry, at), at.row
    ref_inputs = conv_patches(ref, weight.shape, geometry, at).reshape(len(at.row), -1)
    targets = (ref_inputs @ weight.reshape(weight.shape[0], -1).T).astype(np.float64) + bias
    return inputs, targets, at.row


def _grouped_by_parity(at: Positions) -> Positions:
    """The same samples, those of even images first: folds go by image parity, so each fold's
    rows are then one slice."""
    order = np.argsort(at.row % 2, kind="stable")
    return Positions(at.row[order], at.unit[order], at.top[order], at.left[order])


def _linear_refit_rows(x, ref_x, weight, bias):
    inputs = x.reshape(-1, x.shape[-1])
    targets = (ref_x.reshape(-1, ref_x.shape[-1]) @ weight).astype(np.float64) + bias
    return inputs, targets, np.arange(len(inputs)) // (len(inputs) // x.shape[0])


def _refit_rows_expected(rows: int, images: int, batch: int) -> int:
    """Rows the whole calibration set will give (to choose moments or kept samples)."""
    return int(math.ceil(rows / max(batch, 1) * images))
