"""Per-op channel rules: how a group's channels pass through (or end at) each ONNX op type.

A rule receives the node and, for each input that carries the group's channels, the axis and
layout there (`Flow`). It answers with a `Step`: the flows on the node's outputs plus what must
be sliced, a consumer that ends the path, or the reason the path cannot be cut. Adding an op
is adding one rule; an op without a rule is never guessed to be safe.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np
import onnx
from onnx import helper

from onnx_thinet.channels.consumers import CONV, LINEAR
from onnx_thinet.channels.layout import AttrUpdate, Consumer, Layout, ParamSlice, ShapeFix
from onnx_thinet.io.graph import GraphIndex

__all__ = ["RULES", "Flow", "RuleContext", "Step", "data_rule", "rule", "supported_ops"]


@dataclass(frozen=True)
class Flow:
    """The group's channels on `tensor`: along `axis`, laid out as `layout`."""

    tensor: str
    axis: int
    layout: Layout


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

    def length(self, flow: Flow) -> int | None:
        return self.index.dim(flow.tensor, flow.axis)

    def outer(self, flow: Flow) -> int | None:
        length = self.length(flow)
        return None if length is None else flow.layout.outer(length)


Flows = dict[int, Flow]
Rule = Callable[[RuleContext, onnx.NodeProto, Flows], Step]
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


def data_rule(*op_types: str) -> Callable[[Callable[[RuleContext, onnx.NodeProto, Flow], Step]], Rule]:
    """Register a rule for ops whose channels may only arrive on input 0 (the data input)."""

    def register(fn: Callable[[RuleContext, onnx.NodeProto, Flow], Step]) -> Rule:
        def on_data(ctx: RuleContext, node: onnx.NodeProto, flows: Flows) -> Step:
            flow = _data_flow(node, flows)
            return flow if isinstance(flow, Step) else fn(ctx, node, flow)

        rule(*op_types)(on_data)
        return fn

    return register


def supported_ops() -> list[str]:
    return sorted(RULES)


def _blocked(reason: str) -> Step:
    return Step(blocked=reason)


def _data_flow(node: onnx.NodeProto, flows: Flows) -> Flow | Step:
    """The flow on input 0, or a blocked step when channels reach a parameter input instead."""
    if set(flows) != {0}:
        return _blocked(f"channels reach {node.op_type} input {max(flows)} (a parameter)")
    return flows[0]


def _same(node: onnx.NodeProto, flow: Flow, output: int = 0) -> Step:
    return Step(outputs=[Flow(node.output[output], flow.axis, flow.layout)])


UNARY_ELEMENTWISE = (
    "Relu", "LeakyRelu", "Sigmoid", "HardSigmoid", "HardSwish", "Elu", "Selu", "Tanh",
    "Softplus", "Softsign", "Gelu", "Mish", "Abs", "Neg", "Exp", "Sqrt", "Reciprocal",
    "Erf", "Identity", "Cast", "Celu", "ThresholdedRelu", "Floor", "Ceil", "Round",
)


@data_rule(*UNARY_ELEMENTWISE)
def _unary(ctx: RuleContext, node: onnx.NodeProto, flow: Flow) -> Step:
    return _same(node, flow)


@data_rule("Dropout")
def _dropout(ctx: RuleContext, node: onnx.NodeProto, flow: Flow) -> Step:
    if len(node.output) > 1 and node.output[1] and ctx.index.uses.get(node.output[1]):
        return _blocked("Dropout mask output is used")
    return _same(node, flow)


@data_rule("Clip")
def _clip(ctx: RuleContext, node: onnx.NodeProto, flow: Flow) -> Step:
    for bound in (1, 2):
        if bound < len(node.input) and node.input[bound]:
            value = ctx.const(node, bound)
            if value is None or value.size != 1:
                return _blocked("Clip bounds are not scalar constants")
    return _same(node, flow)


@data_rule("PRelu")
def _prelu(ctx: RuleContext, node: onnx.NodeProto, flow: Flow) -> Step:
    return _per_channel_constant(ctx, node, flow, other=1)


