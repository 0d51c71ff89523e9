"""Knowledge-distillation fine-tuning of a pruned ONNX model against its original.

Why: pruning removes filters and costs accuracy; a short distillation run from the
unpruned model (the teacher, run in onnxruntime) recovers most of it without needing
labels. The student ONNX is exported to a readable PyTorch module (torch_export),
trained with KL divergence on temperature-softened outputs (plus cross-entropy when
labels exist), checkpointed every epoch so it can resume, and exported back to ONNX
with the student's names, opset and dynamic axes, then verified.
"""

from __future__ import annotations

import hashlib
import logging
import math
import os
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import onnx

from .errors import ThinetError
from .torch_export import (
    _load_onnx,
    _real_inputs,
    _rel_err,
    _vi_dims,
    export_torch,
    load_exported,
    require_torch,
    to_onnx,
)

__all__ = ["FinetuneProgress", "FinetuneResult", "finetune", "load_data"]

logger = logging.getLogger(__name__)

CHECKPOINT_NAME = "finetune_checkpoint.pt"
_PROBE = 256  # samples used to measure the distillation loss before/after


@dataclass(frozen=True)
class FinetuneResult:
    """What a fine-tuning run did (for the CLI summary and for scripts)."""

    output: Path
    epochs: int  # epochs completed in total (including resumed ones)
    steps: int  # optimizer steps in total (including resumed ones)
    final_loss: float  # distillation loss on the probe set after training
    initial_loss: float  # same measure before training (student as given)
    train_loss: float  # mean training loss of the last steps run
    seconds: float  # training wall time of this invocation
    seconds_per_epoch: float  # training time per full epoch (estimated from steps)
    samples_per_second: float
    resumed_from_epoch: int = 0
    history: tuple[float, ...] = field(default_factory=tuple)  # mean train loss per epoch


@dataclass(frozen=True)
class FinetuneProgress:
    """Progress report passed to the ``progress`` callback after every step."""

    epoch: int  # 1-based
    epochs: int
    step: int  # steps done so far (global)
    total_steps: int
    loss: float
    lr: float
    samples_per_second: float
    epoch_done: bool = False


# ---------------------------------------------------------------- data


def load_data(path: str | Path) -> tuple[np.ndarray, np.ndarray | None]:
    """Read ``.npz`` (x and optional int y) or ``.npy`` (x only) as float32 inputs."""
    p = Path(path)
    if not p.is_file():
        raise ThinetError(f"data file not found: {p}")
    y = None
    try:
        if p.suffix == ".npz":
            with np.load(p, allow_pickle=False) as z:
                if "x" not in z.files:
                    raise ThinetError(
                        f"{p} has no array 'x' (found: {', '.join(z.files) or 'none'})"
                    )
                x = z["x"]
                y = z["y"] if "y" in z.files else None
        elif p.suffix == ".npy":
            x = np.load(p, allow_pickle=False)
        else:
            raise ThinetError(f"data must be a .npz (x, optional y) or .npy file, got {p.name}")
    except ThinetError:
        raise
    except Exception as exc:  # zipfile/pickle/format errors
        raise ThinetError(f"cannot read data {p}: {exc}") from exc
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


def _check_layout(x: np.ndarray, model: onnx.ModelProto, role: str) -> str:
    """The data must fit the model's single input; returns that input's name."""
    inputs = _real_inputs(model.graph)
    if len(inputs) != 1:
        raise ThinetError(f"fine-tuning needs a single-input model; the {role} has {len(inputs)}")
    vi = inputs[0]
    dims = _vi_dims(vi)
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


