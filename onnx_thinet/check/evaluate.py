"""Accuracy on labelled data, and agreement with a reference model (`onnx-thinet eval`)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx

from onnx_thinet.calibration.runtime import make_session
from onnx_thinet.check.measure import ErrorSums
from onnx_thinet.errors import ThinetError
from onnx_thinet.io.data import (
    IMAGE_SUFFIXES,
    ArrayData,
    CalibrationData,
    Preprocess,
    check_arrays,
    load_calibration,
    read_npz,
)
from onnx_thinet.io.graph import graph_inputs

__all__ = ["EvalResult", "evaluate", "load_labelled"]


@dataclass(frozen=True)
class EvalResult:
    samples: int
    accuracy: float | None  # top-1, when labels are known
    top1_agreement: float | None  # with the reference model
    mean_abs_error: float | None  # mean |output − reference output|
    rel_error: float | None  # ‖output − reference‖ / ‖reference‖


def load_labelled(
    path: str | Path, model: onnx.ModelProto, preprocess: Preprocess | None = None
) -> tuple[CalibrationData, np.ndarray]:
    """An `.npz` with `x` and `y`, or an image folder with one sub-folder per class (sorted)."""
    path = Path(path)
    if path.is_dir():
        classes = sorted(p for p in path.iterdir() if p.is_dir())
        if not classes:
            raise ThinetError(f"{path}: expected one sub-folder per class")
        data = load_calibration(path, model, preprocess)
        labels = np.array([_class_of(f, path, classes) for f in data.files], dtype=np.int64)
        return data, labels
    if path.suffix != ".npz":
        raise ThinetError(f"{path}: labelled data must be an .npz with x and y, or a class folder")
    inputs = graph_inputs(model)
    arrays = read_npz(path, required=("x", "y"))
    x, y = arrays["x"], arrays["y"]
    if len(inputs) != 1:
        raise ThinetError(f"{path}: eval feeds one input, the model has {len(inputs)}")
    if len(y) != len(x):
        raise ThinetError(f"{path}: x has {len(x)} samples but y has {len(y)}")
    return ArrayData(check_arrays(path, {inputs[0].name: x}, inputs)), y.astype(np.int64)


def _class_of(file: Path, root: Path, classes: list[Path]) -> int:
    top = file.relative_to(root).parts[0]
    names = [c.name for c in classes]
    if top not in names or file.suffix.lower() not in IMAGE_SUFFIXES:
        raise ThinetError(f"{file}: image outside a class sub-folder")
    return names.index(top)


def evaluate(
    model: onnx.ModelProto,
    data: CalibrationData,
    labels: np.ndarray | None = None,
    reference: onnx.ModelProto | None = None,
    batch_size: int = 256,
    device: str = "auto",
) -> EvalResult:
    """Top-1 accuracy from the first output, and agreement with `reference` when given."""
    session = make_session(model, device)
    ref_session = make_session(reference, device) if reference is not None else None
    correct = agree = 0
    sums = ErrorSums()
    n = len(data)
    for start in range(0, n, batch_size):
        idx = np.arange(start, min(n, start + batch_size))
        feeds = data.batch(idx)
        out = session.run(None, feeds)[0].reshape(len(idx), -1)
        if labels is not None:
            correct += int(np.sum(out.argmax(axis=1) == labels[idx]))
        if ref_session is not None:
            ref = ref_session.run(None, feeds)[0].reshape(len(idx), -1)
            if not sums.add(ref, out):
                raise ThinetError(f"outputs differ in shape from the reference: {out.shape} vs {ref.shape}")
            agree += int(np.sum(out.argmax(axis=1) == ref.argmax(axis=1)))
    has_ref = ref_session is not None
    return EvalResult(
        samples=n,
        accuracy=correct / n if labels is not None and n else None,
        top1_agreement=agree / n if has_ref and n else None,
        mean_abs_error=sums.mean_abs_error if has_ref else None,
        rel_error=sums.rel_error if has_ref and sums.ref_sq > 0 else None,
    )
