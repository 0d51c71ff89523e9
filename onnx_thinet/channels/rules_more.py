"""Channel rules for patterns of feature-pyramid and decoder graphs (issue 12); registered
with their ops in `onnx_thinet.ops` (conv.py: ConvTranspose; shapes.py: Shape).

- `ConvTranspose` reads the group's channels as its input channels (weight [C_in, F, k...]).
- `Shape` of a channel-carrying tensor is safe when the entries it lets through are other
  axes (a pyramid reading H and W: Shape → Gather(2, 3) → ... → Resize(sizes)), or when the
  channel entry only sizes a Resize of that same tensor (PyTorch's interpolate(size=...)
  writes sizes = Concat(Shape(x)[0:2], hw)): after pruning the entry follows the tensor.
- `Resize` with sizes computed at run time (called from the Resize rule).
- grouped `Conv` (called from the Conv rule): carried along when whole groups are cut.
"""

from __future__ import annotations

import numpy as np
import onnx

from onnx_thinet.channels.consumers import CONV_TRANSPOSE
from onnx_thinet.channels.layout import AttrUpdate, Consumer, Layout, ParamSlice, ShapeFix
from onnx_thinet.channels.rules import Blocked, Consumed, Flow, RuleContext, Step, Through, on_data

__all__ = ["conv_transpose_rule", "grouped_conv", "resize_with_runtime_sizes", "shape_rule"]

_PASS_SHAPE = ("Cast", "Identity")
_MAX_DEPTH = 32


@on_data
def conv_transpose_rule(ctx: RuleContext, node: onnx.NodeProto, flow: Flow) -> Step:
    weight = ctx.const(node, 1)
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
def shape_rule(ctx: RuleContext, node: onnx.NodeProto, flow: Flow) -> Step:
    rank = ctx.index.rank(flow.tensor)
    if rank is None:
        return Blocked("Shape of a tensor of unknown rank")
    start, end = (_clamped(ctx.attr(node, key, default), rank) for key, default in (("start", 0), ("end", rank)))
    if not start <= flow.axis < end:
        return Through(())
    problem = _entry_use(ctx, node.output[0], flow.axis - start, node.input[0], flow.axis, 0)
    return Through(()) if problem is None else Blocked(problem)


def _clamped(position: int, rank: int) -> int:
    """Shape's start/end: negative counts from the back, then clamped to [0, rank]."""
    return min(max(position + rank if position < 0 else position, 0), rank)


def _entry_use(ctx: RuleContext, tensor: str, entry: int, source: str, axis: int, depth: int) -> str | None:
    """Why entry `entry` of the 1-D shape tensor `tensor` (the channel count of `source`) is not
    safe to change, or None when every use drops it or sizes a Resize of `source` itself."""
    if depth > _MAX_DEPTH:
        return "the channel count read by Shape goes too far to follow"
    if tensor in ctx.index.graph_outputs:
        return "the channel count read by Shape is a graph output"
    for user, k in ctx.index.uses.get(tensor, []):
        problem = _entry_use_at(ctx, user, k, entry, source, axis, depth)
        if problem is not None:
            return problem
    return None


def _entry_use_at(ctx, user: onnx.NodeProto, k: int, entry: int, source: str, axis: int, depth: int):
    op = user.op_type
    if op == "Resize" and k == 3:  # the sizes input
        same = user.input[0] == source and entry == axis
        return None if same else "the channel count read by Shape sizes a Resize of another tensor"
    if op in _PASS_SHAPE:
        return _entry_use(ctx, user.output[0], entry, source, axis, depth + 1)
    if op == "Gather" and k == 0:
        picked = _picked(ctx, user, "Gather", _length(ctx, user.input[0]))
    elif op == "Slice" and k == 0:
        picked = _picked(ctx, user, "Slice", _length(ctx, user.input[0]))
    elif op == "Concat" and ctx.attr(user, "axis", 0) == 0:
        offset = 0
        for piece in user.input[:k]:
            size = _length(ctx, piece)
            if size is None:
                return "the channel count read by Shape is concatenated after pieces of unknown size"
            offset += size
        return _entry_use(ctx, user.output[0], offset + entry, source, axis, depth + 1)
    else:
        return f"the channel count read by Shape reaches {op}"
    if picked is None:
        return f"Shape entries picked by {op} are computed at run time"
    if entry not in picked:
        return None
    if op == "Gather" and np.ndim(ctx.const(user, 1)) == 0:
        return "the channel count read by Shape is used as a scalar"
    return _entry_use(ctx, user.output[0], picked.index(entry), source, axis, depth + 1)


