"""Element-wise ops of several tensors (Add, Mul, Max, Where...), and the identities (Identity,
Cast, Dropout, Constant). A constant operand is sliced with the channels; two computed
tensors tie their channels together (coupled)."""

from __future__ import annotations

from typing import TYPE_CHECKING

import onnx
from onnx import TensorProto

from onnx_thinet.channels.rules import (
    Blocked,
    CoupledStop,
    Flow,
    on_data,
    per_channel_constant,
    same,
)
from onnx_thinet.ops.activations import unary_rule
from onnx_thinet.ops.registry import register
from onnx_thinet.pytorch.source import INT_ONNX_TYPES, ONNX_TO_TORCH, Val, attrs, flit, paren

if TYPE_CHECKING:
    from onnx_thinet.channels.rules import Flows, RuleContext, Step
    from onnx_thinet.pytorch.codegen import Codegen

__all__: list[str] = []

FLOAT_ONNX_TYPES = frozenset({TensorProto.FLOAT, TensorProto.DOUBLE, TensorProto.FLOAT16})


def _binary_rule(ctx: RuleContext, node: onnx.NodeProto, flows: Flows) -> Step:
    if len(node.input) != 2:
        return CoupledStop(f"{node.op_type} joins {len(node.input)} tensors")
    if len(flows) == 2:
        a, b = flows[0], flows[1]
        if a.axis == b.axis and a.layout == b.layout:
            return same(node, a)  # x * sigmoid(x) and other ops of a tensor with itself
        return Blocked(f"{node.op_type} combines two differently laid-out copies of the channels")
    k = next(iter(flows))
    other = 1 - k
    if ctx.const(node, other) is not None:
        if node.op_type == "Pow" and k == 1:
            return Blocked("channels reach a Pow exponent")
        return per_channel_constant(ctx, node, flows[k], other)
    kind = "residual " if node.op_type in ("Add", "Sub") else "gating "
    return CoupledStop(f"{kind}{node.op_type} ties these channels to another tensor")


def _joins_rule(ctx: RuleContext, node: onnx.NodeProto, flows: Flows) -> Step:
    return CoupledStop(f"{node.op_type} joins these channels with other tensors")


@on_data
def _dropout_rule(ctx: RuleContext, node: onnx.NodeProto, flow: Flow) -> Step:
    if len(node.output) > 1 and node.output[1] and ctx.index.uses.get(node.output[1]):
        return Blocked("Dropout mask output is used")
    return same(node, flow)


_ARITH = {"Add": "+", "Sub": "-", "Mul": "*", "Div": "/"}


@register("Add", "Sub", "Mul", "Div", rule=_binary_rule, traverse="operands")
@register("Pow", rule=_binary_rule)
def _arith(g: Codegen, node: onnx.NodeProto) -> None:
    va, vb = g.values[node.input[0]], g.values[node.input[1]]
    if "shape" in (va.kind, vb.kind) and "tensor" not in (va.kind, vb.kind):
        _shape_arith(g, node, va, vb)
        return
    ra, rb = g.rank(node.input[0]), g.rank(node.input[1])
    a = g.t(node.input[0], node, other_rank=rb)
    b = g.t(node.input[1], node, other_rank=ra)
    op = node.op_type
    if op == "Div" and g.etypes.get(node.output[0]) in INT_ONNX_TYPES:
        g.emit(node, f'torch.div({a}, {b}, rounding_mode="trunc")')
    elif op == "Pow":
        g.emit(node, f"torch.pow({a}, {b})")
    else:
        g.emit(node, f"{a} {_ARITH[op]} {b}")


def _shape_arith(g: Codegen, node: onnx.NodeProto, va: Val, vb: Val) -> None:
    """Arithmetic on Python-number shape values (dynamic reshape targets, anchor strides);
    integer division truncates, a shape cast to float divides exactly."""
    floating = g.etypes.get(node.output[0]) in FLOAT_ONNX_TYPES or any(
        v.kind == "const" and v.array.dtype.kind == "f" for v in (va, vb)
    )
    ia, ib = _numbers(va, floating), _numbers(vb, floating)
    if ia is None or ib is None:
        raise g.unsupported(node, "arithmetic on a shape of unknown length")
    n = max(len(ia), len(ib))
    ia, ib = (ia * n if len(ia) == 1 else ia), (ib * n if len(ib) == 1 else ib)
    py = {"Add": "+", "Sub": "-", "Mul": "*", "Div": "/" if floating else "//"}.get(node.op_type)
    if py is None:
        raise g.unsupported(node, "this arithmetic on shape values")
    items: list[int | str] = []
    for x, y in zip(ia, ib, strict=True):
        if isinstance(x, int | float) and isinstance(y, int | float):
            items.append(eval(f"{x!r} {py} {y!r}"))  # noqa: S307 - two numbers
        else:
            items.append(f"{paren(x)} {py} {paren(y)}")
    scalar = (va.kind != "shape" or va.scalar) and (vb.kind != "shape" or vb.scalar)
    g.values[node.output[0]] = Val("shape", items=items, scalar=scalar)


