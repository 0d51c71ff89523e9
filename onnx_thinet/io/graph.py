"""Graph I/O: load, index, infer shapes, save atomically (canonicalization: `io.canonical`)."""

from __future__ import annotations

import logging
import os
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import onnx
from onnx import numpy_helper

from onnx_thinet.errors import ThinetError, one_line
from onnx_thinet.io.files import atomic_write
from onnx_thinet.io.validate import validate_model
from onnx_thinet.io.weightless import infer_shapes, is_large_weight, weightless_copy

__all__ = [
    "DEFAULT_OPSET",
    "ConstShape",
    "GraphIndex",
    "graph_inputs",
    "infer_shapes",
    "load_model",
    "needs_external_data",
    "opset_version",
    "preserve_interface",
    "save_model_atomic",
    "static_input_shapes",
    "tensor_shape",
]

logger = logging.getLogger(__name__)

# Protobuf refuses to serialise a single message above 2 GiB; leave headroom.
_EXTERNAL_DATA_THRESHOLD = 1_800_000_000
DEFAULT_OPSET = 1


def load_model(path: str | os.PathLike) -> onnx.ModelProto:
    """Load an ONNX file (with any external data beside it), checked by the ONNX checker,
    or explain in one line why not."""
    path = Path(path)
    if not path.exists():
        raise ThinetError(f"{path}: no such file")
    if path.is_dir():
        raise ThinetError(f"{path}: is a directory, expected an .onnx file")
    try:
        model = onnx.load(str(path), load_external_data=False)
    except Exception as exc:  # protobuf raises several unrelated types for bad bytes
        raise ThinetError(f"{path}: not a readable ONNX model ({one_line(exc)})") from None
    validate_model(model, path)  # vets external-data paths before reading them, then the graph
    if not model.graph.node:
        raise ThinetError(f"{path}: not a readable ONNX model (the graph has no nodes)")
    try:
        _check_without_weights(model)
    except Exception as exc:
        raise ThinetError(f"{path}: the ONNX checker rejects the model ({one_line(exc)})") from None
    return model


def _check_without_weights(model: onnx.ModelProto) -> None:
    """The ONNX checker on `model` with its large float weights as empty external files.

    The checker parses whatever it is given in C++ (VGG-16's 553 MB of weights: 2 s); of a
    float weight's values it checks only that one field holds them, which is checked here."""
    for tensor in model.graph.initializer:
        if is_large_weight(tensor) and _value_fields(tensor) != 1:
            raise ValueError(f"tensor {tensor.name!r} must have one and only one value field")
    light = weightless_copy(model)
    with tempfile.TemporaryDirectory(prefix="onnx-thinet-check-") as tmp:
        Path(tmp, "weights").touch()
        for tensor in light.graph.initializer:
            if is_large_weight(tensor):
                tensor.data_location = onnx.TensorProto.EXTERNAL
                tensor.external_data.add(key="location", value="weights")
        Path(tmp, "model.onnx").write_bytes(light.SerializeToString())
        onnx.checker.check_model(os.path.join(tmp, "model.onnx"))


_VALUE_FIELDS = ("float_data", "int32_data", "string_data", "int64_data", "double_data", "uint64_data")


def _value_fields(tensor: onnx.TensorProto) -> int:
    return int(tensor.HasField("raw_data")) + sum(len(getattr(tensor, f)) > 0 for f in _VALUE_FIELDS)


def save_model_atomic(model: onnx.ModelProto, path: str | os.PathLike) -> int:
    """Write `model` so that `path` appears whole or not at all; return the bytes written.

    Models above ~2 GB are stored with their weights in `<name>.data` beside the file.
    """
    path = Path(path)
    if needs_external_data(model):
        path.parent.mkdir(parents=True, exist_ok=True)
        return _save_external(model, path)
    atomic_write(path, lambda tmp: tmp.write_bytes(model.SerializeToString()))
    return path.stat().st_size


def needs_external_data(model: onnx.ModelProto) -> bool:
    """Whether `model` is too large for one protobuf message (it must be saved, checked and
    loaded with its weights in a separate file)."""
    return _serialized_size(model) > _EXTERNAL_DATA_THRESHOLD


