"""ONNX -> readable PyTorch module, and a (fine-tuned) module back to ONNX.

Why: a pruned ONNX model usually needs fine-tuning, and training needs a framework.
``export_torch`` writes a plain ``nn.Module`` source file (``model.py``) and its
weights (``weights.pt``) that a person can read, edit and train; ``to_onnx`` brings
the trained module back with the reference model's input/output names, opset and
dynamic axes, so the rest of the toolchain sees the same interface. The translation
itself lives in ``onnx_thinet.pytorch.codegen`` and the op registry (``onnx_thinet.ops``).

torch is optional: it is imported inside the functions that need it.
"""

from __future__ import annotations

import hashlib
import importlib.util
import logging
import shutil
import tempfile
import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import onnx
from onnx import TensorProto

from onnx_thinet.check.measure import max_relative_error
from onnx_thinet.errors import InternalError, ThinetError
from onnx_thinet.io.feeds import dummy_feeds
from onnx_thinet.io.files import atomic_write
from onnx_thinet.io.graph import graph_inputs, load_model, opset_version
from onnx_thinet.ops import translatable_ops
from onnx_thinet.pytorch.codegen import Codegen, InitSource
from onnx_thinet.pytorch.render import render
from onnx_thinet.pytorch.source import vi_dims

__all__ = [
    "SUPPORTED_OPS",
    "TORCH_REQUIRED_MESSAGE",
    "InitSource",
    "TorchExport",
    "export_torch",
    "export_torch_model",
    "load_exported",
    "require_torch",
    "to_onnx",
]

logger = logging.getLogger(__name__)

TORCH_REQUIRED_MESSAGE = (
    "PyTorch is required for this command: pip install 'onnx-thinet[torch]' (or pip install torch)"
)

_EXPORTER_MIN_OPSET = 11
_EXPORTER_MAX_OPSET = 20  # the TorchScript exporter (dynamo=False) stops at 20
_VERIFY_TOL = 1e-4

SUPPORTED_OPS: tuple[str, ...] = tuple(translatable_ops())



def require_torch() -> Any:
    """Import torch lazily so the rest of onnx-thinet works without it."""
    try:
        import torch
    except (ImportError, OSError) as exc:
        raise ThinetError(TORCH_REQUIRED_MESSAGE) from exc
    return torch


@dataclass(frozen=True)
class TorchExport:
    """What ``export_torch_model`` wrote, plus the parameter -> initializer map.

    ``initializers`` only holds tensors whose values can be written back exactly: one
    state-dict key per initializer, never an initializer also consumed by a node
    that was constant-folded at export time (that copy would not follow the training).
    """

    model_py: Path
    initializers: dict[str, InitSource]


def export_torch(onnx_path: str | Path, out_dir: str | Path, *, verify: bool = True) -> Path:
    """Write DIR/model.py (readable nn.Module) and DIR/weights.pt; return the model.py path.

    With ``verify`` the generated module is first run against onnxruntime on a dummy batch;
    if they differ nothing is written and the measured error is raised.
    """
    src = Path(onnx_path)
    return export_torch_model(load_model(src), out_dir, source=src.name, verify=verify).model_py


def export_torch_model(
    model: onnx.ModelProto,
    out_dir: str | Path,
    *,
    source: str = "model.onnx",
    verify: bool = True,
) -> TorchExport:
    """``export_torch`` for an in-memory model; also returns the parameter -> initializer map.

    ``source`` is the file name the generated docstrings mention. The model is not modified.
    The files are written to a scratch directory, checked there (``verify``), and only then
    moved into ``out_dir``: a refused export leaves ``out_dir`` as it was.
    """
    torch = require_torch()
    if not model.graph.node:
        raise ThinetError(f"{source} has an empty graph")
    out = Path(out_dir)
    if out.exists() and not out.is_dir():
        raise ThinetError(f"output must be a directory: {out} is a file", params=("output",))
    gen = Codegen(model, set(dir(torch.nn.Module)) | {"Model"})
    gen.run()
    text = render(gen, source)
    state = {k: torch.from_numpy(np.array(v, copy=True)) for k, v in gen.state.items()}
    near = out.parent if out.parent.is_dir() else None  # same file system: moves are renames
    scratch = Path(tempfile.mkdtemp(prefix=".export-torch.", dir=near))
    try:
        torch.save(state, str(scratch / "weights.pt"))
        (scratch / "model.py").write_text(text, encoding="utf-8")
        if verify:
            _verify_export(model, scratch / "model.py")
        out.mkdir(parents=True, exist_ok=True)
        for name in ("weights.pt", "model.py"):
            shutil.move(str(scratch / name), str(out / name))
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    logger.info("wrote %s (%d layers/params) and weights.pt", out / "model.py", len(gen.init_lines))
    return TorchExport(out / "model.py", gen.initializer_sources())