def _file_digest(path: Path) -> str:
    """Content hash so a checkpoint is only resumed for the same run inputs."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


# ---------------------------------------------------------------- teacher


class _Teacher:
    """The original model in onnxruntime; runs in chunks if its batch dim is fixed."""

    def __init__(self, path: Path, x_example: np.ndarray) -> None:
        import onnxruntime as ort

        model = _load_onnx(path, external=False)
        self.name = _check_layout(x_example, model, "teacher")
        dims = _vi_dims(_real_inputs(model.graph)[0])
        self.fixed = dims[0] if dims and isinstance(dims[0], int) else None
        try:
            self.sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
        except Exception as exc:
            raise ThinetError(f"onnxruntime cannot load the teacher {path}: {exc}") from exc

    def __call__(self, xb: np.ndarray) -> list[np.ndarray]:
        try:
            return self._run(xb)
        except Exception as exc:
            raise ThinetError(f"the teacher failed on a data batch: {exc}") from exc

    def _run(self, xb: np.ndarray) -> list[np.ndarray]:
        if self.fixed is None:
            return self.sess.run(None, {self.name: xb})
        parts: list[list[np.ndarray]] = []
        n = len(xb)
        for i in range(0, n, self.fixed):
            chunk = xb[i : i + self.fixed]
            pad = self.fixed - len(chunk)
            if pad:
                chunk = np.concatenate([chunk, np.repeat(chunk[-1:], pad, axis=0)])
            parts.append([o[: self.fixed - pad] for o in self.sess.run(None, {self.name: chunk})])
        return [np.concatenate(os_, axis=0) for os_ in zip(*parts, strict=True)]


# ---------------------------------------------------------------- training pieces


def _is_prob(t: Any) -> bool:
    """Outputs that already went through a softmax (rows >= 0 summing to 1)."""
    if t.dim() < 2 or t.shape[1] < 2 or bool((t < 0).any()):
        return False
    return bool(((t.sum(1) - 1.0).abs() < 1e-3).all())


def _logits(torch: Any, out: Any, prob: bool) -> Any:
    """Logits of an output: log of probabilities when the model ends in a softmax."""
    return torch.log(out.clamp_min(1e-12)) if prob else out


def _kd_loss(torch: Any, student: list[Any], teacher: list[Any], temperature: float) -> Any:
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
            prob = _is_prob(t)
            log_p = F.log_softmax(_logits(torch, s, prob) / temperature, dim=1)
            q = F.softmax(_logits(torch, t, prob) / temperature, dim=1)
            kl = F.kl_div(log_p, q, reduction="sum") / s.shape[0]
            if s.dim() > 2:
                kl = kl / math.prod(s.shape[2:])
            total = total + kl * temperature**2
        else:
            total = total + F.mse_loss(s, t)
    return total


def _augment(torch: Any, xb: Any, gen: Any) -> Any:
    """Random shifts (pad + crop) and horizontal flips for NCHW images; identity otherwise."""
    if xb.dim() != 4 or min(xb.shape[2:]) < 8:
        return xb
    n, c, h, w = xb.shape
    pad = max(1, min(h, w) // 8)
    padded = torch.nn.functional.pad(xb, (pad, pad, pad, pad))
    dy = torch.randint(0, 2 * pad + 1, (n,), generator=gen)
    dx = torch.randint(0, 2 * pad + 1, (n,), generator=gen)
    rows = (torch.arange(h)[None, :] + dy[:, None])[:, None, :, None]
    cols = (torch.arange(w)[None, :] + dx[:, None])[:, None, None, :]
    shifted = padded[
        torch.arange(n)[:, None, None, None], torch.arange(c)[None, :, None, None], rows, cols
    ]
    flip = torch.rand(n, generator=gen) < 0.5
    return torch.where(flip[:, None, None, None], shifted.flip(3), shifted)


def _cosine_lr(base: float, step: int, total: int) -> float:
    """Cosine decay from base to 0 over the run (stateless, so resuming is exact)."""
    if total <= 1:
        return base
    return base * 0.5 * (1.0 + math.cos(math.pi * min(step, total) / total))


def _resolve_device(torch: Any, device: str) -> Any:
    """'cpu', 'cuda' or 'cuda:N'; CUDA must actually be there."""
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise ThinetError(
            "CUDA is not available (torch.cuda.is_available() is False); use --device cpu"
        )
    try:
        return torch.device(device)
    except (RuntimeError, ValueError) as exc:
        raise ThinetError(f"unknown device '{device}' (use cpu or cuda)") from exc


def _save_checkpoint(torch: Any, path: Path, state: dict[str, Any]) -> None:
    """Atomic torch.save: an interrupted save never corrupts the last good checkpoint."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        torch.save(state, tmp)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def _probe_loss(
    torch: Any, module: Any, xs: np.ndarray, ts: list[np.ndarray], temperature: float, device: Any
) -> float:
    """Distillation loss on a fixed, un-augmented probe set in eval mode."""
    was = module.training
    module.eval()
    with torch.no_grad():
        out = module(torch.from_numpy(xs).to(device))
        out = [out] if isinstance(out, torch.Tensor) else list(out)
        loss = _kd_loss(torch, out, [torch.from_numpy(t).to(device) for t in ts], temperature)
    module.train(was)
    return float(loss)


