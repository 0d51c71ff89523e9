"""In-graph fine-tuning for the layer-by-layer schedule: new weights, the very same graph.

Why: the pruning pipeline finds layers by node and initializer name, so after each pass
it needs its own graph back with tuned values. The student is exported to a PyTorch
module that records where each parameter came from, trained with the shared loop, and
the values are written back with the inverse layout into the student's initializers.
"""

from __future__ import annotations

import hashlib
import logging
import math
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import onnx
from onnx import numpy_helper

from onnx_thinet.errors import InternalError, ThinetError
from onnx_thinet.pytorch import distill
from onnx_thinet.pytorch.distill import TeacherOutputs, probe_loss
from onnx_thinet.pytorch.export import InitSource, export_torch_model, load_exported, require_torch
from onnx_thinet.pytorch.training import Schedule, cycled_batches, train

__all__ = ["DEFAULT_GRAPH_LR", "TeacherCache", "finetune_graph"]

logger = logging.getLogger(__name__)

DEFAULT_GRAPH_LR = 3e-4  # Adam, cosine-decayed over the steps of one call
_PROBE = 256  # samples on which the loss is measured before and after


class TeacherCache:
    """Data and teacher outputs shared by the fine-tunes of one schedule, owned by its caller.

    Pass the same cache to every `finetune_graph` call of a run (slim does, one per run) so
    the data is read and the teacher run over each sample once; drop it and all is freed.
    """

    def __init__(self) -> None:
        self.key: str | None = None
        self.x: np.ndarray | None = None
        self.y: np.ndarray | None = None
        self.outputs: TeacherOutputs | None = None

    def get(
        self, teacher: onnx.ModelProto, data_path: str | Path
    ) -> tuple[np.ndarray, np.ndarray | None, TeacherOutputs]:
        """(x, y, teacher outputs) for this teacher and data file; reused while both are
        unchanged (teacher bytes, data path, size and modification time)."""
        p = Path(data_path)
        if not p.is_file():
            raise ThinetError(f"data file not found: {p}")
        st = p.stat()
        try:
            blob = teacher.SerializeToString()
        except ValueError as exc:  # over 2 GB, or external data not loaded
            raise ThinetError(f"cannot serialize the teacher model: {exc}") from exc
        key = "|".join(
            (hashlib.sha256(blob).hexdigest(), str(p.resolve()), str(st.st_mtime_ns), str(st.st_size))
        )
        if self.key != key or self.outputs is None or self.x is None:
            self.x, self.y = distill.load_data(p)
            self.outputs = TeacherOutputs(distill.Teacher(teacher, self.x), self.x)
            self.key = key
        return self.x, self.y, self.outputs


@dataclass(frozen=True)
class _Probe:
    """The fixed set on which the loss is measured before and after training."""

    x: np.ndarray
    targets: list[np.ndarray]
    y: np.ndarray | None
    chunk: int

    @classmethod
    def first(cls, x: np.ndarray, y: np.ndarray | None, targets: TeacherOutputs, chunk: int) -> _Probe:
        """The first _PROBE samples (all when there are fewer)."""
        idx = np.arange(min(len(x), _PROBE))
        return cls(x[idx], targets(idx), None if y is None else y[idx], chunk)

    def loss(self, torch: Any, module: Any, temperature: float, device: Any) -> float:
        return probe_loss(torch, module, self.x, self.targets, self.y, temperature, device, self.chunk)


