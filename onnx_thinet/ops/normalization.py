"""BatchNormalization and InstanceNormalization: per-channel parameters sliced with the channels."""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np
import onnx

from onnx_thinet.channels.layout import ParamSlice
from onnx_thinet.channels.rules import Blocked, Flow, Through, on_data
from onnx_thinet.ops.registry import register
from onnx_thinet.pytorch.source import attrs, flit

if TYPE_CHECKING:
    from onnx_thinet.channels.rules import RuleContext, Step
    from onnx_thinet.pytorch.codegen import Codegen

__all__: list[str] = []


@on_data
def _norm_rule(ctx: RuleContext, node: onnx.NodeProto, flow: Flow) -> Step:
    if flow.axis != 1 or ctx.outer(flow) is None:  # outer blocks: a grouped producer's layout
        return Blocked(f"{node.op_type} normalizes another axis than the channels")
    if len(node.output) > 1 and any(ctx.index.uses.get(o) for o in node.output[1:] if o):
        return Blocked("BatchNormalization training outputs are used")
    slices = []
    for j in range(1, len(node.input)):
        if ctx.const(node, j) is None:
            return Blocked(f"{node.op_type} parameter {node.input[j]!r} is not constant")
        slices.append(ParamSlice(node.name, j, 0, flow.layout))
    return Through((Flow(node.output[0], flow.axis, flow.layout),), tuple(slices))


_NORM_CLASS = {2: "1d", 3: "1d", 4: "2d", 5: "3d"}


def _eps_arg(node: onnx.NodeProto) -> list[str]:
    eps = float(np.float32(attrs(node).get("epsilon", 1e-5)))
    return [] if eps == float(np.float32(1e-5)) else [f"eps={flit(eps)}"]


@register("BatchNormalization", rule=_norm_rule, traverse="data")
def _batch_norm(g: Codegen, node: onnx.NodeProto) -> None:
    if any(o in g.used_names for o in node.output[1:]):
        raise g.unsupported(node, "training-mode outputs are used")
    if attrs(node).get("training_mode", 0):
        raise g.unsupported(node, "training_mode=1 (batch statistics at inference)")
    scale, bias, mean, var = (g.const(n) for n in node.input[1:5])
    if scale is None or bias is None or mean is None or var is None:
        raise g.unsupported(node, "scale, bias, mean and var must be constants")
    rank = g.rank(node.input[0])
    args = [str(scale.shape[0]), *_eps_arg(node)]
    momentum = 1.0 - float(attrs(node).get("momentum", 0.9))
    if abs(momentum - 0.1) > 1e-6:
        args.append(f"momentum={flit(momentum)}")
    attr = g.new_attr(node)
    params = {
        "weight": scale,
        "bias": bias,
        "running_mean": mean,
        "running_var": var,
        "num_batches_tracked": np.array(0, dtype=np.int64),
    }
    names = dict(zip(("weight", "bias", "running_mean", "running_var"), node.input[1:5], strict=False))
    ctor = f"nn.BatchNorm{_NORM_CLASS.get(rank or 4, '2d')}({', '.join(args)})"
    g.add_module(attr, ctor, params, {key: g.src(name) for key, name in names.items()})
    g.emit(node, f"self.{attr}({g.t(node.input[0], node)})")


@register("InstanceNormalization", rule=_norm_rule)
def _instance_norm(g: Codegen, node: onnx.NodeProto) -> None:
    scale, bias = g.const(node.input[1]), g.const(node.input[2])
    if scale is None or bias is None:
        raise g.unsupported(node, "scale and bias must be constants")
    rank = g.rank(node.input[0])
    args = [str(scale.shape[0]), *_eps_arg(node), "affine=True"]
    attr = g.new_attr(node)
    ctor = f"nn.InstanceNorm{_NORM_CLASS.get(rank or 4, '2d')}({', '.join(args)})"
    sources = {"weight": g.src(node.input[1]), "bias": g.src(node.input[2])}
    g.add_module(attr, ctor, {"weight": scale, "bias": bias}, sources)
    g.emit(node, f"self.{attr}({g.t(node.input[0], node)})")
