"""Canonicalization: bring an exported graph into the plain form the channel rules understand.

Constants become initializers, then onnx-simplifier folds shape arithmetic and onnxruntime's
basic optimizer removes no-op nodes, each kept only when the outputs stay the same on random
inputs.
"""

from __future__ import annotations

import logging
import os
import tempfile
from dataclasses import dataclass

import numpy as np
import onnx
from onnx import numpy_helper

from onnx_thinet.errors import one_line
from onnx_thinet.io.lifting import graft_lifted, layer_weights, lift
from onnx_thinet.io.probe import outputs_differ, probe, quiet_onnxruntime, reference_after
from onnx_thinet.io.simplify import simplify_lifted
from onnx_thinet.io.weightless import infer_shapes, session_model

__all__ = ["CanonicalStep", "canonicalize", "canonicalize_steps"]

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class CanonicalStep:
    """One canonicalization step: applied, or skipped with the reason (the report's
    `canonicalization` entries)."""

    step: str
    applied: bool
    reason: str | None = None


def canonicalize(model: onnx.ModelProto, simplify: bool = True) -> onnx.ModelProto:
    """Bring an exported graph into the plain form the channel rules understand.

    `canonicalize_steps` without the account of which steps ran.
    """
    return canonicalize_steps(model, simplify)[0]


def canonicalize_steps(
    model: onnx.ModelProto, simplify: bool = True
) -> tuple[onnx.ModelProto, tuple[CanonicalStep, ...]]:
    """Canonical form of `model` and, per optional step, whether it was applied and why not.

    Constants become initializers, then onnx-simplifier folds shape arithmetic and
    onnxruntime's basic optimizer removes no-op nodes. The steps' result is checked against
    the input's outputs on random data; when it differs, each step is checked on its own and
    skipped if it fails or changes them. A skipped step is logged and returned with its
    reason, never silently dropped.
    """
    steps = (("onnxsim", _simplify_onnxsim), ("onnxruntime", _optimize_ort_basic))
    if not simplify:
        return (infer_shapes(_prepared(model), in_place=True),
                tuple(CanonicalStep(n, False, "simplify=False") for n, _ in steps))
    chained = _chained(model, steps)
    if chained is None:
        chained = _stepwise(model, steps)
    canonical, done = chained
    for step in done:
        if step.applied:
            logger.info("canonicalization: %s applied (outputs unchanged on random inputs)", step.step)
        else:
            logger.info("canonicalization: %s skipped: %s", step.step, step.reason)
    return infer_shapes(_name_nodes(_constants_to_initializers(canonical)), in_place=True), done


def _prepared(model: onnx.ModelProto) -> onnx.ModelProto:
    """A copy of `model` (the one copy of its weights) with constants and weights in one place."""
    own = _copy(model)
    return _name_nodes(_weights_without_identity(_weights_not_inputs(_constants_to_initializers(own))))


def _chained(model: onnx.ModelProto, steps) -> tuple[onnx.ModelProto, tuple[CanonicalStep, ...]] | None:
    """Every step in turn, checked once at the end (one probe session fewer per step than
    checking each: a VGG-16 session costs seconds); None when the result's outputs differ or
    cannot be compared, so that each step is judged on its own. The steps consume the model
    they are given, so the prepared input is probed first."""
    current, failed = _prepared(model), {}
    reference = probe(current)
    for name, step in steps:
        candidate, failure = _attempt(step, current)
        if failure is not None:
            failed[name] = failure
            continue
        current = candidate
    if len(failed) == len(steps):  # no step ran: nothing to check
        return current, tuple(CanonicalStep(n, False, failed[n]) for n, _ in steps)
    if outputs_differ(reference, current)[0] is not None:
        return None
    return current, tuple(CanonicalStep(n, n not in failed, failed.get(n)) for n, _ in steps)


def _stepwise(model: onnx.ModelProto, steps) -> tuple[onnx.ModelProto, tuple[CanonicalStep, ...]]:
    """Each step checked against the model before it, and kept only when the outputs agree."""
    model = _prepared(model)
    done = []
    reference = None  # the probe of `model`, reused across steps while `model` stays
    for name, step in steps:
        candidate, reason = _attempt(step, _copy(model))  # a step consumes its model
        if reason is None:
            reference = reference or probe(model)
            reason, run = outputs_differ(reference, candidate)
            if reason is None:
                model, reference = candidate, reference_after(candidate, run)
        done.append(CanonicalStep(name, reason is None, reason))
    return model, tuple(done)


def _copy(model: onnx.ModelProto) -> onnx.ModelProto:
    own = onnx.ModelProto()
    own.CopyFrom(model)
    return own


def _attempt(step, model: onnx.ModelProto) -> tuple[onnx.ModelProto | None, str | None]:
    """A step's result, or why it failed (third-party optimizers fail in many ways)."""
    try:
        with quiet_onnxruntime():
            return step(model), None
    except Exception as exc:
        return None, f"failed: {type(exc).__name__}: {one_line(exc)}"


def _name_nodes(model: onnx.ModelProto) -> onnx.ModelProto:
    """Give every node a unique name (existing names are kept) so reports and rewrites can cite it."""
    seen: set[str] = set()
    for pos, node in enumerate(model.graph.node):
        name = node.name
        if not name or name in seen:
            base = name or f"{node.op_type}_{pos}"
            name, k = base, 1
            while name in seen:
                name, k = f"{base}_{k}", k + 1
            node.name = name
        seen.add(name)
    return model


