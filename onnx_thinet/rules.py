"""Per-op channel rules: how a group's channels pass through (or end at) each ONNX op type.

A rule receives the node, which input carries the channels, and the channel layout there,
and answers with a `Step`: the layouts on the node's outputs plus what must be sliced, a
consumer that ends the path, or the reason the path cannot be cut. Adding an op is adding
one rule; an op without a rule is never guessed to be safe.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np
import onnx
from onnx import helper

from onnx_thinet.channels import AttrUpdate, Consumer, ParamSlice, ShapeFix
from onnx_thinet.graph import GraphIndex

__all__ = ["RULES", "Flow", "RuleContext", "Step", "rule", "supported_ops"]


@dataclass(frozen=True)
class Flow:
    """The group's channels on `tensor`: along `axis`, with `inner` positions per channel."""

    tensor: str
    axis: int
    inner: int = 1


@dataclass
class Step:
    outputs: list[Flow] = field(default_factory=list)
    slices: list[ParamSlice] = field(default_factory=list)
    attr_updates: list[AttrUpdate] = field(default_factory=list)
    shape_fixes: list[ShapeFix] = field(default_factory=list)
    consumer: Consumer | None = None
    coupled: str | None = None
    blocked: str | None = None


@dataclass
class RuleContext:
    index: GraphIndex
    channels: int
    visited: dict[str, Flow]
    opset: int

    def const(self, node: onnx.NodeProto, k: int) -> np.ndarray | None:
        if k >= len(node.input) or not node.input[k]:
            return None
        return self.index.const(node.input[k])

    def attr(self, node: onnx.NodeProto, name: str, default=None):
        for a in node.attribute:
            if a.name == name:
                return helper.get_attribute_value(a)
        return default


Rule = Callable[[RuleContext, onnx.NodeProto, int, Flow], Step]
RULES: dict[str, Rule] = {}


def rule(*op_types: str) -> Callable[[Rule], Rule]:
    """Register a rule for op types; a second rule for the same op is a bug."""

    def register(fn: Rule) -> Rule:
        for op in op_types:
            if op in RULES:
                raise ValueError(f"duplicate channel rule for {op}")
            RULES[op] = fn
        return fn

    return register


def supported_ops() -> list[str]:
    return sorted(RULES)


def _same(node: onnx.NodeProto, flow: Flow) -> Step:
    return Step(outputs=[Flow(node.output[0], flow.axis, flow.inner)])


def _blocked(reason: str) -> Step:
    return Step(blocked=reason)


UNARY_ELEMENTWISE = (
    "Relu", "LeakyRelu", "Sigmoid", "HardSigmoid", "HardSwish", "Elu", "Selu", "Tanh",
    "Softplus", "Softsign", "Gelu", "Mish", "Abs", "Neg", "Exp", "Sqrt", "Reciprocal",
    "Erf", "Identity", "Cast", "Celu", "ThresholdedRelu", "Floor", "Ceil", "Round",
)


@rule(*UNARY_ELEMENTWISE)
def _unary(ctx: RuleContext, node: onnx.NodeProto, k: int, flow: Flow) -> Step:
    return _same(node, flow)


@rule("Dropout")
def _dropout(ctx: RuleContext, node: onnx.NodeProto, k: int, flow: Flow) -> Step:
    if k != 0:
        return _blocked("channels reach a Dropout ratio input")
    if len(node.output) > 1 and node.output[1] and ctx.index.uses.get(node.output[1]):
        return _blocked("Dropout mask output is used")
    return _same(node, flow)


@rule("Clip")
def _clip(ctx: RuleContext, node: onnx.NodeProto, k: int, flow: Flow) -> Step:
    if k != 0:
        return _blocked("channels reach a Clip bound")
    for bound in (1, 2):
        if bound < len(node.input) and node.input[bound]:
            value = ctx.const(node, bound)
            if value is None or value.size != 1:
                return _blocked("Clip bounds are not scalar constants")
    return _same(node, flow)


@rule("PRelu")
def _prelu(ctx: RuleContext, node: onnx.NodeProto, k: int, flow: Flow) -> Step:
    if k != 0:
        return _blocked("channels reach a PRelu slope")
    return _per_channel_constant(ctx, node, flow, other=1)


@rule("Add", "Sub", "Mul", "Div", "Pow", "Max", "Min")
def _binary(ctx: RuleContext, node: onnx.NodeProto, k: int, flow: Flow) -> Step:
    if len(node.input) != 2:
        return Step(coupled=f"{node.op_type} joins {len(node.input)} tensors")
    other = 1 - k
    if ctx.const(node, other) is not None:
        if node.op_type == "Pow" and k == 1:
            return _blocked("channels reach a Pow exponent")
        return _per_channel_constant(ctx, node, flow, other)
    if _derives_from(ctx, node.input[other], flow):
        return _same(node, flow)
    what = "residual " if node.op_type in ("Add", "Sub") else "gating "
    return Step(coupled=f"{what}{node.op_type} ties these channels to another tensor")


