"""Calibration engine: stream batches through onnxruntime and accumulate ThiNet statistics.

For every convolution reading a group we sample (image, output unit, location) triples and record
x̂_c, the contribution of input channel c to that output, and the target ŷ; a linear reader's
sums over all its rows and units are exact (`calibration.linear`). Only the sufficient
statistics XᵀX, Xᵀŷ and ‖ŷ‖² (plus activation zero counts for APoZ) are kept, so memory does
not depend on the number of calibration images.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import numpy as np
import onnx

from onnx_thinet.calibration.linear import LinearChannelMoments, channel_positions
from onnx_thinet.calibration.readers import (
    ReferenceReader,
    consumer_bias,
    consumer_weight,
    conv_view,
    read_from_reference,
    reference_outputs,
    reference_tensors,
    reference_weights,
)
from onnx_thinet.calibration.refit import RefitStats, refit_statistics
from onnx_thinet.calibration.segments import SegmentRunner
from onnx_thinet.calibration.windows import (
    ConvGeometry,
    Positions,
    conv_contributions,
    conv_geometry,
    conv_positions,
    linear_contributions,
    linear_positions,
)
from onnx_thinet.channels.layout import ChannelGroup, Consumer, channel_indicator
from onnx_thinet.solve.threads import blas_threads_for

# refit statistics and the reference readers live in `refit` and `readers`; their public names
# are re-exported here, where the engine's callers have always found them
__all__ = [
    "ConsumerStats",
    "RefitStats",
    "channel_statistics",
    "refit_statistics",
    "reference_tensors",
    "samples_per_image",
]

logger = logging.getLogger(__name__)

Progress = Callable[[int], None]


@dataclass
class ConsumerStats:
    """Running sufficient statistics of one consumer's sampled reconstruction problem."""

    channels: int
    gram: np.ndarray = field(init=False)
    corr: np.ndarray = field(init=False)
    target_sq: float = 0.0
    samples: int = 0
    zeros: np.ndarray = field(init=False)
    elements: int = 0
    refit: RefitStats | None = None

    def __post_init__(self) -> None:
        self.gram = np.zeros((self.channels, self.channels))
        self.corr = np.zeros(self.channels)
        self.zeros = np.zeros(self.channels)

    def add(self, contributions: np.ndarray, target: np.ndarray) -> None:
        x = np.asarray(contributions, dtype=np.float64)
        y = np.asarray(target, dtype=np.float64)
        self.gram += x.T @ x
        self.corr += x.T @ y
        self.target_sq += float(y @ y)
        self.samples += len(y)

    def merged(self, other: ConsumerStats) -> ConsumerStats:
        out = ConsumerStats(self.channels)
        out.gram = self.gram + other.gram
        out.corr = self.corr + other.corr
        out.target_sq = self.target_sq + other.target_sq
        out.samples = self.samples + other.samples
        out.zeros = self.zeros + other.zeros
        out.elements = self.elements + other.elements
        return out



def samples_per_image(channels: int, images: int, requested: int | None) -> int:
    """Enough samples for a well-posed fit: ≥ 10 per image (the paper) and ≥ 20× the channels."""
    if requested:
        return requested
    return max(10, math.ceil(20 * channels / max(images, 1)))


def channel_statistics(
    model: onnx.ModelProto,
    groups: Sequence[ChannelGroup],
    current: SegmentRunner,
    reference: SegmentRunner | None = None,
    reference_model: onnx.ModelProto | None = None,
    *,
    per_image: int | None = None,
    seed: int = 0,
    kept_outputs: dict[str, np.ndarray] | None = None,
    progress: Progress | None = None,
    zero_counts: bool = False,
) -> dict[str, dict[str, ConsumerStats]]:
    """One sweep over the calibration batches gathering channel statistics for all `groups`.

    `model` is the network as pruned so far; with `reference` (running the original network)
    the targets ŷ come from it instead, so reconstruction also corrects earlier layers' error.
    `kept_outputs[node]` lists which of the reference's output filters a consumer still has
    (it may already have been cut as the producer of an earlier group).
    `zero_counts`: also count zero activations per channel (APoZ; a pass over every element).
    Returns stats[group.producer][consumer.node].
    """
    tensors = sorted({c.input for g in groups for c in g.consumers})
    consumers = [c for g in groups for c in g.consumers]
    current.ensure(model, tensors)
    outputs, ref_tensors, ref_weights, ref_biases = _reference_side(reference, reference_model, consumers,
                                                                    kept_outputs)
    weights = {c.node: consumer_weight(model, c) for c in consumers}
    nodes = {n.name: n for n in model.graph.node}
    stats = {g.producer: {c.node: ConsumerStats(g.channels) for c in g.consumers} for g in groups}
    rng = np.random.default_rng(seed)
    images = len(current.batching.indices)
    exact: dict[tuple[str, str], LinearChannelMoments] = {}
    for batch in range(current.batching.count):
        values = {name: current.get(name, batch) for name in tensors}
        ref_values = {name: reference.get(name, batch) for name in ref_tensors} if reference else {}
        for group in groups:
            count = samples_per_image(group.channels, images, per_image)
            for consumer in group.consumers:
                entry, x = stats[group.producer][consumer.node], values[consumer.input]
                ref_x, ref_weight = ref_values.get(consumer.input), ref_weights.get(consumer.node)
                if consumer.kind.windowed:
                    ref = None if reference is None else ReferenceReader(
                        ref_x, ref_weight, ref_values.get(outputs.get(consumer.node)),
                        ref_biases.get(consumer.node, 0.0), (kept_outputs or {}).get(consumer.node))
                    with blas_threads_for(group.channels):
                        _add_channel_samples(entry, group.channels, consumer, nodes[consumer.node], x,
                                             weights[consumer.node], ref, count, rng, zero_counts)
                    continue
                key = (group.producer, consumer.node)
                if key not in exact:
                    exact[key] = _linear_moments(group.channels, consumer, x, weights[consumer.node], count)
                _add_linear_exact(entry, exact[key], x, weights[consumer.node], ref_x, ref_weight, count,
                                  zero_counts)
        if progress is not None:
            progress(len(current.batching.rows(batch)))
    for (producer, node), moments in exact.items():
        moments.finish(stats[producer][node])
    return stats


