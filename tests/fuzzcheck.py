"""The properties every generated graph must have after slimming (tests/test_fuzz.py, tools/fuzz.py).

`check_case` slims a graph and returns what it found instead of raising, so the fuzz tool
can count failures by kind and the test can assert there are none:

* keep 0.5: the slim model passes the full checker, runs in onnxruntime at batch 1 and 3
  with the original's output shapes, and has the original's interface (names, dtypes, dims);
* keep 1.0: outputs equal the original's (relative error < 1e-5);
* the planted producer alone at keep 0.5: outputs equal the original's (< 1e-4), when the
  tool prunes that producer;
* export-torch: the slim model becomes a module that matches it, and `to_onnx` of that
  module matches it within 1e-5. A translator that is missing is counted, not a failure.
"""

from __future__ import annotations

import tempfile
import traceback
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort

from onnx_thinet import SlimConfig, slim
from onnx_thinet.errors import ThinetError
from onnx_thinet.io.data import ArrayData
from tests.fuzzgraphs import FuzzCase

__all__ = ["INVALID_KINDS", "Outcome", "check_case", "interface"]

# Failure kinds that mean a wrong slim model; "internal-error" (ThinetError saying so) and "crash"
# (any other exception: exit 1 in the CLI) write nothing but are bugs too; "generator": the
# drawn graph itself does not run in onnxruntime (a bug of tests/fuzzgraphs.py).
INVALID_KINDS = ("checker", "runtime", "interface", "shape", "keep1-differs", "planted-differs",
                 "torch-differs", "to-onnx")


@dataclass
class Outcome:
    """What one graph did: slimmed or why not, groups pruned, failures as (kind, detail)."""

    slimmed: bool = False
    groups_pruned: int = 0
    refused: str | None = None
    torch: str = "not run"  # ok | unsupported: ... | not run
    failures: list[tuple[str, str]] = field(default_factory=list)

    def fail(self, kind: str, detail: str) -> None:
        self.failures.append((kind, detail))


def _inputs(model: onnx.ModelProto, batch: int, seed: int) -> dict[str, np.ndarray]:
    vi = model.graph.input[0]
    dims = [d.dim_value or batch for d in vi.type.tensor_type.shape.dim]
    dims[0] = batch
    return {vi.name: np.random.default_rng(seed).standard_normal(dims).astype(np.float32)}


def _run(model: onnx.ModelProto, feeds: dict[str, np.ndarray]) -> list[np.ndarray]:
    session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    return session.run(None, feeds)


def _rel(ref: np.ndarray, got: np.ndarray) -> float:
    return float(np.abs(ref - got).max() / max(float(np.abs(ref).max()), 1e-6))


def interface(model: onnx.ModelProto) -> list[tuple]:
    """(role, name, dtype, dims) of every graph input and output; dims keep symbolic names."""
    rows = []
    for role, values in (("input", model.graph.input), ("output", model.graph.output)):
        for vi in values:
            t = vi.type.tensor_type
            dims = tuple(d.dim_param or d.dim_value for d in t.shape.dim)
            rows.append((role, vi.name, t.elem_type, dims))
    return rows


def check_case(case: FuzzCase, *, calib: int = 24, torch: bool = True) -> Outcome:
    """Run every property on `case` (see module docstring); never raises."""
    outcome = Outcome()
    try:
        _check(case, calib, torch, outcome)
    except Exception as exc:  # a crash of the checks themselves is a finding too
        outcome.fail("crash", f"{type(exc).__name__}: {exc}\n{traceback.format_exc(limit=4)}")
    return outcome


