"""The one training loop of onnx-thinet, used by `finetune` and by the layer-by-layer schedule.

The callers differ only in the order of batches (epochs that resume from a checkpoint, or
a cycle of permutations), in how a batch becomes inputs and teacher targets (augmented or
cached), and in what they do after a step (progress, checkpoints); those come in as
arguments. The loop owns the learning-rate schedule, the optimizer step and its errors.
"""

from __future__ import annotations

import itertools
import math
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from typing import Any

import numpy as np

from onnx_thinet.errors import ThinetError, one_line
from onnx_thinet.pytorch.distill import as_outputs, is_prob, kd_loss, logits_of

__all__ = [
    "Batch",
    "Schedule",
    "StepDone",
    "augment",
    "cosine_lr",
    "cycled_batches",
    "epoch_batches",
    "steps_per_epoch",
    "train",
]


@dataclass(frozen=True)
class Batch:
    """Which samples one optimizer step trains on."""

    epoch: int  # 0-based
    index: int  # batch number within the epoch
    samples: np.ndarray  # sorted sample indices (sorted reads are cheap on memory maps)
    last: bool  # the epoch's last batch


@dataclass(frozen=True)
class Schedule:
    """Learning rate and loss settings of a run; `start_step` > 0 when resuming."""

    lr: float  # peak learning rate, cosine-decayed to 0 over total_steps
    total_steps: int
    temperature: float
    device: Any
    start_step: int = 0


@dataclass(frozen=True)
class StepDone:
    """What the loop reports after each optimizer step."""

    batch: Batch
    step: int  # steps done so far, this one included (global across resumes)
    loss: float
    lr: float
    seconds: float  # wall time of this step, data preparation included


def steps_per_epoch(n: int, batch_size: int) -> int:
    """Full batches, plus the remainder unless it is a single sample (BatchNorm needs two)."""
    return n // batch_size + (1 if n % batch_size > 1 or n < batch_size else 0)


def epoch_batches(
    n: int, batch_size: int, seed: int, epochs: int, start_epoch: int = 0, start_batch: int = 0
) -> Iterator[Batch]:
    """`finetune`'s order: a permutation per epoch, seeded by (seed, epoch) so a resumed run
    draws the very batches the interrupted one would have."""
    per_epoch = steps_per_epoch(n, batch_size)
    for epoch in range(start_epoch, epochs):
        order = np.random.default_rng([seed, epoch]).permutation(n)
        for b in range(start_batch if epoch == start_epoch else 0, per_epoch):
            samples = np.sort(order[b * batch_size : (b + 1) * batch_size])
            yield Batch(epoch, b, samples, b == per_epoch - 1)


def cycled_batches(n: int, batch_size: int, seed: int) -> Iterator[Batch]:
    """The schedule's order: full batches from successive permutations of one seeded stream,
    without end (the loop stops at its step count)."""
    size = min(batch_size, n)
    per_epoch = n // size
    rng = np.random.default_rng(seed)
    for epoch in itertools.count():
        order = rng.permutation(n)
        for b in range(per_epoch):
            yield Batch(epoch, b, np.sort(order[b * size : (b + 1) * size]), b == per_epoch - 1)


def cosine_lr(base: float, step: int, total: int) -> float:
    """Cosine decay from base to 0 over the run (stateless, so resuming is exact)."""
    if total <= 1:
        return base
    return base * 0.5 * (1.0 + math.cos(math.pi * min(step, total) / total))


def augment(torch: Any, xb: Any, gen: Any) -> Any:
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


def train(
    torch: Any,
    module: Any,
    optimizer: Any,
    batches: Iterable[Batch],
    make_batch: Callable[[Batch], tuple[Any, list[np.ndarray]]],
    labels: np.ndarray | None,
    schedule: Schedule,
    on_step: Callable[[StepDone], None] | None = None,
) -> int:
    """Optimizer steps over `batches` until `schedule.total_steps`; returns the step reached.

    `make_batch` turns a batch into (input tensor on the CPU, teacher outputs); the loss is
    T^2 * KL on softened outputs, plus cross-entropy on `labels` when given.
    """
    step = schedule.start_step
    for batch in batches:
        if step >= schedule.total_steps:
            break
        tick = time.perf_counter()
        xb, targets = make_batch(batch)
        lr = cosine_lr(schedule.lr, step, schedule.total_steps)
        for group in optimizer.param_groups:
            group["lr"] = lr
        y = None if labels is None else labels[batch.samples]
        try:
            loss = _train_step(torch, module, optimizer, xb, targets, y, schedule)
        except RuntimeError as exc:  # shape mismatch, out of memory, ...
            raise ThinetError(f"training step failed: {one_line(exc)}") from exc
        step += 1
        if on_step is not None:
            on_step(StepDone(batch, step, loss, lr, time.perf_counter() - tick))
    return step


def _train_step(
    torch: Any,
    module: Any,
    optimizer: Any,
    xb: Any,
    targets: list[np.ndarray],
    y: np.ndarray | None,
    schedule: Schedule,
) -> float:
    """One optimizer step on distillation (+ cross-entropy) loss; returns the loss."""
    dev = schedule.device
    out = as_outputs(torch, module(xb.to(dev)))
    teach = [torch.from_numpy(np.asarray(t)).to(dev) for t in targets]
    loss = kd_loss(torch, out, teach, schedule.temperature)
    if y is not None and out[0].dim() == 2:
        labels = torch.from_numpy(y).to(dev)
        if int(labels.max()) >= out[0].shape[1] or int(labels.min()) < 0:
            raise ThinetError(f"labels must be in [0, {out[0].shape[1]}) for this model's output")
        logits = logits_of(torch, out[0], is_prob(teach[0]))
        loss = loss + torch.nn.functional.cross_entropy(logits, labels)
    if not torch.isfinite(loss):
        raise ThinetError("the loss became NaN/inf; lower lr", params=("lr",))
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    optimizer.step()
    return float(loss.detach())