def _simplify_onnxsim(model: onnx.ModelProto) -> onnx.ModelProto:
    return simplify_lifted(model)


# Ops that onnxruntime's basic level may fold into the values of the layer before them
# (ConvMulFusion, ConvAddFusion, ConvBNFusion, MatMulBNFusion): such a layer's weights must
# reach it. MatMulAddFusion only moves a MatMul's weight into a Gemm, lifted or not.
_CONV_FOLDS = ("Add", "Sub", "Mul", "Div", "BatchNormalization")
_ORT_FOLDS_INTO_WEIGHTS = {"Conv": _CONV_FOLDS, "ConvTranspose": _CONV_FOLDS,
                           "MatMul": ("Mul", "Div", "BatchNormalization"),
                           "Gemm": ("Mul", "Div", "BatchNormalization")}
# ops its layout and elimination passes may move or remove first, bringing such an op next to
# the layer (tf2onnx writes Conv → Transpose → Mul for an NHWC BatchNorm)
_ORT_MOVES = ("Transpose", "Reshape", "Squeeze", "Unsqueeze", "Identity", "Flatten", "Dropout")


def _optimize_ort_basic(model: onnx.ModelProto) -> onnx.ModelProto:
    """onnxruntime's basic optimizer; `model` is consumed (its graph replaced, see `io.lifting`).

    The layer weights it cannot change go to it as graph inputs: its result is written to a
    file and read back, and VGG-16's 553 MB of weights took seconds each way."""
    import onnxruntime as ort

    lifted = layer_weights(model, unless_read_by=_ORT_FOLDS_INTO_WEIGHTS, through=_ORT_MOVES)
    with tempfile.TemporaryDirectory() as tmp:
        out = os.path.join(tmp, "opt.onnx")
        opts = ort.SessionOptions()
        opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_BASIC
        opts.optimized_model_filepath = out
        opts.log_severity_level = 4
        opts.add_session_config_entry("session.disable_prepacking", "1")  # never runs: packing is waste
        session_model(lift(model, lifted)).session(opts, ["CPUExecutionProvider"])  # writes `out`
        optimized = onnx.load(out)
    if any(n.domain not in ("", "ai.onnx") for n in optimized.graph.node):
        raise RuntimeError("optimizer introduced non-standard ops")
    casts = sum(n.op_type == "Cast" for n in model.graph.node)
    if sum(n.op_type == "Cast" for n in optimized.graph.node) > casts:
        # float16 on CPU: the runtime wraps kernels in float32 Casts, not a change to keep
        raise RuntimeError("optimizer inserted precision Casts")
    return graft_lifted(model, optimized, lifted)


def _constants_to_initializers(model: onnx.ModelProto) -> onnx.ModelProto:
    """Constant nodes become initializers (in place), so weights are found in one place."""
    graph = model.graph
    keep = []
    for node in graph.node:
        if node.op_type == "Constant" and node.domain in ("", "ai.onnx") and len(node.output) == 1:
            try:
                value = _constant_value(node)
            except ValueError:
                keep.append(node)
                continue
            graph.initializer.append(numpy_helper.from_array(value, node.output[0]))
        else:
            keep.append(node)
    del graph.node[:]
    graph.node.extend(keep)
    return model


def _weights_not_inputs(model: onnx.ModelProto) -> onnx.ModelProto:
    """Initializers that older exporters also list as graph inputs are weights, not inputs: the
    channel rules need them constant (the slim model lists them again, see preserve_interface)."""
    weights = {t.name for t in model.graph.initializer}
    kept = [vi for vi in model.graph.input if vi.name not in weights]
    if len(kept) < len(model.graph.input):
        del model.graph.input[:]
        model.graph.input.extend(kept)
    return model


def _weights_without_identity(model: onnx.ModelProto) -> onnx.ModelProto:
    """Readers of Identity(initializer) read the initializer itself (an exporter's weight alias),
    so a weight shared that way is seen as shared and copied before it is cut."""
    source = {t.name for t in model.graph.initializer}
    outputs = {o.name for o in model.graph.output}
    alias: dict[str, str] = {}
    for node in model.graph.node:
        if (node.op_type == "Identity" and node.domain in ("", "ai.onnx") and node.input
                and node.output[0] not in outputs):
            origin = alias.get(node.input[0], node.input[0])
            if origin in source:
                alias[node.output[0]] = origin
    if not alias:
        return model
    kept = [n for n in model.graph.node if not (n.op_type == "Identity" and n.output[0] in alias)]
    for node in kept:
        for k, name in enumerate(node.input):
            if name in alias:
                node.input[k] = alias[name]
    del model.graph.node[:]
    model.graph.node.extend(kept)
    return model


def _constant_value(node: onnx.NodeProto) -> np.ndarray:
    attr = node.attribute[0] if node.attribute else None
    if attr is None:
        raise ValueError("empty Constant")
    if attr.name == "value":
        return numpy_helper.to_array(attr.t)
    if attr.name == "value_float":
        return np.array(attr.f, dtype=np.float32)
    if attr.name == "value_floats":
        return np.array(list(attr.floats), dtype=np.float32)
    if attr.name == "value_int":
        return np.array(attr.i, dtype=np.int64)
    if attr.name == "value_ints":
        return np.array(list(attr.ints), dtype=np.int64)
    raise ValueError(f"Constant with {attr.name}")
