"""Knowledge distillation pieces shared by `finetune` and the layer-by-layer schedule.

Why one module: both fine-tuning entry points train the same way (the teacher in
onnxruntime, KL divergence on temperature-softened outputs plus cross-entropy when labels
exist, Adam with a cosine learning rate); they differ only in where the student comes
from and where the weights go. The training loop lives in `training.py`.
"""

from __future__ import annotations

import logging
import math
from pathlib import Path
from typing import Any

import numpy as np
import onnx

from onnx_thinet.check.measure import max_relative_error
from onnx_thinet.errors import InternalError, ThinetError
from onnx_thinet.io.data import read_npy, read_npz
from onnx_thinet.io.graph import graph_inputs, load_model, tensor_shape

__all__ = [
    "Teacher",
    "TeacherOutputs",
    "check_layout",
    "is_prob",
    "kd_loss",
    "load_data",
    "logits_of",
    "module_error",
    "probe_loss",
    "resolve_device",
    "verify_module",
]

logger = logging.getLogger(__name__)

TEACHER_CACHE_BYTES = 256 << 20  # teacher outputs remembered per sample, at most


# ---------------------------------------------------------------- data


def load_data(path: str | Path) -> tuple[np.ndarray, np.ndarray | None]:
    """Read ``.npz`` (x and optional int y) or ``.npy`` (x only) as float32 inputs."""
    p = Path(path)
    if not p.is_file():
        raise ThinetError(f"data file not found: {p}")
    if p.suffix == ".npz":
        arrays = read_npz(p, required=("x",))
        x, y = arrays["x"], arrays.get("y")
    elif p.suffix == ".npy":
        x, y = np.array(read_npy(p)), None  # in memory: training slices it often
    else:
        raise ThinetError(f"data must be a .npz (x, optional y) or .npy file, got {p.name}")
    if x.dtype.kind not in "fiu" or x.ndim < 1 or len(x) == 0:
        raise ThinetError(f"data x must be a non-empty numeric array, got {x.dtype} {x.shape}")
    x = np.ascontiguousarray(x, dtype=np.float32)
    if y is not None:
        if y.ndim != 1 or len(y) != len(x):
            raise ThinetError(f"labels y must be 1-D with {len(x)} entries, got shape {y.shape}")
        if y.dtype.kind not in "iu" and not (y.dtype.kind == "f" and np.all(y == np.round(y))):
            raise ThinetError(f"labels y must be integers, got {y.dtype}")
        y = y.astype(np.int64)
    return x, y


def check_layout(x: np.ndarray, model: onnx.ModelProto, role: str) -> str:
    """The data must fit the model's single input; returns that input's name."""
    inputs = graph_inputs(model)
    if len(inputs) != 1:
        raise ThinetError(f"fine-tuning needs a single-input model; the {role} has {len(inputs)}")
    vi = inputs[0]
    dims = tensor_shape(vi)
    if dims is not None:
        want = "[" + ", ".join(str(d) if d is not None else "?" for d in dims) + "]"
        bad = len(dims) != x.ndim or any(
            isinstance(d, int) and d != s for d, s in zip(dims[1:], x.shape[1:], strict=False)
        )
        if bad:
            raise ThinetError(
                f"data x has shape {list(x.shape)} but the {role} input '{vi.name}' expects {want}"
            )
    return vi.name


# ---------------------------------------------------------------- teacher


