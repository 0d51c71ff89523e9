"""Verification of a rewritten model: the ONNX checker, onnxruntime, and output error on held-out data."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import onnx

from onnx_thinet.calibration.runtime import make_session
from onnx_thinet.check.measure import ErrorSums
from onnx_thinet.errors import InternalError
from onnx_thinet.io.data import CalibrationData

__all__ = ["OutputComparison", "check_model", "compare_outputs"]


@dataclass(frozen=True)
class OutputComparison:
    """How far a model's outputs are from a reference's on the same inputs."""

    rel_error: float  # ‖Δ‖ / ‖reference‖ over all outputs
    max_abs_error: float
    max_rel_error: float  # max |Δ| / max |reference|
    top1_agreement: float | None  # for 2-D outputs: fraction of equal argmax
    samples: int


def check_model(model: onnx.ModelProto) -> None:
    """Full ONNX checker (with shape inference); a failure here is a bug in the rewrite."""
    try:
        onnx.checker.check_model(model, full_check=True)
    except Exception as exc:
        raise InternalError(f"the rewritten model fails the ONNX checker ({exc})") from None


def compare_outputs(
    reference: onnx.ModelProto,
    candidate: onnx.ModelProto,
    data: CalibrationData,
    indices: np.ndarray,
    batch_size: int = 32,
    device: str = "cpu",
) -> OutputComparison:
    """Run both models in onnxruntime on `indices` of `data` and measure the difference."""
    ref_session = make_session(reference, device)
    try:
        cand_session = make_session(candidate, device)
    except Exception as exc:
        raise InternalError(f"onnxruntime cannot load the rewritten model ({exc})") from None
    sums = ErrorSums()
    agree = rows = 0
    for start in range(0, len(indices), batch_size):
        feeds = data.batch(indices[start : start + batch_size])
        for ref, out in zip(ref_session.run(None, feeds), cand_session.run(None, feeds)):
            if not sums.add(ref, out):
                raise InternalError(f"output shape changed {ref.shape} -> {out.shape}")
            if ref.ndim == 2 and ref.shape[1] > 1:
                agree += int(np.sum(ref.argmax(axis=1) == out.argmax(axis=1)))
                rows += ref.shape[0]
    return OutputComparison(
        rel_error=sums.rel_error,
        max_abs_error=sums.max_abs,
        max_rel_error=sums.max_rel_error,
        top1_agreement=agree / rows if rows else None,
        samples=len(indices),
    )
