"""Knowledge-distillation fine-tuning of a pruned ONNX model against its original.

Why: pruning removes filters and costs accuracy; a short distillation run from the
unpruned model (the teacher, run in onnxruntime) recovers most of it without needing
labels. The student ONNX is exported to a readable PyTorch module (pytorch.export),
trained by the shared loop (pytorch.training) with KL divergence on temperature-softened
outputs (plus cross-entropy when labels exist), checkpointed every epoch so it can
resume, and exported back to ONNX with the student's names, opset and dynamic axes,
then verified.

``finetune_graph`` (pytorch.finetune_graph) is the in-memory variant for the
layer-by-layer schedule; it is importable from here too.
"""

from __future__ import annotations

import logging
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import onnx

from onnx_thinet.errors import InternalError, ThinetError
from onnx_thinet.io.files import atomic_write, file_digest
from onnx_thinet.io.graph import graph_inputs, load_model, tensor_shape
from onnx_thinet.pytorch.distill import (
    Teacher,
    TeacherOutputs,
    check_layout,
    load_data,
    probe_loss,
    resolve_device,
    verify_module,
)
from onnx_thinet.pytorch.export import export_torch, load_exported, require_torch, to_onnx
from onnx_thinet.pytorch.finetune_graph import DEFAULT_GRAPH_LR, TeacherCache, finetune_graph
from onnx_thinet.pytorch.training import (
    Batch,
    Schedule,
    StepDone,
    augment,
    epoch_batches,
    steps_per_epoch,
    train,
)

__all__ = [
    "CHECKPOINT_NAME",
    "DEFAULT_GRAPH_LR",
    "FinetuneProgress",
    "FinetuneResult",
    "TeacherCache",
    "finetune",
    "finetune_graph",
    "load_data",
]

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


@dataclass(frozen=True)
class _Checkpoint:
    """Where a run saves its state after every epoch, and what identifies the run."""

    path: Path
    fingerprint: dict[str, Any]

    @classmethod
    def for_run(
        cls, directory: str | Path, files: tuple[Path, Path, Path], batch_size: int, seed: int
    ) -> _Checkpoint:
        """A run is resumed only with the same student, teacher and data (by content),
        batch size and seed."""
        digests = dict(zip(("student", "teacher", "data"), map(file_digest, files)))
        return cls(Path(directory) / CHECKPOINT_NAME, digests | {"batch_size": batch_size, "seed": seed})

    def save(self, torch: Any, state: dict[str, Any]) -> None:
        """Atomic torch.save: an interrupted save never corrupts the last good checkpoint."""
        atomic_write(self.path, lambda tmp: torch.save(state | {"fingerprint": self.fingerprint}, tmp))

    def load(self, torch: Any) -> dict[str, Any]:
        """Read the checkpoint and refuse one that belongs to a different run."""
        try:
            state = torch.load(self.path, map_location="cpu", weights_only=False)
        except Exception as exc:  # torch.load raises pickle, zip and runtime errors alike
            raise ThinetError(
                f"cannot read checkpoint {self.path}: {exc}; delete it or pass resume=False",
                params=("resume",),
            ) from exc
        if state.get("fingerprint") != self.fingerprint:
            raise ThinetError(
                f"checkpoint {self.path} belongs to a different run (student, teacher, data, batch "
                "size or seed changed); delete it, use another checkpoint_dir, or pass resume=False",
                params=("checkpoint_dir", "resume"),
            )
        return state


