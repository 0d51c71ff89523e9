"""Channel-dependency analysis: which producers' output channels can be cut, and what goes with them."""

from __future__ import annotations

import dataclasses
import heapq
import logging
from collections.abc import Collection
from dataclasses import dataclass

import onnx
from onnx import helper

from onnx_thinet.channels.layout import (
    ChannelGroup,
    Consumer,
    Coupled,
    Layout,
    ParamSlice,
    Segment,
    Skipped,
)
from onnx_thinet.channels.rules import (
    Blocked,
    Consumed,
    CoupledStop,
    Flow,
    RuleContext,
    Step,
    Through,
)
from onnx_thinet.io.graph import GraphIndex, infer_shapes, opset_version
from onnx_thinet.ops import channel_rule, traversal

__all__ = ["QUANTIZED_OPS", "Analysis", "analyze", "opset_version", "quantization_refusal"]

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class Analysis:
    """Prunable groups in topological order, plus what was kept and why."""

    groups: tuple[ChannelGroup, ...]
    coupled: tuple[Coupled, ...]
    skipped: tuple[Skipped, ...]


QUANTIZED_OPS = frozenset({
    "QuantizeLinear", "DequantizeLinear", "DynamicQuantizeLinear", "ConvInteger", "MatMulInteger",
    "QLinearConv", "QLinearMatMul", "QGemm", "QLinearAdd", "QLinearMul", "QLinearSigmoid",
    "QLinearLeakyRelu", "QLinearConcat", "QLinearGlobalAveragePool", "QLinearAveragePool",
    "DynamicQuantizeMatMul", "MatMulIntegerToFloat", "QAttention",
})


def quantization_refusal(model: onnx.ModelProto) -> str | None:
    """Why a quantized graph is refused, or None for a float graph.

    Pruning rescales float weights by least squares; quantized weights, scales and zero points
    would have to be re-derived, so the float model is pruned first and quantized after.
    """
    found = sorted({n.op_type for n in model.graph.node if n.op_type in QUANTIZED_OPS})
    if not found:
        return None
    return (f"the model is quantized ({', '.join(found[:4])}{' ...' if len(found) > 4 else ''}): "
            "onnx-thinet prunes float models; prune the float model first, then quantize the slim model")


def analyze(model: onnx.ModelProto, prune_coupled: bool = False,
            producers: Collection[str] | None = None) -> Analysis:
    """Find every prunable producer (Conv group=1, Gemm, MatMul with constant weights).

    A producer is prunable when every path from its output reaches consumers (Conv, Gemm,
    MatMul) only through ops whose rule proves they act per channel. A path that meets a
    residual Add or a gating Mul makes the channels coupled; an unknown op or a graph output
    makes the producer skipped. Neither stops analysis of other producers.

    With `prune_coupled`, producers tied by residual Adds or gating Muls are gathered into one
    group (every producer whose output is summed into the same tensors) and pruned jointly.

    `producers` (node names) limits the walks to those producers: a pass re-reads its own groups
    only (the U-Net's 108 passes walked 110 producers each). A joint group needs every walk, so
    `prune_coupled` reads them all.
    """
    if not model.graph.value_info:
        model = infer_shapes(model)
    index = GraphIndex.build(model)
    opset = opset_version(model)
    groups, coupled, skipped = [], [], []
    wanted = None if producers is None or prune_coupled else set(producers)
    for node in model.graph.node:
        if wanted is not None and node.name not in wanted:
            continue
        start = _producer_start(index, node)
        if start is None:
            continue
        outcome = _walk(index, [node], [start], opset)
        outcome = _by_whole_groups(index, node, outcome, opset)
        if isinstance(outcome, ChannelGroup):
            groups.append(outcome)
        elif isinstance(outcome, Coupled):
            coupled.append(outcome)
        else:
            skipped.append(outcome)
    if prune_coupled and coupled:
        joint, coupled = _join_coupled(index, coupled, opset)
        groups = sorted(groups + joint, key=lambda g: index.order[g.producers[0]])
    return Analysis(tuple(groups), tuple(coupled), tuple(skipped))


Window = tuple[int, int]  # channels [lo, hi) of a producer's output