def _verify_output(torch: Any, module: Any, path: Path, xs: np.ndarray) -> None:
    """check_model(full_check) plus an onnxruntime run that must match the torch module."""
    import onnxruntime as ort

    try:
        onnx.checker.check_model(onnx.load(str(path)), full_check=True)
        sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    except Exception as exc:
        raise ThinetError(f"the fine-tuned model {path} failed validation: {exc}") from exc
    dims = _vi_dims(_real_inputs(onnx.load(str(path), load_external_data=False).graph)[0])
    if dims and isinstance(dims[0], int):
        xs = xs[: dims[0]]
    got = sess.run(None, {sess.get_inputs()[0].name: xs})
    with torch.no_grad():
        ref = module(torch.from_numpy(xs))
    ref = [ref] if isinstance(ref, torch.Tensor) else list(ref)
    for r, g in zip(ref, got, strict=False):
        err = _rel_err(r.numpy(), g)
        if err > 1e-3:
            raise ThinetError(
                f"the exported {path} disagrees with the trained module (rel. error {err:.1e})"
            )


# ---------------------------------------------------------------- main entry


def finetune(
    student_onnx: str | Path,
    teacher_onnx: str | Path,
    data: str | Path,
    epochs: int,
    output: str | Path,
    *,
    device: str = "cpu",
    lr: float = 3e-4,
    batch_size: int = 64,
    temperature: float = 4.0,
    checkpoint_dir: str | Path | None = None,
    resume: bool = True,
    augment: bool = True,
    progress: Callable[[FinetuneProgress], None] | None = None,
    max_steps: int | None = None,
    seed: int = 0,
) -> FinetuneResult:
    """Distil the teacher into the (pruned) student and write the tuned ONNX to ``output``.

    Adam with a cosine learning-rate schedule; loss = T^2 * KL(soft teacher || soft
    student) + cross-entropy when the data has labels. ``max_steps`` caps the optimizer
    steps (across resumes). Checkpoints go to ``checkpoint_dir`` after every epoch.
    """
    torch = require_torch()
    student_path, teacher_path, out = Path(student_onnx), Path(teacher_onnx), Path(output)
    if epochs < 1:
        raise ThinetError("epochs must be at least 1")
    if batch_size < 1 or lr <= 0 or temperature <= 0:
        raise ThinetError("batch size, learning rate and temperature must be positive")
    if max_steps is not None and max_steps < 1:
        raise ThinetError("max_steps must be at least 1")
    dev = _resolve_device(torch, device)
    student_model = _load_onnx(student_path, external=False)
    x, y = load_data(data)
    _check_layout(x, student_model, "student")
    teacher = _Teacher(teacher_path, x)

    torch.manual_seed(seed)
    with tempfile.TemporaryDirectory(prefix="onnx_thinet_ft_") as tmp:
        module = load_exported(export_torch(student_path, Path(tmp) / "student"))
    module.to(dev).train()
    optimizer = torch.optim.Adam(module.parameters(), lr=lr)

    n = len(x)
    steps_per_epoch = n // batch_size + (1 if n % batch_size > 1 or n < batch_size else 0)
    total_steps = epochs * steps_per_epoch
    if max_steps is not None:
        total_steps = min(total_steps, max_steps)

    probe_x = x[:_PROBE]
    probe_t = teacher(probe_x)
    initial_loss = _probe_loss(torch, module, probe_x, probe_t, temperature, dev)

    ckpt = Path(checkpoint_dir) / CHECKPOINT_NAME if checkpoint_dir is not None else None
    fingerprint = {
        "student": _file_digest(student_path),
        "teacher": _file_digest(teacher_path),
        "data": _file_digest(Path(data)),
        "batch_size": batch_size,
        "seed": seed,
    }
    start_epoch, start_batch, step, history = 0, 0, 0, []
    if ckpt is not None and ckpt.is_file() and resume:
        state = _load_checkpoint(torch, ckpt, fingerprint)
        module.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        start_epoch, start_batch, step = state["epoch"], state["batch"], state["step"]
        history = list(state["history"])
        torch.set_rng_state(state["torch_rng"])
        logger.info("resuming from %s: epoch %d, step %d", ckpt, start_epoch, step)
        initial_loss = float(state.get("initial_loss", initial_loss))
    resumed_from = start_epoch

    teacher_cache = None if augment else teacher(x)
    gen = torch.Generator()
    recent: list[float] = []
    t0 = time.perf_counter()
    steps_run = 0
    samples_run = 0
    epoch = start_epoch
    for epoch in range(start_epoch, epochs):
        if step >= total_steps:
            break
        order = np.random.default_rng([seed, epoch]).permutation(n)
        epoch_losses: list[float] = []
        batch_idx = start_batch if epoch == start_epoch else 0
        completed = True
        while batch_idx < steps_per_epoch:
            if step >= total_steps:
                completed = False
                break
            idx = np.sort(order[batch_idx * batch_size : (batch_idx + 1) * batch_size])
            tick = time.perf_counter()
            xb = torch.from_numpy(x[idx])
            if augment:
                gen.manual_seed(seed * 1_000_003 + epoch * 10_007 + batch_idx)
                xb = _augment(torch, xb, gen)
                targets = teacher(xb.numpy())
            else:
                targets = [t[idx] for t in teacher_cache]
            lr_now = _cosine_lr(lr, step, total_steps)
            for group in optimizer.param_groups:
                group["lr"] = lr_now
            try:
                loss = _train_step(
                    torch, module, optimizer, xb.to(dev), targets, y, idx, temperature, dev
                )
            except RuntimeError as exc:  # shape mismatch, out of memory, ...
                first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
                raise ThinetError(f"training step failed: {first}") from exc
            step += 1
            steps_run += 1
            batch_idx += 1
            samples_run += len(idx)
            epoch_losses.append(loss)
            recent = (recent + [loss])[-steps_per_epoch:]
            if progress is not None:
                sps = len(idx) / max(time.perf_counter() - tick, 1e-9)
                progress(
                    FinetuneProgress(
                        epoch + 1,
                        epochs,
                        step,
                        total_steps,
                        loss,
                        lr_now,
                        sps,
                        epoch_done=batch_idx >= steps_per_epoch,
                    )
                )
        if completed:
            history.append(float(np.mean(epoch_losses)) if epoch_losses else float("nan"))
            logger.info("epoch %d/%d: loss %.4f", epoch + 1, epochs, history[-1])
        if ckpt is not None:
            done_epoch, done_batch = (epoch + 1, 0) if completed else (epoch, batch_idx)
            _save_checkpoint(
                torch,
                ckpt,
                {
                    "model": module.state_dict(),
                    "optimizer": optimizer.state_dict(),
                    "epoch": done_epoch,
                    "batch": done_batch,
                    "step": step,
                    "history": history,
                    "torch_rng": torch.get_rng_state(),
                    "fingerprint": fingerprint,
                    "initial_loss": initial_loss,
                },
            )
        if not completed:
            break
    seconds = time.perf_counter() - t0

    final_loss = _probe_loss(torch, module, probe_x, probe_t, temperature, dev)
    module.cpu().eval()
    example = x[: min(len(x), max(2, min(batch_size, 8)))]
    to_onnx(module, student_path, out, example_inputs=(torch.from_numpy(example),))
    _verify_output(torch, module, out, example)
    epochs_done = len(history)
    result = FinetuneResult(
        output=out,
        epochs=epochs_done,
        steps=step,
        final_loss=final_loss,
        initial_loss=initial_loss,
        train_loss=float(np.mean(recent)) if recent else float("nan"),
        seconds=seconds,
        seconds_per_epoch=seconds * steps_per_epoch / steps_run if steps_run else 0.0,
        samples_per_second=samples_run / seconds if seconds > 0 else 0.0,
        resumed_from_epoch=resumed_from,
        history=tuple(history),
    )
    logger.info("fine-tuned %s: distillation loss %.4f -> %.4f", out, initial_loss, final_loss)
    return result


