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
from onnx import helper, numpy_helper

from onnx_thinet.calibration.linear import LinearChannelMoments, channel_positions
from onnx_thinet.calibration.segments import SegmentRunner
from onnx_thinet.calibration.windows import (
    ConvGeometry,
    Positions,
    conv_contributions,
    conv_geometry,
    conv_output_rows,
    conv_output_samples,
    conv_patches,
    conv_positions,
    linear_contributions,
    linear_positions,
)
from onnx_thinet.channels.consumers import CONV
from onnx_thinet.channels.layout import ChannelGroup, Consumer, channel_indicator, removed_positions
from onnx_thinet.errors import InternalError
from onnx_thinet.solve.moments import FitMoments, FitSamples
from onnx_thinet.solve.threads import blas_threads_for

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
        for fold, rows in zip(self.folds, (~odd, odd)):
            if rows.any():
                fold.add(inputs[rows], targets[rows])

    @property
    def total(self) -> FitMoments:
        return self.folds[0] + self.folds[1]


REFIT_ROWS_PER_UNKNOWN = 10  # sampled windows per refit unknown, over the calibration set


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
    outputs = _reference_outputs(reference_model, consumers) if reference is not None else {}
    ref_tensors = sorted(_read_from_reference(consumers, outputs)) if reference is not None else []
    if reference is not None:
        reference.ensure(reference_model, ref_tensors)
    weights = {c.node: _consumer_weight(model, c) for c in consumers}
    ref_weights = _reference_weights(reference_model, consumers, kept_outputs) if reference else {}
    ref_biases = {c.node: _consumer_bias(reference_model, c) for c in consumers if c.node in outputs}
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
                    ref = None if reference is None else _ReferenceReader(
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
    return stats


@dataclass(frozen=True)
class _ReferenceReader:
    """A windowed reader in the original network on one batch: its input and its weight (the
    filters the reader still has) and, for a plain Conv, its output as onnxruntime computed it in
    the forward pass, with its bias and the original index of each filter still there (None: all)."""

    x: np.ndarray | None  # not stored when the output is
    weight: np.ndarray
    output: np.ndarray | None = None
    bias: np.ndarray | float = 0.0
    filters: np.ndarray | None = None

    def sums(self, sampler: _Sampler) -> np.ndarray:
        """Σ_c x̂_c at the sampled outputs: the output there less the bias, when it is known."""
        if self.output is None:
            return sampler(self.x, self.weight).sum(axis=1)
        units = sampler.at.unit if self.filters is None else np.asarray(self.filters)[sampler.at.unit]
        out = _known(conv_output_samples(self.output, sampler.geometry, sampler.at, units))
        return out.astype(np.float64) - (np.take(self.bias, units) if np.ndim(self.bias) else self.bias)

    def rows(self, geometry: ConvGeometry, at: Positions) -> np.ndarray:
        """Every filter's output (bias included) at the sampled windows."""
        filters = np.arange(self.weight.shape[0]) if self.filters is None else np.asarray(self.filters)
        return _known(conv_output_rows(self.output, geometry, at, filters)).astype(np.float64)


def _known(values: np.ndarray | None) -> np.ndarray:
    if values is None:  # onnxruntime's output and our window geometry disagree on the Conv
        raise InternalError("a Conv reader's output does not have the size its windows give")
    return values


def reference_tensors(model: onnx.ModelProto, consumers: Sequence[Consumer]) -> set[str]:
    """What the statistics of `consumers` read from the original network `model`: the output of
    a plain Conv reader, the input of any other."""
    return _read_from_reference(consumers, _reference_outputs(model, consumers))


def _read_from_reference(consumers: Sequence[Consumer], outputs: dict[str, str]) -> set[str]:
    return {c.input for c in consumers if c.node not in outputs} | set(outputs.values())


def _reference_outputs(model: onnx.ModelProto, consumers: Sequence[Consumer]) -> dict[str, str]:
    """The output tensor of each plain Conv reader (one group) in the original network.

    Its values at the sampled places are the targets: the next pass computes that output in
    its forward pass anyway, so storing it now replaces a second gather of the windows and,
    for the refit, a product with the whole weight at every sampled place.
    """
    nodes = {n.name: n for n in model.graph.node}
    outputs = {}
    for consumer in consumers:
        node = nodes.get(consumer.node)
        if (consumer.kind == CONV and node is not None and node.op_type == "Conv"
                and node.domain in ("", "ai.onnx") and node.output and node.output[0]):
            group = next((helper.get_attribute_value(a) for a in node.attribute if a.name == "group"), 1)
            if group == 1:
                outputs[consumer.node] = node.output[0]
    return outputs


def _add_channel_samples(entry: ConsumerStats, channels: int, consumer: Consumer, node, x, weight,
                         ref: _ReferenceReader | None, count: int, rng, zero_counts: bool) -> None:
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
    weights = _reference_weights(source_model, consumers, kept_outputs if reference else None)
    biases = {c.node: _filters(_consumer_bias(source_model, c), c,
                               (kept_outputs or {}).get(c.node) if reference else None, bias=True)
              for c in consumers}
    outputs = _reference_outputs(reference_model, consumers) if reference is not None else {}
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
                ref = _ReferenceReader(None, weights[consumer.node], source.get(outputs[consumer.node], batch),
                                       filters=(kept_outputs or {}).get(consumer.node))
            else:
                ref = source.get(consumer.input, batch) if reference is not None else x
            axis = consumer.kind.channel_axis(x.ndim)
            lost = removed_positions(consumer.weight.layout, kept, group.channels, x.shape[axis])
            window = int(np.prod(weights[consumer.node].shape[2:])) if consumer.kind.windowed else 1
            with blas_threads_for((x.shape[axis] - len(lost)) * window):  # the refit's unknowns
                _add_refit(stats[consumer.node], consumer, nodes[consumer.node], x, ref, weights[consumer.node],
                           biases[consumer.node], lost, images, rng, first)


def _reference_weights(model, consumers, kept_outputs) -> dict[str, np.ndarray]:
    maps = kept_outputs or {}
    return {c.node: _filters(_consumer_weight(model, c), c, maps.get(c.node)) for c in consumers}


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
        view = _conv_view(consumer, node)
        conv_node, shape = view.node, view.shape(x_shape)
        geometry = conv_geometry(conv_node, shape, weight.shape)
        positions = conv_positions(x_shape[0], weight.shape[0], geometry, count, rng)
        return _Sampler(positions, geometry,
                        lambda x, w: conv_contributions(view.input(x), w, geometry, positions))
    rows = int(np.prod(x_shape[:-1], dtype=np.int64))
    positions = linear_positions(rows, weight.shape[1], count, rng)
    return _Sampler(positions, None, lambda x, w: linear_contributions(x, w, positions))


def _add_refit(entry: ConsumerStats, consumer: Consumer, node, x, ref, weight, bias, lost,
               images: int, rng, first_image: int) -> None:
    """Sample the kept positions of consumer inputs `x` (all but `lost`) at random places;
    targets are all outputs there. `ref` is the reference input, or a `_ReferenceReader`
    that knows the reference output."""
    axis = consumer.kind.channel_axis(x.ndim)
    if consumer.kind.windowed:
        view = _conv_view(consumer, node)
        kept = np.setdiff1d(np.arange(x.shape[axis]), lost)
        ref = ref if isinstance(ref, _ReferenceReader) else view.input(ref)
        inputs, targets, image = _conv_refit_rows(view.node, view.input(x), ref, weight, bias, images, rng, kept)
    else:
        inputs, targets, image = _linear_refit_rows(np.delete(x, lost, axis=axis), ref, weight, bias)
    if entry.refit is None:  # the prior (a copy of the kept weight) only once
        if consumer.kind.windowed:
            prior = np.delete(weight, lost, axis=1)
            prior = prior.reshape(prior.shape[0], -1).T
        else:
            prior = np.delete(weight, lost, axis=0)
        in_channels = x.shape[axis] - len(lost)
        rows = _refit_rows_expected(len(inputs), images, x.shape[0])
        entry.refit = RefitStats(inputs.shape[1], targets.shape[1], in_channels, prior.astype(np.float64),
                                 columns_kept=True, expected_rows=rows)
    entry.refit.add(inputs, targets, (first_image + image) % 2 == 1)


def _conv_refit_rows(node, x, ref, weight, bias, images: int, rng, kept: np.ndarray):
    """Windows of the `kept` input channels and the reference conv's outputs at the same places
    (read from its stored output when `ref` is a `_ReferenceReader`, else computed from the
    reference input `ref`)."""
    kept_shape = (weight.shape[0], len(kept), *weight.shape[2:])
    dims = int(np.prod(kept_shape[1:]))
    geometry = conv_geometry(node, x.shape, kept_shape)
    places = int(np.prod(geometry.out_size))
    per_image = min(places, max(10, math.ceil(REFIT_ROWS_PER_UNKNOWN * dims / max(images, 1))))
    at = conv_positions(x.shape[0], 1, geometry, per_image, rng)
    inputs = conv_patches(x, kept_shape, geometry, at, channels=kept).reshape(len(at.row), -1)
    if isinstance(ref, _ReferenceReader):
        return inputs, ref.rows(geometry, at), at.row
    ref_inputs = conv_patches(ref, weight.shape, geometry, at).reshape(len(at.row), -1)
    targets = (ref_inputs @ weight.reshape(weight.shape[0], -1).T).astype(np.float64) + bias
    return inputs, targets, at.row


def _linear_refit_rows(x, ref_x, weight, bias):
    inputs = x.reshape(-1, x.shape[-1])
    targets = (ref_x.reshape(-1, ref_x.shape[-1]) @ weight).astype(np.float64) + bias
    return inputs, targets, np.arange(len(inputs)) // (len(inputs) // x.shape[0])


def _refit_rows_expected(rows: int, images: int, batch: int) -> int:
    """Rows the whole calibration set will give (to choose moments or kept samples)."""
    return int(math.ceil(rows / max(batch, 1) * images))


@dataclass(frozen=True)
class _ConvView:
    """A windowed consumer as the plain Conv it is sampled as (`ConsumerKind.conv_attributes`)."""

    node: onnx.NodeProto
    consumer: Consumer
    attrs: dict

    def input(self, x: np.ndarray) -> np.ndarray:
        return self.consumer.kind.conv_input(x, self.attrs)

    def shape(self, x_shape) -> tuple[int, ...]:
        probe = np.zeros((1, 1, *x_shape[2:]), np.float32)
        return (*x_shape[:2], *self.input(probe).shape[2:])


def _conv_view(consumer: Consumer, node: onnx.NodeProto) -> _ConvView:
    attrs = {a.name: helper.get_attribute_value(a) for a in node.attribute}
    conv = helper.make_node("Conv", list(node.input), list(node.output),
                            **consumer.kind.conv_attributes(attrs))
    return _ConvView(conv, consumer, attrs)


def _filters(values, consumer: Consumer, kept: np.ndarray | None, bias: bool = False):
    """The reference's weight or bias restricted to the output filters the consumer still has."""
    if kept is None or np.ndim(values) == 0:
        return values
    return np.take(values, kept, axis=0 if bias else consumer.kind.filter_axis)


def _consumer_bias(model: onnx.ModelProto, consumer: Consumer) -> np.ndarray | float:
    """The consumer's additive bias per output (0 when it has none)."""
    node = next(n for n in model.graph.node if n.name == consumer.node)
    if consumer.kind.windowed or node.op_type == "Gemm":
        if len(node.input) < 3 or not node.input[2]:
            return 0.0
        tensor = next((t for t in model.graph.initializer if t.name == node.input[2]), None)
        if tensor is None:
            return 0.0
        beta = next((helper.get_attribute_value(a) for a in node.attribute if a.name == "beta"), 1.0)
        return numpy_helper.to_array(tensor).astype(np.float64).reshape(-1) * beta
    return 0.0


def _consumer_weight(model: onnx.ModelProto, consumer: Consumer) -> np.ndarray:
    """The consumer's weight as stored for conv, or as a [K, F] matrix (alpha folded) for linear."""
    node = next(n for n in model.graph.node if n.name == consumer.node)
    name = node.input[consumer.weight.input_index]
    tensor = next(t for t in model.graph.initializer if t.name == name)
    stored = np.asarray(numpy_helper.to_array(tensor), dtype=np.float32)  # no copy when it is float32
    weight = consumer.kind.working(stored, consumer.transpose)
    if consumer.kind.windowed:
        return np.ascontiguousarray(weight)
    alpha = next((helper.get_attribute_value(a) for a in node.attribute if a.name == "alpha"), 1.0)
    return weight if alpha == 1.0 else weight * np.float32(alpha)


def _count_zeros(entry: ConsumerStats, x: np.ndarray, axis: int, indicator: np.ndarray) -> None:
    """Zero counts per channel of the consumer's input (APoZ)."""
    others = tuple(k for k in range(x.ndim) if k != axis % x.ndim)
    entry.zeros += np.count_nonzero(x == 0, axis=others).astype(np.float64) @ indicator
    entry.elements += x.size // x.shape[axis] * int(indicator.sum(axis=0).max())
