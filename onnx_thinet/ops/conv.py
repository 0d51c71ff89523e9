"""Conv, ConvTranspose, Gemm, MatMul: the layers with weights, channel consumers and producers.

A grouped Conv carries whole groups along; a ConvTranspose reads the channels as its input
channels (a per-channel one, bilinear upsampling in decoders, carries them along)."""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np
import onnx

from onnx_thinet.channels.consumers import CONV, CONV_TRANSPOSE, LINEAR
from onnx_thinet.channels.layout import AttrUpdate, Consumer, Layout, ParamSlice
from onnx_thinet.channels.rules import Blocked, Consumed, Flow, Through, on_data
from onnx_thinet.ops.registry import register
from onnx_thinet.pytorch.source import (
    FLOAT_DTYPES,
    NP_TO_TORCH,
    attrs,
    flit,
    opt_input,
    torch_pad,
    tup,
)

if TYPE_CHECKING:
    from onnx_thinet.channels.rules import RuleContext, Step
    from onnx_thinet.io.graph import ConstShape
    from onnx_thinet.pytorch.codegen import Codegen

__all__: list[str] = []


# ---------------------------------------------------------------- channel rules


@on_data
def conv_rule(ctx: RuleContext, node: onnx.NodeProto, flow: Flow) -> Step:
    """A dense Conv consumes the channels; a depthwise Conv carries them through."""
    weight = ctx.const_shape(node, 1)
    if weight is None:
        return Blocked("Conv weight is not a constant initializer")
    if flow.axis != 1 or ctx.outer(flow) is None:
        return Blocked("Conv reads channels on another axis")
    group = ctx.attr(node, "group", 1)
    in_channels = ctx.length(flow) or weight.shape[1] * group
    if group == 1:
        if weight.ndim not in (3, 4):
            return Blocked(f"{weight.ndim - 2}-D Conv consumers are not supported")
        return Consumed(Consumer(node.name, CONV, flow.tensor, ParamSlice(node.name, 1, 1, flow.layout)))
    if group == in_channels and weight.shape[1] == 1 and ctx.outer(flow) == 1:
        return _depthwise(node, flow, weight, in_channels)
    return grouped_conv(ctx, node, flow, weight, group, in_channels)


def _depthwise(node: onnx.NodeProto, flow: Flow, weight: ConstShape, in_channels: int) -> Step:
    multiplier = weight.shape[0] // in_channels
    out_layout = Layout(flow.layout.segments, flow.layout.total, flow.layout.inner * multiplier)
    slices = [ParamSlice(node.name, 1, 0, out_layout)]
    if len(node.input) > 2 and node.input[2]:
        slices.append(ParamSlice(node.name, 2, 0, out_layout))
    return Through(
        (Flow(node.output[0], 1, out_layout),),
        tuple(slices),
        (AttrUpdate(node.name, "group", flow.layout, in_channels),),
    )


def grouped_conv(ctx: RuleContext, node: onnx.NodeProto, flow: Flow, weight, group: int, in_channels) -> Step:
    """A grouped Conv carries whole input groups to their output groups when every channel of
    the group's layout spans whole input groups (the producer is then cut by groups)."""
    per_group = int(weight.shape[1])
    if in_channels != group * per_group or flow.layout.inner % per_group or ctx.outer(flow) != 1:
        return Blocked(f"grouped Conv (group={group}) mixes channels within groups")
    out_inner = flow.layout.inner // per_group * (weight.shape[0] // group)
    out_layout = Layout(flow.layout.segments, flow.layout.total, out_inner)
    slices = [ParamSlice(node.name, 1, 0, out_layout)]
    if len(node.input) > 2 and node.input[2]:
        slices.append(ParamSlice(node.name, 2, 0, out_layout))
    return Through((Flow(node.output[0], 1, out_layout),), tuple(slices),
                   (AttrUpdate(node.name, "group", flow.layout, in_channels, per_group),))


@on_data
def conv_transpose_rule(ctx: RuleContext, node: onnx.NodeProto, flow: Flow) -> Step:
    weight = ctx.const_shape(node, 1)
    if weight is None:
        return Blocked("ConvTranspose weight is not a constant initializer")
    if flow.axis != 1 or ctx.outer(flow) != 1:
        return Blocked("ConvTranspose reads channels on another axis")
    group = ctx.attr(node, "group", 1)
    if group != 1 and group == ctx.length(flow):
        return _depthwise_transposed(node, flow, weight, group)
    if group != 1:
        return Blocked("grouped ConvTranspose mixes channels within groups")
    if weight.ndim not in (3, 4):
        return Blocked(f"{weight.ndim - 2}-D ConvTranspose consumers are not supported")
    auto_pad = ctx.attr(node, "auto_pad", b"NOTSET")
    if (auto_pad.decode() if isinstance(auto_pad, bytes) else auto_pad) != "NOTSET":
        return Blocked("ConvTranspose with auto_pad is not supported as a consumer")
    if ctx.attr(node, "output_shape") is not None or ctx.attr(node, "kernel_shape") is None:
        return Blocked("ConvTranspose needs kernel_shape and no output_shape to be a consumer")
    spatial = weight.ndim - 2
    pads = ctx.attr(node, "pads", [0] * (2 * spatial))
    dilations = ctx.attr(node, "dilations", [1] * spatial)
    reach = [d * (k - 1) for d, k in zip(dilations, weight.shape[2:])]
    if any(p > r for p, r in zip(pads, reach * 2)):
        return Blocked("ConvTranspose pads exceed its kernel reach")
    cut = ParamSlice(node.name, 1, 0, flow.layout)
    return Consumed(Consumer(node.name, CONV_TRANSPOSE, flow.tensor, cut))