class Teacher:
    """A model (file or in-memory) in onnxruntime; runs in chunks if its batch dim is fixed."""

    def __init__(
        self, source: Path | onnx.ModelProto, x_example: np.ndarray, role: str = "teacher"
    ) -> None:
        import onnxruntime as ort

        self.role = role
        if isinstance(source, onnx.ModelProto):
            model, where, feed = source, f"the {role}", source.SerializeToString()
        else:
            model, where, feed = load_model(source), f"the {role} {source}", str(source)
        self.name = check_layout(x_example, model, role)
        dims = tensor_shape(graph_inputs(model)[0])
        self.fixed = dims[0] if dims and isinstance(dims[0], int) else None
        try:
            self.sess = ort.InferenceSession(feed, providers=["CPUExecutionProvider"])
        except Exception as exc:  # onnxruntime raises its own types for unsupported graphs
            raise ThinetError(f"onnxruntime cannot load {where}: {exc}") from exc

    def __call__(self, xb: np.ndarray) -> list[np.ndarray]:
        try:
            return self._run(xb)
        except Exception as exc:  # an onnxruntime failure on the user's model and data
            raise ThinetError(f"the {self.role} failed on a data batch: {exc}") from exc

    def _run(self, xb: np.ndarray) -> list[np.ndarray]:
        if self.fixed is None:
            return self.sess.run(None, {self.name: xb})
        parts: list[list[np.ndarray]] = []
        for i in range(0, len(xb), self.fixed):
            chunk = xb[i : i + self.fixed]
            pad = self.fixed - len(chunk)
            if pad:
                chunk = np.concatenate([chunk, np.repeat(chunk[-1:], pad, axis=0)])
            parts.append([o[: self.fixed - pad] for o in self.sess.run(None, {self.name: chunk})])
        return [np.concatenate(outs, axis=0) for outs in zip(*parts, strict=True)]


class TeacherOutputs:
    """Teacher outputs per data sample, computed on first use and then remembered.

    Un-augmented samples need the teacher once each, however many epochs (or schedule
    passes) read them. Outputs too large to keep (dense predictions on big data,
    over TEACHER_CACHE_BYTES) are recomputed instead.
    """

    def __init__(self, teacher: Teacher, x: np.ndarray, chunk: int = 64) -> None:
        self.teacher, self.x, self.chunk = teacher, x, chunk
        self.outs: list[np.ndarray] | None = None
        self.have = np.zeros(len(x), dtype=bool)
        self.cacheable = True

    def __call__(self, idx: np.ndarray) -> list[np.ndarray]:
        if not self.cacheable:
            return self._run(idx)
        if self.outs is None:
            res = self._run(idx)
            per_sample = sum(o[:1].nbytes for o in res)
            if not all(o.ndim and len(o) == len(idx) for o in res) or (
                per_sample * len(self.x) > TEACHER_CACHE_BYTES
            ):
                self.cacheable = False
                return res
            self.outs = [np.empty((len(self.x), *o.shape[1:]), o.dtype) for o in res]
            self._store(idx, res)
            return res
        missing = idx[~self.have[idx]]
        if len(missing):
            self._store(missing, self._run(missing))
        return [o[idx] for o in self.outs]

    def _run(self, idx: np.ndarray) -> list[np.ndarray]:
        """The teacher on x[idx], at most `chunk` samples per onnxruntime run."""
        parts = [
            self.teacher(self.x[idx[i : i + self.chunk]]) for i in range(0, len(idx), self.chunk)
        ]
        if len(parts) == 1:
            return parts[0]
        return [np.concatenate(p, axis=0) for p in zip(*parts, strict=True)]

    def _store(self, idx: np.ndarray, res: list[np.ndarray]) -> None:
        if self.outs is None:
            raise InternalError("teacher outputs stored before they were allocated")
        for dst, src in zip(self.outs, res, strict=True):
            dst[idx] = src
        self.have[idx] = True


# ---------------------------------------------------------------- loss


def is_prob(t: Any) -> bool:
    """Outputs that already went through a softmax (rows >= 0 summing to 1)."""
    if t.dim() < 2 or t.shape[1] < 2 or bool((t < 0).any()):
        return False
    return bool(((t.sum(1) - 1.0).abs() < 1e-3).all())


def logits_of(torch: Any, out: Any, prob: bool) -> Any:
    """Logits of an output: log of probabilities when the model ends in a softmax."""
    return torch.log(out.clamp_min(1e-12)) if prob else out


