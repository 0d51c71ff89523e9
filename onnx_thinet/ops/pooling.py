"""Pooling and reductions over spatial axes: each channel is pooled on its own."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import onnx

from onnx_thinet.channels.rules import Blocked, Flow, Through, on_data, same
from onnx_thinet.ops.registry import register
from onnx_thinet.pytorch.source import attrs, flit, torch_pad, tup

if TYPE_CHECKING:
    from onnx_thinet.channels.rules import RuleContext, Step
    from onnx_thinet.pytorch.codegen import Codegen

__all__: list[str] = []


@on_data
def _pool_rule(ctx: RuleContext, node: onnx.NodeProto, flow: Flow) -> Step:
    if flow.axis != 1:
        return Blocked(f"{node.op_type} pools the channel axis")
    if len(node.output) > 1 and node.output[1] and ctx.index.uses.get(node.output[1]):
        return Blocked("MaxPool indices output is used")
    return same(node, flow)


@on_data
def _reduce_rule(ctx: RuleContext, node: onnx.NodeProto, flow: Flow) -> Step:
    rank = ctx.index.rank(flow.tensor)
    axes = ctx.attr(node, "axes")
    if axes is None and len(node.input) > 1 and node.input[1]:
        value = ctx.const(node, 1)
        if value is None:
            return Blocked(f"{node.op_type} axes are computed at run time")
        axes = value.tolist()
    if not axes or rank is None:
        return Blocked(f"{node.op_type} reduces over all axes")
    axes = [a % rank for a in axes]
    if flow.axis in axes:
        return Blocked(f"{node.op_type} reduces over the channel axis")
    axis = flow.axis
    if not ctx.attr(node, "keepdims", 1):
        axis -= sum(a < flow.axis for a in axes)
    return Through((Flow(node.output[0], axis, flow.layout),))


def _window(g: Codegen, node: onnx.NodeProto) -> tuple[dict[str, Any], list[int], list[int], list[int], list[int]]:
    """(attributes, kernel, strides, pad begins, pad ends) of a pooling node."""
    a = attrs(node)
    kernel = list(a["kernel_shape"])
    nd = len(kernel)
    if nd not in (1, 2, 3):
        raise g.unsupported(node, f"{nd}-D pooling")
    strides = list(a.get("strides", [1] * nd))
    begins, ends = g.pads(node, a, kernel, strides, list(a.get("dilations", [1] * nd)))
    return a, kernel, strides, begins, ends


def _centered(begins: list[int], ends: list[int], kernel: list[int], dil: list[int]) -> bool:
    """Pads PyTorch's pooling `padding=` can express: symmetric, at most half the window."""
    half = all(p <= ((k - 1) * d + 1) // 2 for p, k, d in zip(begins, kernel, dil, strict=True))
    return begins == ends and half


@register("MaxPool", rule=_pool_rule, traverse="data")
def _max_pool(g: Codegen, node: onnx.NodeProto) -> None:
    if len(node.output) > 1 and node.output[1] in g.used_names:
        raise g.unsupported(node, "the indices output is used")
    a, kernel, strides, begins, ends = _window(g, node)
    dil = list(a.get("dilations", [1] * len(kernel)))
    x = g.t(node.input[0], node)
    args = [tup(kernel)] + ([f"stride={tup(strides)}"] if strides != kernel else [])
    if not _centered(begins, ends, kernel, dil):
        x = f"F.pad({x}, {torch_pad(begins, ends)}, value=-float('inf'))"
    elif any(begins):
        args.append(f"padding={tup(begins)}")
    if any(d != 1 for d in dil):
        args.append(f"dilation={tup(dil)}")
    if a.get("ceil_mode", 0):
        args.append("ceil_mode=True")
    g.emit(node, f"F.max_pool{len(kernel)}d({x}, {', '.join(args)})")


@register("AveragePool", rule=_pool_rule, traverse="data")
def _average_pool(g: Codegen, node: onnx.NodeProto) -> None:
    a, kernel, strides, begins, ends = _window(g, node)
    if any(d != 1 for d in a.get("dilations", [])):
        raise g.unsupported(node, "dilated average pooling")
    include = bool(a.get("count_include_pad", 0))
    x = g.t(node.input[0], node)
    args = [tup(kernel)] + ([f"stride={tup(strides)}"] if strides != kernel else [])
    if not _centered(begins, ends, kernel, [1] * len(kernel)):
        if not include and any(begins + ends):
            raise g.unsupported(node, "asymmetric pads with count_include_pad=0")
        x = f"F.pad({x}, {torch_pad(begins, ends)})"
    elif any(begins):
        args.append(f"padding={tup(begins)}")
    if a.get("ceil_mode", 0):
        args.append("ceil_mode=True")
    if not include and any(begins):
        args.append("count_include_pad=False")
    g.emit(node, f"F.avg_pool{len(kernel)}d({x}, {', '.join(args)})")


@register("LpPool", rule=_pool_rule)
def _lp_pool(g: Codegen, node: onnx.NodeProto) -> None:
    """(sum over the window of |x|^p)^(1/p), zero padding: a sum pool of |x|^p."""
    a, kernel, strides, begins, ends = _window(g, node)
    if a.get("ceil_mode", 0) or any(d != 1 for d in a.get("dilations", [])):
        raise g.unsupported(node, "ceil_mode or dilations")
    p = int(a.get("p", 2))
    x = f"{g.t(node.input[0], node)}.abs().pow({p})"
    if any(begins + ends):
        x = f"F.pad({x}, {torch_pad(begins, ends)})"
    size = 1
    for k in kernel:
        size *= k
    pooled = f"F.avg_pool{len(kernel)}d({x}, {tup(kernel)}, stride={tup(strides)}) * {size}"
    g.emit(node, f"({pooled}).pow({flit(1.0 / p)})")


@register("GlobalAveragePool", "GlobalMaxPool", rule=_pool_rule)
def _global_pool(g: Codegen, node: onnx.NodeProto) -> None:
    kind = "avg" if node.op_type == "GlobalAveragePool" else "max"
    x = g.t(node.input[0], node)
    rank = g.rank(node.input[0])
    if rank in (3, 4, 5):
        g.emit(node, f"F.adaptive_{kind}_pool{rank - 2}d({x}, 1)")
    else:
        fn = "mean" if kind == "avg" else "amax"
        g.emit(node, f"torch.{fn}({x}, dim=tuple(range(2, {x}.dim())), keepdim=True)")


@register("GlobalLpPool", rule=_pool_rule)
def _global_lp_pool(g: Codegen, node: onnx.NodeProto) -> None:
    p = int(attrs(node).get("p", 2))
    x = g.t(node.input[0], node)
    rank = g.rank(node.input[0])
    dims = str(tuple(range(2, rank))) if rank is not None else f"tuple(range(2, {x}.dim()))"
    g.emit(node, f"{x}.abs().pow({p}).sum(dim={dims}, keepdim=True).pow({flit(1.0 / p)})")


# ONNX reduction -> (PyTorch function, how to prepare x, how to finish)
_REDUCE = {
    "ReduceMean": ("torch.mean", "{x}", "{r}"),
    "ReduceMax": ("torch.amax", "{x}", "{r}"),
    "ReduceMin": ("torch.amin", "{x}", "{r}"),
    "ReduceSum": ("torch.sum", "{x}", "{r}"),
    "ReduceL1": ("torch.sum", "{x}.abs()", "{r}"),
    "ReduceL2": ("torch.sum", "{x}.square()", "torch.sqrt({r})"),
}


@register(*_REDUCE, rule=_reduce_rule)
def _reduce(g: Codegen, node: onnx.NodeProto) -> None:
    a = attrs(node)
    x = g.t(node.input[0], node)
    axes = a.get("axes")
    if len(node.input) > 1 and node.input[1]:
        axes = g.need_ints(node, 1, "axes")
    fn, prepare, finish = _REDUCE[node.op_type]
    if not axes:
        if a.get("noop_with_empty_axes", 0):
            g.emit(node, x)
            return
        rank = g.rank(node.input[0])
        dims = str(tuple(range(rank))) if rank is not None else f"tuple(range({x}.dim()))"
    else:
        dims = str(tuple(int(v) for v in axes)) if len(axes) > 1 else str(int(axes[0]))
    keep = bool(a.get("keepdims", 1))
    reduced = f"{fn}({prepare.format(x=x)}, dim={dims}, keepdim={keep})"
    g.emit(node, finish.format(r=reduced))
