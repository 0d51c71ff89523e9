"""Models without their weight bytes: shape inference and onnxruntime sessions read only dims.

Serializing a model copies every weight (half a gigabyte for VGG-16), and a pipeline that
infers shapes or builds a session once per pass pays that each time. These helpers hand
onnx and onnxruntime a copy whose large float initializers carry only their name, type and
dims: shape inference reads values only of small (shape-like) constants, and onnxruntime
takes the weights as in-memory external initializers, never as protobuf bytes.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable, Mapping

import numpy as np
import onnx
from onnx import TensorProto, numpy_helper

from onnx_thinet.errors import one_line

__all__ = [
    "LARGE_WEIGHT_ELEMENTS",
    "SessionModel",
    "copy_fields",
    "infer_shapes",
    "is_large_weight",
    "is_session_array",
    "session_model",
    "weight_stub",
    "weightless_copy",
]

logger = logging.getLogger(__name__)

# Constants that shape inference reads (Reshape targets, Resize scales, Slice bounds, data
# propagation through Shape arithmetic) are a few elements; weights are thousands.
LARGE_WEIGHT_ELEMENTS = 1024
_FLOAT_TYPES = frozenset({TensorProto.FLOAT, TensorProto.DOUBLE, TensorProto.FLOAT16, TensorProto.BFLOAT16})
_IN_MEMORY = "onnx-thinet-in-memory"  # external-data location of weights handed over as OrtValues


def is_large_weight(tensor: TensorProto, above: int | None = None) -> bool:
    """A float initializer held in memory and too large to be a shape constant (or with more
    than `above` elements)."""
    limit = LARGE_WEIGHT_ELEMENTS if above is None else above
    return (tensor.data_type in _FLOAT_TYPES and tensor.data_location != TensorProto.EXTERNAL
            and math.prod(tensor.dims) > limit)


def weightless_copy(model: onnx.ModelProto,
                    strip: Callable[[TensorProto], bool] = is_large_weight) -> onnx.ModelProto:
    """Copy of `model` whose large float initializers (those `strip` picks) have name, type and
    dims but no data.

    Nothing of the weights is copied or serialized; everything else (nodes, value_info,
    functions, small and integer initializers) is copied verbatim.
    """
    light = onnx.ModelProto()
    copy_fields(model, light, skip="graph")
    copy_fields(model.graph, light.graph, skip="initializer")
    for tensor in model.graph.initializer:
        if strip(tensor):
            light.graph.initializer.append(weight_stub(tensor))
        else:
            light.graph.initializer.append(tensor)
    return light


def infer_shapes(model: onnx.ModelProto, in_place: bool = False) -> onnx.ModelProto:
    """`onnx.shape_inference.infer_shapes(model, data_prop=True)`, run on a weightless copy.

    The result is the same model with the inferred value_info (and output types); with
    `in_place` it is `model` itself, otherwise a copy (weights copied in memory, never
    serialized). Inference that fails never fails the run: the model is returned as it is.
    """
    try:
        inferred = onnx.shape_inference.infer_shapes(weightless_copy(model), data_prop=True)
    except Exception as exc:
        logger.warning("shape inference failed: %s", one_line(exc))
        return model
    target = model
    if not in_place:
        target = onnx.ModelProto()
        target.CopyFrom(model)
    for field in [f.name for f, _ in target.ListFields() if f.name != "graph"]:
        target.ClearField(field)
    for field in [f.name for f, _ in target.graph.ListFields() if f.name != "initializer"]:
        target.graph.ClearField(field)
    copy_fields(inferred, target, skip="graph")
    copy_fields(inferred.graph, target.graph, skip="initializer")
    return target


class SessionModel:
    """A model as onnxruntime takes it without the weight bytes: the serialized graph, and the
    large weights as OrtValues over numpy arrays (kept alive here for the session's life).

    `arrays` holds the values of large initializers that `model` carries as dims alone (a
    sub-graph cut from a bigger model: copying its weights into a new graph is a copy saved).
    """

    def __init__(self, model: onnx.ModelProto, arrays: Mapping[str, np.ndarray] | None = None):
        import onnxruntime as ort

        arrays = arrays or {}
        light = weightless_copy(model, is_session_array)
        large = {t.name: t for t in model.graph.initializer if is_session_array(t)}
        self.arrays = [np.ascontiguousarray(arrays[t.name] if t.name in arrays
                                            else numpy_helper.to_array(large[t.name]))
                       for t in light.graph.initializer if t.name in large]
        self.names = [t.name for t in light.graph.initializer if t.name in large]
        self.values = [ort.OrtValue.ortvalue_from_numpy(a) for a in self.arrays]
        for tensor, array in zip((t for t in light.graph.initializer if t.name in large), self.arrays):
            tensor.data_location = TensorProto.EXTERNAL
            tensor.external_data.add(key="location", value=_IN_MEMORY)
            tensor.external_data.add(key="length", value=str(array.nbytes))
        self.data = light.SerializeToString()

    def session(self, options, providers: list):
        """An InferenceSession on these weights (`options` gains them; use it for one session)."""
        import onnxruntime as ort

        if self.names:
            options.add_external_initializers(self.names, self.values)
        session = ort.InferenceSession(self.data, options, providers=providers)
        session._thinet_weights = self  # the OrtValues must outlive the session
        return session


def session_model(model: onnx.ModelProto, arrays: Mapping[str, np.ndarray] | None = None) -> SessionModel:
    """`model` ready for onnxruntime without serializing its weights (see `SessionModel`)."""
    return SessionModel(model, arrays)


def weight_stub(tensor: TensorProto) -> TensorProto:
    """`tensor` with its name, type and dims but no data (its values travel beside the model)."""
    return TensorProto(name=tensor.name, data_type=tensor.data_type, dims=tensor.dims)


def is_session_array(tensor: TensorProto) -> bool:
    """A large weight onnxruntime can take as an OrtValue (numpy has no bfloat16 of its own)."""
    return is_large_weight(tensor) and tensor.data_type != TensorProto.BFLOAT16


def copy_fields(source, target, skip: str) -> None:
    """Copy every set field of one protobuf message into another of its type, but `skip`."""
    for descriptor, value in source.ListFields():
        if descriptor.name == skip:
            continue
        if descriptor.is_repeated:
            getattr(target, descriptor.name).extend(value)
        elif descriptor.type == descriptor.TYPE_MESSAGE:
            getattr(target, descriptor.name).CopyFrom(value)
        else:
            setattr(target, descriptor.name, value)
