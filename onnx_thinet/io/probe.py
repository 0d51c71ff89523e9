"""Whether a canonicalization step changed a model's outputs, judged on seeded random inputs.

Each probe is a whole forward pass and an onnxruntime session, the largest cost of
canonicalizing a big model; a model's outputs are therefore computed once and reused as the
reference for the next step, and sessions take the weights without serializing them.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass

import numpy as np
import onnx

from onnx_thinet.errors import one_line
from onnx_thinet.io.weightless import session_model

__all__ = ["ProbeRun", "outputs_differ", "probe", "quiet_onnxruntime", "reference_after"]

_BATCH, _SEED = 2, 0  # a batch of two also catches a batch dimension folded into a constant


@dataclass(frozen=True)
class ProbeRun:
    """A model's outputs on its probe inputs, or why it could not be run."""

    feeds: dict[str, np.ndarray] | None
    outputs: list[np.ndarray] | None
    error: str | None = None


def probe(model: onnx.ModelProto) -> ProbeRun:
    """Run `model` on its seeded probe inputs; a failure is recorded, not raised."""
    from onnx_thinet.io.feeds import dummy_feeds

    try:
        feeds = dummy_feeds(model, batch=_BATCH, seed=_SEED)
        return ProbeRun(feeds, _run(model, feeds))
    except Exception as exc:  # any failure to run means "cannot tell": the step is not applied
        return ProbeRun(None, None, f"{type(exc).__name__}: {one_line(exc)}")


def outputs_differ(reference: ProbeRun, candidate: onnx.ModelProto) -> tuple[str | None, ProbeRun | None]:
    """Why `candidate` cannot replace the model `reference` was run on (None: same outputs),
    and the candidate's run on the same inputs."""
    if reference.error is not None:
        return f"could not compare outputs: {reference.error}", None
    try:
        outputs = _run(candidate, reference.feeds)
    except Exception as exc:
        return f"could not compare outputs: {type(exc).__name__}: {one_line(exc)}", None
    return _difference(reference.outputs, outputs), ProbeRun(reference.feeds, outputs)


def reference_after(candidate: onnx.ModelProto, run: ProbeRun | None) -> ProbeRun:
    """The probe of an accepted `candidate`: its run from the comparison when its own probe
    inputs are the ones it was run on, a fresh probe otherwise."""
    from onnx_thinet.io.feeds import dummy_feeds

    if run is not None:
        try:
            feeds = dummy_feeds(candidate, batch=_BATCH, seed=_SEED)
        except Exception:
            feeds = None
        if feeds is not None and feeds.keys() == run.feeds.keys() and all(
                feeds[k].dtype == run.feeds[k].dtype and np.array_equal(feeds[k], run.feeds[k]) for k in feeds):
            return run
    return probe(candidate)


def _difference(out_a: list[np.ndarray], out_b: list[np.ndarray]) -> str | None:
    if len(out_a) != len(out_b):
        return "changed the number of outputs"
    for x, y in zip(out_a, out_b):
        if x.shape != y.shape:
            return f"changed an output shape {x.shape} -> {y.shape}"
        if x.dtype.kind == "f":
            scale = max(float(np.abs(x).max(initial=0.0)), 1e-6)
            if float(np.abs(x - y).max(initial=0.0)) > 1e-4 * scale:
                return "changed the outputs"
        elif not np.array_equal(x, y):
            return "changed the outputs"
    return None


@contextlib.contextmanager
def quiet_onnxruntime():
    """Keep onnxruntime's own error lines (a probe that fails is expected) off the user's screen."""
    import onnxruntime as ort

    ort.set_default_logger_severity(4)
    try:
        yield
    finally:
        ort.set_default_logger_severity(2)  # onnxruntime's default: warnings and above


def _run(model: onnx.ModelProto, feeds: dict[str, np.ndarray]) -> list[np.ndarray]:
    """One probe run with onnxruntime's logging off (failures are reported by us)."""
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.log_severity_level = 4
    # Both sides of a comparison run alike; repacking the weights for one run costs more than it
    # saves, and so does the blocked (NCHWc) layout of the full level, which copies every conv
    # weight (VGG-16's canonicalization 2.17 → 2.07 s, ResNet-50's 0.91 → 0.75 s). With no graph
    # optimization at all, float16 kernels ran as written and a simplified float16 graph
    # "changed the outputs" (tests/test_io.py).
    opts.add_session_config_entry("session.disable_prepacking", "1")
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_BASIC
    with quiet_onnxruntime():
        session = session_model(model).session(opts, ["CPUExecutionProvider"])
        run_options = ort.RunOptions()
        run_options.log_severity_level = 4
        return session.run(None, feeds, run_options)