def _by_whole_groups(index: GraphIndex, node: onnx.NodeProto, outcome, opset: int):
    """A Conv producer read by a grouped Conv: walked again with its filters in blocks of that
    conv's channels per group, so whole groups are cut; the first outcome if that fails too."""
    if not (isinstance(outcome, Skipped) and "grouped Conv" in outcome.reason and node.op_type == "Conv"):
        return outcome
    reader = next((n for n in index.model.graph.node if n.name == outcome.node), None)
    weight = None if reader is None else index.const_shape(reader.input[1])
    start = _producer_start(index, node, unit=int(weight.shape[1])) if weight is not None else None
    if start is None:
        return outcome
    again = _walk(index, [node], [start], opset)
    if not isinstance(again, ChannelGroup):
        return outcome
    return dataclasses.replace(again, unit=int(weight.shape[1]))


def _join_coupled(index: GraphIndex, coupled: list[Coupled], opset: int):
    """Grow each coupled producer into the set of producers tied to it and walk them together.

    A member may join with part of its channels only: a C2f's first conv is tied to the
    bottleneck's residual Adds through one output of a Split, so only that window is cut.
    """
    joint: list[ChannelGroup] = []
    left: dict[str, Coupled] = {c.producer: c for c in coupled}
    nodes = {n.name: n for n in index.model.graph.node}
    for first in list(left):
        if first not in left:
            continue
        outcome = left[first]
        members: dict[str, Window] = {first: (0, outcome.channels)}
        for _ in range(64):
            grown = _tied_producers(index, nodes[outcome.node], members)
            if grown is None:
                break
            members = grown
            ordered = sorted(members, key=index.order.__getitem__)
            starts = [_producer_start(index, nodes[m], members[m]) for m in ordered]
            if any(s is None for s in starts) or len({s.channels for s in starts}) != 1:
                break
            outcome = _walk(index, [nodes[m] for m in ordered], starts, opset)
            if not isinstance(outcome, Coupled):
                break
        if isinstance(outcome, ChannelGroup):
            joint.append(outcome)
            for member in members:
                left.pop(member, None)
    return joint, list(left.values())


def _tied_producers(
    index: GraphIndex, node: onnx.NodeProto, members: dict[str, Window]
) -> dict[str, Window] | None:
    """`members` grown by the producers feeding `node` (the coupling op), or None if unchanged.

    A producer reached through a Split is narrowed to the window that reaches `node`.
    """
    grown = dict(members)
    for name in node.input:
        for producer, (lo, hi) in (_origins(index, name, depth=0) or {}).items():
            old_lo, old_hi = grown.get(producer, (lo, hi))
            window = (max(lo, old_lo), min(hi, old_hi))
            if window[0] >= window[1]:
                return None
            grown[producer] = window
    return grown if grown != members else None


def _origins(index: GraphIndex, tensor: str, depth: int) -> dict[str, Window] | None:
    """Producers whose channels reach `tensor` through per-channel ops, residual sums and
    channel Splits, each with the window of its channels that makes up `tensor`. Which ops
    may be passed, and how, is each op's `traverse` entry in the op registry."""
    node = index.producer.get(tensor)
    if node is None or depth > 256:
        return None
    start = _producer_start(index, node)
    if start is not None:
        return {node.name: (0, start.channels)}
    how = traversal(node.op_type) if node.domain in ("", "ai.onnx") else "no"
    if how == "data" and all(index.const_shape(i) is not None for i in node.input[1:] if i):
        return _origins(index, node.input[0], depth + 1)
    if how == "operands" and len(node.input) == 2:
        return _operand_origins(index, node, depth)
    if how == "split":
        return _split_origins(index, node, tensor, depth)
    return None


def _operand_origins(index: GraphIndex, node: onnx.NodeProto, depth: int) -> dict[str, Window] | None:
    """Origins of every computed operand of a residual sum or gating product, merged."""
    parts = [_origins(index, i, depth + 1) for i in node.input if index.const_shape(i) is None]
    if not parts or any(p is None for p in parts):
        return None
    merged: dict[str, Window] = {}
    for part in parts:
        for producer, window in part.items():
            if merged.setdefault(producer, window) != window:
                return None
    return merged


def _split_origins(
    index: GraphIndex, node: onnx.NodeProto, tensor: str, depth: int
) -> dict[str, Window] | None:
    """Origins of one output of a Split along the channel axis of a 4-D (NCHW) tensor."""
    rank = index.rank(node.input[0])
    axis = next((helper.get_attribute_value(a) for a in node.attribute if a.name == "axis"), 0)
    if rank != 4 or axis % rank != 1:
        return None
    sizes = [index.dim(out, 1) for out in node.output]
    if any(s is None for s in sizes):
        return None
    k = list(node.output).index(tensor)
    begin = sum(sizes[:k])
    parts = _origins(index, node.input[0], depth + 1)
    if parts is None:
        return None
    narrowed = {}
    for producer, (lo, hi) in parts.items():
        if hi - lo != sum(sizes):
            return None
        narrowed[producer] = (lo + begin, lo + begin + sizes[k])
    return narrowed


