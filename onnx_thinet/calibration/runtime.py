"""onnxruntime sessions: device choice, running a model, and reading intermediate tensors."""

from __future__ import annotations

import functools
import logging
from collections.abc import Mapping

import numpy as np
import onnx
import onnxruntime as ort

from onnx_thinet.errors import ThinetError
from onnx_thinet.io.graph import graph_inputs
from onnx_thinet.io.weightless import session_model

__all__ = [
    "ONNXRUNTIME_ERRORS",
    "make_session",
    "providers_for",
    "run_model",
    "session_providers",
    "truncated_model",
]

logger = logging.getLogger(__name__)

_warned: set[str] = set()  # one fallback warning per reason and process

# What onnxruntime raises when it cannot load or run a graph (its own classes, not RuntimeError).
ONNXRUNTIME_ERRORS = tuple(getattr(ort.capi.onnxruntime_pybind11_state, name) for name in (
    "Fail", "InvalidArgument", "NotImplemented", "RuntimeException", "InvalidGraph", "EPFail"))


def providers_for(device: str) -> list[str]:
    """onnxruntime providers for `auto|cpu|cuda`; CUDA only when the GPU build offers it.

    `cuda` without a CUDA provider warns once and runs on the CPU.
    """
    available = ort.get_available_providers()
    if device == "cpu":
        return ["CPUExecutionProvider"]
    if device not in ("auto", "cuda"):
        raise ThinetError(f"device must be auto, cpu or cuda (got {device!r})", params=("device",))
    if "CUDAExecutionProvider" in available:
        _preload_cuda_libraries()
        return ["CUDAExecutionProvider", "CPUExecutionProvider"]
    if device == "cuda":
        _warn_once("no-provider", "--device cuda: this onnxruntime has no CUDA execution provider "
                   "(pip install onnxruntime-gpu); running on the CPU")
    return ["CPUExecutionProvider"]


def make_session(model: onnx.ModelProto, device: str = "cpu", arena: bool = False,
                 arrays: Mapping[str, np.ndarray] | None = None, spin: bool = False) -> ort.InferenceSession:
    """A session on `device`; warns once when CUDA was asked for but the session does not use it
    (onnxruntime falls back to the CPU silently when the CUDA libraries cannot be loaded).

    The large weights reach onnxruntime as in-memory external initializers, never serialized.
    `arena`: onnxruntime's CPU arena, for a caller that does not keep outputs in it (it binds
    arrays of its own or copies them: the arena never shrinks while the session lives, and
    ResNet-50 at 256 images peaked at 4.5 GB keeping them there, 2.4 GB copying them). It
    makes runs about a quarter faster than fresh allocations, which this VM faults in slowly.
    `arrays`: values of the initializers `model` carries as dims alone (see `SessionModel`).
    `spin`: worker threads wait for work spinning, for a caller that runs its batches back to
    back and then drops the session (spinning threads would take the cores of numpy between
    runs, or of another session's runs).
    """
    opts = ort.SessionOptions()
    opts.log_severity_level = 4  # a failure reaches the caller as an exception, not a log line
    # Sessions here are many and short: prepacked copies of the weights cost more to build
    # (VGG-16: 1.3 s of a 1.9 s start) than they save.
    opts.enable_cpu_mem_arena = arena
    # A memory pattern is traced on a session's first run and allocated afresh on its second,
    # and a segment session runs a few batches: its second run then paid for new memory too
    # (a ResNet-50 bottleneck, batch 32: 0.15 s on runs one and two, 0.11 s from the third;
    # without the pattern, 0.11 s from the second)
    opts.enable_mem_pattern = False
    opts.add_session_config_entry("session.disable_prepacking", "1")
    opts.add_session_config_entry("session.intra_op.allow_spinning", "1" if spin else "0")
    providers = providers_for(device)
    session = session_model(model, arrays).session(opts, [_with_options(p) for p in providers])
    if "CUDAExecutionProvider" in providers and "CUDAExecutionProvider" not in session.get_providers():
        _warn_once("not-used", f"--device {device}: onnxruntime could not start its CUDA execution "
                   "provider (CUDA or cuDNN libraries missing?); running on the CPU")
    return session


# A segment session runs a few batches and is dropped, so cuDNN's exhaustive search for the
# fastest algorithm (onnxruntime's default, redone for every session and input shape) costs
# more than it saves; its heuristic choice is what a short-lived session wants.
_CUDA_OPTIONS = {"cudnn_conv_algo_search": "HEURISTIC"}


def _with_options(provider: str):
    return (provider, _CUDA_OPTIONS) if provider == "CUDAExecutionProvider" else provider


def session_providers(device: str) -> list[str]:
    """The providers a session on `device` really uses, from a one-node model."""
    x = onnx.helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, [1])
    y = onnx.helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, [1])
    graph = onnx.helper.make_graph([onnx.helper.make_node("Relu", ["x"], ["y"])], "probe", [x], [y])
    model = onnx.helper.make_model(graph, opset_imports=[onnx.helper.make_opsetid("", 13)], ir_version=8)
    return list(make_session(model, device).get_providers())


@functools.cache
def _preload_cuda_libraries() -> None:
    """Let onnxruntime-gpu load CUDA and cuDNN from pip's nvidia-* wheels (torch installs them);
    without this it only searches the system library path and silently falls back to the CPU."""
    preload = getattr(ort, "preload_dlls", None)
    if preload is None:
        return
    try:
        preload()
    except Exception as exc:  # a missing wheel is normal; the session check below still warns
        logger.debug("onnxruntime.preload_dlls: %s", exc)


def _warn_once(key: str, message: str) -> None:
    if key not in _warned:
        _warned.add(key)
        logger.warning(message)


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