def _serialized_size(model: onnx.ModelProto) -> int:
    """About the bytes `model` serializes to, from the weights' dims (ByteSize would serialize)."""
    weights = sum(int(np.prod(t.dims, dtype=np.int64)) * onnx.helper.tensor_dtype_to_np_dtype(t.data_type).itemsize
                  for t in model.graph.initializer if is_large_weight(t))
    return weightless_copy(model).ByteSize() + weights


def _save_external(model: onnx.ModelProto, path: Path) -> int:
    """The graph and `<name>.data` through temp files: the data is renamed into place first and
    the graph after it, so a failure never leaves a graph whose weights are missing."""
    data_name = path.name + ".data"
    copy = onnx.ModelProto()
    copy.CopyFrom(model)  # a message copy: serializing would hit protobuf's 2 GB limit

    def write_data(tmp_data: Path) -> None:
        graph_tmp = tmp_data.with_name(tmp_data.name + ".onnx")
        try:  # moves the weights of `copy` into tmp_data, leaving references in `copy`
            onnx.save_model(copy, str(graph_tmp), save_as_external_data=True,
                            all_tensors_to_one_file=True, location=tmp_data.name, size_threshold=0)
        finally:
            graph_tmp.unlink(missing_ok=True)

    atomic_write(path.with_name(data_name), write_data)
    # The location recorded in the graph must name the final data file, not the temp one.
    for init in copy.graph.initializer:
        for entry in init.external_data:
            if entry.key == "location":
                entry.value = data_name
    try:
        atomic_write(path, lambda tmp: tmp.write_bytes(copy.SerializeToString()))
    except BaseException:
        path.with_name(data_name).unlink(missing_ok=True)
        raise
    return path.stat().st_size + path.with_name(data_name).stat().st_size


def opset_version(model: onnx.ModelProto) -> int:
    """The default-domain opset, which decides op semantics.

    A model without a default-domain entry predates opset imports (IR < 3): opset 1.
    """
    for entry in model.opset_import:
        if entry.domain in ("", "ai.onnx"):
            return int(entry.version)
    return DEFAULT_OPSET


def graph_inputs(model: onnx.ModelProto | onnx.GraphProto) -> list[onnx.ValueInfoProto]:
    """Inputs that the caller feeds (older exporters also list initializers as inputs)."""
    graph = model.graph if isinstance(model, onnx.ModelProto) else model
    init_names = {i.name for i in graph.initializer}
    return [i for i in graph.input if i.name not in init_names]


def static_input_shapes(
    model: onnx.ModelProto, fixed: dict[str, tuple[int, ...]] | None = None
) -> onnx.ModelProto:
    """Copy of `model` whose graph inputs have concrete dims (batch 1 unless `fixed` says)."""
    out = onnx.ModelProto()
    out.CopyFrom(model)
    for inp in graph_inputs(out):
        dims = inp.type.tensor_type.shape.dim
        want = (fixed or {}).get(inp.name)
        for k, d in enumerate(dims):
            value = want[k] if want is not None and k < len(want) else None
            if value is None:
                value = d.dim_value if d.HasField("dim_value") and d.dim_value > 0 else 1
                if k == 0:
                    value = 1
            d.Clear()
            d.dim_value = int(value)
    for output in out.graph.output:  # declared output dims (an export's fixed batch) must not leak in
        output.type.tensor_type.ClearField("shape")
    del out.graph.value_info[:]
    return infer_shapes(out, in_place=True)


def tensor_shape(value_info: onnx.ValueInfoProto) -> tuple[int | str | None, ...] | None:
    """Dims of a value: ints where known, symbol names where symbolic, None where unknown."""
    t = value_info.type.tensor_type
    if not t.HasField("shape"):
        return None
    dims: list[int | str | None] = []
    for d in t.shape.dim:
        if d.HasField("dim_value"):
            dims.append(int(d.dim_value))
        elif d.HasField("dim_param"):
            dims.append(d.dim_param)
        else:
            dims.append(None)
    return tuple(dims)


