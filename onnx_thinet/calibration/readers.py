"""How a consumer is read: its weight and bias as the statistics use them, the plain Conv a
windowed reader is sampled as, and what the original network's readers give (their stored
output at sampled places) when targets come from it."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import onnx
from onnx import helper, numpy_helper

from onnx_thinet.calibration.windows import (
    ConvGeometry,
    Positions,
    conv_output_rows,
    conv_output_samples,
)
from onnx_thinet.channels.consumers import CONV
from onnx_thinet.channels.layout import Consumer
from onnx_thinet.errors import InternalError

__all__ = [
    "ConvView",
    "ReferenceReader",
    "consumer_bias",
    "consumer_weight",
    "conv_view",
    "kept_filters",
    "read_from_reference",
    "reference_outputs",
    "reference_tensors",
    "reference_weights",
]


@dataclass(frozen=True)
class ReferenceReader:
    """A windowed reader in the original network on one batch: its input and its weight (the
    filters the reader still has) and, for a plain Conv, its output as onnxruntime computed it in
    the forward pass, with its bias and the original index of each filter still there (None: all)."""

    x: np.ndarray | None  # not stored when the output is
    weight: np.ndarray
    output: np.ndarray | None = None
    bias: np.ndarray | float = 0.0
    filters: np.ndarray | None = None

    def sums(self, sampler) -> np.ndarray:
        """Σ_c x̂_c at the sampled outputs: the output there less the bias, when it is known."""
        if self.output is None:
            return sampler(self.x, self.weight).sum(axis=1)
        units = sampler.at.unit if self.filters is None else np.asarray(self.filters)[sampler.at.unit]
        out = _known(conv_output_samples(self.output, sampler.geometry, sampler.at, units))
        return out.astype(np.float64) - (np.take(self.bias, units) if np.ndim(self.bias) else self.bias)

    def rows(self, geometry: ConvGeometry, at: Positions) -> np.ndarray:
        """Every filter's output (bias included) at the sampled windows, in the output's own
        precision (the moments take float32 from 256 unknowns on: a float64 copy was cast back)."""
        filters = np.arange(self.weight.shape[0]) if self.filters is None else np.asarray(self.filters)
        return _known(conv_output_rows(self.output, geometry, at, filters))


def _known(values: np.ndarray | None) -> np.ndarray:
    if values is None:  # onnxruntime's output and our window geometry disagree on the Conv
        raise InternalError("a Conv reader's output does not have the size its windows give")
    return values


def reference_tensors(model: onnx.ModelProto, consumers: Sequence[Consumer]) -> set[str]:
    """What the statistics of `consumers` read from the original network `model`: the output of
    a plain Conv reader, the input of any other."""
    return read_from_reference(consumers, reference_outputs(model, consumers))


def read_from_reference(consumers: Sequence[Consumer], outputs: dict[str, str]) -> set[str]:
    return {c.input for c in consumers if c.node not in outputs} | set(outputs.values())


def reference_outputs(model: onnx.ModelProto, consumers: Sequence[Consumer]) -> dict[str, str]:
    """The output tensor of each plain Conv reader (one group, read whole) in the original network.

    Its values at the sampled places are the targets: the next pass computes that output in
    its forward pass anyway, so storing it now replaces a second gather of the windows and,
    for the refit, a product with the whole weight at every sampled place.
    """
    nodes = {n.name: n for n in model.graph.node}
    outputs = {}
    for consumer in consumers:
        node = nodes.get(consumer.node)
        if (consumer.kind == CONV and consumer.span is None and node is not None and node.op_type == "Conv"
                and node.domain in ("", "ai.onnx") and node.output and node.output[0]):
            group = next((helper.get_attribute_value(a) for a in node.attribute if a.name == "group"), 1)
            if group == 1:
                outputs[consumer.node] = node.output[0]
    return outputs


def reference_weights(model, consumers, kept_outputs) -> dict[str, np.ndarray]:
    maps = kept_outputs or {}
    return {c.node: kept_filters(consumer_weight(model, c), c, maps.get(c.node)) for c in consumers}


@dataclass(frozen=True)
class ConvView:
    """A windowed consumer as the plain Conv it is sampled as (`ConsumerKind.conv_attributes`)."""

    node: onnx.NodeProto
    consumer: Consumer
    attrs: dict

    def input(self, x: np.ndarray) -> np.ndarray:
        return self.consumer.kind.conv_input(x, self.attrs)

    def shape(self, x_shape) -> tuple[int, ...]:
        probe = np.zeros((1, 1, *x_shape[2:]), np.float32)
        return (*x_shape[:2], *self.input(probe).shape[2:])


def conv_view(consumer: Consumer, node: onnx.NodeProto) -> ConvView:
    attrs = {a.name: helper.get_attribute_value(a) for a in node.attribute}
    conv = helper.make_node("Conv", list(node.input), list(node.output),
                            **consumer.kind.conv_attributes(attrs))
    return ConvView(conv, consumer, attrs)


def kept_filters(values, consumer: Consumer, kept: np.ndarray | None, bias: bool = False):
    """The reference's weight or bias restricted to the output filters the consumer still has."""
    if kept is None or np.ndim(values) == 0:
        return values
    return np.take(values, kept, axis=0 if bias else consumer.kind.filter_axis)


def consumer_bias(model: onnx.ModelProto, consumer: Consumer) -> np.ndarray | float:
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


def consumer_weight(model: onnx.ModelProto, consumer: Consumer) -> np.ndarray:
    """The consumer's weight as stored for conv, or as a [K, F] matrix (alpha folded) for linear."""
    node = next(n for n in model.graph.node if n.name == consumer.node)
    name = node.input[consumer.weight.input_index]
    tensor = next(t for t in model.graph.initializer if t.name == name)
    stored = np.asarray(numpy_helper.to_array(tensor), dtype=np.float32)  # no copy when it is float32
    weight = consumer.kind.working(stored, consumer.transpose)
    if consumer.kind.windowed:
        if consumer.span is not None:
            weight = weight[:, consumer.span[0] : consumer.span[1]]
        return np.ascontiguousarray(weight)
    alpha = next((helper.get_attribute_value(a) for a in node.attribute if a.name == "alpha"), 1.0)
    return weight if alpha == 1.0 else weight * np.float32(alpha)
