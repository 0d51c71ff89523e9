"""Element types and seeded dummy inputs for a model's graph inputs (one rule for symbolic dims)."""

from __future__ import annotations

import numpy as np
import onnx

from onnx_thinet.errors import ThinetError
from onnx_thinet.io.graph import graph_inputs, tensor_shape

__all__ = ["ONNX_TO_NUMPY", "SYMBOLIC_DIM", "dummy_feeds", "dummy_shape"]

ONNX_TO_NUMPY = {
    onnx.TensorProto.FLOAT: np.float32,
    onnx.TensorProto.FLOAT16: np.float16,
    onnx.TensorProto.DOUBLE: np.float64,
    onnx.TensorProto.INT64: np.int64,
    onnx.TensorProto.INT32: np.int32,
    onnx.TensorProto.UINT8: np.uint8,
    onnx.TensorProto.INT8: np.int8,
    onnx.TensorProto.BOOL: np.bool_,
}

# A symbolic or unknown dim other than the batch: 32 survives the five stride-2 stages of
# a detector backbone (8 would shrink to zero), and is still cheap to run.
SYMBOLIC_DIM = 32


def dummy_shape(value: onnx.ValueInfoProto, batch: int = 1) -> tuple[int, ...]:
    """Concrete dims of a graph input: static dims as they are, a symbolic or unknown first
    dim as `batch`, any other symbolic or unknown dim as SYMBOLIC_DIM."""
    dims = tensor_shape(value)
    if dims is None:
        raise ThinetError(f"graph input {value.name!r} has no shape; cannot make an example input")
    return tuple(
        d if isinstance(d, int) and d > 0 else (batch if k == 0 else SYMBOLIC_DIM)
        for k, d in enumerate(dims)
    )


def dummy_feeds(model: onnx.ModelProto, batch: int = 1, seed: int = 0) -> dict[str, np.ndarray]:
    """Seeded inputs for every real graph input: standard normal floats, integers 0 or 1
    (safe as indices), shapes from `dummy_shape`."""
    rng = np.random.default_rng(seed)
    feeds = {}
    for value in graph_inputs(model):
        dtype = ONNX_TO_NUMPY.get(value.type.tensor_type.elem_type)
        if dtype is None:
            raise ThinetError(f"graph input {value.name!r} has an unsupported element type")
        shape = dummy_shape(value, batch)
        if np.issubdtype(dtype, np.floating):
            feeds[value.name] = rng.standard_normal(shape).astype(dtype)
        else:
            feeds[value.name] = rng.integers(0, 2, size=shape).astype(dtype)
    return feeds