@rule("Add", "Sub", "Mul", "Div", "Pow", "Max", "Min")
def _binary(ctx: RuleContext, node: onnx.NodeProto, flows: Flows) -> Step:
    if len(node.input) != 2:
        return Step(coupled=f"{node.op_type} joins {len(node.input)} tensors")
    if len(flows) == 2:
        a, b = flows[0], flows[1]
        if a.axis == b.axis and a.layout == b.layout:
            return _same(node, a)  # x * sigmoid(x) and other ops of a tensor with itself
        return _blocked(f"{node.op_type} combines two differently laid-out copies of the channels")
    k = next(iter(flows))
    other = 1 - k
    if ctx.const(node, other) is not None:
        if node.op_type == "Pow" and k == 1:
            return _blocked("channels reach a Pow exponent")
        return _per_channel_constant(ctx, node, flows[k], other)
    kind = "residual " if node.op_type in ("Add", "Sub") else "gating "
    return Step(coupled=f"{kind}{node.op_type} ties these channels to another tensor")


def _per_channel_constant(ctx: RuleContext, node: onnx.NodeProto, flow: Flow, other: int) -> Step:
    """A constant operand broadcast against the flow: sliced when it varies along the channels."""
    value = ctx.const(node, other)
    if value is None:
        return _blocked(f"{node.op_type} operand {node.input[other]!r} is not constant")
    rank = ctx.index.rank(flow.tensor)
    if rank is None:
        return _blocked(f"rank of {flow.tensor!r} unknown")
    out_rank = max(rank, value.ndim)
    out_axis = flow.axis + (out_rank - rank)
    const_axis = out_axis - (out_rank - value.ndim)
    step = Step(outputs=[Flow(node.output[0], out_axis, flow.layout)])
    if const_axis < 0 or value.shape[const_axis] == 1:
        return step
    if value.shape[const_axis] != ctx.length(flow):
        return _blocked(f"{node.op_type} constant of shape {value.shape} does not match the channels")
    step.slices.append(ParamSlice(node.name, other, const_axis, flow.layout))
    return step


@data_rule("BatchNormalization", "InstanceNormalization")
def _batchnorm(ctx: RuleContext, node: onnx.NodeProto, flow: Flow) -> Step:
    if flow.axis != 1 or ctx.outer(flow) is None:
        return _blocked(f"{node.op_type} normalizes another axis than the channels")
    if len(node.output) > 1 and any(ctx.index.uses.get(o) for o in node.output[1:] if o):
        return _blocked("BatchNormalization training outputs are used")
    step = _same(node, flow)
    for j in range(1, len(node.input)):
        if ctx.const(node, j) is None:
            return _blocked(f"{node.op_type} parameter {node.input[j]!r} is not constant")
        step.slices.append(ParamSlice(node.name, j, 0, flow.layout))
    return step


@data_rule("MaxPool", "AveragePool", "LpPool", "GlobalAveragePool", "GlobalMaxPool", "GlobalLpPool")
def _pool(ctx: RuleContext, node: onnx.NodeProto, flow: Flow) -> Step:
    if flow.axis != 1:
        return _blocked(f"{node.op_type} pools the channel axis")
    if len(node.output) > 1 and node.output[1] and ctx.index.uses.get(node.output[1]):
        return _blocked("MaxPool indices output is used")
    return _same(node, flow)


@data_rule("ReduceMean", "ReduceMax", "ReduceMin", "ReduceSum", "ReduceL2", "ReduceL1")
def _reduce(ctx: RuleContext, node: onnx.NodeProto, flow: Flow) -> Step:
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
    return Step(outputs=[Flow(node.output[0], axis, flow.layout)])


@data_rule("Pad")
def _pad(ctx: RuleContext, node: onnx.NodeProto, flow: Flow) -> Step:
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


@data_rule("Softmax", "LogSoftmax")
def _softmax(ctx: RuleContext, node: onnx.NodeProto, flow: Flow) -> Step:
    rank = ctx.index.rank(flow.tensor)
    axis = ctx.attr(node, "axis", -1 if ctx.opset >= 13 else 1)
    if rank is None:
        return _blocked("rank unknown")
    axis %= rank
    if axis == flow.axis or (ctx.opset < 13 and axis <= flow.axis):
        return _blocked(f"{node.op_type} normalizes across the channels")
    return _same(node, flow)