@dataclass
class _RunState:
    """What a `finetune` run has done so far; updated after every step by `on_step`."""

    epochs: int
    total_steps: int
    per_epoch: int
    initial_loss: float
    history: list[float] = field(default_factory=list)
    epoch_losses: list[float] = field(default_factory=list)
    recent: list[float] = field(default_factory=list)
    step: int = 0
    start_epoch: int = 0
    start_batch: int = 0
    steps_run: int = 0
    samples_run: int = 0
    last: Batch | None = None

    def record(self, done: StepDone) -> None:
        """Count a step; close the epoch (mean loss into history) after its last batch."""
        self.step, self.last = done.step, done.batch
        self.steps_run += 1
        self.samples_run += len(done.batch.samples)
        self.epoch_losses.append(done.loss)
        self.recent = (self.recent + [done.loss])[-self.per_epoch :]
        if done.batch.last:
            losses, self.epoch_losses = self.epoch_losses, []
            self.history.append(float(np.mean(losses)) if losses else float("nan"))
            logger.info("epoch %d/%d: loss %.4f", done.batch.epoch + 1, self.epochs, self.history[-1])

    def result(self, output: Path, final_loss: float, seconds: float, resumed_from: int) -> FinetuneResult:
        return FinetuneResult(
            output=output, epochs=len(self.history), steps=self.step, final_loss=final_loss,
            initial_loss=self.initial_loss,
            train_loss=float(np.mean(self.recent)) if self.recent else float("nan"),
            seconds=seconds,
            seconds_per_epoch=seconds * self.per_epoch / self.steps_run if self.steps_run else 0.0,
            samples_per_second=self.samples_run / seconds if seconds > 0 else 0.0,
            resumed_from_epoch=resumed_from, history=tuple(self.history),
        )

    def position(self) -> tuple[int, int]:
        """(epoch, batch) to resume from after the last step run."""
        if self.last is None:
            return self.start_epoch, self.start_batch
        if self.last.last:
            return self.last.epoch + 1, 0
        return self.last.epoch, self.last.index + 1


def finetune(
    student_onnx: str | Path,
    teacher_onnx: str | Path,
    data: str | Path,
    epochs: int,
    output: str | Path,
    *,
    device: str = "auto",
    lr: float = 1e-3,
    batch_size: int = 64,
    temperature: float = 4.0,
    checkpoint_dir: str | Path | None = None,
    resume: bool = True,
    augment: bool = False,
    progress: Callable[[FinetuneProgress], None] | None = None,
    max_steps: int | None = None,
    seed: int = 0,
) -> FinetuneResult:
    """Distil the teacher into the (pruned) student and write the tuned ONNX to ``output``.

    Adam with a cosine learning-rate schedule; loss = T^2 * KL(soft teacher || soft
    student) + cross-entropy when the data has labels. ``max_steps`` caps the optimizer
    steps (across resumes). Checkpoints go to ``checkpoint_dir`` after every epoch.
    ``device``: auto (CUDA when torch sees a GPU), cpu or cuda.
    """
    torch = require_torch()
    _check_arguments(epochs, batch_size, lr, temperature, max_steps)
    dev = resolve_device(torch, device)
    student_path, out = Path(student_onnx), Path(output)
    x, y = load_data(data)
    check_layout(x, load_model(student_path), "student")
    teacher = Teacher(Path(teacher_onnx), x)
    torch.manual_seed(seed)
    module = _student_module(torch, student_path, dev)
    optimizer = torch.optim.Adam(module.parameters(), lr=lr)
    per_epoch = steps_per_epoch(len(x), batch_size)
    total = min(epochs * per_epoch, max_steps or epochs * per_epoch)
    probe_x, probe_t = x[:_PROBE], teacher(x[:_PROBE])
    initial = probe_loss(torch, module, probe_x, probe_t, None, temperature, dev, len(probe_x))
    run = _RunState(epochs, total, per_epoch, initial)
    ckpt = None
    if checkpoint_dir is not None:
        files = (student_path, Path(teacher_onnx), Path(data))
        ckpt = _Checkpoint.for_run(checkpoint_dir, files, batch_size, seed)
        if resume and ckpt.path.is_file():
            _resume(torch, ckpt, module, optimizer, run)
    resumed_from = run.start_epoch
    batches = epoch_batches(len(x), batch_size, seed, epochs, run.start_epoch, run.start_batch)
    t0 = time.perf_counter()
    train(torch, module, optimizer, batches, _batch_maker(torch, x, teacher, seed, augment), y,
          Schedule(lr, total, temperature, dev, run.step),
          _step_handler(torch, run, module, optimizer, ckpt, progress))
    if ckpt is not None and run.last is not None and not run.last.last:
        _save(torch, ckpt, module, optimizer, run)  # stopped inside an epoch (max_steps)
    seconds = time.perf_counter() - t0
    final = probe_loss(torch, module, probe_x, probe_t, None, temperature, dev, len(probe_x))
    _export_and_verify(torch, module, student_path, out, x[: min(len(x), max(2, min(batch_size, 8)))])
    logger.info("fine-tuned %s: distillation loss %.4f -> %.4f", out, run.initial_loss, final)
    return run.result(out, final, seconds, resumed_from)