@dataclass(frozen=True)
class _Start:
    flow: Flow
    channels: int
    slices: tuple[ParamSlice, ...]


def _producer_start(
    index: GraphIndex, node: onnx.NodeProto, window: Window | None = None, unit: int = 1
) -> _Start | None:
    """Where a producer's channels begin, and its own weights to cut; None if not a producer.

    With a `window`, only the Conv's output channels [lo, hi) belong to the group; with a
    `unit`, each channel of the group is `unit` consecutive filters of a Conv.
    """
    if node.domain not in ("", "ai.onnx") or not node.output:
        return None
    weight = index.const_shape(node.input[1]) if len(node.input) > 1 else None
    if weight is None:
        return None
    attrs = {a.name: helper.get_attribute_value(a) for a in node.attribute}
    bias = node.input[2] if len(node.input) > 2 and node.input[2] else None
    if unit > 1:
        return _unit_start(node, weight, bias, attrs, unit)
    if node.op_type == "Conv" and attrs.get("group", 1) > 1 and weight.ndim >= 3:
        return _grouped_start(node, weight, bias, int(attrs["group"]), window)
    if node.op_type in ("Conv", "ConvTranspose") and attrs.get("group", 1) == 1 and weight.ndim >= 3:
        return _filters_start(node, weight, bias, window, axis=0 if node.op_type == "Conv" else 1)
    if window is not None and window != (0, _out_channels(node, weight, attrs)):
        return None
    if node.op_type == "Gemm" and weight.ndim == 2:
        transposed = bool(attrs.get("transB", 0))
        full = Layout.full(int(weight.shape[0] if transposed else weight.shape[1]))
        slices = [ParamSlice(node.name, 1, 0 if transposed else 1, full)]
        if bias:
            c = index.const_shape(bias)
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


def _unit_start(node: onnx.NodeProto, weight, bias, attrs: dict, unit: int) -> _Start | None:
    """A group=1 Conv whose filters are selected `unit` at a time."""
    if node.op_type != "Conv" or attrs.get("group", 1) != 1 or weight.shape[0] % unit:
        return None
    units = int(weight.shape[0]) // unit
    layout = Layout((Segment(0, 0, units),), units, unit)
    slices = [ParamSlice(node.name, 1, 0, layout)]
    if bias:
        slices.append(ParamSlice(node.name, 2, 0, layout))
    return _Start(Flow(node.output[0], 1, layout), units, tuple(slices))


def _grouped_start(node: onnx.NodeProto, weight, bias, group: int, window: Window | None) -> _Start | None:
    """A grouped Conv's filters as `group` blocks of F/group: channel j is filter j of every
    group, so each group loses the same filters and keeps its structure."""
    per_group = int(weight.shape[0]) // group
    if per_group < 2 or (window is not None and window != (0, per_group)):
        return None
    layout = Layout.full(per_group)
    slices = [ParamSlice(node.name, 1, 0, layout)]
    if bias:
        slices.append(ParamSlice(node.name, 2, 0, layout))
    return _Start(Flow(node.output[0], 1, layout), per_group, tuple(slices))


def _filters_start(node: onnx.NodeProto, weight, bias, window: Window | None, axis: int) -> _Start:
    """A group=1 (transposed) conv: its filters are weight axis `axis` (0 for Conv [F, C, k...],
    1 for ConvTranspose [C, F, k...]); with a window, only filters [lo, hi)."""
    total = int(weight.shape[axis])
    lo, hi = window or (0, total)
    layout = Layout((Segment(lo, 0, hi - lo),), total)
    slices = [ParamSlice(node.name, 1, axis, layout)]
    if bias:
        slices.append(ParamSlice(node.name, 2, 0, layout))
    return _Start(Flow(node.output[0], 1, layout), hi - lo, tuple(slices))


def _out_channels(node: onnx.NodeProto, weight, attrs: dict) -> int:
    """Output channels of a Gemm or MatMul producer."""
    if node.op_type == "Gemm" and attrs.get("transB", 0):
        return int(weight.shape[0])
    return int(weight.shape[-1])


