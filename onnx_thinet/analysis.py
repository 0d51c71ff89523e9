"""Channel-dependency analysis: which producers' output channels can be cut, and what goes with them."""

from __future__ import annotations

import logging
from dataclasses import dataclass

import onnx
from onnx import helper

from onnx_thinet.channels import ChannelGroup, Consumer, Coupled, Layout, ParamSlice, Skipped
from onnx_thinet.graph import GraphIndex, infer_shapes
from onnx_thinet.rules import RULES, Flow, RuleContext, Step

__all__ = ["Analysis", "analyze", "opset_version"]

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class Analysis:
    """Prunable groups in topological order, plus what was kept and why."""

    groups: tuple[ChannelGroup, ...]
    coupled: tuple[Coupled, ...]
    skipped: tuple[Skipped, ...]


def opset_version(model: onnx.ModelProto) -> int:
    for entry in model.opset_import:
        if entry.domain in ("", "ai.onnx"):
            return entry.version
    return 1


def analyze(model: onnx.ModelProto) -> Analysis:
    """Find every prunable producer (Conv group=1, Gemm, MatMul with constant weights).

    A producer is prunable when every path from its output reaches consumers (Conv, Gemm,
    MatMul) only through ops whose rule proves they act per channel. A path that meets a
    residual Add or Concat makes the channels coupled; an unknown op or a graph output
    makes the producer skipped. Neither stops analysis of other producers.
    """
    if not model.graph.value_info:
        model = infer_shapes(model)
    index = GraphIndex.build(model)
    opset = opset_version(model)
    groups, coupled, skipped = [], [], []
    for node in model.graph.node:
        start = _producer_start(index, node)
        if start is None:
            continue
        outcome = _walk(index, node, start, opset)
        if isinstance(outcome, ChannelGroup):
            groups.append(outcome)
        elif isinstance(outcome, Coupled):
            coupled.append(outcome)
        else:
            skipped.append(outcome)
    return Analysis(tuple(groups), tuple(coupled), tuple(skipped))


@dataclass(frozen=True)
class _Start:
    flow: Flow
    channels: int
    slices: tuple[ParamSlice, ...]


def _producer_start(index: GraphIndex, node: onnx.NodeProto) -> _Start | None:
    """Where a producer's channels begin, and its own weights to cut; None if not a producer."""
    if node.domain not in ("", "ai.onnx") or not node.output:
        return None
    weight = index.const(node.input[1]) if len(node.input) > 1 else None
    if weight is None:
        return None
    attrs = {a.name: helper.get_attribute_value(a) for a in node.attribute}
    bias = node.input[2] if len(node.input) > 2 and node.input[2] else None
    if node.op_type == "Conv" and attrs.get("group", 1) == 1 and weight.ndim >= 3:
        full = Layout.full(int(weight.shape[0]))
        slices = [ParamSlice(node.name, 1, 0, full)]
        if bias:
            slices.append(ParamSlice(node.name, 2, 0, full))
        return _Start(Flow(node.output[0], 1, full), full.total, tuple(slices))
    if node.op_type == "Gemm" and weight.ndim == 2:
        transposed = bool(attrs.get("transB", 0))
        full = Layout.full(int(weight.shape[0] if transposed else weight.shape[1]))
        slices = [ParamSlice(node.name, 1, 0 if transposed else 1, full)]
        if bias:
            c = index.const(bias)
            if c is None:
                return None
            if c.ndim >= 1 and c.shape[-1] == full.total and c.size > 1:
                slices.append(ParamSlice(node.name, 2, c.ndim - 1, full))
        return _Start(Flow(node.output[0], 1, full), full.total, tuple(slices))
    if node.op_type == "MatMul" and weight.ndim == 2:
        rank = index.rank(node.output[0])
        if rank is None:
            return None
        full = Layout.full(int(weight.shape[1]))
        return _Start(Flow(node.output[0], rank - 1, full), full.total, (ParamSlice(node.name, 1, 1, full),))
    return None


def _walk(
    index: GraphIndex, producer: onnx.NodeProto, start: _Start, opset: int
) -> ChannelGroup | Coupled | Skipped:
    """Follow the producer's channels forward, node by node in topological order.

    Each node sees every one of its inputs that carries the channels at once, so ops that
    combine a tensor with itself (SiLU as x·sigmoid(x), SPPF's Concat of pooled copies) are
    judged with all their inputs known.
    """
    ctx = RuleContext(index, start.channels, opset)
    flows = {start.flow.tensor: start.flow}
    steps: list[Step] = []
    consumers: list[Consumer] = []
    path: list[str] = []
    for node in index.model.graph.node[index.position(producer) + 1 :]:
        inputs = {k: flows[name] for k, name in enumerate(node.input) if name in flows}
        if not inputs:
            continue
        step = _apply_rule(ctx, node, inputs)
        if step.coupled is not None:
            return Coupled(producer.name, start.channels, node.name, step.coupled)
        if step.blocked is not None:
            return Skipped(producer.name, node.name, f"{node.op_type}: {step.blocked}")
        if step.consumer is not None:
            consumers.append(step.consumer)
            continue
        path.append(node.name)
        steps.append(step)
        for out in step.outputs:
            flows[out.tensor] = out
    reached_output = next((t for t in flows if t in index.graph_outputs), None)
    if reached_output is not None:
        return Skipped(producer.name, reached_output, f"channels reach graph output {reached_output!r}")
    if not consumers:
        return Skipped(producer.name, producer.name, "no Conv, Gemm or MatMul reads these channels")
    return ChannelGroup(
        producer=producer.name,
        producer_op=producer.op_type,
        channels=start.channels,
        output=start.flow.tensor,
        slices=start.slices + tuple(s for step in steps for s in step.slices),
        consumers=tuple(consumers),
        attr_updates=tuple(u for step in steps for u in step.attr_updates),
        shape_fixes=tuple(f for step in steps for f in step.shape_fixes),
        path=tuple(path),
    )


def _apply_rule(ctx: RuleContext, node: onnx.NodeProto, inputs: dict[int, Flow]) -> Step:
    if node.domain not in ("", "ai.onnx"):
        return Step(blocked=f"op {node.domain}:{node.op_type} is unknown to onnx-thinet")
    channel_rule = RULES.get(node.op_type)
    if channel_rule is None:
        return Step(blocked=f"op {node.op_type} has no channel rule (not proven per-channel)")
    return channel_rule(ctx, node, inputs)
