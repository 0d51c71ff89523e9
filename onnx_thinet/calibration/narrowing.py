"""Readers that a later pass refits are read narrowly: only the Concat input carrying the group.

A U-Net's skip tensor reaches its decoder reader through a Concat whose other input is the
decoder below it. Reading that Concat at the encoder's pass ran the rest of the network, in
both copies, once per skip level, and each later pass ran it again (the U-Net of
`tools/bench.py`: 297 Conv runs in the original network for 109 Convs). The reader reads a
later group's channels too, so that later pass refits it on everything it reads; until then
this group's share is all its statistics need. So the reader is read on the Concat input that
carries the group, with its weight's matching input channels (`Consumer.span`), and is
rescaled (ThiNet's least-squares scale per kept channel), not refit, now.
"""

from __future__ import annotations

from collections.abc import Collection
from dataclasses import replace

import onnx
from onnx import helper

from onnx_thinet.channels.consumers import CONV
from onnx_thinet.channels.layout import ChannelGroup, Consumer, Layout, Segment
from onnx_thinet.io.graph import graph_inputs, tensor_shape

__all__ = ["narrow_readers"]


def narrow_readers(model: onnx.ModelProto, reference: onnx.ModelProto | None, group: ChannelGroup,
                   read_later: Collection[str]) -> tuple[ChannelGroup, frozenset[str]]:
    """`group` with each of its readers that also reads a group a later pass cuts (`read_later`)
    read narrowly where it can be, and the names of those narrowed.

    A reader is narrowed when it is a plain Conv reading a channel Concat whose one input (or
    one Split's input, all of whose outputs it concatenates in order) holds all of the group's
    channels, at the same place in `model` and in the original `reference` (so one weight span
    serves both); every other reader is kept as it is.
    """
    if not any(c.node in read_later and c.kind == CONV for c in group.consumers):
        return group, frozenset()
    here, there = _Concats(model), _Concats(reference) if reference is not None else None
    consumers, narrowed = [], set()
    for consumer in group.consumers:
        narrow = (_narrowed(consumer, here, there)
                  if consumer.node in read_later and consumer.kind == CONV else None)
        consumers.append(narrow or consumer)
        if narrow is not None:
            narrowed.add(consumer.node)
    return replace(group, consumers=tuple(consumers)), frozenset(narrowed)


class _Concats:
    """A model's channel Concats by output, and the channel count of each of their inputs."""

    def __init__(self, model: onnx.ModelProto):
        self.nodes = {n.name: n for n in model.graph.node}
        self.concats = {n.output[0]: n for n in model.graph.node
                        if n.op_type == "Concat" and n.domain in ("", "ai.onnx") and n.output}
        self.splits = {o: n for n in model.graph.node
                       if n.op_type == "Split" and n.domain in ("", "ai.onnx") for o in n.output}
        infos = [*graph_inputs(model), *model.graph.value_info, *model.graph.output]
        self.shapes = {v.name: tensor_shape(v) for v in infos}

    def inputs(self, tensor: str) -> list[tuple[str, int]] | None:
        """(input, channels) of the Concat along axis 1 that produces `tensor`, when all are known."""
        node = self.concats.get(tensor)
        if node is None:
            return None
        shape = self.shapes.get(tensor)
        axis = next((helper.get_attribute_value(a) for a in node.attribute if a.name == "axis"), None)
        if shape is None or axis is None or axis % len(shape) != 1:
            return None
        parts = []
        for name in node.input:
            dims = self.shapes.get(name)
            if not name or dims is None or len(dims) != len(shape) or not isinstance(dims[1], int):
                return None
            parts.append((name, dims[1]))
        return self._unsplit(parts, len(shape))

    def _unsplit(self, parts: list[tuple[str, int]], rank: int) -> list[tuple[str, int]]:
        """`parts` with each run of a channel Split's outputs, all of them in order, replaced by
        the Split's input: a YOLO C2f concatenates both halves of its first conv's output, so
        that conv's channels are one tensor there, not two."""
        merged, k = [], 0
        while k < len(parts):
            split = self.splits.get(parts[k][0])
            outputs = list(split.output) if split is not None else []
            count = len(outputs)
            if (split is not None and [name for name, _ in parts[k : k + count]] == outputs
                    and self._channel_split(split, rank)):
                merged.append((split.input[0], sum(channels for _, channels in parts[k : k + count])))
                k += count
            else:
                merged.append(parts[k])
                k += 1
        return merged

    def _channel_split(self, split: onnx.NodeProto, rank: int) -> bool:
        axis = next((helper.get_attribute_value(a) for a in split.attribute if a.name == "axis"), 0)
        dims = self.shapes.get(split.input[0])
        return axis % rank == 1 and dims is not None and len(dims) == rank and isinstance(dims[1], int)

    def plain_conv(self, name: str) -> bool:
        node = self.nodes.get(name)
        return (node is not None and node.op_type == "Conv" and node.domain in ("", "ai.onnx")
                and next((helper.get_attribute_value(a) for a in node.attribute if a.name == "group"), 1) == 1)


def _narrowed(consumer: Consumer, here: _Concats, there: _Concats | None) -> Consumer | None:
    parts = here.inputs(consumer.input)
    if parts is None or not here.plain_conv(consumer.node):
        return None
    if there is not None and there.inputs(consumer.input) != parts:
        return None  # the original's Concat differs (an input already cut): no common span
    layout = consumer.weight.layout
    total = sum(channels for _, channels in parts)
    if layout.inner != 1 or layout.total != total:
        return None
    first = min(s.offset for s in layout.segments)
    last = max(s.offset + s.hi - s.lo for s in layout.segments)
    base = 0
    for name, channels in parts:
        if base <= first and last <= base + channels:
            segments = tuple(Segment(s.offset - base, s.lo, s.hi) for s in layout.segments)
            weight = replace(consumer.weight, layout=Layout(segments, channels, 1))
            return replace(consumer, input=name, weight=weight, span=(base, base + channels))
        base += channels
    return None
