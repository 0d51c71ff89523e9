"""Activations and other per-element functions of one tensor: channels pass straight through."""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np
import onnx

from onnx_thinet.channels.rules import Blocked, Flow, on_data, per_channel_constant, same
from onnx_thinet.ops.registry import register
from onnx_thinet.pytorch.source import FLOAT_DTYPES, attrs, flit, lit

if TYPE_CHECKING:
    from onnx_thinet.channels.rules import RuleContext, Step
    from onnx_thinet.pytorch.codegen import Codegen

__all__ = ["ALPHA", "UNARY", "unary_rule"]


@on_data
def unary_rule(ctx: RuleContext, node: onnx.NodeProto, flow: Flow) -> Step:
    """A function of each element alone keeps every channel where it was."""
    return same(node, flow)


@on_data
def _clip_rule(ctx: RuleContext, node: onnx.NodeProto, flow: Flow) -> Step:
    for bound in (1, 2):
        if bound < len(node.input) and node.input[bound]:
            value = ctx.const(node, bound)
            if value is None or value.size != 1:
                return Blocked("Clip bounds are not scalar constants")
    return same(node, flow)


@on_data
def _prelu_rule(ctx: RuleContext, node: onnx.NodeProto, flow: Flow) -> Step:
    return per_channel_constant(ctx, node, flow, other=1)


@on_data
def _softmax_rule(ctx: RuleContext, node: onnx.NodeProto, flow: Flow) -> Step:
    rank = ctx.index.rank(flow.tensor)
    axis = ctx.attr(node, "axis", -1 if ctx.opset >= 13 else 1)
    if rank is None:
        return Blocked("rank unknown")
    axis %= rank
    if axis == flow.axis or (ctx.opset < 13 and axis <= flow.axis):
        return Blocked(f"{node.op_type} normalizes across the channels")
    return same(node, flow)


# One PyTorch expression per op, of the input `x`.
UNARY = {
    "Relu": "F.relu({x})",
    "Sigmoid": "torch.sigmoid({x})",
    "Tanh": "torch.tanh({x})",
    "HardSwish": "F.hardswish({x})",
    "Exp": "torch.exp({x})",
    "Sqrt": "torch.sqrt({x})",
    "Neg": "-{x}",
    "Abs": "torch.abs({x})",
    "Reciprocal": "torch.reciprocal({x})",
    "Erf": "torch.erf({x})",
    "Floor": "torch.floor({x})",
    "Ceil": "torch.ceil({x})",
    "Round": "torch.round({x})",  # both round half to even
    "Softplus": "F.softplus({x})",
    "Softsign": "F.softsign({x})",
    "Mish": "F.mish({x})",
}
# Element-wise too, but no channel rule: slim never prunes through them.
UNARY_NO_RULE = {"Log": "torch.log({x})", "Not": "torch.logical_not({x})"}


def _unary(g: Codegen, node: onnx.NodeProto) -> None:
    template = UNARY.get(node.op_type) or UNARY_NO_RULE[node.op_type]
    g.emit(node, template.format(x=g.t(node.input[0], node)))


register(*UNARY, rule=unary_rule, traverse="data")(_unary)
register(*UNARY_NO_RULE)(_unary)


# Activations with one `alpha` attribute: (ONNX default, PyTorch expression of x and alpha).
ALPHA = {
    "LeakyRelu": (0.01, "F.leaky_relu({x}, {a})"),
    "Elu": (1.0, "F.elu({x}, {a})"),
    "Celu": (1.0, "F.celu({x}, {a})"),
    "ThresholdedRelu": (1.0, "torch.where({x} > {a}, {x}, 0.0)"),  # F.threshold: not exportable
}


@register(*ALPHA, rule=unary_rule, traverse="data")
def _with_alpha(g: Codegen, node: onnx.NodeProto) -> None:
    default, template = ALPHA[node.op_type]
    alpha = attrs(node).get("alpha", default)
    g.emit(node, template.format(x=g.t(node.input[0], node), a=flit(alpha)))


@register("Selu", rule=unary_rule, traverse="data")
def _selu(g: Codegen, node: onnx.NodeProto) -> None:
    a = attrs(node)
    alpha = np.float32(a.get("alpha", 1.67326319217681884765625))
    gamma = np.float32(a.get("gamma", 1.05070102214813232421875))
    x = g.t(node.input[0], node)
    if np.isclose(alpha, 1.6732632, rtol=1e-6) and np.isclose(gamma, 1.0507010, rtol=1e-6):
        g.emit(node, f"F.selu({x})")
        return
    g.emit(node, f"{flit(gamma)} * torch.where({x} > 0, {x}, {flit(alpha)} * (torch.exp({x}) - 1.0))")


