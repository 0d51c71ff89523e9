"""Ops that move axes around (axes family): Reshape, Flatten, Transpose, Squeeze, Unsqueeze, Pad. The channels
follow their axis; a merge of axes keeps them as the outer factor of the merged axis."""

from __future__ import annotations

import logging
import math
from typing import TYPE_CHECKING

import numpy as np
import onnx

from onnx_thinet.channels.layout import Layout, ShapeFix
from onnx_thinet.channels.rules import Blocked, Flow, Through, on_data, same
from onnx_thinet.ops.registry import register
from onnx_thinet.pytorch.source import Val, attrs, flit, torch_pad

if TYPE_CHECKING:
    from onnx_thinet.channels.rules import RuleContext, Step
    from onnx_thinet.pytorch.codegen import Codegen

__all__: list[str] = []

logger = logging.getLogger(__name__)


# ---------------------------------------------------------------- channel rules


@on_data
def _pad_rule(ctx: RuleContext, node: onnx.NodeProto, flow: Flow) -> Step:
    rank = ctx.index.rank(flow.tensor)
    pads = ctx.attr(node, "pads")
    if pads is None:
        value = ctx.const(node, 1)
        if value is None:
            return Blocked("Pad amounts are computed at run time")
        pads = value.tolist()
    axes = list(range(rank or 0))
    if len(node.input) > 3 and node.input[3]:
        value = ctx.const(node, 3)
        if value is None or rank is None:
            return Blocked("Pad axes are computed at run time")
        axes = [a % rank for a in value.tolist()]
    half = len(pads) // 2
    for j, a in enumerate(axes[:half]):
        if a == flow.axis and (pads[j] != 0 or pads[j + half] != 0):
            return Blocked("Pad pads the channel axis")
    return same(node, flow)


@on_data
def _transpose_rule(ctx: RuleContext, node: onnx.NodeProto, flow: Flow) -> Step:
    perm = ctx.attr(node, "perm")
    if perm is None:
        rank = ctx.index.rank(flow.tensor)
        if rank is None:
            return Blocked("Transpose of unknown rank")
        perm = list(reversed(range(rank)))
    return Through((Flow(node.output[0], list(perm).index(flow.axis), flow.layout),))


@on_data
def _squeeze_rule(ctx: RuleContext, node: onnx.NodeProto, flow: Flow) -> Step:
    rank = ctx.index.rank(flow.tensor)
    out_rank = ctx.index.rank(node.output[0])
    axes = ctx.attr(node, "axes")
    if axes is None and len(node.input) > 1:
        value = ctx.const(node, 1)
        axes = None if value is None else value.tolist()
    if axes is None or rank is None or out_rank is None:
        return Blocked(f"{node.op_type} axes or rank unknown")
    if node.op_type == "Squeeze":
        axes = [a % rank for a in axes]
        if flow.axis in axes:
            return Blocked("Squeeze removes the channel axis")
        axis = flow.axis - sum(a < flow.axis for a in axes)
        return Through((Flow(node.output[0], axis, flow.layout),))
    axes = sorted(a % out_rank for a in axes)
    kept = [a for a in range(out_rank) if a not in axes]
    return Through((Flow(node.output[0], kept[flow.axis], flow.layout),))


@on_data
def _flatten_rule(ctx: RuleContext, node: onnx.NodeProto, flow: Flow) -> Step:
    dims = ctx.index.shapes.get(flow.tensor)
    if dims is None:
        return Blocked("Flatten input shape unknown")
    axis = ctx.attr(node, "axis", 1) % max(len(dims), 1)
    return _merge_axes(node, flow, dims, [(0, axis), (axis, len(dims))])


