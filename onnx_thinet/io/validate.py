"""Refuse hostile or broken model files with one clear line before anything acts on them.

`validate_model` runs on a model loaded *without* its external data: external-data locations
are vetted before any byte of them is read (onnx itself had path-traversal CVEs here:
CVE-2024-27318, CVE-2024-27319), then the graph is checked for what the ONNX checker reports
unclearly or not at all (cycles, tensors nobody provides, duplicate names, initializers that
shadow a node output or contradict the input they stand for, absurd dims, non-float weights,
declared shapes that lie about what the graph computes), and only then is the data loaded.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper

from onnx_thinet.errors import ThinetError, one_line
from onnx_thinet.io.weightless import weightless_copy

__all__ = ["MAX_ELEMENTS_PER_SAMPLE", "validate_model"]

logger = logging.getLogger(__name__)

MAX_ELEMENTS_PER_SAMPLE = 2**31  # one input sample of more elements (8 GB of float32) is absurd
_MAX_TENSOR_ELEMENTS = 2**40
_FLOAT_TYPES = {TensorProto.FLOAT, TensorProto.FLOAT16, TensorProto.DOUBLE, TensorProto.BFLOAT16}
_WEIGHTED = {"Conv": 1, "ConvTranspose": 1, "Gemm": 1}  # op -> input index of its weight


def validate_model(model: onnx.ModelProto, path: Path) -> None:
    """Vet external-data paths and the graph, then load the external data; raise ThinetError."""
    _check_external_locations(model, path)
    _check_names(model, path)
    _check_order(model, path)
    _check_dims(model, path)
    _check_weights(model, path)
    _check_declared_shapes(model, path)  # before the external data: the proto stays small
    _load_external(model, path)
    logger.info("%s: %d nodes, %d initializers validated", path, len(model.graph.node),
                len(model.graph.initializer))


def _tensors(graph: onnx.GraphProto) -> Iterator[TensorProto]:
    """Every TensorProto of a graph and its subgraphs (initializers and attribute constants)."""
    yield from graph.initializer
    for node in graph.node:
        for attr in node.attribute:
            if attr.type == onnx.AttributeProto.TENSOR:
                yield attr.t
            yield from attr.tensors
            if attr.HasField("g"):
                yield from _tensors(attr.g)
            for sub in attr.graphs:
                yield from _tensors(sub)


def _check_external_locations(model: onnx.ModelProto, path: Path) -> None:
    """Every external location must be a relative path inside the model's folder (no `..`,
    no absolute path, no symlink leading out), checked before anything is read."""
    folder = path.parent.resolve()
    for tensor in _tensors(model.graph):
        if tensor.data_location != TensorProto.EXTERNAL:
            continue
        info = {entry.key: entry.value for entry in tensor.external_data}
        location = info.get("location", "")
        where = f"{path}: tensor {tensor.name!r} stores its data at {location!r}"
        if not location or os.path.isabs(location) or Path(location).is_absolute():
            raise ThinetError(f"{where}; refusing an absolute or empty external-data path")
        if ".." in Path(location).parts or "\\" in location:
            raise ThinetError(f"{where}; refusing an external-data path that leaves the model's folder")
        target = (folder / location).resolve()
        if folder not in target.parents:
            raise ThinetError(f"{where}, which resolves outside the model's folder; refusing it")
        if not target.is_file():
            raise ThinetError(f"{where}, which is not a file beside the model")
        _check_extent(info, target, where)


def _check_extent(info: dict[str, str], target: Path, where: str) -> None:
    try:
        offset, length = int(info.get("offset", 0)), int(info.get("length", 0))
    except ValueError:
        raise ThinetError(f"{where} with an unreadable offset or length") from None
    if offset < 0 or length < 0 or offset + length > target.stat().st_size:
        raise ThinetError(f"{where} at bytes {offset}..{offset + length}, past the end of that file")


def _load_external(model: onnx.ModelProto, path: Path) -> None:
    if not any(t.data_location == TensorProto.EXTERNAL for t in _tensors(model.graph)):
        return
    try:
        onnx.external_data_helper.load_external_data_for_model(model, str(path.parent))
    except Exception as exc:
        raise ThinetError(f"{path}: cannot read the model's external data ({one_line(exc)})") from None


def _check_names(model: onnx.ModelProto, path: Path) -> None:
    """Unique initializer and node-output names; an initializer never replaces a computed tensor,
    and one that doubles as a graph input (older exporters) must agree with it."""
    graph = model.graph
    seen: set[str] = set()
    for init in graph.initializer:
        if init.name in seen:
            raise ThinetError(f"{path}: two initializers are named {init.name!r}")
        seen.add(init.name)
    produced: dict[str, str] = {}
    for node in graph.node:
        for out in node.output:
            if out and out in produced:
                raise ThinetError(f"{path}: tensor {out!r} is produced twice "
                                  f"(by {produced[out]!r} and {node.name or node.op_type!r})")
            if out in seen:
                raise ThinetError(f"{path}: initializer {out!r} shadows the output of node "
                                  f"{node.name or node.op_type!r}")
            produced[out] = node.name or node.op_type
    inits = {t.name: t for t in graph.initializer}
    for vi in graph.input:
        if vi.name in produced:
            raise ThinetError(f"{path}: graph input {vi.name!r} is also produced by a node")
        if vi.name in inits and not _agrees(vi, inits[vi.name]):
            raise ThinetError(f"{path}: initializer {vi.name!r} shadows the graph input of that name "
                              f"with another type or shape")


def _agrees(vi: onnx.ValueInfoProto, tensor: TensorProto) -> bool:
    t = vi.type.tensor_type
    if t.elem_type != tensor.data_type:
        return False
    if not t.HasField("shape"):
        return True
    dims = [d.dim_value if d.HasField("dim_value") else None for d in t.shape.dim]
    return len(dims) == len(tensor.dims) and all(d in (None, v) for d, v in zip(dims, tensor.dims))


def _check_order(model: onnx.ModelProto, path: Path) -> None:
    """Every node input is provided by a graph input, an initializer or a node, with no cycle."""
    graph = model.graph
    available = {vi.name for vi in graph.input} | {t.name for t in graph.initializer} | {""}
    producer = {out: node for node in graph.node for out in node.output if out}
    for node in graph.node:
        for name in node.input:
            if name not in available and name not in producer:
                raise ThinetError(f"{path}: node {node.name or node.op_type!r} reads {name!r}, which no "
                                  "node, graph input or initializer provides")
    _check_acyclic(graph, producer, path)


def _check_acyclic(graph: onnx.GraphProto, producer: dict[str, onnx.NodeProto], path: Path) -> None:
    """Kahn's algorithm over node-to-node edges: linear, so 10k-node graphs stay instant."""
    position = {id(n): k for k, n in enumerate(graph.node)}
    waiting = [0] * len(graph.node)
    readers: dict[str, list[int]] = {}
    for k, node in enumerate(graph.node):
        for name in set(node.input):
            if name in producer:
                waiting[k] += 1
                readers.setdefault(name, []).append(k)
    ready = [k for k, count in enumerate(waiting) if count == 0]
    done = 0
    while ready:
        done += 1
        for out in graph.node[ready.pop()].output:
            for k in readers.get(out, []):
                waiting[k] -= 1
                if waiting[k] == 0:
                    ready.append(k)
    if done < len(graph.node):
        stuck = [n.name or n.op_type for n in graph.node if waiting[position[id(n)]] > 0][:4]
        raise ThinetError(f"{path}: the graph has a cycle (through {', '.join(stuck)})")