@register("Gelu", rule=unary_rule, traverse="data")
def _gelu(g: Codegen, node: onnx.NodeProto) -> None:
    approx = attrs(node).get("approximate", "none")
    x = g.t(node.input[0], node)
    g.emit(node, f"F.gelu({x})" if approx == "none" else f"F.gelu({x}, approximate='tanh')")


@register("HardSigmoid", rule=unary_rule, traverse="data")
def _hard_sigmoid(g: Codegen, node: onnx.NodeProto) -> None:
    a = attrs(node)
    alpha, beta = float(a.get("alpha", 0.2)), float(a.get("beta", 0.5))
    x = g.t(node.input[0], node)
    if np.isclose(alpha, 1 / 6, rtol=1e-6) and beta == 0.5:
        g.emit(node, f"F.hardsigmoid({x})")
    else:
        g.emit(node, f"torch.clamp({x} * {flit(alpha)} + {flit(beta)}, 0.0, 1.0)")


@register("PRelu", rule=_prelu_rule, traverse="data")
def _prelu(g: Codegen, node: onnx.NodeProto) -> None:
    slope = g.const(node.input[1])
    x = g.t(node.input[0], node)
    rank = g.rank(node.input[0])
    channels = None if slope is None else _prelu_channels(slope, rank)
    if channels is not None:
        attr = g.new_attr(node)
        ctor = "nn.PReLU()" if channels == 0 else f"nn.PReLU({channels})"
        g.add_module(attr, ctor, {"weight": slope.reshape(max(channels, 1))}, {"weight": g.src(node.input[1])})
        g.emit(node, f"self.{attr}({x})")
        return
    s = g.t(node.input[1], node, other_rank=rank)
    g.emit(node, f"torch.where({x} >= 0, {x}, {x} * {s})")


def _prelu_channels(slope: np.ndarray, rank: int | None) -> int | None:
    """0 for one shared slope, C for a slope per channel (axis 1), None for anything else."""
    if slope.size == 1:
        return 0
    r = rank if rank is not None else slope.ndim + 1
    padded = (1,) * (r - slope.ndim) + tuple(slope.shape)
    if r >= 2 and padded[1] == slope.size and all(d == 1 for i, d in enumerate(padded) if i != 1):
        return int(slope.size)
    return None


@register("Clip", rule=_clip_rule, traverse="data")
def _clip(g: Codegen, node: onnx.NodeProto) -> None:
    x = g.t(node.input[0], node)
    bounds = [_clip_bound(g, node, idx, key) for idx, key in ((1, "min"), (2, "max"))]
    if [v for v, _ in bounds] == [0.0, 6.0]:
        g.emit(node, f"F.relu6({x})")
        return
    parts = [x] + [f"{k}={b}" for k, (_, b) in zip(("min", "max"), bounds, strict=True) if b is not None]
    g.emit(node, f"torch.clamp({', '.join(parts)})")


def _clip_bound(g: Codegen, node: onnx.NodeProto, idx: int, key: str) -> tuple[float | None, str | None]:
    """(constant value or None, source text or None) of one Clip bound."""
    if g.opset < 11:
        val = attrs(node).get(key)
        return (None, None) if val is None else (float(val), flit(val))
    name = node.input[idx] if len(node.input) > idx else ""
    if not name:
        return None, None
    arr = g.const(name)
    if arr is None:
        return None, g.t(name, node)
    text = lit(arr.reshape(())) if arr.dtype in FLOAT_DTYPES else str(int(arr))
    return float(arr), text


@register("Softmax", "LogSoftmax", rule=_softmax_rule)
def _softmax(g: Codegen, node: onnx.NodeProto) -> None:
    fn = "softmax" if node.op_type == "Softmax" else "log_softmax"
    x = g.t(node.input[0], node)
    rank = g.rank(node.input[0])
    axis = int(attrs(node).get("axis", -1 if g.opset >= 13 else 1))
    if g.opset >= 13 or axis == -1 or (rank is not None and axis % rank == rank - 1):
        g.emit(node, f"torch.{fn}({x}, dim={axis})")
    else:  # opset < 13: coerce to 2-D at `axis`
        g.emit(node, f"torch.{fn}({x}.flatten({axis}), dim=-1).reshape({x}.shape)")