def preserve_interface(original: onnx.ModelProto, model: onnx.ModelProto) -> onnx.ModelProto:
    """`model` with the original's declared inputs and outputs, verbatim: names, element types,
    and shapes with their symbolic or unknown dims (shape inference would fill those in).

    A weight the original also lists as a graph input (older exporters) is listed again, with
    the shape it has now.
    """
    weights = {t.name: t for t in model.graph.initializer}
    inputs = []
    for vi in original.graph.input:
        if vi.name in weights:
            t = weights[vi.name]
            inputs.append(onnx.helper.make_tensor_value_info(vi.name, t.data_type, list(t.dims)))
        else:  # verbatim, also one that simplification found unused (callers still feed it)
            inputs.append(vi)
    inputs += [vi for vi in model.graph.input if vi.name not in {i.name for i in inputs}]
    del model.graph.input[:]
    model.graph.input.extend(inputs)
    declared = {vi.name: vi for vi in original.graph.output}
    for vi in model.graph.output:
        if vi.name in declared:
            vi.CopyFrom(declared[vi.name])
    return model


@dataclass(frozen=True)
class ConstShape:
    """An initializer's dims, for checks that need only its shape (a weight's data is large)."""

    shape: tuple[int, ...]

    @property
    def ndim(self) -> int:
        return len(self.shape)

    @property
    def size(self) -> int:
        return int(np.prod(self.shape, dtype=np.int64))


class _ShapeTable(dict):
    """Tensor shapes, read from their value_info on first lookup: an index is built once per
    pass and per segment, and reads the shapes of a few of a model's hundreds of tensors."""

    def __init__(self, infos: dict[str, onnx.ValueInfoProto]):
        super().__init__()
        self._infos = infos

    def __missing__(self, name: str) -> tuple[int | str | None, ...]:
        info = self._infos.get(name)
        if info is None:
            raise KeyError(name)
        shape = self[name] = tensor_shape(info)
        return shape

    def get(self, name: str, default=None):
        try:
            return self[name]
        except KeyError:
            return default

    def __contains__(self, name: object) -> bool:
        return self.get(name) is not None


@dataclass
class GraphIndex:
    """Read-only lookups over a graph: who produces and who reads each tensor, constants, shapes."""

    model: onnx.ModelProto
    producer: dict[str, onnx.NodeProto] = field(default_factory=dict)
    uses: dict[str, list[tuple[onnx.NodeProto, int]]] = field(default_factory=dict)
    initializers: dict[str, onnx.TensorProto] = field(default_factory=dict)
    shapes: dict[str, tuple[int | str | None, ...]] = field(default_factory=dict)
    graph_outputs: set[str] = field(default_factory=set)
    order: dict[str, int] = field(default_factory=dict)
    reader_positions: dict[str, list[int]] = field(default_factory=dict)  # graph order of each tensor's readers
    _values: dict[str, np.ndarray] = field(default_factory=dict, repr=False, compare=False)

    @classmethod
    def build(cls, model: onnx.ModelProto) -> GraphIndex:
        index = cls(model)
        graph = model.graph
        for pos, node in enumerate(graph.node):
            index.order[node.name] = pos
            for out in node.output:
                if out:
                    index.producer[out] = node
            for k, name in enumerate(node.input):
                if name:
                    index.uses.setdefault(name, []).append((node, k))
                    index.reader_positions.setdefault(name, []).append(pos)
        index.initializers = {t.name: t for t in graph.initializer}
        index.shapes = _ShapeTable({vi.name: vi for vi in [*graph.input, *graph.value_info, *graph.output]
                                    if vi.type.tensor_type.HasField("shape")})
        index.graph_outputs = {o.name for o in graph.output}
        return index

    def const(self, name: str) -> np.ndarray | None:
        """The value of an initializer (read-only, decoded once per index), or None when the
        tensor is computed at run time."""
        tensor = self.initializers.get(name)
        if tensor is None:
            return None
        value = self._values.get(name)
        if value is None:
            value = numpy_helper.to_array(tensor)
            value.flags.writeable = False
            self._values[name] = value
        return value

    def const_shape(self, name: str) -> ConstShape | None:
        """An initializer's dims without reading its data, or None when the tensor is computed."""
        tensor = self.initializers.get(name)
        return None if tensor is None else ConstShape(tuple(int(d) for d in tensor.dims))

    def rank(self, name: str) -> int | None:
        shape = self.shapes.get(name)
        return None if shape is None else len(shape)

    def dim(self, name: str, axis: int) -> int | None:
        shape = self.shapes.get(name)
        if shape is None or axis >= len(shape):
            return None
        value = shape[axis]
        return value if isinstance(value, int) else None

    def position(self, node: onnx.NodeProto) -> int:
        return self.order[node.name]
