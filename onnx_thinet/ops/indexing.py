"""Concat, Split, Slice, Gather, Range, Expand, Tile, ConstantOfShape: joining, cutting and
indexing tensors, and the run-time shape arithmetic (Shape -> Gather -> Concat/Range) that
becomes Python in forward()."""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np
import onnx

from onnx_thinet.channels.layout import ShapeFix
from onnx_thinet.channels.rules import Blocked, CoupledStop, Flow, Through, on_data
from onnx_thinet.ops.registry import register
from onnx_thinet.pytorch.source import INT_END, NP_TO_TORCH, ONNX_TO_TORCH, Val, attrs, lit

if TYPE_CHECKING:
    from onnx_thinet.channels.rules import Flows, RuleContext, Step
    from onnx_thinet.pytorch.codegen import Codegen

__all__: list[str] = []


# ---------------------------------------------------------------- channel rules


def _concat_rule(ctx: RuleContext, node: onnx.NodeProto, flows: Flows) -> Step:
    axes = {f.axis for f in flows.values()}
    rank = ctx.index.rank(node.output[0])
    if rank is None or len(axes) != 1:
        return Blocked("Concat of channels on different axes")
    axis = axes.pop()
    if ctx.attr(node, "axis", 1) % rank != axis:
        return CoupledStop("Concat along another axis mixes these channels with other tensors")
    inner = {f.layout.inner for f in flows.values()}
    if len(inner) != 1:
        return Blocked("Concat of channels with different inner layouts")
    inner = inner.pop()
    lengths = [ctx.index.dim(name, axis) for name in node.input]
    if any(n is None or n % inner for n in lengths):
        return Blocked("Concat input sizes unknown or not aligned with the channels")
    if any(ctx.outer(f) != 1 for f in flows.values()):
        return Blocked("Concat of flattened channels")
    total = sum(lengths) // inner
    layout, base = None, 0
    for k, length in enumerate(lengths):
        if k in flows:
            part = flows[k].layout.shifted(base, total)
            layout = part if layout is None else layout.merged(part)
        base += length // inner
    return Through((Flow(node.output[0], axis, layout),))