def finetune_graph(
    model: onnx.ModelProto,
    teacher: onnx.ModelProto,
    data_path: str | Path,
    steps: int,
    *,
    seed: int = 0,
    device: str = "auto",
    lr: float | None = None,
    batch_size: int = 64,
    temperature: float = 4.0,
    freeze_bn: bool = True,
    cache: TeacherCache | None = None,
) -> onnx.ModelProto:
    """Fine-tune ``model`` for ``steps`` optimizer steps in place of its own graph.

    The paper's layer-by-layer schedule: after a pruning pass, a short distillation from
    the original ``teacher`` before the next layer, with ``finetune()``'s loss and data.
    ``lr`` defaults to DEFAULT_GRAPH_LR (3e-4: on Fashion-MNIST VGG, keep 0.4, 20 steps per
    pass, 1e-3 raised the loss, 1e-4 recovered less); vary ``seed`` per pass to see more data.
    Returns a copy whose graph is unchanged: only float initializer values change (tensors
    without a one-to-one initializer stay frozen). ``freeze_bn`` keeps BatchNorm in eval
    mode. A tuning that raises the probe loss (first 256 samples) is discarded with a
    warning; ``steps=0`` still does the round trip. ``cache``: a TeacherCache shared by the
    calls of one schedule (None: nothing outlives the call).
    """
    torch = require_torch()
    lr = _check_arguments(model, teacher, steps, lr, batch_size, temperature)
    dev = distill.resolve_device(torch, device)
    x, y, targets = (cache or TeacherCache()).get(teacher, data_path)
    distill.check_layout(x, model, "student")
    t0 = time.perf_counter()
    out = onnx.ModelProto()
    out.CopyFrom(model)
    module, mapping, trainable = _export_student(out)
    module.to(dev)
    probe = _Probe.first(x, y, targets, chunk=max(1, min(batch_size, 64)))
    initial = final = probe.loss(torch, module, temperature, dev)
    steps = int(steps)
    if steps and trainable:
        torch.manual_seed(seed)
        _set_train_mode(torch, module, freeze_bn)
        train(torch, module, torch.optim.Adam(trainable, lr=lr), cycled_batches(len(x), batch_size, seed),
              lambda b: (torch.from_numpy(x[b.samples]), targets(b.samples)), y,
              Schedule(lr, steps, temperature, dev))
        final = probe.loss(torch, module, temperature, dev)
    elif steps:
        logger.warning("nothing to fine-tune: no parameter maps onto an initializer")
    module.cpu().eval()
    updated = _write_back(module, mapping, out, initial, final)
    diff = _structure_diff(model, out)
    if diff is not None:
        raise InternalError(f"fine-tuning changed the graph's {diff}")
    distill.verify_module(torch, module if updated else None, out, probe.x[:8])
    logger.info(
        "fine-tuned %d steps in %.1fs: probe loss %.4g -> %.4g, %d of %d initializers updated",
        steps, time.perf_counter() - t0, initial, final, updated, len(mapping),
    )
    return out


def _check_arguments(
    model: Any, teacher: Any, steps: Any, lr: float | None, batch_size: int, temperature: float
) -> float:
    """Refuse bad arguments; return the learning rate to use."""
    if not isinstance(model, onnx.ModelProto) or not isinstance(teacher, onnx.ModelProto):
        raise ThinetError("finetune_graph needs onnx.ModelProto student and teacher")
    if isinstance(steps, bool) or not isinstance(steps, (int, np.integer)) or steps < 0:
        raise ThinetError(f"steps must be a non-negative integer, got {steps!r}", params=("steps",))
    lr = DEFAULT_GRAPH_LR if lr is None else float(lr)
    if not math.isfinite(lr) or lr < 0:
        raise ThinetError(f"learning rate lr must be >= 0, got {lr}", params=("lr",))
    if batch_size < 1 or temperature <= 0:
        raise ThinetError("batch_size and temperature must be positive",
                          params=("batch_size", "temperature"))
    return lr


def _export_student(model: onnx.ModelProto) -> tuple[Any, dict[str, InitSource], list[Any]]:
    """The student as a module, its parameter -> initializer map, and the trainable
    parameters (those with a one-to-one initializer; the others are frozen)."""
    with tempfile.TemporaryDirectory(prefix="onnx_thinet_ftg_") as tmp:
        exported = export_torch_model(model, tmp, source="student.onnx")
        module = load_exported(exported.model_py)
    mapping = exported.initializers
    trainable = []
    for name, p in module.named_parameters():
        if name in mapping:
            trainable.append(p)
        else:
            p.requires_grad_(False)
    frozen = [n for n, _ in module.named_parameters() if n not in mapping]
    if frozen:
        logger.info("frozen (no one-to-one initializer): %s", ", ".join(frozen))
    return module, mapping, trainable


