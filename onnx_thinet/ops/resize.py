"""Resize and Upsample: spatial resampling, channel for channel.

Nearest resizing is translated to ``F.interpolate(mode="nearest")`` only where that is exactly
ONNX's rule (asymmetric coordinates rounded down, or integer upscales in half-pixel coordinates
rounded to nearest); any other coordinate/rounding mode gathers the source rows and columns
with index tensors computed by ONNX's own formula, so no mode is approximated silently.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np
import onnx

from onnx_thinet.channels.layout import ShapeFix
from onnx_thinet.channels.rules import Blocked, Flow, Through, on_data, same
from onnx_thinet.channels.rules_more import resize_with_runtime_sizes
from onnx_thinet.ops.registry import register
from onnx_thinet.pytorch.source import attrs, flit, node_base

if TYPE_CHECKING:
    from onnx_thinet.channels.rules import RuleContext, Step
    from onnx_thinet.pytorch.codegen import Codegen

__all__: list[str] = []


@on_data
def _resize_rule(ctx: RuleContext, node: onnx.NodeProto, flow: Flow) -> Step:
    if len(node.input) > 3 and node.input[3]:
        sizes = ctx.const(node, 3)
        if sizes is None:
            return resize_with_runtime_sizes(ctx, node, flow)
        if int(sizes[flow.axis]) != ctx.length(flow):
            return Blocked("Resize output sizes are unknown")
        fix = ShapeFix(node.name, 3, flow.axis, flow.layout, ctx.length(flow))
        return Through((Flow(node.output[0], flow.axis, flow.layout),), shape_fixes=(fix,))
    scale_index = 2 if node.op_type == "Resize" and ctx.opset >= 11 else 1
    scales = ctx.const(node, scale_index)
    if scales is None or scales.size <= flow.axis or float(scales[flow.axis]) != 1.0:
        return Blocked("Resize scales are unknown or scale the channel axis")
    return same(node, flow)


# ONNX coordinate_transformation_mode -> source coordinate of output position `i`
_COORD = dict(
    asymmetric="{i} / {s}",
    half_pixel="({i} + 0.5) / {s} - 0.5",
    pytorch_half_pixel="({i} + 0.5) / {s} - 0.5",
    tf_half_pixel_for_nn="({i} + 0.5) / {s}",
    align_corners="{i} * ({n_in} - 1) / max({n_out} - 1, 1)",
)
# ONNX nearest_mode -> integer index of source coordinate `c`
_ROUND = dict(
    round_prefer_floor="torch.ceil({c} - 0.5)",
    round_prefer_ceil="torch.floor({c} + 0.5)",
    floor="torch.floor({c})",
    ceil="torch.ceil({c})",
)


def _resize_common(g: Codegen, node: onnx.NodeProto, mode: str, coord: str, nearest: str,
                   scales: list[float] | None, sizes: list[int | str] | None) -> None:
    if scales and (scales[0] != 1.0 or scales[1] != 1.0):
        raise g.unsupported(node, "resizing batch or channel dims")
    if not scales and not sizes:
        raise g.unsupported(node, "neither scales nor sizes is a constant")
    nd = len(scales or sizes or []) - 2
    if mode == "nearest":
        if _interpolate_is_exact(g, node, coord, nearest, scales, sizes):
            _interpolate(g, node, "nearest", "", scales, sizes)
        else:
            _nearest_by_index(g, node, coord, nearest, scales, sizes)
        return
    tmode = {1: "linear", 2: "bilinear", 3: "trilinear"}.get(nd) if mode == "linear" else None
    if mode == "cubic" and nd == 2:
        if float(attrs(node).get("cubic_coeff_a", -0.75)) != -0.75:
            raise g.unsupported(node, "cubic_coeff_a other than -0.75")
        tmode = "bicubic"
    if tmode is None:
        raise g.unsupported(node, f"{nd}-D resize mode '{mode}'")
    if coord == "align_corners":
        _interpolate(g, node, tmode, ", align_corners=True", scales, sizes)
    elif coord in ("half_pixel", "pytorch_half_pixel"):
        _interpolate(g, node, tmode, ", align_corners=False", scales, sizes)
    else:
        raise g.unsupported(node, f"{mode} resize with {coord} coordinates")


def _interpolate_is_exact(g: Codegen, node: onnx.NodeProto, coord: str, nearest: str,
                          scales: list[float] | None, sizes: list[int | str] | None) -> bool:
    """Whether F.interpolate(mode='nearest') picks the same source pixel as ONNX."""
    if coord == "asymmetric" and nearest == "floor":
        return True  # torch: floor(i * in / out), the same formula
    if coord not in ("half_pixel", "pytorch_half_pixel") or not nearest.startswith("round"):
        return False
    if scales:  # an integer upscale s: (i + 0.5) / s - 0.5 never ties, rounds to floor(i / s)
        return all(float(s).is_integer() and s >= 1 for s in scales[2:])
    dims = g.dim_list(node.input[0])
    spatial = dims[2:] if dims else []
    pairs = list(zip(sizes[2:], spatial, strict=False))
    return len(pairs) == len(sizes) - 2 and all(
        isinstance(o, int) and isinstance(i, int) and o % i == 0 for o, i in pairs
    )


def _interpolate(g: Codegen, node: onnx.NodeProto, tmode: str, extra: str,
                 scales: list[float] | None, sizes: list[int | str] | None) -> None:
    x = g.t(node.input[0], node)
    if scales:
        spatial = scales[2:]
        sf = "(" + ", ".join(flit(s) for s in spatial) + ("," if len(spatial) == 1 else "") + ")"
        g.emit(node, f'F.interpolate({x}, scale_factor={sf}, mode="{tmode}"{extra})')
        return
    spatial_sizes = [str(s) for s in sizes[2:]]
    sz = "(" + ", ".join(spatial_sizes) + ("," if len(spatial_sizes) == 1 else "") + ")"
    g.emit(node, f'F.interpolate({x}, size={sz}, mode="{tmode}"{extra})')


def _nearest_by_index(g: Codegen, node: onnx.NodeProto, coord: str, nearest: str,
                      scales: list[float] | None, sizes: list[int | str] | None) -> None:
    """ONNX nearest resizing written out: per spatial axis, source index = round(coord(i))."""
    if coord not in _COORD or nearest not in _ROUND:
        raise g.unsupported(node, f"nearest resize with {coord} coordinates, {nearest} rounding")
    x0 = x = g.t(node.input[0], node)
    dims = g.dim_list(node.input[0]) or []
    nd = len(scales or sizes or []) - 2
    for ax in range(2, 2 + nd):
        n_in = dims[ax] if ax < len(dims) and isinstance(dims[ax], int) else f"{x0}.shape[{ax}]"
        if scales:
            s = flit(scales[ax])
            n_out = _scaled_size(n_in, scales[ax])
        else:
            n_out = sizes[ax]
            s = f"({n_out} / {n_in})"
        pos = f"torch.arange({n_out}, device={x0}.device, dtype=torch.float32)"
        c = _COORD[coord].format(i=pos, s=s, n_in=n_in, n_out=n_out)
        index = f"{_ROUND[nearest].format(c=f'({c})')}.clamp(0, {n_in} - 1).long()"
        var = g.unique(f"{node_base(node)}_index{ax}", g.locals_used, "index")
        g.fwd_lines.append(f"{var} = {index}")
        x = f"{x}.index_select({ax}, {var})"
    g.emit(node, x)


def _scaled_size(n_in: int | str, scale: float) -> int | str:
    """ONNX output size floor(in * scale), in float32 like onnxruntime."""
    if isinstance(n_in, int):
        return int(np.floor(np.float32(n_in) * np.float32(scale)))
    if float(scale).is_integer():  # integer arithmetic stays dynamic when traced
        return f"{n_in} * {int(scale)}"
    if float(1.0 / scale).is_integer():
        return f"{n_in} // {int(1.0 / scale)}"
    return f"int({n_in} * {flit(scale)})"


@register("Resize", rule=_resize_rule, traverse="data")
def _resize(g: Codegen, node: onnx.NodeProto) -> None:
    a = attrs(node)
    if a.get("antialias", 0) or "axes" in a or a.get("exclude_outside", 0):
        raise g.unsupported(node, "antialias / axes / exclude_outside")
    if g.opset < 11:
        scales_arr = g.const(node.input[1])
    else:
        scales_arr = g.const(node.input[2]) if len(node.input) > 2 and node.input[2] else None
    if scales_arr is not None and scales_arr.size == 0:
        scales_arr = None
    scales = None if scales_arr is None else [float(s) for s in scales_arr.reshape(-1)]
    sizes = None
    if g.opset >= 11 and len(node.input) > 3 and node.input[3]:
        sizes = g.int_items(node, 3, "sizes")  # ints, or expressions computed in forward()
    coord = a.get("coordinate_transformation_mode", "asymmetric" if g.opset < 11 else "half_pixel")
    nearest = a.get("nearest_mode", "round_prefer_floor" if g.opset >= 11 else "floor")
    _resize_common(g, node, a.get("mode", "nearest"), coord, nearest, scales, sizes)


@register("Upsample", rule=_resize_rule, traverse="data")
def _upsample(g: Codegen, node: onnx.NodeProto) -> None:
    a = attrs(node)
    scales = a.get("scales")
    if scales is None:
        arr = g.const(node.input[1]) if len(node.input) > 1 else None
        scales = None if arr is None else [float(s) for s in arr.reshape(-1)]
    if a.get("mode", "nearest") != "nearest":
        raise g.unsupported(node, "Upsample modes other than nearest")
    _resize_common(g, node, "nearest", "asymmetric", "floor", scales, None)