def load_exported(model_py: str | Path) -> Any:
    """Import a generated model.py by path (no sys.path change) and return its load() module."""
    require_torch()
    path = Path(model_py)
    if path.is_dir():
        path = path / "model.py"
    if not path.is_file():
        raise ThinetError(f"generated model not found: {path}")
    digest = hashlib.sha1(str(path.resolve()).encode()).hexdigest()[:12]
    spec = importlib.util.spec_from_file_location(f"_onnx_thinet_model_{digest}", path)
    if spec is None or spec.loader is None:
        raise ThinetError(f"cannot import {path}")
    mod = importlib.util.module_from_spec(spec)
    try:
        spec.loader.exec_module(mod)
        return mod.load()
    except ThinetError:
        raise
    except Exception as exc:
        raise ThinetError(f"cannot load {path}: {type(exc).__name__}: {exc}") from exc


def _reference_run(model: onnx.ModelProto) -> tuple[dict[str, np.ndarray], list[np.ndarray]]:
    """onnxruntime's outputs on a dummy batch of 2, or of 1 for graphs that bake in batch 1."""
    import onnxruntime as ort

    try:
        sess = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    except Exception as exc:
        raise ThinetError(f"onnxruntime cannot load the model ({exc}); nothing was written") from exc
    error: Exception | None = None
    for batch in (2, 1):
        feeds = dummy_feeds(model, batch)
        try:
            return feeds, sess.run(None, feeds)
        except Exception as exc:
            error = exc
    raise ThinetError(
        f"onnxruntime cannot run the model on a dummy input ({error}), so the generated "
        "module cannot be checked; nothing was written"
    ) from error


def _verify_export(model: onnx.ModelProto, model_py: Path, tol: float = _VERIFY_TOL) -> None:
    """Compare the generated module with onnxruntime on the model's dummy input (io's rule for
    symbolic dims); raise InternalError if they differ by more than `tol` (relative) or the
    module cannot run (a translation bug), ThinetError if onnxruntime cannot run the model."""
    torch = require_torch()
    feeds, ref = _reference_run(model)
    module = load_exported(model_py)
    try:
        with torch.no_grad():
            got = module(*[torch.from_numpy(v) for v in feeds.values()])
    except Exception as exc:
        raise InternalError(
            f"the generated module fails on a dummy input ({type(exc).__name__}: {exc}); "
            "nothing was written; please report this as an onnx-thinet bug"
        ) from exc
    got = [got] if isinstance(got, torch.Tensor) else list(got)
    for name, r, t in zip([o.name for o in model.graph.output], ref, got, strict=False):
        err = max_relative_error(r, t.numpy())
        if err > tol:
            raise InternalError(
                f"the generated module disagrees with onnxruntime on output '{name}' "
                f"(relative error {err:.2e} > {tol:.0e}); nothing was written; "
                "please report this as an onnx-thinet bug"
            )
    logger.info("export check passed on %d output(s)", len(ref))


# ---------------------------------------------------------------- back to ONNX

_TORCH_FROM_ONNX = {
    TensorProto.FLOAT: "float32",
    TensorProto.DOUBLE: "float64",
    TensorProto.FLOAT16: "float16",
    TensorProto.INT64: "int64",
    TensorProto.INT32: "int32",
    TensorProto.UINT8: "uint8",
    TensorProto.INT8: "int8",
    TensorProto.BOOL: "bool",
}


def _dummy_inputs(torch: Any, ref: onnx.ModelProto, device: Any) -> tuple[Any, ...]:
    """Example inputs for tracing: reference shapes, symbolic batch -> 2, other symbolic -> 32."""
    out = []
    for vi in graph_inputs(ref.graph):
        dims = vi_dims(vi)
        if dims is None:
            raise ThinetError(f"reference input '{vi.name}' has no shape; pass example_inputs")
        shape = [d if isinstance(d, int) else (2 if i == 0 else 32) for i, d in enumerate(dims)]
        if any(not isinstance(d, int) for d in dims[1:]):
            logger.warning("input '%s' has symbolic non-batch dims; tracing with 32", vi.name)
        dtype = getattr(torch, _TORCH_FROM_ONNX.get(vi.type.tensor_type.elem_type, "float32"))
        if dtype.is_floating_point:
            out.append(torch.randn(*shape, dtype=dtype, device=device))
        else:
            out.append(torch.zeros(*shape, dtype=dtype, device=device))
    return tuple(out)