def _depthwise_transposed(node: onnx.NodeProto, flow: Flow, weight, group: int) -> Step:
    """A per-channel ConvTranspose (bilinear upsampling in segmentation decoders) carries the
    channels along: its weight [C, m, k...] loses rows, its outputs come m per channel."""
    multiplier = int(weight.shape[1])
    out_layout = Layout(flow.layout.segments, flow.layout.total, flow.layout.inner * multiplier)
    slices = [ParamSlice(node.name, 1, 0, flow.layout)]
    if len(node.input) > 2 and node.input[2]:
        slices.append(ParamSlice(node.name, 2, 0, out_layout))
    return Through((Flow(node.output[0], 1, out_layout),), tuple(slices),
                   (AttrUpdate(node.name, "group", flow.layout, group),))


@on_data
def gemm_rule(ctx: RuleContext, node: onnx.NodeProto, flow: Flow) -> Step:
    if ctx.attr(node, "transA", 0):
        return Blocked("Gemm reads a transposed input")
    if ctx.const_shape(node, 1) is None:
        return Blocked("Gemm weight is not a constant initializer")
    if flow.axis != 1:
        return Blocked("Gemm reads channels on another axis")
    transposed = bool(ctx.attr(node, "transB", 0))
    weight = ParamSlice(node.name, 1, 1 if transposed else 0, flow.layout)
    return Consumed(Consumer(node.name, LINEAR, flow.tensor, weight, transpose=transposed))


@on_data
def matmul_rule(ctx: RuleContext, node: onnx.NodeProto, flow: Flow) -> Step:
    weight = ctx.const_shape(node, 1)
    rank = ctx.index.rank(flow.tensor)
    if weight is None or weight.ndim != 2:
        return Blocked("MatMul is not activation x constant 2-D weight")
    if rank is None or flow.axis != rank - 1:
        return Blocked("MatMul reads channels on another axis")
    weight_slice = ParamSlice(node.name, 1, 0, flow.layout)
    return Consumed(Consumer(node.name, LINEAR, flow.tensor, weight_slice, bias_index=None))


# ---------------------------------------------------------------- translators


def _weights(g: Codegen, node: onnx.NodeProto) -> tuple[np.ndarray, np.ndarray | None, int]:
    """Constant weight and optional bias of a (transposed) convolution, and its spatial rank."""
    w = g.const(node.input[1])
    bias_name = opt_input(node, 2)
    b = g.const(bias_name) if bias_name else None
    if w is None or (bias_name and b is None):
        raise g.unsupported(node, "weight and bias must be constant initializers")
    if w.ndim - 2 not in (1, 2, 3):
        raise g.unsupported(node, f"{w.ndim - 2}-D convolution")
    return w, b, w.ndim - 2


def _layer(g: Codegen, node: onnx.NodeProto, cls: str, args: list[str], w: np.ndarray,
           b: np.ndarray | None) -> str:
    """Add the nn layer with its weight and bias; return the module attribute."""
    args = args + (["bias=False"] if b is None else [])
    if w.dtype != np.float32:
        args.append(f"dtype={NP_TO_TORCH[w.dtype]}")
    attr = g.new_attr(node)
    sources = {"weight": g.src(node.input[1]), "bias": g.src(opt_input(node, 2))}
    g.add_module(attr, f"nn.{cls}({', '.join(args)})", {"weight": w, "bias": b}, sources)
    return attr


def _optional_args(values: dict[str, list[int]], group: int) -> list[str]:
    """Keyword arguments that differ from PyTorch's defaults."""
    defaults = {"stride": 1, "padding": 0, "output_padding": 0, "dilation": 1}
    args = [f"{k}={tup(v)}" for k, v in values.items() if any(x != defaults[k] for x in v)]
    return args + ([f"groups={group}"] if group != 1 else [])


@register("Conv", rule=conv_rule, traverse="data")  # traversed when depthwise (not a producer)
def _conv(g: Codegen, node: onnx.NodeProto) -> None:
    """nn.Conv; pads nn.Conv cannot express (asymmetric, SAME) become an F.pad."""
    a = attrs(node)
    w, b, nd = _weights(g, node)
    group = int(a.get("group", 1))
    kernel = list(w.shape[2:])
    strides = list(a.get("strides", [1] * nd))
    dil = list(a.get("dilations", [1] * nd))
    begins, ends = g.pads(node, a, kernel, strides, dil)
    padding = begins if begins == ends else [0] * nd
    args = [str(w.shape[1] * group), str(w.shape[0]), tup(kernel)]
    args += _optional_args({"stride": strides, "padding": padding, "dilation": dil}, group)
    attr = _layer(g, node, f"Conv{nd}d", args, w, b)
    x = g.t(node.input[0], node)
    if begins != ends:
        x = f"F.pad({x}, {torch_pad(begins, ends)})"
    g.emit(node, f"self.{attr}({x})")