def _set_train_mode(torch: Any, module: Any, freeze_bn: bool) -> None:
    """Training mode, with BatchNorm layers kept in eval mode when freeze_bn."""
    module.train()
    if freeze_bn:
        for m in module.modules():
            if isinstance(m, torch.nn.modules.batchnorm._BatchNorm):
                m.eval()


def _write_back(
    module: Any, mapping: dict[str, InitSource], out: onnx.ModelProto, initial: float, final: float
) -> int:
    """Trained values into `out`'s initializers (unless the probe loss rose); how many changed."""
    if final > initial:
        logger.warning(
            "fine-tuning raised the probe loss (%.4g -> %.4g); keeping the weights "
            "as they were (try a lower learning rate)", initial, final,
        )
        return 0
    updated = 0
    state = module.state_dict()
    inits = {t.name: t for t in out.graph.initializer}
    for key, src in mapping.items():
        tensor = inits[src.initializer]
        old = _init_array(tensor)
        new = _to_initializer(state[key].detach().numpy(), src, old.shape, old.dtype)
        if new.tobytes() != old.tobytes():
            _set_initializer(tensor, new)
            updated += 1
    return updated


def _init_array(tensor: onnx.TensorProto) -> np.ndarray:
    """An initializer's values (its data must be loaded)."""
    try:
        return numpy_helper.to_array(tensor)
    except Exception as exc:  # numpy_helper raises several types for unloaded external data
        raise ThinetError(
            f"cannot read initializer '{tensor.name}' (external data not loaded?): {exc}"
        ) from exc


def _to_initializer(
    value: np.ndarray, src: InitSource, shape: tuple[int, ...], dtype: Any
) -> np.ndarray:
    """Inverse of the export layout: divide the scale, transpose back, reshape, recast."""
    arr = value
    if src.scale != 1.0:
        arr = arr.astype(np.float64) / src.scale
    if src.transpose:
        if arr.ndim != 2:
            raise InternalError(f"transposed parameter for '{src.initializer}' is not 2-D")
        arr = arr.T
    if arr.size != math.prod(shape):
        raise InternalError(
            f"parameter for initializer '{src.initializer}' has {arr.size} "
            f"values, the initializer {list(shape)}"
        )
    return np.ascontiguousarray(arr.reshape(shape).astype(dtype, copy=False))


def _set_initializer(tensor: onnx.TensorProto, arr: np.ndarray) -> None:
    """Replace an initializer's values in place, keeping its name, dims, type and doc."""
    doc = tensor.doc_string
    tensor.CopyFrom(numpy_helper.from_array(arr, tensor.name))
    tensor.doc_string = doc


def _structure_diff(a: onnx.ModelProto, b: onnx.ModelProto) -> str | None:
    """What differs between two models apart from initializer values (None: nothing)."""

    def ser(items: Any) -> list[bytes]:
        return [i.SerializeToString(deterministic=True) for i in items]

    ga, gb = a.graph, b.graph
    if [n.name for n in ga.node] != [n.name for n in gb.node]:
        return "node names"
    if ser(ga.node) != ser(gb.node):
        return "nodes (ops, inputs, outputs or attributes)"
    ia = [(t.name, tuple(t.dims), t.data_type) for t in ga.initializer]
    ib = [(t.name, tuple(t.dims), t.data_type) for t in gb.initializer]
    if ia != ib:
        return "initializer names, shapes or types"
    for what in ("input", "output", "value_info", "sparse_initializer"):
        if ser(getattr(ga, what)) != ser(getattr(gb, what)):
            return f"graph {what}"
    if ser(a.opset_import) != ser(b.opset_import) or a.ir_version != b.ir_version:
        return "opset or IR version"
    return None