def _check(case: FuzzCase, calib: int, torch: bool, outcome: Outcome) -> None:
    model = case.model
    try:
        _run(model, _inputs(model, 2, seed=0))
    except Exception as exc:
        outcome.fail("generator", f"onnxruntime cannot run the generated graph: {str(exc).splitlines()[0][:200]}")
        return
    data = ArrayData(_inputs(model, calib, seed=1))
    config = SlimConfig(keep_ratio=0.5, batch_size=16, prune_coupled=case.prune_coupled)
    half = _slim(model, data, config, outcome)
    if half is None:
        return
    outcome.slimmed = True
    outcome.groups_pruned = sum(g.channels_after < g.channels_before for g in half.groups)
    _check_valid(model, half.model, outcome)
    same = _slim(model, data, SlimConfig(keep_ratio=1.0, batch_size=16), outcome)
    if same is not None:
        err = _rel(_run(model, _inputs(model, 3, 5))[0], _run(same.model, _inputs(model, 3, 5))[0])
        if err >= 1e-5:
            outcome.fail("keep1-differs", f"relative error {err:.3g}")
    _check_planted(case, data, half, outcome)
    if torch and not outcome.failures:
        _check_torch(half.model, outcome)


def _slim(model, data, config: SlimConfig, outcome: Outcome):
    try:
        return slim(model, data, config)
    except ThinetError as exc:
        text = str(exc)
        if text.startswith("internal error"):
            outcome.fail("internal-error", text)
        elif outcome.refused is None:
            outcome.refused = text.split(":")[0]
        return None


def _check_valid(model: onnx.ModelProto, slim_model: onnx.ModelProto, outcome: Outcome) -> None:
    try:
        onnx.checker.check_model(slim_model, full_check=True)
    except Exception as exc:
        outcome.fail("checker", str(exc).splitlines()[0][:300])
    if interface(slim_model) != interface(model):
        outcome.fail("interface", f"{interface(model)} -> {interface(slim_model)}")
    for batch in (1, 3):
        feeds = _inputs(model, batch, seed=batch)
        try:
            got = _run(slim_model, feeds)
        except Exception as exc:
            outcome.fail("runtime", f"batch {batch}: {str(exc).splitlines()[0][:300]}")
            return
        want = _run(model, feeds)
        if [a.shape for a in got] != [a.shape for a in want]:
            outcome.fail("shape", f"batch {batch}: {[a.shape for a in want]} -> {[a.shape for a in got]}")


def _check_planted(case: FuzzCase, data, half, outcome: Outcome) -> None:
    if case.planted is None:
        return
    producer, _ = case.planted
    if producer not in {g.producer for g in half.groups}:
        return  # the tool does not prune this producer here (coupled or not provably safe)
    only = _slim(case.model, data, SlimConfig(keep_ratio=0.5, only=(producer,), batch_size=16), outcome)
    if only is None:
        outcome.fail("planted-differs", f"{producer}: refused with --only")
        return
    feeds = _inputs(case.model, 4, seed=11)
    err = _rel(_run(case.model, feeds)[0], _run(only.model, feeds)[0])
    if err >= 1e-4:
        outcome.fail("planted-differs", f"{producer}: relative error {err:.3g}")


def _check_torch(slim_model: onnx.ModelProto, outcome: Outcome) -> None:
    from onnx_thinet.pytorch.export import export_torch_model, load_exported, to_onnx

    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "slim.onnx"
        onnx.save(slim_model, path)
        try:
            exported = export_torch_model(slim_model, Path(tmp) / "torch", verify=True)
        except ThinetError as exc:
            text = str(exc).splitlines()[0]
            if "disagrees" in text:
                outcome.fail("torch-differs", text[:300])
            else:
                outcome.torch = f"unsupported: {text[:120]}"
            return
        module = load_exported(exported.model_py)
        try:
            back = onnx.load(to_onnx(module, path, Path(tmp) / "back.onnx"))
        except ThinetError as exc:
            outcome.fail("to-onnx", str(exc).splitlines()[0][:300])
            return
        feeds = _inputs(slim_model, 2, seed=7)
        err = _rel(_run(slim_model, feeds)[0], _run(back, feeds)[0])
        if err >= 1e-5:
            outcome.fail("torch-differs", f"to_onnx relative error {err:.3g}")
        outcome.torch = "ok"