@on_data
def _split_rule(ctx: RuleContext, node: onnx.NodeProto, flow: Flow) -> Step:
    rank = ctx.index.rank(flow.tensor)
    if rank is None:
        return Blocked("Split of unknown rank")
    if ctx.attr(node, "axis", 0) % rank != flow.axis:
        return Through(tuple(Flow(out, flow.axis, flow.layout) for out in node.output if out))
    sizes = [ctx.index.dim(out, flow.axis) for out in node.output]
    inner = flow.layout.inner
    if any(s is None or s % inner for s in sizes) or ctx.outer(flow) != 1:
        return Blocked("Split sizes unknown or not aligned with the channels")
    if len(node.input) < 2 and ctx.attr(node, "split") is None:
        return Blocked("Split into equal parts (no explicit sizes to update)")
    if len(node.input) > 1 and ctx.const(node, 1) is None:
        return Blocked("Split sizes are computed at run time")
    outputs, fixes, start = [], [], 0
    for k, (out, size) in enumerate(zip(node.output, sizes)):
        part = flow.layout.window(start, start + size // inner)
        start += size // inner
        if part is not None and out:
            outputs.append(Flow(out, flow.axis, part))
            fixes.append(ShapeFix(node.name, 1 if len(node.input) > 1 else -1, k, part, size))
    return Through(tuple(outputs), shape_fixes=tuple(fixes))


# ---------------------------------------------------------------- translators


@register("Concat", rule=_concat_rule)
def _concat(g: Codegen, node: onnx.NodeProto) -> None:
    axis = int(attrs(node).get("axis", 0))
    vals = [g.values[i] for i in node.input if i]
    if any(v.kind == "shape" for v in vals) and all(v.kind != "tensor" for v in vals):
        items: list[int | str] = []
        for v in vals:
            if v.kind == "const":
                items += [int(e) for e in v.array.reshape(-1)]
            elif v.items is None:
                raise g.unsupported(node, "concatenating shapes of unknown length")
            else:
                items += v.items
        g.values[node.output[0]] = Val("shape", items=items)
        return
    parts = [g.t(i, node) for i in node.input if i]
    g.emit(node, f"torch.cat([{', '.join(parts)}], dim={axis})")

@register("Split", rule=_split_rule, traverse="split")
def _split(g: Codegen, node: onnx.NodeProto) -> None:
    a = attrs(node)
    axis = int(a.get("axis", 0))
    x = g.t(node.input[0], node)
    sizes = a.get("split")
    if len(node.input) > 1 and node.input[1]:
        sizes = g.need_ints(node, 1, "split")
    n = len(node.output)
    if sizes is not None:
        expr = f"torch.split({x}, {list(int(s) for s in sizes)}, dim={axis})"
    else:
        dims = g.dim_list(node.input[0])
        d = dims[axis] if dims is not None and -len(dims) <= axis < len(dims) else None
        if isinstance(d, int):
            chunk = -(-d // n)
            sizes = [min(chunk, d - i * chunk) for i in range(n)]
            expr = f"torch.split({x}, {sizes}, dim={axis})"
        else:
            expr = f"torch.chunk({x}, {n}, dim={axis})"
    names = []
    for i, out in enumerate(node.output):
        if out and out in g.used_names:
            var = g.new_var(node, i)
            g.values[out] = Val("tensor", var)
            names.append(var)
        else:
            names.append("_")
    if n == 1:
        g.fwd_lines.append(f"{names[0]} = {expr}[0]")
    else:
        g.fwd_lines.append(f"{', '.join(names)} = {expr}")

@register("Slice")
def _slice(g: Codegen, node: onnx.NodeProto) -> None:
    starts, ends, axes, steps = _slice_args(g, node)
    v = g.values[node.input[0]]
    if v.kind == "shape":
        if not all(isinstance(e, int) for e in starts + ends):
            raise g.unsupported(node, "slicing a shape value with computed bounds")
        if axes not in ([0], [-1]):
            raise g.unsupported(node, "slicing a shape value on an axis other than 0")
        if v.items is None:
            g.values[node.output[0]] = Val("shape", expr=f"{v.expr}[{starts[0]}:{ends[0]}:{steps[0]}]")
        else:
            g.values[node.output[0]] = Val("shape", items=list(v.items)[slice(starts[0], ends[0], steps[0])])
        return
    x = g.t(node.input[0], node)
    rank = g.rank(node.input[0])
    if rank is not None:
        axes = [ax % rank for ax in axes]
    flips, spec = [], {}
    for s, e, st, ax in zip(starts, ends, steps, axes, strict=True):
        if st < 0 and st == -1 and (s == -1 or (isinstance(s, int) and s >= INT_END)) and (
            isinstance(e, int) and e <= -INT_END
        ):
            flips.append(ax)
            continue
        if st < 0:
            raise g.unsupported(node, "negative steps other than a full reversal")
        spec[ax] = _slice_text(s, e, st)
    if spec:
        x = f"{x}[{', '.join(_index_list(g, node, spec))}]"
    if flips:
        x = f"torch.flip({x}, {flips})"
    g.emit(node, x)


def _slice_args(g: Codegen, node: onnx.NodeProto) -> tuple[list, list, list[int], list[int]]:
    """starts, ends (ints or Python expressions), axes and steps of a Slice."""
    if g.opset < 10:
        a = attrs(node)
        starts, ends = list(a["starts"]), list(a["ends"])
        return starts, ends, list(a.get("axes", range(len(starts)))), [1] * len(starts)
    starts = g.int_items(node, 1, "starts")
    ends = g.int_items(node, 2, "ends")
    has = lambda k: len(node.input) > k and node.input[k]  # noqa: E731
    axes = g.need_ints(node, 3, "axes") if has(3) else list(range(len(starts)))
    steps = g.need_ints(node, 4, "steps") if has(4) else [1] * len(starts)
    return starts, ends, axes, steps


def _slice_text(s: int | str, e: int | str, step: int) -> str:
    """Python slice text; bounds past the int32 range mean 'from the start' / 'to the end'."""
    s_txt = "" if s == 0 or (isinstance(s, int) and s <= -INT_END) else str(s)
    e_txt = "" if isinstance(e, int) and e >= INT_END else str(e)
    return f"{s_txt}:{e_txt}" + (f":{step}" if step != 1 else "")


def _index_list(g: Codegen, node: onnx.NodeProto, spec: dict[int, str]) -> list[str]:
    if all(ax >= 0 for ax in spec):
        return [spec.get(i, ":") for i in range(max(spec) + 1)]
    if all(ax < 0 for ax in spec):
        return ["..."] + [spec.get(i, ":") for i in range(min(spec), 0)]
    raise g.unsupported(node, "mixed negative/positive axes on a tensor of unknown rank")


@register("Gather")
def _gather(g: Codegen, node: onnx.NodeProto) -> None:
    axis = int(attrs(node).get("axis", 0))
    v = g.values[node.input[0]]
    idx = g.const(node.input[1])
    if v.kind == "shape":
        if idx is None or v.items is None:
            raise g.unsupported(node, "gathering from a shape with computed indices")
        picked = [v.items[int(i)] for i in idx.reshape(-1)]
        g.values[node.output[0]] = Val("shape", items=picked, scalar=idx.ndim == 0)
        return
    x = g.t(node.input[0], node)
    if idx is not None and idx.size <= 64:
        i_txt = lit(idx.astype(np.int64))
    else:
        i_txt = g.t(node.input[1], node)
    if axis >= 0:
        prefix = ":, " * axis
        g.emit(node, f"{x}[{prefix}{i_txt}]")
    else:
        suffix = ", :" * (-axis - 1)
        g.emit(node, f"{x}[..., {i_txt}{suffix}]")


@register("Range")
def _range(g: Codegen, node: onnx.NodeProto) -> None:
    """torch.arange of start, limit, delta: constants, run-time shape values or 0-d tensors."""
    args = [_scalar(g, node, name) for name in node.input]
    etype = g.etypes.get(node.output[0])
    if etype is None:
        const = g.const(node.input[0])
        dtype = "torch.int64" if const is None or const.dtype.kind in "iu" else "torch.float32"
    else:
        dtype = ONNX_TO_TORCH[etype]
    device = f", device={g.arg_names[0]}.device" if g.arg_names else ""
    g.emit(node, f"torch.arange({', '.join(args)}, dtype={dtype}{device})")


def _scalar(g: Codegen, node: onnx.NodeProto, name: str) -> str:
    """Source text of a scalar operand."""
    v = g.values[name]
    if v.kind == "const":
        return lit(np.asarray(v.array).reshape(()))
    if v.kind == "shape":
        if v.items is None or len(v.items) != 1:
            raise g.unsupported(node, f"operand '{name}' is not a scalar")
        return str(v.items[0])
    return v.expr


def _sizes_text(items: list[int | str]) -> str:
    """A tuple literal of ints and run-time expressions."""
    return "(" + ", ".join(map(str, items)) + ("," if len(items) == 1 else "") + ")"


@register("Expand")
def _expand(g: Codegen, node: onnx.NodeProto) -> None:
    """Bidirectional broadcast to a shape (a product with ones keeps ONNX's rule that a 1 in
    the target keeps the input's dim, which Tensor.expand refuses)."""
    x = g.t(node.input[0], node)
    items = g.int_items(node, 1, "shape")
    g.emit(node, f"{x} * torch.ones({_sizes_text(items)}, dtype={x}.dtype, device={x}.device)")


@register("Tile")
def _tile(g: Codegen, node: onnx.NodeProto) -> None:
    x = g.t(node.input[0], node)
    g.emit(node, f"{x}.repeat{_sizes_text(g.int_items(node, 1, 'repeats'))}")


@register("ConstantOfShape")
def _constant_of_shape(g: Codegen, node: onnx.NodeProto) -> None:
    value = attrs(node).get("value")
    fill = np.zeros(1, np.float32) if value is None else np.asarray(value).reshape(-1)
    dtype = NP_TO_TORCH.get(fill.dtype)
    if dtype is None:
        raise g.unsupported(node, f"fill value of dtype {fill.dtype}")
    items = g.int_items(node, 0, "shape")
    device = f", device={g.arg_names[0]}.device" if g.arg_names else ""
    g.emit(node, f"torch.full({_sizes_text(items)}, {lit(fill[0])}, dtype={dtype}{device})")