def _derives_from(ctx: RuleContext, tensor: str, flow: Flow) -> bool:
    """True when `tensor` is the flow's own tensor seen through per-channel unary ops (SiLU)."""
    for _ in range(64):
        seen = ctx.visited.get(tensor)
        if seen is not None:
            return seen.axis == flow.axis and seen.inner == flow.inner
        node = ctx.index.producer.get(tensor)
        if node is None or node.op_type not in UNARY_ELEMENTWISE + ("Clip",):
            return False
        tensor = node.input[0]
    return False


def _per_channel_constant(ctx: RuleContext, node: onnx.NodeProto, flow: Flow, other: int) -> Step:
    """A constant operand broadcast against the flow: sliced when it varies over channels."""
    value = ctx.const(node, other)
    if value is None:
        return _blocked(f"{node.op_type} operand {node.input[other]!r} is not constant")
    rank = ctx.index.rank(flow.tensor)
    if rank is None:
        return _blocked(f"rank of {flow.tensor!r} unknown")
    out_rank = max(rank, value.ndim)
    out_axis = flow.axis + (out_rank - rank)
    const_axis = out_axis - (out_rank - value.ndim)
    step = Step(outputs=[Flow(node.output[0], out_axis, flow.inner)])
    if const_axis < 0 or value.shape[const_axis] == 1:
        return step
    length = ctx.index.dim(flow.tensor, flow.axis)
    if value.shape[const_axis] != length:
        return _blocked(f"{node.op_type} constant of shape {value.shape} does not match the channels")
    step.slices.append(ParamSlice(node.name, other, const_axis, flow.inner))
    return step


@rule("BatchNormalization", "InstanceNormalization")
def _batchnorm(ctx: RuleContext, node: onnx.NodeProto, k: int, flow: Flow) -> Step:
    if k != 0 or flow.axis != 1 or _outer(ctx, flow) != 1:
        return _blocked(f"{node.op_type} normalizes another axis than the channels")
    if len(node.output) > 1 and any(ctx.index.uses.get(o) for o in node.output[1:] if o):
        return _blocked("BatchNormalization training outputs are used")
    step = _same(node, flow)
    for j in range(1, len(node.input)):
        if ctx.const(node, j) is None:
            return _blocked(f"{node.op_type} parameter {node.input[j]!r} is not constant")
        step.slices.append(ParamSlice(node.name, j, 0, flow.inner))
    return step


@rule("MaxPool", "AveragePool", "LpPool", "GlobalAveragePool", "GlobalMaxPool", "GlobalLpPool")
def _pool(ctx: RuleContext, node: onnx.NodeProto, k: int, flow: Flow) -> Step:
    if flow.axis != 1:
        return _blocked(f"{node.op_type} pools the channel axis")
    if len(node.output) > 1 and node.output[1] and ctx.index.uses.get(node.output[1]):
        return _blocked("MaxPool indices output is used")
    return _same(node, flow)


@rule("ReduceMean", "ReduceMax", "ReduceMin", "ReduceSum", "ReduceL2", "ReduceL1")
def _reduce(ctx: RuleContext, node: onnx.NodeProto, k: int, flow: Flow) -> Step:
    if k != 0:
        return _blocked(f"channels reach {node.op_type} axes")
    rank = ctx.index.rank(flow.tensor)
    axes = ctx.attr(node, "axes")
    if axes is None and len(node.input) > 1 and node.input[1]:
        value = ctx.const(node, 1)
        if value is None:
            return _blocked(f"{node.op_type} axes are computed at run time")
        axes = value.tolist()
    if not axes or rank is None:
        return _blocked(f"{node.op_type} reduces over all axes")
    axes = [a % rank for a in axes]
    if flow.axis in axes:
        return _blocked(f"{node.op_type} reduces over the channel axis")
    axis = flow.axis
    if not ctx.attr(node, "keepdims", 1):
        axis -= sum(a < flow.axis for a in axes)
    return Step(outputs=[Flow(node.output[0], axis, flow.inner)])


@rule("Pad")
def _pad(ctx: RuleContext, node: onnx.NodeProto, k: int, flow: Flow) -> Step:
    if k != 0:
        return _blocked("channels reach Pad parameters")
    rank = ctx.index.rank(flow.tensor)
    pads = ctx.attr(node, "pads")
    if pads is None:
        value = ctx.const(node, 1)
        if value is None:
            return _blocked("Pad amounts are computed at run time")
        pads = value.tolist()
    axes = list(range(rank or 0))
    if len(node.input) > 3 and node.input[3]:
        value = ctx.const(node, 3)
        if value is None or rank is None:
            return _blocked("Pad axes are computed at run time")
        axes = [a % rank for a in value.tolist()]
    half = len(pads) // 2
    for j, a in enumerate(axes[:half]):
        if a == flow.axis and (pads[j] != 0 or pads[j + half] != 0):
            return _blocked("Pad pads the channel axis")
    return _same(node, flow)