@data_rule("Transpose")
def _transpose(ctx: RuleContext, node: onnx.NodeProto, flow: Flow) -> Step:
    perm = ctx.attr(node, "perm")
    if perm is None:
        rank = ctx.index.rank(flow.tensor)
        if rank is None:
            return _blocked("Transpose of unknown rank")
        perm = list(reversed(range(rank)))
    return Step(outputs=[Flow(node.output[0], list(perm).index(flow.axis), flow.layout)])


@data_rule("Unsqueeze", "Squeeze")
def _squeeze(ctx: RuleContext, node: onnx.NodeProto, flow: Flow) -> Step:
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
        axis = flow.axis - sum(a < flow.axis for a in axes)
        return Step(outputs=[Flow(node.output[0], axis, flow.layout)])
    axes = sorted(a % out_rank for a in axes)
    kept = [a for a in range(out_rank) if a not in axes]
    return Step(outputs=[Flow(node.output[0], kept[flow.axis], flow.layout)])


@data_rule("Flatten")
def _flatten(ctx: RuleContext, node: onnx.NodeProto, flow: Flow) -> Step:
    dims = ctx.index.shapes.get(flow.tensor)
    if dims is None:
        return _blocked("Flatten input shape unknown")
    axis = ctx.attr(node, "axis", 1) % max(len(dims), 1)
    return _merge_axes(node, flow, dims, [(0, axis), (axis, len(dims))])


@data_rule("Reshape")
def _reshape(ctx: RuleContext, node: onnx.NodeProto, flow: Flow) -> Step:
    dims, out_dims = _concrete(ctx.index.shapes.get(flow.tensor), ctx.index.shapes.get(node.output[0]))
    if dims is None:
        return _blocked("Reshape target shape is only known at run time, so where the channels go cannot be proven")
    groups = _reshape_groups(list(dims), list(out_dims))
    if groups is None:
        return _blocked("Reshape splits the channel axis")
    step = _merge_axes(node, flow, dims, groups)
    if step.blocked is not None:
        return step
    position = step.outputs[0].axis
    fix = _shape_entry_fix(ctx, node, position, step.outputs[0].layout, out_dims[position])
    if isinstance(fix, str):
        return _blocked(fix)
    if fix is not None:
        step.shape_fixes.append(fix)
    elif groups[position] != (position, position + 1) and _shape_entry(ctx, node, position) == 0:
        return _blocked("Reshape copies a dim that is not the channel axis")
    return step


def _concrete(dims, out_dims):
    """Both shapes as ints, the batch counted as 1: a symbolic dim shared by both, or a symbolic
    leading dim in and an unknown leading dim out (shape inference loses the name there)."""
    if dims is None or out_dims is None:
        return None, None
    shared = {d for d in dims if isinstance(d, str)} & {d for d in out_dims if isinstance(d, str)}
    dims = [1 if d in shared else d for d in dims]
    out_dims = [1 if d in shared else d for d in out_dims]
    if dims and out_dims and not isinstance(dims[0], int) and not isinstance(out_dims[0], int):
        dims, out_dims = [1, *dims[1:]], [1, *out_dims[1:]]
    if not all(isinstance(d, int) for d in dims + out_dims):
        return None, None
    return dims, out_dims


def _shape_entry(ctx: RuleContext, node: onnx.NodeProto, position: int) -> int | None:
    target = ctx.const(node, 1)
    return None if target is None else int(target[position])