@on_data
def _reshape_rule(ctx: RuleContext, node: onnx.NodeProto, flow: Flow) -> Step:
    dims, out_dims = _concrete(ctx.index.shapes.get(flow.tensor), ctx.index.shapes.get(node.output[0]))
    if dims is None:
        return Blocked("Reshape target shape is only known at run time, so where the channels go cannot be proven")
    groups = _reshape_groups(list(dims), list(out_dims))
    if groups is None:
        return Blocked("Reshape splits the channel axis")
    step = _merge_axes(node, flow, dims, groups)
    if not isinstance(step, Through):
        return step
    out = step.outputs[0]
    fix = _shape_entry_fix(ctx, node, out.axis, out.layout, out_dims[out.axis])
    if isinstance(fix, str):
        return Blocked(fix)
    if fix is not None:
        return Through(step.outputs, shape_fixes=(fix,))
    if groups[out.axis] != (out.axis, out.axis + 1) and _shape_entry(ctx, node, out.axis) == 0:
        return Blocked("Reshape copies a dim that is not the channel axis")
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
                return Blocked(f"{node.op_type}: dims after the channels are not static")
            inner = flow.layout.inner * int(np.prod(after, dtype=np.int64))
            layout = Layout(flow.layout.segments, flow.layout.total, inner)
            return Through((Flow(node.output[0], position, layout),))
    return Blocked(f"{node.op_type} drops the channel axis")


# ---------------------------------------------------------------- translators


@register("Pad", rule=_pad_rule, traverse="data")
def _pad(g: Codegen, node: onnx.NodeProto) -> None:
    a = attrs(node)
    mode = a.get("mode", "constant")
    if g.opset < 11:
        pads, value = list(a["pads"]), float(a.get("value", 0.0))
    else:
        pads = g.need_ints(node, 1, "pads")
        cv = g.const(node.input[2]) if len(node.input) > 2 and node.input[2] else None
        if len(node.input) > 2 and node.input[2] and cv is None:
            raise g.unsupported(node, "the pad value must be a constant")
        value = 0.0 if cv is None else float(cv)
    n = len(pads) // 2
    begins, ends = pads[:n], pads[n:]
    if len(node.input) > 3 and node.input[3]:
        axes = g.need_ints(node, 3, "axes")
        rank = g.rank(node.input[0])
        if rank is None:
            raise g.unsupported(node, "Pad with axes on a tensor of unknown rank")
        full_b, full_e = [0] * rank, [0] * rank
        for ax, b, e in zip(axes, begins, ends, strict=True):
            full_b[ax % rank], full_e[ax % rank] = b, e
        begins, ends = full_b, full_e
    torch_mode = {
        "constant": "constant",
        "reflect": "reflect",
        "edge": "replicate",
        "wrap": "circular",
    }.get(mode)
    if torch_mode is None:
        raise g.unsupported(node, f"pad mode '{mode}'")
    x = g.t(node.input[0], node)
    extra = ""
    if torch_mode != "constant":
        extra = f', mode="{torch_mode}"'
    elif value != 0.0:
        extra = f", value={flit(value)}"
    g.emit(node, f"F.pad({x}, {torch_pad(begins, ends)}{extra})")

@register("Flatten", rule=_flatten_rule)
def _flatten(g: Codegen, node: onnx.NodeProto) -> None:
    x = g.t(node.input[0], node)
    axis = int(attrs(node).get("axis", 1))
    rank = g.rank(node.input[0])
    if axis < 0:
        if rank is None:
            raise g.unsupported(node, "negative axis on a tensor of unknown rank")
        axis += rank
    if axis == 0:
        g.emit(node, f"{x}.reshape(1, -1)")
    elif axis == 1:
        g.emit(node, f"torch.flatten({x}, 1)")
    elif rank is not None and axis == rank:
        g.emit(node, f"{x}.reshape(-1, 1)")
    else:
        g.emit(node, f"torch.flatten(torch.flatten({x}, {axis}), 0, {axis - 1})")

@register("Reshape", rule=_reshape_rule)
def _reshape(g: Codegen, node: onnx.NodeProto) -> None:
    x = g.t(node.input[0], node)
    allowzero = int(attrs(node).get("allowzero", 0))
    shape_v = g.values[node.input[1]]
    if shape_v.kind == "tensor":
        raise g.unsupported(node, "the target shape is computed from tensor data")
    if shape_v.kind == "shape" and shape_v.items is None:
        g.emit(node, f"{x}.reshape({shape_v.expr})")
        return
    items: list[int | str] = (
        list(shape_v.items) if shape_v.kind == "shape" else g.need_ints(node, 1, "shape")
    )
    if not allowzero:
        items = [f"{x}.shape[{i}]" if it == 0 else it for i, it in enumerate(items)]
    items = _batch_dynamic(g, node, items, shape_v.kind == "const", x)
    g.emit(
        node, f"{x}.reshape({', '.join(map(str, items))})" if items else f"{x}.reshape(())"
    )

