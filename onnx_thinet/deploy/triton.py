"""A Triton Inference Server model repository for an ONNX model (onnxruntime backend).

Layout: `REPO/NAME/1/model.onnx` and `REPO/NAME/config.pbtxt`. Inputs and outputs, their data
types and dims come from the graph; when every input and output has a dynamic first axis, that
axis is Triton's batch axis (`max_batch_size`, dims without it, dynamic batching on).
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

import onnx

from onnx_thinet.errors import ThinetError
from onnx_thinet.io.files import write_text_atomic
from onnx_thinet.io.graph import save_model_atomic

__all__ = ["TRITON_TYPES", "TritonTensor", "triton_config", "write_triton_repository"]

TRITON_TYPES = {
    onnx.TensorProto.FLOAT: "TYPE_FP32", onnx.TensorProto.FLOAT16: "TYPE_FP16",
    onnx.TensorProto.DOUBLE: "TYPE_FP64", onnx.TensorProto.BFLOAT16: "TYPE_BF16",
    onnx.TensorProto.INT8: "TYPE_INT8", onnx.TensorProto.INT16: "TYPE_INT16",
    onnx.TensorProto.INT32: "TYPE_INT32", onnx.TensorProto.INT64: "TYPE_INT64",
    onnx.TensorProto.UINT8: "TYPE_UINT8", onnx.TensorProto.UINT16: "TYPE_UINT16",
    onnx.TensorProto.UINT32: "TYPE_UINT32", onnx.TensorProto.UINT64: "TYPE_UINT64",
    onnx.TensorProto.BOOL: "TYPE_BOOL", onnx.TensorProto.STRING: "TYPE_STRING",
}
_NAME = re.compile(r"^[A-Za-z0-9_.-]+$")


@dataclass(frozen=True)
class TritonTensor:
    name: str
    data_type: str
    dims: tuple[int, ...]  # -1 where dynamic


def _tensor(value: onnx.ValueInfoProto) -> TritonTensor:
    tensor_type = value.type.tensor_type
    if not value.type.HasField("tensor_type") or tensor_type.elem_type not in TRITON_TYPES:
        raise ThinetError(f"{value.name}: Triton has no data type for this tensor type")
    dims = tuple(d.dim_value if d.HasField("dim_value") and d.dim_value > 0 else -1 for d in tensor_type.shape.dim)
    return TritonTensor(value.name, TRITON_TYPES[tensor_type.elem_type], dims)


def _interface(model: onnx.ModelProto) -> tuple[list[TritonTensor], list[TritonTensor]]:
    initializers = {t.name for t in model.graph.initializer}
    inputs = [_tensor(v) for v in model.graph.input if v.name not in initializers]
    return inputs, [_tensor(v) for v in model.graph.output]


def _list(kind: str, tensors: list[TritonTensor], batched: bool) -> str:
    entries = []
    for t in tensors:
        dims = t.dims[1:] if batched else t.dims
        entries.append(f'  {{\n    name: "{t.name}"\n    data_type: {t.data_type}\n'
                       f'    dims: [ {", ".join(str(d) for d in dims)} ]\n  }}')
    return f"{kind} [\n" + ",\n".join(entries) + "\n]\n"


def triton_config(model: onnx.ModelProto, name: str, max_batch: int = 32, device: str = "cpu") -> str:
    """config.pbtxt text for `model` served as `name` by Triton's onnxruntime backend."""
    if device not in ("cpu", "gpu"):
        raise ThinetError(f"--device must be cpu or gpu (got {device!r})")
    if max_batch < 0:
        raise ThinetError(f"--max-batch must be non-negative (got {max_batch})")
    inputs, outputs = _interface(model)
    dynamic = all(t.dims and t.dims[0] == -1 for t in inputs + outputs)
    batched = dynamic and max_batch > 0
    text = f'name: "{name}"\nbackend: "onnxruntime"\nmax_batch_size: {max_batch if batched else 0}\n'
    text += _list("input", inputs, batched) + _list("output", outputs, batched)
    kind = "KIND_GPU" if device == "gpu" else "KIND_CPU"
    text += f"instance_group [\n  {{\n    count: 1\n    kind: {kind}\n  }}\n]\n"
    if batched:
        text += "dynamic_batching { }\n"
    return text


def write_triton_repository(model: onnx.ModelProto, repo: str | Path, name: str, max_batch: int = 32,
                            device: str = "cpu") -> Path:
    """Write `repo/name/1/model.onnx` and `repo/name/config.pbtxt`; returns the model folder."""
    if not _NAME.match(name):
        raise ThinetError(f"--name {name!r}: use letters, digits, '_', '-' and '.' only")
    config = triton_config(model, name, max_batch, device)
    folder = Path(repo) / name
    if folder.exists() and not folder.is_dir():
        raise ThinetError(f"{folder}: exists and is not a folder")
    save_model_atomic(model, folder / "1" / "model.onnx")
    write_text_atomic(folder / "config.pbtxt", config)
    return folder