def _reference_side(reference: SegmentRunner | None, reference_model, consumers, kept_outputs):
    """What a sweep reads from the original network, computed there: the plain Conv readers'
    output tensors, the tensors to read, the readers' weights (filters still kept) and biases."""
    if reference is None:
        return {}, [], {}, {}
    outputs = reference_outputs(reference_model, consumers)
    tensors = sorted(read_from_reference(consumers, outputs))
    reference.ensure(reference_model, tensors)
    weights = reference_weights(reference_model, consumers, kept_outputs)
    biases = {c.node: consumer_bias(reference_model, c) for c in consumers if c.node in outputs}
    return outputs, tensors, weights, biases


def _add_channel_samples(entry: ConsumerStats, channels: int, consumer: Consumer, node, x, weight,
                         ref: ReferenceReader | None, count: int, rng, zero_counts: bool) -> None:
    """Sampled per-channel contributions x̂ and the target ŷ of one consumer on one batch."""
    sampler = _sampler(consumer, node, x.shape, weight, count, rng)
    contrib = sampler(x, weight)
    axis = consumer.kind.channel_axis(x.ndim)
    indicator = channel_indicator(consumer.weight.layout, channels, x.shape[axis])
    # the usual reader takes the group's channels as its whole input, one position each: a
    # product with the identity would cost 2·S·C² (10,000 samples of 512 channels: 5 GFLOP)
    whole = indicator.shape[0] == indicator.shape[1] and np.array_equal(indicator, np.eye(channels))
    per_channel = contrib if whole else contrib @ indicator
    # The target is the group's share of the output; other inputs of the consumer
    # (a Concat's foreign entries) are not touched by this selection.
    target = per_channel.sum(axis=1)
    if ref is not None:
        target = target + ref.sums(sampler) - contrib.sum(axis=1)
    entry.add(per_channel, target)
    if zero_counts:
        _count_zeros(entry, x, axis, indicator)


def _linear_moments(channels: int, consumer: Consumer, x, weight, count: int) -> LinearChannelMoments:
    positions = channel_positions(consumer.weight.layout, channels, x.shape[-1])
    return LinearChannelMoments(positions, weight, count / weight.shape[1])


def _add_linear_exact(entry: ConsumerStats, moments: LinearChannelMoments, x, weight, ref_x, ref_weight,
                      count: int, zero_counts: bool) -> None:
    """Exact statistics of a linear reader on one batch; the target is the group's share of the
    output (plus, with a reference, what the reference network adds on top of the current one)."""
    rows = x.reshape(-1, x.shape[-1])
    group = moments.positions.ravel()
    if ref_x is not None and len(group) == rows.shape[1]:
        # the group is the reader's whole input (a chain): its share is the reference output
        # (`weight[group]` would copy the whole weight per batch: 411 MB on VGG-16's first FC)
        target = ref_x.reshape(-1, ref_x.shape[-1]) @ ref_weight
    elif len(group) == rows.shape[1]:
        target = rows @ weight
    else:
        target = rows[:, group] @ weight[group]
        if ref_x is not None:
            target += ref_x.reshape(-1, ref_x.shape[-1]) @ ref_weight - rows @ weight
    moments.add(entry, rows, target, len(rows) * count)
    if zero_counts:
        zeros = np.count_nonzero(rows == 0, axis=0)  # APoZ, as `_count_zeros` counts it
        entry.zeros += zeros[moments.positions].sum(axis=1)
        entry.elements += len(rows) * moments.positions.shape[1]


@dataclass(frozen=True)
class _Sampler:
    """Positions drawn once; calling it evaluates the contributions there on any (x, weight)."""

    at: Positions
    geometry: ConvGeometry | None  # windowed readers
    evaluate: Callable[[np.ndarray, np.ndarray], np.ndarray]

    def __call__(self, x: np.ndarray, weight: np.ndarray) -> np.ndarray:
        return self.evaluate(x, weight)


def _sampler(consumer: Consumer, node, x_shape, weight, count: int, rng) -> _Sampler:
    if consumer.kind.windowed:
        view = conv_view(consumer, node)
        conv_node, shape = view.node, view.shape(x_shape)
        geometry = conv_geometry(conv_node, shape, weight.shape)
        positions = conv_positions(x_shape[0], weight.shape[0], geometry, count, rng)
        return _Sampler(positions, geometry,
                        lambda x, w: conv_contributions(view.input(x), w, geometry, positions))
    rows = int(np.prod(x_shape[:-1], dtype=np.int64))
    positions = linear_positions(rows, weight.shape[1], count, rng)
    return _Sampler(positions, None, lambda x, w: linear_contributions(x, w, positions))


def _count_zeros(entry: ConsumerStats, x: np.ndarray, axis: int, indicator: np.ndarray) -> None:
    """Zero counts per channel of the consumer's input (APoZ)."""
    others = tuple(k for k in range(x.ndim) if k != axis % x.ndim)
    entry.zeros += np.count_nonzero(x == 0, axis=others).astype(np.float64) @ indicator
    entry.elements += x.size // x.shape[axis] * int(indicator.sum(axis=0).max())
