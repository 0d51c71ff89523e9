"""onnxruntime sessions: device choice, running a model, and reading intermediate tensors."""

from __future__ import annotations

import logging

import numpy as np
import onnx
import onnxruntime as ort

from onnx_thinet.errors import ThinetError
from onnx_thinet.io.graph import graph_inputs

__all__ = [
    "make_session",
    "providers_for",
    "run_model",
    "truncated_model",
]

logger = logging.getLogger(__name__)

def providers_for(device: str) -> list[str]:
    """onnxruntime providers for `auto|cpu|cuda`; CUDA only when the GPU build can use it."""
    available = ort.get_available_providers()
    if device == "cpu":
        return ["CPUExecutionProvider"]
    if device == "cuda":
        if "CUDAExecutionProvider" not in available:
            raise ThinetError(
                "device cuda: onnxruntime has no CUDA provider here "
                "(pip install onnxruntime-gpu, and check the GPU driver)", params=("device",)
            )
        return ["CUDAExecutionProvider", "CPUExecutionProvider"]
    if device == "auto":
        if "CUDAExecutionProvider" in available:
            return ["CUDAExecutionProvider", "CPUExecutionProvider"]
        return ["CPUExecutionProvider"]
    raise ThinetError(f"device must be auto, cpu or cuda (got {device!r})", params=("device",))


def make_session(model: onnx.ModelProto, device: str = "cpu") -> ort.InferenceSession:
    opts = ort.SessionOptions()
    opts.log_severity_level = 3
    data = model.SerializeToString()
    return ort.InferenceSession(data, opts, providers=providers_for(device))


def run_model(
    model: onnx.ModelProto,
    feeds: dict[str, np.ndarray],
    outputs: list[str] | None = None,
    device: str = "cpu",
) -> list[np.ndarray]:
    session = make_session(model, device)
    return session.run(outputs, feeds)


def truncated_model(model: onnx.ModelProto, outputs: list[str]) -> onnx.ModelProto:
    """The part of `model` that computes `outputs`, with those tensors as its graph outputs.

    Running only the ancestors of the tensors we need keeps calibration passes short.
    """
    graph = model.graph
    producer = {out: node for node in graph.node for out in node.output}
    needed, stack, seen_nodes = set(outputs), list(outputs), set()
    while stack:
        name = stack.pop()
        node = producer.get(name)
        if node is None or node.name in seen_nodes:
            continue
        seen_nodes.add(node.name)
        for inp in node.input:
            if inp and inp not in needed:
                needed.add(inp)
                stack.append(inp)
    nodes = [n for n in graph.node if n.name in seen_nodes]
    value_infos = {vi.name: vi for vi in list(graph.value_info) + list(graph.output)}
    outs = []
    for name in outputs:
        if name in value_infos:
            outs.append(value_infos[name])
        else:
            outs.append(onnx.helper.make_value_info(name, onnx.TypeProto()))
    inits = [t for t in graph.initializer if t.name in needed]
    inputs = [i for i in graph.input if i.name in needed or i in graph_inputs(model)]
    new_graph = onnx.helper.make_graph(
        nodes, graph.name, inputs, outs, inits, value_info=list(graph.value_info)
    )
    new_model = onnx.helper.make_model(
        new_graph, opset_imports=list(model.opset_import), ir_version=model.ir_version
    )
    return new_model