@rule("Softmax", "LogSoftmax")
def _softmax(ctx: RuleContext, node: onnx.NodeProto, k: int, flow: Flow) -> Step:
    rank = ctx.index.rank(flow.tensor)
    default = -1 if ctx.opset >= 13 else 1
    axis = ctx.attr(node, "axis", default)
    if rank is None:
        return _blocked("rank unknown")
    axis %= rank
    if axis == flow.axis or (ctx.opset < 13 and axis <= flow.axis):
        return _blocked(f"{node.op_type} normalizes across the channels")
    return _same(node, flow)


@rule("Transpose")
def _transpose(ctx: RuleContext, node: onnx.NodeProto, k: int, flow: Flow) -> Step:
    rank = ctx.index.rank(flow.tensor)
    perm = ctx.attr(node, "perm")
    if perm is None:
        if rank is None:
            return _blocked("Transpose of unknown rank")
        perm = list(reversed(range(rank)))
    return Step(outputs=[Flow(node.output[0], list(perm).index(flow.axis), flow.inner)])


@rule("Unsqueeze", "Squeeze")
def _squeeze(ctx: RuleContext, node: onnx.NodeProto, k: int, flow: Flow) -> Step:
    if k != 0:
        return _blocked(f"channels reach {node.op_type} axes")
    rank = ctx.index.rank(flow.tensor)
    out_rank = ctx.index.rank(node.output[0])
    axes = ctx.attr(node, "axes")
    if axes is None and len(node.input) > 1:
        value = ctx.const(node, 1)
        axes = None if value is None else value.tolist()
    if axes is None or rank is None or out_rank is None:
        return _blocked(f"{node.op_type} axes or rank unknown")
    if node.op_type == "Squeeze":
        axes = [a % rank for a in axes]
        if flow.axis in axes:
            return _blocked("Squeeze removes the channel axis")
        return Step(outputs=[Flow(node.output[0], flow.axis - sum(a < flow.axis for a in axes))])
    axes = sorted(a % out_rank for a in axes)
    kept = [a for a in range(out_rank) if a not in axes]
    return Step(outputs=[Flow(node.output[0], kept[flow.axis], flow.inner)])


@rule("Flatten")
def _flatten(ctx: RuleContext, node: onnx.NodeProto, k: int, flow: Flow) -> Step:
    dims = ctx.index.shapes.get(flow.tensor)
    if dims is None:
        return _blocked("Flatten input shape unknown")
    axis = ctx.attr(node, "axis", 1) % max(len(dims), 1)
    out_shape = ((0, axis), (axis, len(dims)))
    return _merge_axes(ctx, node, flow, dims, out_shape)


@rule("Reshape")
def _reshape(ctx: RuleContext, node: onnx.NodeProto, k: int, flow: Flow) -> Step:
    if k != 0:
        return _blocked("channels reach a Reshape shape")
    target = ctx.const(node, 1)
    if target is None:
        return _blocked("Reshape shape is computed at run time")
    dims = ctx.index.shapes.get(flow.tensor)
    out_dims = ctx.index.shapes.get(node.output[0])
    if dims is None or out_dims is None or not all(isinstance(d, int) for d in dims + out_dims):
        return _blocked("Reshape shapes are not static")
    groups = _reshape_groups(list(dims), list(out_dims))
    if groups is None:
        return _blocked("Reshape splits the channel axis")
    step = _merge_axes(ctx, node, flow, dims, groups)
    if step.blocked is None:
        position = step.outputs[0].axis
        if int(target[position]) > 0:
            step.shape_fixes.append(ShapeFix(node.name, 1, position))
        elif int(target[position]) == 0 and (position, position + 1) != groups[position]:
            return _blocked("Reshape copies a dim that is not the channel axis")
    return step


def _reshape_groups(dims: list[int], out_dims: list[int]) -> list[tuple[int, int]] | None:
    """For each output dim, the range of input dims merged into it; None if a dim is split."""
    groups, start = [], 0
    for out in out_dims:
        end, size = start, 1
        while end < len(dims) and size < out:
            size *= dims[end]
            end += 1
        if size != out:
            return None
        groups.append((start, end))
        start = end
    if any(d != 1 for d in dims[start:]):
        return None
    return groups