def _student_module(torch: Any, student_path: Path, device: Any) -> Any:
    """The student as a generated PyTorch module (checked against onnxruntime), training."""
    with tempfile.TemporaryDirectory(prefix="onnx_thinet_ft_") as tmp:
        module = load_exported(export_torch(student_path, Path(tmp) / "student"))
    return module.to(device).train()


def _check_arguments(
    epochs: int, batch_size: int, lr: float, temperature: float, max_steps: int | None
) -> None:
    if epochs < 1:
        raise ThinetError("epochs must be at least 1", params=("epochs",))
    if batch_size < 1 or lr <= 0 or temperature <= 0:
        raise ThinetError("batch_size, lr and temperature must be positive",
                          params=("batch_size", "lr", "temperature"))
    if max_steps is not None and max_steps < 1:
        raise ThinetError("max_steps must be at least 1", params=("max_steps",))


def _resume(torch: Any, ckpt: _Checkpoint, module: Any, optimizer: Any, run: _RunState) -> None:
    """Continue where the checkpointed run stopped: weights, optimizer, position, RNG, history."""
    state = ckpt.load(torch)
    module.load_state_dict(state["model"])
    optimizer.load_state_dict(state["optimizer"])
    run.start_epoch, run.start_batch, run.step = state["epoch"], state["batch"], state["step"]
    run.history = list(state["history"])
    torch.set_rng_state(state["torch_rng"])
    run.initial_loss = float(state.get("initial_loss", run.initial_loss))
    logger.info("resuming from %s: epoch %d, step %d", ckpt.path, run.start_epoch, run.step)


def _save(torch: Any, ckpt: _Checkpoint, module: Any, optimizer: Any, run: _RunState) -> None:
    epoch, batch = run.position()
    ckpt.save(torch, {
        "model": module.state_dict(), "optimizer": optimizer.state_dict(),
        "epoch": epoch, "batch": batch, "step": run.step, "history": run.history,
        "torch_rng": torch.get_rng_state(), "initial_loss": run.initial_loss,
    })


def _batch_maker(
    torch: Any, x: np.ndarray, teacher: Teacher, seed: int, augmented: bool
) -> Callable[[Batch], tuple[Any, list[np.ndarray]]]:
    """Inputs and teacher targets of a batch: augmented ones need the teacher on the
    augmented images; plain ones are cached per sample (the teacher runs once each)."""
    outputs = TeacherOutputs(teacher, x)
    gen = torch.Generator()

    def make(batch: Batch) -> tuple[Any, list[np.ndarray]]:
        xb = torch.from_numpy(x[batch.samples])
        if not augmented:
            return xb, outputs(batch.samples)
        gen.manual_seed(seed * 1_000_003 + batch.epoch * 10_007 + batch.index)
        xb = augment(torch, xb, gen)
        return xb, teacher(xb.numpy())

    return make


def _step_handler(
    torch: Any,
    run: _RunState,
    module: Any,
    optimizer: Any,
    ckpt: _Checkpoint | None,
    progress: Callable[[FinetuneProgress], None] | None,
) -> Callable[[StepDone], None]:
    """After each step: count it, report progress, checkpoint at the end of each epoch."""

    def on_step(done: StepDone) -> None:
        run.record(done)
        if progress is not None:
            sps = len(done.batch.samples) / max(done.seconds, 1e-9)
            progress(FinetuneProgress(done.batch.epoch + 1, run.epochs, done.step, run.total_steps,
                                      done.loss, done.lr, sps, epoch_done=done.batch.last))
        if ckpt is not None and done.batch.last:
            _save(torch, ckpt, module, optimizer, run)

    return on_step


def _export_and_verify(
    torch: Any, module: Any, student_path: Path, out: Path, example: np.ndarray
) -> None:
    """Back to ONNX with the student's interface; the file must pass the full checker and
    agree with the trained module in onnxruntime."""
    module.cpu().eval()
    to_onnx(module, student_path, out, example_inputs=(torch.from_numpy(example),))
    try:
        written = onnx.load(str(out))
        onnx.checker.check_model(written, full_check=True)
    except Exception as exc:  # the checker raises ValidationError and inference errors
        raise InternalError(f"the fine-tuned model {out} fails the ONNX checker: {exc}") from exc
    dims = tensor_shape(graph_inputs(written)[0])
    if dims and isinstance(dims[0], int):  # a static batch is baked into the module too
        example = example[: dims[0]]
    verify_module(torch, module, written, example)