def _walk(
    index: GraphIndex, producers: list[onnx.NodeProto], starts: list[_Start], opset: int
) -> ChannelGroup | Coupled | Skipped:
    """Follow the producers' channels forward, node by node in topological order.

    Each node sees every one of its inputs that carries the channels at once, so ops that
    combine a tensor with itself (SiLU as x·sigmoid(x), SPPF's Concat of pooled copies, a
    residual Add of two producers of one joint group) are judged with all inputs known.
    """
    producer, start = producers[0], starts[0]
    name = " + ".join(p.name for p in producers)
    own = {p.name for p in producers}
    ctx = RuleContext(index, start.channels, opset)
    flows = {s.flow.tensor: s.flow for s in starts}
    steps: list[Through] = []
    consumers: list[Consumer] = []
    path: list[str] = []
    readers = _ReadersInOrder(index, after=index.position(producer))
    for tensor in flows:
        readers.add(tensor)
    for node in readers:
        inputs = {k: flows[name] for k, name in enumerate(node.input) if name in flows}
        if node.name in own:
            if inputs:
                return Skipped(name, node.name, "a producer of the group reads the group's channels")
            continue
        if not inputs:
            continue
        step = _apply_rule(ctx, node, inputs)
        if isinstance(step, CoupledStop):
            return Coupled(name, start.channels, node.name,
                           _interface_tie(index, node, inputs) or step.reason)
        if isinstance(step, Blocked):
            return Skipped(name, node.name, f"{node.op_type}: {step.reason}")
        if isinstance(step, Consumed):
            consumers.append(step.consumer)
            continue
        path.append(node.name)
        steps.append(step)
        for out in step.outputs:
            flows[out.tensor] = out
            readers.add(out.tensor)
    reached_output = next((t for t in flows if t in index.graph_outputs), None)
    if reached_output is not None:
        return Skipped(name, reached_output, f"channels reach graph output {reached_output!r}")
    if not consumers:
        return Skipped(name, producer.name, "no Conv, Gemm or MatMul reads these channels")
    return ChannelGroup(
        producer=name,
        producer_op=producer.op_type,
        channels=start.channels,
        output=start.flow.tensor,
        slices=tuple(s for st in starts for s in st.slices) + tuple(s for step in steps for s in step.slices),
        consumers=tuple(consumers),
        attr_updates=tuple(u for step in steps for u in step.attr_updates),
        shape_fixes=tuple(f for step in steps for f in step.shape_fixes),
        path=tuple(path),
        producers=tuple(p.name for p in producers),
    )


class _ReadersInOrder:
    """The nodes after position `after` that read tensors `add`ed so far, in graph order.

    Iterating while adding is the point: a walk visits only the nodes its channels reach, not
    every later node of the graph (a 109-conv U-Net: 1.4 million node visits over one slim).
    """

    def __init__(self, index: GraphIndex, after: int):
        self.index, self.after = index, after
        self.queue: list[int] = []
        self.queued: set[int] = set()

    def add(self, tensor: str) -> None:
        for pos in self.index.reader_positions.get(tensor, ()):
            if pos > self.after and pos not in self.queued:
                self.queued.add(pos)
                heapq.heappush(self.queue, pos)

    def __iter__(self):
        nodes = self.index.model.graph.node
        while self.queue:
            yield nodes[heapq.heappop(self.queue)]


_DATA_MOVES = {"Identity", "Cast", "Slice", "Transpose", "Reshape", "Squeeze", "Unsqueeze", "Pad"}


def _interface_tie(index: GraphIndex, node: onnx.NodeProto, inputs: dict[int, Flow]) -> str | None:
    """A coupling with a tensor fed from outside (a streaming state cache): name that input."""
    graph_inputs = {i.name for i in index.model.graph.input} - set(index.initializers)
    for k, name in enumerate(node.input):
        if k in inputs:
            continue
        for _ in range(8):  # follow ops that only move data back: Identity, Cast, Slice of a cache
            if name in graph_inputs:
                return (f"{node.op_type} ties these channels to graph input {name!r} (its channel "
                        "count is part of the model's interface, e.g. a streaming state cache)")
            producer = index.producer.get(name)
            if producer is None or producer.op_type not in _DATA_MOVES:
                break
            name = producer.input[0]
    return None


def _apply_rule(ctx: RuleContext, node: onnx.NodeProto, inputs: dict[int, Flow]) -> Step:
    if node.domain not in ("", "ai.onnx"):
        return Blocked(f"op {node.domain}:{node.op_type} is unknown to onnx-thinet")
    rule = channel_rule(node.op_type)
    if rule is None:
        return Blocked(f"op {node.op_type} has no channel rule (not proven per-channel)")
    return rule(ctx, node, inputs)
