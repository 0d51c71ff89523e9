"""The channel-rule framework: how a group's channels pass through (or end at) an ONNX op.

A rule receives the node and, for each input that carries the group's channels, the axis and
layout there (`Flow`). It answers with one `Step` variant: `Through` (the flows on the node's
outputs plus what must be sliced), `Consumed` (a consumer ends the path), `CoupledStop` (the
channels are tied to another tensor) or `Blocked` (the path cannot be cut, and why). The rules
themselves live beside each op's PyTorch translator in the op registry (`onnx_thinet.ops`);
an op without a rule is never guessed to be safe.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import onnx
from onnx import helper

from onnx_thinet.channels.layout import AttrUpdate, Consumer, Layout, ParamSlice, ShapeFix
from onnx_thinet.io.graph import ConstShape, GraphIndex

__all__ = [
    "Blocked",
    "Consumed",
    "CoupledStop",
    "Flow",
    "Flows",
    "Rule",
    "RuleContext",
    "Step",
    "Through",
    "on_data",
    "per_channel_constant",
    "same",
]


@dataclass(frozen=True)
class Flow:
    """The group's channels on `tensor`: along `axis`, laid out as `layout`."""

    tensor: str
    axis: int
    layout: Layout


@dataclass(frozen=True)
class Through:
    """The channels pass through the op onto `outputs`; cutting them edits these parameters."""

    outputs: tuple[Flow, ...]
    slices: tuple[ParamSlice, ...] = ()
    attr_updates: tuple[AttrUpdate, ...] = ()
    shape_fixes: tuple[ShapeFix, ...] = ()


@dataclass(frozen=True)
class Consumed:
    """The op reads the channels as input features: the path ends at this consumer."""

    consumer: Consumer


@dataclass(frozen=True)
class CoupledStop:
    """The op ties the channels to another tensor (residual Add, gating Mul...)."""

    reason: str


@dataclass(frozen=True)
class Blocked:
    """The channels cannot be cut along this path, and why."""

    reason: str


Step = Through | Consumed | CoupledStop | Blocked


@dataclass(frozen=True)
class RuleContext:
    """What a rule may read: the graph index, the group's channel count, the opset."""

    index: GraphIndex
    channels: int
    opset: int

    def const(self, node: onnx.NodeProto, k: int) -> np.ndarray | None:
        if k >= len(node.input) or not node.input[k]:
            return None
        return self.index.const(node.input[k])

    def const_shape(self, node: onnx.NodeProto, k: int) -> ConstShape | None:
        """Dims of a constant input without its data (a weight's data is large)."""
        if k >= len(node.input) or not node.input[k]:
            return None
        return self.index.const_shape(node.input[k])

    def attr(self, node: onnx.NodeProto, name: str, default=None):
        for a in node.attribute:
            if a.name == name:
                return helper.get_attribute_value(a)
        return default

    def length(self, flow: Flow) -> int | None:
        return self.index.dim(flow.tensor, flow.axis)

    def outer(self, flow: Flow) -> int | None:
        length = self.length(flow)
        return None if length is None else flow.layout.outer(length)


Flows = dict[int, Flow]
Rule = Callable[[RuleContext, onnx.NodeProto, Flows], Step]
DataRule = Callable[[RuleContext, onnx.NodeProto, Flow], Step]


def on_data(fn: DataRule) -> Rule:
    """A rule for ops whose channels may only arrive on input 0 (the data input)."""

    def rule(ctx: RuleContext, node: onnx.NodeProto, flows: Flows) -> Step:
        if set(flows) != {0}:
            return Blocked(f"channels reach {node.op_type} input {max(flows)} (a parameter)")
        return fn(ctx, node, flows[0])

    rule.__name__ = rule.__qualname__ = fn.__name__
    rule.__doc__ = fn.__doc__
    return rule


def same(node: onnx.NodeProto, flow: Flow, output: int = 0) -> Through:
    """The channels come out unchanged on one output."""
    return Through((Flow(node.output[output], flow.axis, flow.layout),))


def per_channel_constant(ctx: RuleContext, node: onnx.NodeProto, flow: Flow, other: int) -> Step:
    """A constant operand broadcast against the flow: sliced when it varies along the channels."""
    value = ctx.const(node, other)
    if value is None:
        return Blocked(f"{node.op_type} operand {node.input[other]!r} is not constant")
    rank = ctx.index.rank(flow.tensor)
    if rank is None:
        return Blocked(f"rank of {flow.tensor!r} unknown")
    out_rank = max(rank, value.ndim)
    out_axis = flow.axis + (out_rank - rank)
    const_axis = out_axis - (out_rank - value.ndim)
    outputs = (Flow(node.output[0], out_axis, flow.layout),)
    if const_axis < 0 or value.shape[const_axis] == 1:
        return Through(outputs)
    if value.shape[const_axis] != ctx.length(flow):
        return Blocked(f"{node.op_type} constant of shape {value.shape} does not match the channels")
    return Through(outputs, (ParamSlice(node.name, other, const_axis, flow.layout),))
