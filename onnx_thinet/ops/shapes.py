"""Shape: a tensor's dims read at run time. In forward() they become Python ints of
`x.shape` (static dims as literals), so shape arithmetic downstream stays readable and
traces to dynamic shape ops."""

from __future__ import annotations

from typing import TYPE_CHECKING

import onnx

from onnx_thinet.channels.rules_more import shape_rule
from onnx_thinet.ops.registry import register
from onnx_thinet.pytorch.source import Val, attrs

if TYPE_CHECKING:
    from onnx_thinet.pytorch.codegen import Codegen

__all__: list[str] = []


@register("Shape", rule=shape_rule)
def _shape(g: Codegen, node: onnx.NodeProto) -> None:
    x = g.t(node.input[0], node)
    a = attrs(node)
    dims = g.dim_list(node.input[0])
    start, end = a.get("start"), a.get("end")
    if dims is None:
        sl = (
            ""
            if start is None and end is None
            else f"[{start or ''}:{'' if end is None else end}]"
        )
        g.values[node.output[0]] = Val("shape", expr=f"list({x}.shape){sl}")
        return
    items: list[int | str] = [
        d if isinstance(d, int) else f"{x}.shape[{i}]" for i, d in enumerate(dims)
    ]
    g.values[node.output[0]] = Val("shape", items=items[slice(start, end)])