def kd_loss(torch: Any, student: list[Any], teacher: list[Any], temperature: float) -> Any:
    """KL(teacher || student) on temperature-softened outputs (dim 1), scaled by T^2.

    Outputs without a class dim (rank < 2) fall back to mean squared error; outputs
    that are already probabilities are softened through their logarithm.
    """
    F = torch.nn.functional
    total = 0.0
    for s, t in zip(student, teacher, strict=False):
        if s.shape != t.shape:
            raise ThinetError(
                f"student output shape {list(s.shape)} differs from teacher {list(t.shape)}"
            )
        if s.dim() >= 2 and s.shape[1] > 1:
            prob = is_prob(t)
            log_p = F.log_softmax(logits_of(torch, s, prob) / temperature, dim=1)
            q = F.softmax(logits_of(torch, t, prob) / temperature, dim=1)
            kl = F.kl_div(log_p, q, reduction="sum") / s.shape[0]
            if s.dim() > 2:
                kl = kl / math.prod(s.shape[2:])
            total = total + kl * temperature**2
        else:
            total = total + F.mse_loss(s, t)
    return total


def as_outputs(torch: Any, out: Any) -> list[Any]:
    """A module's result as a list of tensors (one output or a tuple of them)."""
    return [out] if isinstance(out, torch.Tensor) else list(out)


def probe_loss(
    torch: Any,
    module: Any,
    xs: np.ndarray,
    ts: list[np.ndarray],
    ys: np.ndarray | None,
    temperature: float,
    device: Any,
    chunk: int,
) -> float:
    """The training objective (distillation, + cross-entropy with labels) on a fixed probe
    set, in eval mode and in chunks (bounded memory on big models)."""
    F = torch.nn.functional
    was = module.training
    module.eval()
    total = 0.0
    with torch.no_grad():
        for i in range(0, len(xs), chunk):
            out = as_outputs(torch, module(torch.from_numpy(xs[i : i + chunk]).to(device)))
            teach = [torch.from_numpy(np.asarray(t[i : i + chunk])).to(device) for t in ts]
            loss = float(kd_loss(torch, out, teach, temperature))
            if ys is not None and out[0].dim() == 2:
                labels = torch.from_numpy(ys[i : i + chunk]).to(device)
                if int(labels.max()) < out[0].shape[1] and int(labels.min()) >= 0:
                    logits = logits_of(torch, out[0], is_prob(teach[0]))
                    loss += float(F.cross_entropy(logits, labels))
            total += loss * len(out[0])
    module.train(was)
    return total / len(xs)


# ---------------------------------------------------------------- device and checks


def resolve_device(torch: Any, device: str) -> Any:
    """'auto' (CUDA when torch sees a GPU), 'cpu', 'cuda' or 'cuda:N'; CUDA must be there."""
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise ThinetError(
            "CUDA is not available (torch.cuda.is_available() is False); use device cpu",
            params=("device",),
        )
    try:
        return torch.device(device)
    except (RuntimeError, ValueError) as exc:
        raise ThinetError(
            f"unknown device '{device}' (use auto, cpu or cuda)", params=("device",)
        ) from exc


def module_error(torch: Any, module: Any, xs: np.ndarray, got: list[np.ndarray]) -> float:
    """Largest max-relative error between the module's outputs on `xs` and `got`."""
    with torch.no_grad():
        ref = as_outputs(torch, module(torch.from_numpy(xs)))
    return max(
        (max_relative_error(r.numpy(), g) for r, g in zip(ref, got, strict=False)), default=0.0
    )


def verify_module(
    torch: Any, module: Any | None, model: Path | onnx.ModelProto, xs: np.ndarray
) -> None:
    """onnxruntime must run the fine-tuned model to finite outputs that (when `module` is
    given) agree with the trained module within 1e-3; disagreement is a bug of ours."""
    got = Teacher(model, xs, role="fine-tuned model")(xs)
    if not all(np.all(np.isfinite(g)) for g in got if g.dtype.kind == "f"):
        raise ThinetError("the fine-tuned model produces NaN/inf")
    if module is None:
        return
    err = module_error(torch, module, xs, got)
    if err > 1e-3:
        raise InternalError(
            f"the fine-tuned model disagrees with the trained module (rel. error {err:.1e})"
        )