def _fit_batch(example: Any, vi: onnx.ValueInfoProto) -> Any:
    """Trim/repeat an example to the reference's static batch: tracing bakes it in."""
    dims = vi_dims(vi)
    if not dims or not isinstance(dims[0], int) or example.dim() == 0:
        return example
    want = dims[0]
    if example.shape[0] < want:
        reps = -(-want // example.shape[0])
        example = example.repeat(reps, *([1] * (example.dim() - 1)))
    return example[:want]


def _dynamic_axes(ref: onnx.ModelProto) -> dict[str, dict[int, str]]:
    """Dims that are symbolic or unknown in the reference inputs/outputs stay dynamic."""
    axes: dict[str, dict[int, str]] = {}
    for vi in list(graph_inputs(ref.graph)) + list(ref.graph.output):
        dims = vi_dims(vi)
        if not dims:
            continue
        dyn = {
            i: (d if isinstance(d, str) else f"{vi.name}_dim{i}")
            for i, d in enumerate(dims)
            if not isinstance(d, int)
        }
        if dyn:
            axes[vi.name] = dyn
    return axes


def to_onnx(
    module: Any,
    reference_onnx: str | Path,
    output_path: str | Path,
    *,
    example_inputs: Sequence[Any] | None = None,
) -> Path:
    """Export a (fine-tuned) module to ONNX with the reference's names, opset and dynamic axes.

    Input and output names are the reference's verbatim, whatever they are ('4195',
    'input.1'): the module is traced under placeholder names that are renamed afterwards.
    The file is written atomically (temp file + rename) so a failed export never leaves
    a half-written model behind.
    """
    torch = require_torch()
    ref = load_model(reference_onnx)
    in_names = [vi.name for vi in graph_inputs(ref.graph)]
    args = _example_args(torch, module, ref, example_inputs)
    if len(args) != len(in_names):
        raise ThinetError(f"the reference model has {len(in_names)} inputs, got {len(args)} examples")
    out = Path(output_path)
    out.parent.mkdir(parents=True, exist_ok=True)
    was_training = module.training
    module.eval()
    try:
        atomic_write(out, lambda tmp: _export_renamed(torch, module, args, ref, tmp))
    except ThinetError:
        raise
    except Exception as exc:
        raise ThinetError(f"PyTorch could not export the module to ONNX: {exc}") from exc
    finally:
        module.train(was_training)
    logger.info("wrote %s (opset %d)", out, _export_opset(ref))
    return out


def _export_opset(ref: onnx.ModelProto) -> int:
    return min(max(opset_version(ref), _EXPORTER_MIN_OPSET), _EXPORTER_MAX_OPSET)


def _example_args(torch: Any, module: Any, ref: onnx.ModelProto, examples: Sequence[Any] | None) -> tuple:
    """Tracing inputs on the module's device: the caller's examples, or dummies."""
    try:
        device = next(iter(module.parameters())).device
    except StopIteration:
        device = torch.device("cpu")
    if examples is None:
        return _dummy_inputs(torch, ref, device)
    return tuple(
        _fit_batch(torch.as_tensor(a).to(device), vi)
        for a, vi in zip(examples, graph_inputs(ref.graph), strict=False)
    )


def _export_renamed(torch: Any, module: Any, args: tuple, ref: onnx.ModelProto, path: Path) -> None:
    """Trace under placeholder names, then give inputs and outputs the reference's names."""
    in_names = [vi.name for vi in graph_inputs(ref.graph)]
    out_names = [o.name for o in ref.graph.output]
    names = {f"onnx_thinet_input_{i}": n for i, n in enumerate(in_names)}
    names.update({f"onnx_thinet_output_{i}": n for i, n in enumerate(out_names)})
    placeholder = {n: p for p, n in names.items()}
    dynamic = {placeholder[name]: axes for name, axes in _dynamic_axes(ref).items()}
    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore")
        torch.onnx.export(
            module, args, str(path), dynamo=False, opset_version=_export_opset(ref),
            input_names=list(names)[: len(in_names)], output_names=list(names)[len(in_names) :],
            dynamic_axes=dynamic, do_constant_folding=True,
        )
    exported = onnx.load(str(path))
    _rename_values(exported.graph, names)
    got = [o.name for o in exported.graph.output]
    if got != out_names:
        raise ThinetError(f"exported outputs {got} do not match the reference's {out_names}")
    onnx.checker.check_model(exported)
    onnx.save(exported, str(path))


def _rename_values(graph: onnx.GraphProto, names: dict[str, str]) -> None:
    """Rename values everywhere in `graph`; an internal value already using a target name is
    moved aside first (PyTorch numbers its values, so '4195' may be taken)."""
    taken = {n for node in graph.node for n in (*node.input, *node.output)}
    taken |= {t.name for t in graph.initializer} | {v.name for v in graph.value_info}
    full = dict(names)
    for name in set(names.values()) & taken - set(names):
        fresh, k = f"{name}_internal", 2
        while fresh in taken or fresh in full.values():
            fresh, k = f"{name}_internal{k}", k + 1
        full[name] = fresh
    for node in graph.node:
        node.input[:] = [full.get(n, n) for n in node.input]
        node.output[:] = [full.get(n, n) for n in node.output]
    for value in (*graph.input, *graph.output, *graph.value_info, *graph.initializer):
        value.name = full.get(value.name, value.name)