@register("ConvTranspose", rule=conv_transpose_rule)
def _conv_transpose(g: Codegen, node: onnx.NodeProto) -> None:
    """nn.ConvTranspose; asymmetric pads are cropped from the unpadded output."""
    a = attrs(node)
    w, b, nd = _weights(g, node)
    if "output_shape" in a or a.get("auto_pad", "NOTSET") not in ("NOTSET", "VALID"):
        raise g.unsupported(node, "output_shape / auto_pad SAME are not supported")
    group = int(a.get("group", 1))
    pads = [0] * (2 * nd) if a.get("auto_pad") == "VALID" else list(a.get("pads", [0] * 2 * nd))
    symmetric = pads[:nd] == pads[nd:]
    args = [str(w.shape[0]), str(w.shape[1] * group), tup(list(w.shape[2:]))]
    args += _optional_args({
        "stride": list(a.get("strides", [1] * nd)),
        "padding": pads[:nd] if symmetric else [0] * nd,
        "output_padding": list(a.get("output_padding", [0] * nd)),
        "dilation": list(a.get("dilations", [1] * nd)),
    }, group)
    attr = _layer(g, node, f"ConvTranspose{nd}d", args, w, b)
    y = f"self.{attr}({g.t(node.input[0], node)})"
    if not symmetric:
        crop = [f"{lo}:{-hi if hi else ''}" for lo, hi in zip(pads[:nd], pads[nd:], strict=True)]
        y = f"{y}[..., {', '.join(crop)}]"
    g.emit(node, y)


@register("Gemm", rule=gemm_rule)
def _gemm(g: Codegen, node: onnx.NodeProto) -> None:
    a = attrs(node)
    ta, tb = int(a.get("transA", 0)), int(a.get("transB", 0))
    alpha, beta = float(a.get("alpha", 1.0)), float(a.get("beta", 1.0))
    bw = g.const(node.input[1])
    c_name = node.input[2] if len(node.input) > 2 else ""
    c = g.const(c_name) if c_name else None
    if bw is not None and bw.ndim == 2 and not ta and bw.dtype in FLOAT_DTYPES:
        weight = (bw if tb else bw.T) * np.asarray(alpha, bw.dtype)
        out_f, in_f = weight.shape
        bias = None
        bias_src = None
        linear_ok = not c_name
        if (
            c is not None
            and (c.ndim <= 1 or (c.ndim == 2 and c.shape[0] == 1))
            and c.size in (1, out_f)
        ):
            bias = np.broadcast_to(c.reshape(-1) * np.asarray(beta, c.dtype), (out_f,)).copy()
            linear_ok = True
            # a broadcast scalar C has no one-to-one write-back: it stays unmapped
            bias_src = g.src(c_name, scale=beta) if c.size == out_f else None
        if linear_ok:
            args = [str(in_f), str(out_f)] + ([] if bias is not None else ["bias=False"])
            attr = g.new_attr(node)
            g.add_module(
                attr,
                f"nn.Linear({', '.join(args)})",
                {"weight": weight.astype(bw.dtype), "bias": bias},
                {
                    "weight": g.src(node.input[1], transpose=not tb, scale=alpha),
                    "bias": bias_src,
                },
            )
            g.emit(node, f"self.{attr}({g.t(node.input[0], node)})")
            return
    x = g.t(node.input[0], node)
    w = g.t(node.input[1], node)
    expr = f"torch.matmul({x + '.t()' if ta else x}, {w + '.t()' if tb else w})"
    if alpha != 1.0:
        expr = f"{expr} * {flit(alpha)}"
    if c_name:
        cexpr = g.t(c_name, node, other_rank=2)
        expr = f"{expr} + {cexpr}" if beta == 1.0 else f"{expr} + {cexpr} * {flit(beta)}"
    g.emit(node, expr)


@register("MatMul", rule=matmul_rule)
def _matmul(g: Codegen, node: onnx.NodeProto) -> None:
    bw = g.const(node.input[1])
    if (
        bw is not None
        and bw.ndim == 2
        and bw.dtype in FLOAT_DTYPES
        and g.const(node.input[0]) is None
    ):
        attr = g.new_attr(node)
        dt = "" if bw.dtype == np.float32 else f", dtype={NP_TO_TORCH[bw.dtype]}"
        g.add_module(
            attr,
            f"nn.Linear({bw.shape[0]}, {bw.shape[1]}, bias=False{dt})",
            {"weight": np.ascontiguousarray(bw.T)},
            {"weight": g.src(node.input[1], transpose=True)},
        )
        g.emit(node, f"self.{attr}({g.t(node.input[0], node)})")
        return
    g.emit(
        node, f"torch.matmul({g.t(node.input[0], node)}, {g.t(node.input[1], node)})"
    )