def _check_dims(model: onnx.ModelProto, path: Path) -> None:
    for vi in model.graph.input:
        dims = [d.dim_value for d in vi.type.tensor_type.shape.dim if d.HasField("dim_value")]
        if any(d < 0 for d in dims):
            raise ThinetError(f"{path}: input {vi.name!r} declares a negative dim {dims}")
        per_sample = int(np.prod(dims[1:], dtype=object)) if len(dims) > 1 else 1
        if per_sample > MAX_ELEMENTS_PER_SAMPLE:
            raise ThinetError(f"{path}: input {vi.name!r} declares absurd dims {dims} "
                              f"({per_sample:,} elements per sample)")
    for tensor in model.graph.initializer:
        count = int(np.prod(list(tensor.dims), dtype=object))
        if any(d < 0 for d in tensor.dims) or count > _MAX_TENSOR_ELEMENTS:
            raise ThinetError(f"{path}: initializer {tensor.name!r} declares absurd dims {list(tensor.dims)}")


def _check_weights(model: onnx.ModelProto, path: Path) -> None:
    inits = {t.name: t for t in model.graph.initializer}
    for node in model.graph.node:
        k = _WEIGHTED.get(node.op_type)
        if k is None or node.domain not in ("", "ai.onnx") or len(node.input) <= k:
            continue
        weight = inits.get(node.input[k])
        if weight is not None and weight.data_type not in _FLOAT_TYPES:
            kind = helper.tensor_dtype_to_np_dtype(weight.data_type)
            raise ThinetError(f"{path}: {node.op_type} {node.name!r} has {kind} weights "
                              f"({node.input[k]!r}); only float weights can be pruned")


def _check_declared_shapes(model: onnx.ModelProto, path: Path) -> None:
    """Strict shape inference: declared input/output/value_info shapes must match the graph's."""
    if any(op.domain not in ("", "ai.onnx") for op in model.opset_import):
        return  # custom ops have no shape inference
    try:
        onnx.shape_inference.infer_shapes(weightless_copy(model), check_type=True, strict_mode=True)
    except Exception as exc:
        text = one_line(exc)
        if "differ" in text:
            raise ThinetError(f"{path}: declared shapes contradict what the graph computes ({text})") from None
        if "unsupported type" in text or "type mismatch" in text.lower():
            raise ThinetError(f"{path}: the model fails the strict type check ({text})") from None
        logger.info("strict shape inference gave up (%s); the checker and runtime still apply", text)