def _merge_axes(
    ctx: RuleContext, node: onnx.NodeProto, flow: Flow, dims, groups: list[tuple[int, int]] | tuple
) -> Step:
    """Output layout when input dims are merged in `groups` (Flatten, flattening Reshape)."""
    for position, (start, end) in enumerate(groups):
        if start <= flow.axis < end:
            after = dims[flow.axis + 1 : end]
            if not all(isinstance(d, int) for d in after):
                return _blocked(f"{node.op_type}: dims after the channels are not static")
            inner = flow.inner * int(np.prod(after, dtype=np.int64))
            return Step(outputs=[Flow(node.output[0], position, inner)])
    return _blocked(f"{node.op_type} drops the channel axis")


@rule("Conv")
def _conv(ctx: RuleContext, node: onnx.NodeProto, k: int, flow: Flow) -> Step:
    if k != 0:
        return _blocked("channels reach a Conv weight or bias")
    weight = ctx.const(node, 1)
    if weight is None:
        return _blocked("Conv weight is not a constant initializer")
    if flow.axis != 1 or _outer(ctx, flow) != 1:
        return _blocked("Conv reads channels on another axis")
    group = ctx.attr(node, "group", 1)
    in_channels = ctx.index.dim(flow.tensor, 1) or weight.shape[1] * group
    if group == 1:
        return Step(consumer=Consumer(node.name, "conv", flow.tensor, ParamSlice(node.name, 1, 1, flow.inner)))
    if group == in_channels and weight.shape[1] == 1:
        multiplier = weight.shape[0] // group
        inner = flow.inner * multiplier
        step = Step(outputs=[Flow(node.output[0], 1, inner)])
        step.slices.append(ParamSlice(node.name, 1, 0, inner))
        if len(node.input) > 2 and node.input[2]:
            step.slices.append(ParamSlice(node.name, 2, 0, inner))
        step.attr_updates.append(AttrUpdate(node.name, "group", flow.inner))
        return step
    return _blocked(f"grouped Conv (group={group}) mixes channels within groups")


@rule("Gemm")
def _gemm(ctx: RuleContext, node: onnx.NodeProto, k: int, flow: Flow) -> Step:
    if k != 0 or ctx.attr(node, "transA", 0):
        return _blocked("channels reach Gemm as B, C or a transposed A")
    if ctx.const(node, 1) is None:
        return _blocked("Gemm weight is not a constant initializer")
    if flow.axis != 1:
        return _blocked("Gemm reads channels on another axis")
    transposed = bool(ctx.attr(node, "transB", 0))
    weight = ParamSlice(node.name, 1, 1 if transposed else 0, flow.inner)
    return Step(consumer=Consumer(node.name, "linear", flow.tensor, weight, transpose=transposed))


@rule("MatMul")
def _matmul(ctx: RuleContext, node: onnx.NodeProto, k: int, flow: Flow) -> Step:
    weight = ctx.const(node, 1)
    rank = ctx.index.rank(flow.tensor)
    if k != 0 or weight is None or weight.ndim != 2:
        return _blocked("MatMul is not activation x constant 2-D weight")
    if rank is None or flow.axis != rank - 1:
        return _blocked("MatMul reads channels on another axis")
    slice_ = ParamSlice(node.name, 1, 0, flow.inner)
    return Step(consumer=Consumer(node.name, "linear", flow.tensor, slice_, bias_index=None))


@rule("Concat", "Sum", "Mean", "Where", "Split", "Slice", "Gather", "Einsum", "Resize", "Upsample")
def _coupling_or_structural(ctx: RuleContext, node: onnx.NodeProto, k: int, flow: Flow) -> Step:
    if node.op_type in ("Concat", "Sum", "Mean", "Where"):
        return Step(coupled=f"{node.op_type} joins these channels with other tensors")
    if node.op_type in ("Resize", "Upsample"):
        return _resize(ctx, node, k, flow)
    return _blocked(f"{node.op_type} on the channel path is not supported yet")


def _resize(ctx: RuleContext, node: onnx.NodeProto, k: int, flow: Flow) -> Step:
    if k != 0:
        return _blocked("channels reach Resize parameters")
    if len(node.input) > 3 and node.input[3]:
        return _blocked("Resize with explicit sizes encodes the channel count")
    scale_index = 2 if node.op_type == "Resize" and ctx.opset >= 11 else 1
    scales = ctx.const(node, scale_index)
    if scales is None or scales.size <= flow.axis or float(scales[flow.axis]) != 1.0:
        return _blocked("Resize scales are unknown or scale the channel axis")
    return _same(node, flow)


def _outer(ctx: RuleContext, flow: Flow) -> int | None:
    length = ctx.index.dim(flow.tensor, flow.axis)
    if length is None:
        return 1
    return length // (ctx.channels * flow.inner)