def _numbers(v: Val, floating: bool) -> list | None:
    """A shape value's items, or a constant's values as Python ints (floats when `floating`)."""
    if v.kind == "shape":
        return None if v.items is None else list(v.items)
    values = v.array.reshape(-1).tolist()
    return [float(x) for x in values] if floating else [int(x) for x in values]


@register("Max", "Min", rule=_binary_rule)
def _max_min(g: Codegen, node: onnx.NodeProto) -> None:
    """Element-wise max/min of any number of tensors; a scalar constant becomes a clamp."""
    names = [i for i in node.input if i]
    fn, bound = ("torch.maximum", "min") if node.op_type == "Max" else ("torch.minimum", "max")
    scalars = [i for i in names if g.const(i) is not None and g.const(i).size == 1]
    tensors = [i for i in names if i not in scalars]
    if not tensors:
        raise g.unsupported(node, "all operands are constants")
    expr = g.t(tensors[0], node)
    for name in tensors[1:]:
        expr = f"{fn}({expr}, {g.t(name, node)})"
    for name in scalars:
        expr = f"torch.clamp({expr}, {bound}={flit(float(g.const(name).reshape(())))})"
    g.emit(node, expr)


@register("Sum", rule=_joins_rule)
def _sum(g: Codegen, node: onnx.NodeProto) -> None:
    g.emit(node, " + ".join(g.t(i, node) for i in node.input))


@register("Mean", rule=_joins_rule)
def _mean(g: Codegen, node: onnx.NodeProto) -> None:
    terms = " + ".join(g.t(i, node) for i in node.input)
    g.emit(node, f"({terms}) / {flit(len(node.input))}" if len(node.input) > 1 else terms)


@register("Where", rule=_joins_rule)
def _where(g: Codegen, node: onnx.NodeProto) -> None:
    cond, a, b = (g.t(i, node) for i in node.input)
    g.emit(node, f"torch.where({cond}, {a}, {b})")


@register("Identity", rule=unary_rule, traverse="data")
def _identity(g: Codegen, node: onnx.NodeProto) -> None:
    g.alias(node, node.input[0])


@register("Cast", rule=unary_rule, traverse="data")
def _cast(g: Codegen, node: onnx.NodeProto) -> None:
    v = g.values[node.input[0]]
    to = int(attrs(node)["to"])
    if v.kind == "shape":  # shape arithmetic stays in Python numbers
        g.values[node.output[0]] = v
        return
    dtype = ONNX_TO_TORCH.get(to)
    if dtype is None:
        raise g.unsupported(node, f"cast to {TensorProto.DataType.Name(to)}")
    g.emit(node, f"{g.t(node.input[0], node)}.to({dtype})")


@register("Dropout", rule=_dropout_rule, traverse="data")
def _dropout(g: Codegen, node: onnx.NodeProto) -> None:
    if len(node.output) > 1 and node.output[1] in g.used_names:
        raise g.unsupported(node, "its mask output is used")
    ratio = attrs(node).get("ratio", 0.5)
    if len(node.input) > 1 and node.input[1]:
        r = g.const(node.input[1])
        if r is None:
            raise g.unsupported(node, "ratio must be a constant")
        ratio = float(r)
    attr = g.new_attr(node)
    g.add_module(attr, f"nn.Dropout({flit(ratio)})", {})
    g.emit(node, f"self.{attr}({g.t(node.input[0], node)})")


@register("Constant")  # always constant-folded before translation
def _constant(g: Codegen, node: onnx.NodeProto) -> None:
    g.fold(node)


_COMPARE = {
    "Equal": "torch.eq", "Greater": "torch.gt", "Less": "torch.lt", "GreaterOrEqual": "torch.ge",
    "LessOrEqual": "torch.le", "And": "torch.logical_and", "Or": "torch.logical_or",
    "Xor": "torch.logical_xor",
}


@register(*_COMPARE)
def _compare(g: Codegen, node: onnx.NodeProto) -> None:
    """Comparisons and logic: boolean masks (no channel rule: slim never prunes through them)."""
    a, b = (g.t(name, node) for name in node.input)
    if not g.values[node.input[0]].kind == "tensor":  # torch.eq(1.0, x) wants a tensor first
        a, b = b, a
        fn = {"torch.gt": "torch.lt", "torch.lt": "torch.gt", "torch.ge": "torch.le", "torch.le": "torch.ge"}
        g.emit(node, f"{fn.get(_COMPARE[node.op_type], _COMPARE[node.op_type])}({a}, {b})")
        return
    g.emit(node, f"{_COMPARE[node.op_type]}({a}, {b})")