def _shape_entry_fix(ctx, node, position: int, layout: Layout, length: int) -> ShapeFix | str | None:
    """How the Reshape's target encodes the channel dim: a fix, nothing to do, or why not."""
    target = ctx.const(node, 1)
    if target is not None:
        return ShapeFix(node.name, 1, position, layout, length) if int(target[position]) > 0 else None
    concat = ctx.index.producer.get(node.input[1])
    if concat is None or concat.op_type != "Concat":
        return "Reshape shape is computed at run time"
    offset = 0
    for k, piece in enumerate(concat.input):  # tf2onnx: Concat(Unsqueeze(Gather(Shape(x))), [-1])
        size = ctx.index.dim(piece, 0)
        if size is None:
            return "Reshape shape pieces have unknown sizes"
        if offset <= position < offset + size:
            value = ctx.index.const(piece)
            if value is None:
                return "Reshape takes the channel dim from a run-time shape"
            if int(value[position - offset]) > 0:
                return ShapeFix(concat.name, k, position - offset, layout, length)
            return None
        offset += size
    return "Reshape shape is shorter than its output"


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


def _merge_axes(node: onnx.NodeProto, flow: Flow, dims, groups) -> Step:
    """Output flow when input dims are merged in `groups` (Flatten, flattening Reshape)."""
    for position, (start, end) in enumerate(groups):
        if start <= flow.axis < end:
            after = dims[flow.axis + 1 : end]
            if not all(isinstance(d, int) for d in after):
                return _blocked(f"{node.op_type}: dims after the channels are not static")
            inner = flow.layout.inner * int(np.prod(after, dtype=np.int64))
            layout = Layout(flow.layout.segments, flow.layout.total, inner)
            return Step(outputs=[Flow(node.output[0], position, layout)])
    return _blocked(f"{node.op_type} drops the channel axis")


@rule("Concat")
def _concat(ctx: RuleContext, node: onnx.NodeProto, flows: Flows) -> Step:
    axes = {f.axis for f in flows.values()}
    rank = ctx.index.rank(node.output[0])
    if rank is None or len(axes) != 1:
        return _blocked("Concat of channels on different axes")
    axis = axes.pop()
    if ctx.attr(node, "axis", 1) % rank != axis:
        return Step(coupled="Concat along another axis mixes these channels with other tensors")
    inner = {f.layout.inner for f in flows.values()}
    if len(inner) != 1:
        return _blocked("Concat of channels with different inner layouts")
    inner = inner.pop()
    lengths = [ctx.index.dim(name, axis) for name in node.input]
    if any(n is None or n % inner for n in lengths):
        return _blocked("Concat input sizes unknown or not aligned with the channels")
    if any(ctx.outer(f) != 1 for f in flows.values()):
        return _blocked("Concat of flattened channels")
    total = sum(lengths) // inner
    layout, base = None, 0
    for k, length in enumerate(lengths):
        if k in flows:
            part = flows[k].layout.shifted(base, total)
            layout = part if layout is None else layout.merged(part)
        base += length // inner
    return Step(outputs=[Flow(node.output[0], axis, layout)])