def _length(ctx: RuleContext, name: str) -> int | None:
    """Entries of a 1-D shape tensor, from its inferred shape or its constant value."""
    value = ctx.index.const(name)
    return int(np.size(value)) if value is not None else ctx.index.dim(name, 0)


def _picked(ctx: RuleContext, node: onnx.NodeProto, op: str, length: int | None) -> list[int] | None:
    """Entries of a 1-D shape tensor that a Gather or Slice with constant arguments keeps."""
    if length is None:
        return None
    if op == "Gather":
        indices = ctx.const(node, 1)
        return None if indices is None else [int(i) % length for i in np.ravel(indices)]
    args = [ctx.const(node, j) if j < len(node.input) and node.input[j] else None for j in range(1, 5)]
    starts, ends, axes, steps = args
    if starts is None or ends is None or (len(node.input) > 3 and node.input[3] and axes is None):
        return None
    if len(node.input) > 4 and node.input[4] and steps is None:
        return None
    if axes is not None and [int(a) for a in np.ravel(axes)] not in ([0], [-1]):
        return None
    step = 1 if steps is None else int(np.ravel(steps)[0])
    return list(range(length))[slice(int(np.ravel(starts)[0]), int(np.ravel(ends)[0]), step)]


def resize_with_runtime_sizes(ctx: RuleContext, node: onnx.NodeProto, flow: Flow) -> Step:
    """A Resize whose sizes are computed: safe when the channel entry is the input's own
    Shape entry (follows the cut by itself) or a constant piece of a Concat (shrunk)."""
    outputs = (Flow(node.output[0], flow.axis, flow.layout),)
    found = _sizes_entry(ctx, node.input[3], flow.axis, 0)
    if found is None:
        return Blocked("Resize output sizes are computed at run time from elsewhere")
    kind, where = found
    if kind == "shape" and where == (node.input[0], flow.axis):
        return Through(outputs)
    if kind == "const":
        concat, k, position = where
        return Through(outputs, shape_fixes=(ShapeFix(concat, k, position, flow.layout, ctx.length(flow)),))
    return Blocked("Resize sizes take the channel count from another tensor")


def _sizes_entry(ctx: RuleContext, tensor: str, entry: int, depth: int):
    """Where entry `entry` of a computed 1-D sizes tensor comes from: ("shape", (x, axis)),
    ("const", (concat node, input index, position)), or None when it cannot be told."""
    node = ctx.index.producer.get(tensor)
    if node is None or depth > _MAX_DEPTH:
        return None
    if node.op_type in _PASS_SHAPE:
        return _sizes_entry(ctx, node.input[0], entry, depth + 1)
    if node.op_type == "Shape":
        rank = ctx.index.rank(node.input[0])
        start = ctx.attr(node, "start", 0)
        return None if rank is None else ("shape", (node.input[0], (start % rank) + entry))
    if node.op_type in ("Gather", "Slice"):
        picked = _picked(ctx, node, node.op_type, _length(ctx, node.input[0]))
        if picked is None or entry >= len(picked):
            return None
        return _sizes_entry(ctx, node.input[0], picked[entry], depth + 1)
    if node.op_type == "Concat":
        offset = 0
        for k, piece in enumerate(node.input):
            size = _length(ctx, piece)
            if size is None:
                return None
            if offset <= entry < offset + size:
                if ctx.index.const(piece) is not None:
                    return ("const", (node.name, k, entry - offset))
                return _sizes_entry(ctx, piece, entry - offset, depth + 1)
            offset += size
    return None


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