def _batch_dynamic(
    g: Codegen, node: onnx.NodeProto, items: list[int | str], from_const: bool, x: str
) -> list[int | str]:
    """Keep a symbolic batch dim symbolic when a constant reshape baked it in."""
    dims = g.dim_list(node.input[0])
    if not (from_const and items and dims and isinstance(items[0], int) and items[0] > 0):
        return items
    if isinstance(dims[0], int):
        return items  # a static batch stays as the model had it
    rest_in = dims[1:]
    rest_out = items[1:]
    if not all(isinstance(d, int) for d in rest_in):
        return items
    one_free = rest_out.count(-1) == 1
    exact = all(isinstance(d, int) and d > 0 for d in rest_out) and math.prod(
        rest_out
    ) == math.prod(rest_in)
    if not (one_free or exact):
        return items
    logger.info("reshape %s: keeping the batch dim dynamic", node.name or node.output[0])
    return [f"{x}.shape[0]"] + rest_out

@register("Transpose", rule=_transpose_rule)
def _transpose(g: Codegen, node: onnx.NodeProto) -> None:
    x = g.t(node.input[0], node)
    perm = attrs(node).get("perm")
    if perm is None:
        rank = g.rank(node.input[0])
        if rank is None:
            g.emit(node, f"{x}.permute(*reversed(range({x}.dim())))")
            return
        perm = list(reversed(range(rank)))
    g.emit(node, f"{x}.permute({', '.join(str(int(p)) for p in perm)})")

def _axes(g: Codegen, node: onnx.NodeProto) -> list[int] | None:
    """Squeeze/Unsqueeze axes from the attribute (opset < 13) or the input."""
    a = attrs(node)
    if "axes" in a:
        return [int(v) for v in a["axes"]]
    if len(node.input) > 1 and node.input[1]:
        return g.need_ints(node, 1, "axes")
    return None

@register("Squeeze", rule=_squeeze_rule)
def _squeeze(g: Codegen, node: onnx.NodeProto) -> None:
    axes = _axes(g, node)
    v = g.values[node.input[0]]
    if v.kind == "shape":
        if v.items is None or len(v.items) != 1:
            raise g.unsupported(node, "squeezing a shape value of unknown length")
        g.values[node.output[0]] = Val("shape", items=list(v.items), scalar=True)
        return
    x = g.t(node.input[0], node)
    if not axes:
        g.emit(node, f"{x}.squeeze()")
    elif len(axes) == 1:
        g.emit(node, f"{x}.squeeze({axes[0]})")
    else:
        g.emit(node, f"{x}.squeeze({tuple(axes)})")

@register("Unsqueeze", rule=_squeeze_rule)
def _unsqueeze(g: Codegen, node: onnx.NodeProto) -> None:
    axes = _axes(g, node)
    if not axes:
        raise g.unsupported(node, "Unsqueeze without axes")
    v = g.values[node.input[0]]
    if v.kind == "shape":
        if not v.scalar or axes not in ([0], [-1]):
            raise g.unsupported(node, "unsqueezing a shape value other than a scalar")
        g.values[node.output[0]] = Val("shape", items=list(v.items or []), scalar=False)
        return
    x = g.t(node.input[0], node)
    rank = g.rank(node.input[0])
    if any(ax < 0 for ax in axes):
        if rank is None:
            if len(axes) == 1:
                g.emit(node, f"{x}.unsqueeze({axes[0]})")
                return
            raise g.unsupported(node, "negative axes on a tensor of unknown rank")
        out_rank = rank + len(axes)
        axes = [ax % out_rank for ax in axes]
    expr = x + "".join(f".unsqueeze({ax})" for ax in sorted(axes))
    g.emit(node, expr)