@data_rule("Split")
def _split(ctx: RuleContext, node: onnx.NodeProto, flow: Flow) -> Step:
    rank = ctx.index.rank(flow.tensor)
    if rank is None:
        return _blocked("Split of unknown rank")
    if ctx.attr(node, "axis", 0) % rank != flow.axis:
        return Step(outputs=[Flow(out, flow.axis, flow.layout) for out in node.output if out])
    sizes = [ctx.index.dim(out, flow.axis) for out in node.output]
    inner = flow.layout.inner
    if any(s is None or s % inner for s in sizes) or ctx.outer(flow) != 1:
        return _blocked("Split sizes unknown or not aligned with the channels")
    if len(node.input) < 2 and ctx.attr(node, "split") is None:
        return _blocked("Split into equal parts (no explicit sizes to update)")
    if len(node.input) > 1 and ctx.const(node, 1) is None:
        return _blocked("Split sizes are computed at run time")
    step, start = Step(), 0
    for k, (out, size) in enumerate(zip(node.output, sizes)):
        part = flow.layout.window(start, start + size // inner)
        start += size // inner
        if part is not None and out:
            step.outputs.append(Flow(out, flow.axis, part))
            step.shape_fixes.append(ShapeFix(node.name, 1 if len(node.input) > 1 else -1, k, part, size))
    return step


@data_rule("Conv")
def _conv(ctx: RuleContext, node: onnx.NodeProto, flow: Flow) -> Step:
    weight = ctx.const(node, 1)
    if weight is None:
        return _blocked("Conv weight is not a constant initializer")
    if flow.axis != 1 or ctx.outer(flow) is None:
        return _blocked("Conv reads channels on another axis")
    group = ctx.attr(node, "group", 1)
    in_channels = ctx.length(flow) or weight.shape[1] * group
    if group == 1:
        if weight.ndim not in (3, 4):
            return _blocked(f"{weight.ndim - 2}-D Conv consumers are not supported")
        return Step(consumer=Consumer(node.name, CONV, flow.tensor, ParamSlice(node.name, 1, 1, flow.layout)))
    if group == in_channels and weight.shape[1] == 1 and ctx.outer(flow) == 1:
        multiplier = weight.shape[0] // group
        out_layout = Layout(flow.layout.segments, flow.layout.total, flow.layout.inner * multiplier)
        step = Step(outputs=[Flow(node.output[0], 1, out_layout)])
        step.slices.append(ParamSlice(node.name, 1, 0, out_layout))
        if len(node.input) > 2 and node.input[2]:
            step.slices.append(ParamSlice(node.name, 2, 0, out_layout))
        step.attr_updates.append(AttrUpdate(node.name, "group", flow.layout, in_channels))
        return step
    from onnx_thinet.channels.rules_more import grouped_conv

    return grouped_conv(ctx, node, flow, weight, group, in_channels)


@data_rule("Gemm")
def _gemm(ctx: RuleContext, node: onnx.NodeProto, flow: Flow) -> Step:
    if ctx.attr(node, "transA", 0):
        return _blocked("Gemm reads a transposed input")
    if ctx.const(node, 1) is None:
        return _blocked("Gemm weight is not a constant initializer")
    if flow.axis != 1:
        return _blocked("Gemm reads channels on another axis")
    transposed = bool(ctx.attr(node, "transB", 0))
    weight = ParamSlice(node.name, 1, 1 if transposed else 0, flow.layout)
    return Step(consumer=Consumer(node.name, LINEAR, flow.tensor, weight, transpose=transposed))


@data_rule("MatMul")
def _matmul(ctx: RuleContext, node: onnx.NodeProto, flow: Flow) -> Step:
    weight = ctx.const(node, 1)
    rank = ctx.index.rank(flow.tensor)
    if weight is None or weight.ndim != 2:
        return _blocked("MatMul is not activation x constant 2-D weight")
    if rank is None or flow.axis != rank - 1:
        return _blocked("MatMul reads channels on another axis")
    weight_slice = ParamSlice(node.name, 1, 0, flow.layout)
    return Step(consumer=Consumer(node.name, LINEAR, flow.tensor, weight_slice, bias_index=None))


@data_rule("Resize", "Upsample")
def _resize(ctx: RuleContext, node: onnx.NodeProto, flow: Flow) -> Step:
    if len(node.input) > 3 and node.input[3]:
        sizes = ctx.const(node, 3)
        if sizes is None:
            from onnx_thinet.channels.rules_more import resize_with_runtime_sizes

            return resize_with_runtime_sizes(ctx, node, flow)
        if int(sizes[flow.axis]) != ctx.length(flow):
            return _blocked("Resize output sizes are unknown")
        return Step(outputs=[Flow(node.output[0], flow.axis, flow.layout)],
                    shape_fixes=[ShapeFix(node.name, 3, flow.axis, flow.layout, ctx.length(flow))])
    scale_index = 2 if node.op_type == "Resize" and ctx.opset >= 11 else 1
    scales = ctx.const(node, scale_index)
    if scales is None or scales.size <= flow.axis or float(scales[flow.axis]) != 1.0:
        return _blocked("Resize scales are unknown or scale the channel axis")
    return _same(node, flow)


@rule("Sum", "Mean", "Where")
def _joins(ctx: RuleContext, node: onnx.NodeProto, flows: Flows) -> Step:
    return Step(coupled=f"{node.op_type} joins these channels with other tensors")


import onnx_thinet.channels.rules_more  # noqa: E402,F401  (registers the feature-pyramid rules)
