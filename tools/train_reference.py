"""Train the reference Fashion-MNIST CNNs and export them to ONNX.

Writes, under ``--out`` (default ``models``):

* ``fmnist_vgg.onnx``, ``fmnist_resnet.onnx``, ``fmnist_mobilenet.onnx``: input ``input``
  float32 ``[N, 1, 28, 28]`` (normalized, see ``tools/fmnist.py``), output ``logits`` ``[N, 10]``;
* ``fmnist_calib.npy``: 512 normalized training images, float32 ``[512, 1, 28, 28]``;
* ``fmnist_test_1k.npz``: ``x`` (the first 1000 normalized test images) and ``y`` (int64 labels).

Runs on CPU with one thread by default. Every model is seeded from ``--seed`` on its own, so
training one model alone gives the same weights as training it together with the others.

Example::

    python tools/train_reference.py --models vgg,resnet,mobilenet --seed 0 --out models
"""

from __future__ import annotations

import argparse
import math
import random
import sys
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent))
import fmnist  # noqa: E402

NUM_CLASSES = 10
CALIB_SIZE = 512
TEST_SUBSET = 1000


# --------------------------------------------------------------------------- models


def conv_bn(cin: int, cout: int, k: int = 3, stride: int = 1, groups: int = 1) -> list[nn.Module]:
    """Conv (no bias, 'same' padding) followed by BatchNorm."""
    return [
        nn.Conv2d(cin, cout, k, stride=stride, padding=k // 2, groups=groups, bias=False),
        nn.BatchNorm2d(cout),
    ]


class VGG(nn.Module):
    """VGG-style: 3x3 conv-BN-ReLU stacks with max pooling, then a two-layer classifier."""

    def __init__(
        self,
        widths: tuple[int | str, ...] = (24, 24, "M", 48, 48, "M", 96, 96, "M"),
        hidden: int = 256,
        dropout: float = 0.3,
    ) -> None:
        super().__init__()
        layers: list[nn.Module] = []
        cin, size = 1, 28
        for w in widths:
            if w == "M":
                layers.append(nn.MaxPool2d(2))
                size //= 2
            else:
                layers += [*conv_bn(cin, int(w)), nn.ReLU(inplace=True)]
                cin = int(w)
        self.features = nn.Sequential(*layers)
        self.classifier = nn.Sequential(
            nn.Flatten(),
            nn.Linear(cin * size * size, hidden),
            nn.ReLU(inplace=True),
            nn.Dropout(dropout),
            nn.Linear(hidden, NUM_CLASSES),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.features(x))


class BasicBlock(nn.Module):
    """ResNet basic block: conv-BN-ReLU-conv-BN plus (projection) shortcut, then ReLU."""

    def __init__(self, cin: int, cout: int, stride: int = 1) -> None:
        super().__init__()
        self.body = nn.Sequential(
            *conv_bn(cin, cout, 3, stride), nn.ReLU(inplace=True), *conv_bn(cout, cout, 3)
        )
        if stride != 1 or cin != cout:
            self.shortcut: nn.Module = nn.Sequential(*conv_bn(cin, cout, 1, stride))
        else:
            self.shortcut = nn.Identity()
        self.relu = nn.ReLU(inplace=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.relu(self.body(x) + self.shortcut(x))


class ResNet(nn.Module):
    """Small ResNet: 3x3 stem, one basic block per stage, global average pool, linear."""

    def __init__(
        self, stem: int = 32, stages: tuple[int, ...] = (32, 64, 128), stem_stride: int = 2
    ) -> None:
        super().__init__()
        self.stem = nn.Sequential(*conv_bn(1, stem, 3, stem_stride), nn.ReLU(inplace=True))
        blocks, cin = [], stem
        for i, w in enumerate(stages):
            blocks.append(BasicBlock(cin, w, stride=1 if i == 0 else 2))
            cin = w
        self.blocks = nn.Sequential(*blocks)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(cin, NUM_CLASSES)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.pool(self.blocks(self.stem(x)))
        return self.fc(torch.flatten(x, 1))


class InvertedResidual(nn.Module):
    """MobileNetV2 block: 1x1 expand-BN-ReLU6, 3x3 depthwise-BN-ReLU6, 1x1 project-BN (+x)."""

    def __init__(self, cin: int, cout: int, stride: int, expand: int) -> None:
        super().__init__()
        hidden = cin * expand
        self.use_residual = stride == 1 and cin == cout
        self.body = nn.Sequential(
            *conv_bn(cin, hidden, 1),
            nn.ReLU6(inplace=True),
            *conv_bn(hidden, hidden, 3, stride, groups=hidden),
            nn.ReLU6(inplace=True),
            *conv_bn(hidden, cout, 1),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.body(x)
        return x + y if self.use_residual else y


# (expansion, out channels, stride) per inverted residual block
MOBILENET_BLOCKS = (
    (4, 16, 1),
    (6, 24, 2),
    (6, 24, 1),
    (6, 32, 1),
    (6, 32, 1),
    (6, 64, 2),
)


class MobileNetV2(nn.Module):
    """Small MobileNetV2: 3x3 stem, inverted residual blocks, 1x1 head conv, GAP, linear."""

    def __init__(
        self,
        stem: int = 16,
        blocks: tuple[tuple[int, int, int], ...] = MOBILENET_BLOCKS,
        head: int = 256,
        stem_stride: int = 2,
    ) -> None:
        super().__init__()
        self.stem = nn.Sequential(*conv_bn(1, stem, 3, stem_stride), nn.ReLU6(inplace=True))
        layers, cin = [], stem
        for t, c, s in blocks:
            layers.append(InvertedResidual(cin, c, s, t))
            cin = c
        self.blocks = nn.Sequential(*layers)
        self.head = nn.Sequential(*conv_bn(cin, head, 1), nn.ReLU6(inplace=True))
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(head, NUM_CLASSES)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.pool(self.head(self.blocks(self.stem(x))))
        return self.fc(torch.flatten(x, 1))


# name -> (constructor, default epochs, peak learning rate)
MODELS: dict[str, tuple[Callable[[], nn.Module], int, float]] = {
    "vgg": (VGG, 5, 0.05),
    "resnet": (ResNet, 8, 0.05),
    "mobilenet": (MobileNetV2, 7, 0.05),
}


# --------------------------------------------------------------------------- training


def seed_everything(seed: int) -> None:
    """Seed python, numpy and torch."""
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def augment(x: torch.Tensor, gen: torch.Generator, pad: int = 2) -> torch.Tensor:
    """Random crop with zero (black) padding ``pad`` and random horizontal flip, per sample."""
    n, _, h, w = x.shape
    black = -fmnist.MEAN / fmnist.STD
    padded = F.pad(x, (pad, pad, pad, pad), value=black)
    oy = torch.randint(0, 2 * pad + 1, (n,), generator=gen)
    ox = torch.randint(0, 2 * pad + 1, (n,), generator=gen)
    rows = (oy[:, None] + torch.arange(h))[:, :, None]
    cols = (ox[:, None] + torch.arange(w))[:, None, :]
    out = padded[torch.arange(n)[:, None, None], 0, rows, cols].unsqueeze(1)
    flip = torch.rand(n, generator=gen) < 0.5
    out[flip] = out[flip].flip(-1)
    return out.contiguous()


def lr_at(step: int, total: int, peak: float, warmup: int) -> float:
    """Linear warmup to ``peak`` then cosine decay to zero."""
    if step < warmup:
        return peak * (step + 1) / warmup
    progress = (step - warmup) / max(1, total - warmup)
    return 0.5 * peak * (1.0 + math.cos(math.pi * progress))


@torch.no_grad()
def evaluate(model: nn.Module, x: torch.Tensor, y: torch.Tensor, batch: int = 1000) -> float:
    """Top-1 accuracy of ``model`` (eval mode) on ``x``/``y``."""
    model.eval()
    correct = 0
    for i in range(0, len(x), batch):
        correct += (model(x[i : i + batch]).argmax(1) == y[i : i + batch]).sum().item()
    return correct / len(x)


def train(
    model: nn.Module,
    x: torch.Tensor,
    y: torch.Tensor,
    epochs: int,
    lr: float,
    seed: int,
    batch: int,
    log: Callable[[str], None],
) -> list[float]:
    """SGD + Nesterov momentum, warmup + cosine schedule; returns the epoch times in seconds.

    Trains in channels-last memory format (about 2x faster on CPU), then switches back.
    """
    cl = torch.channels_last
    model.to(memory_format=cl)
    decay = [p for p in model.parameters() if p.ndim > 1]
    no_decay = [p for p in model.parameters() if p.ndim <= 1]
    opt = torch.optim.SGD(
        [{"params": decay, "weight_decay": 5e-4}, {"params": no_decay, "weight_decay": 0.0}],
        lr=lr,
        momentum=0.9,
        nesterov=True,
    )
    gen = torch.Generator().manual_seed(seed)
    steps_per_epoch = math.ceil(len(x) / batch)
    total, warmup = epochs * steps_per_epoch, steps_per_epoch // 2
    step, times = 0, []
    for epoch in range(epochs):
        model.train()
        t0 = time.perf_counter()
        order = torch.randperm(len(x), generator=gen)
        loss_sum = 0.0
        for i in range(0, len(x), batch):
            idx = order[i : i + batch]
            for group in opt.param_groups:
                group["lr"] = lr_at(step, total, lr, warmup)
            xb = augment(x[idx], gen).to(memory_format=cl)
            loss = F.cross_entropy(model(xb), y[idx])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            loss_sum += loss.item() * len(idx)
            step += 1
        times.append(time.perf_counter() - t0)
        log(f"  epoch {epoch + 1}/{epochs}: loss {loss_sum / len(x):.4f}, {times[-1]:.1f} s")
    model.to(memory_format=torch.contiguous_format)
    model.eval()
    return times


# --------------------------------------------------------------------------- export / check


def export_onnx(model: nn.Module, path: Path) -> None:
    """Export ``model`` (eval mode) with the TorchScript exporter, opset 17, dynamic batch."""
    model.eval()
    dummy = torch.zeros(1, 1, 28, 28)
    torch.onnx.export(
        model,
        (dummy,),
        str(path),
        dynamo=False,
        opset_version=17,
        input_names=["input"],
        output_names=["logits"],
        dynamic_axes={"input": {0: "batch"}, "logits": {0: "batch"}},
    )


def onnx_session(path: Path):
    """A single-threaded onnxruntime CPU session for ``path``."""
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.intra_op_num_threads = 1
    opts.inter_op_num_threads = 1
    return ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])


def check_onnx(model: nn.Module, path: Path, x: np.ndarray, y: np.ndarray) -> tuple[float, float]:
    """Return (max |onnx - torch| on 256 test images, onnx accuracy on ``x``/``y``)."""
    import onnx

    onnx.checker.check_model(onnx.load(str(path)))
    sess = onnx_session(path)
    probe = x[:256]
    with torch.no_grad():
        ref = model(torch.from_numpy(probe)).numpy()
    diff = float(np.abs(sess.run(["logits"], {"input": probe})[0] - ref).max())
    if diff > 1e-4:
        raise RuntimeError(f"{path}: ONNX logits differ from torch by {diff:.3g} > 1e-4")
    chunks = [x[i : i + 1000] for i in range(0, len(x), 1000)]
    preds = np.concatenate([sess.run(["logits"], {"input": c})[0].argmax(1) for c in chunks])
    return diff, float((preds == y).mean())


# --------------------------------------------------------------------------- data files


def write_data_files(
    out: Path, train_x: np.ndarray, test_x: np.ndarray, test_y: np.ndarray, seed: int
) -> None:
    """Write the 512-image calibration set and the 1000-image labelled test subset."""
    rng = np.random.default_rng(seed)
    idx = np.sort(rng.choice(len(train_x), CALIB_SIZE, replace=False))
    np.save(out / "fmnist_calib.npy", fmnist.normalize(train_x[idx]))
    np.savez_compressed(
        out / "fmnist_test_1k.npz",
        x=fmnist.normalize(test_x[:TEST_SUBSET]),
        y=test_y[:TEST_SUBSET].astype(np.int64),
    )


def count_params(model: nn.Module) -> int:
    """Number of trainable parameters."""
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """Command line."""
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument(
        "--models",
        default="vgg,resnet,mobilenet",
        help="comma-separated subset of: " + ",".join(MODELS),
    )
    p.add_argument(
        "--epochs",
        type=int,
        default=None,
        help="epochs per model (default: per model, "
        + ", ".join(f"{k}={v[1]}" for k, v in MODELS.items())
        + ")",
    )
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", type=Path, default=Path("models"))
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--threads", type=int, default=1, help="torch CPU threads (default 1)")
    p.add_argument("--fmnist-root", type=Path, default=fmnist.DEFAULT_ROOT)
    p.add_argument(
        "--no-data-files",
        action="store_true",
        help="do not (re)write fmnist_calib.npy and fmnist_test_1k.npz",
    )
    args = p.parse_args(argv)
    args.models = [m.strip() for m in args.models.split(",") if m.strip()]
    unknown = [m for m in args.models if m not in MODELS]
    if unknown:
        p.error(f"unknown model(s) {unknown}; choose from {list(MODELS)}")
    return args


def main(argv: list[str] | None = None) -> int:
    """Entry point."""
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    args.out.mkdir(parents=True, exist_ok=True)

    def log(msg: str) -> None:
        print(msg, flush=True)

    train_u8, train_y = fmnist.load_split("train", args.fmnist_root)
    test_u8, test_y = fmnist.load_split("test", args.fmnist_root)
    xtr, ytr = torch.from_numpy(fmnist.normalize(train_u8)), torch.from_numpy(train_y)
    test_x = fmnist.normalize(test_u8)
    if not args.no_data_files:
        write_data_files(args.out, train_u8, test_u8, test_y, args.seed)
        log(f"wrote {args.out / 'fmnist_calib.npy'} and {args.out / 'fmnist_test_1k.npz'}")

    summary = []
    for name in args.models:
        ctor, default_epochs, lr = MODELS[name]
        epochs = args.epochs if args.epochs is not None else default_epochs
        seed_everything(args.seed)
        model = ctor()
        log(
            f"{name}: {count_params(model):,} parameters, {epochs} epochs, lr {lr}, "
            f"batch {args.batch_size}, {torch.get_num_threads()} thread(s)"
        )
        t0 = time.perf_counter()
        times = train(model, xtr, ytr, epochs, lr, args.seed, args.batch_size, log)
        total = time.perf_counter() - t0
        torch_acc = evaluate(model, torch.from_numpy(test_x), torch.from_numpy(test_y))
        path = args.out / f"fmnist_{name}.onnx"
        export_onnx(model, path)
        diff, onnx_acc = check_onnx(model, path, test_x, test_y)
        size = path.stat().st_size
        log(
            f"{name}: torch test acc {torch_acc:.4f}, ONNX test acc {onnx_acc:.4f} (10k), "
            f"max |onnx-torch| {diff:.2e}, mean epoch {np.mean(times):.1f} s, "
            f"train total {total:.1f} s, {path} {size / 1e6:.2f} MB"
        )
        summary.append((name, count_params(model), epochs, np.mean(times), total, onnx_acc, size))

    log("\nmodel      params    epochs  s/epoch  train s  onnx acc  size MB")
    for name, n, ep, t, tot, acc, size in summary:
        log(f"{name:<10} {n:>8,} {ep:>6} {t:>8.1f} {tot:>8.1f} {acc:>9.4f} {size / 1e6:>8.2f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