def _load_checkpoint(torch: Any, ckpt: Path, fingerprint: dict[str, Any]) -> dict[str, Any]:
    """Read a checkpoint and refuse one that belongs to a different run."""
    try:
        state = torch.load(ckpt, map_location="cpu", weights_only=False)
    except Exception as exc:
        raise ThinetError(
            f"cannot read checkpoint {ckpt}: {exc}; delete it or pass --no-resume"
        ) from exc
    if state.get("fingerprint") != fingerprint:
        raise ThinetError(
            f"checkpoint {ckpt} belongs to a different run (student, teacher, data, batch size or "
            "seed changed); delete it, use another --checkpoint-dir, or pass --no-resume"
        )
    return state


def _train_step(
    torch: Any,
    module: Any,
    optimizer: Any,
    xb: Any,
    targets: list[np.ndarray],
    y: np.ndarray | None,
    idx: np.ndarray,
    temperature: float,
    dev: Any,
) -> float:
    """One optimizer step on distillation (+ cross-entropy) loss; returns the loss."""
    out = module(xb)
    out = [out] if isinstance(out, torch.Tensor) else list(out)
    teach = [torch.from_numpy(np.asarray(t)).to(dev) for t in targets]
    loss = _kd_loss(torch, out, teach, temperature)
    if y is not None and out[0].dim() == 2:
        labels = torch.from_numpy(y[idx]).to(dev)
        if int(labels.max()) >= out[0].shape[1] or int(labels.min()) < 0:
            raise ThinetError(f"labels must be in [0, {out[0].shape[1]}) for this model's output")
        logits = _logits(torch, out[0], _is_prob(teach[0]))
        loss = loss + torch.nn.functional.cross_entropy(logits, labels)
    if not torch.isfinite(loss):
        raise ThinetError("the loss became NaN/inf; lower --lr")
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    optimizer.step()
    return float(loss.detach())
