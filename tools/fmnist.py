"""Fashion-MNIST loading and normalization (numpy only).

Reads the gzipped IDX files shipped by the Debian package ``dataset-fashion-mnist``
(``/usr/share/datasets/fashion-mnist``). No torch, no network access.
"""

from __future__ import annotations

import gzip
import os
from pathlib import Path

import numpy as np

DEFAULT_ROOT = Path(os.environ.get("FMNIST_ROOT", "/usr/share/datasets/fashion-mnist"))

MEAN = 0.2860
STD = 0.3530

CLASSES = [
    "T-shirt/top",
    "Trouser",
    "Pullover",
    "Dress",
    "Coat",
    "Sandal",
    "Shirt",
    "Sneaker",
    "Bag",
    "Ankle boot",
]

SPLITS = {"train": "train", "test": "t10k", "t10k": "t10k"}

_IMAGES_MAGIC = 2051  # 0x00000803: unsigned byte, 3 dims
_LABELS_MAGIC = 2049  # 0x00000801: unsigned byte, 1 dim

_INSTALL_HINT = "install it with: apt-get install -y dataset-fashion-mnist"


def _split_paths(split: str, root: Path) -> tuple[Path, Path]:
    """Return the (images, labels) IDX paths for ``split`` under ``root``."""
    if split not in SPLITS:
        raise ValueError(f"unknown Fashion-MNIST split {split!r}; expected one of {sorted(SPLITS)}")
    prefix = SPLITS[split]
    return (
        root / f"{prefix}-images-idx3-ubyte.gz",
        root / f"{prefix}-labels-idx1-ubyte.gz",
    )


def _read_idx(path: Path, magic: int, ndim: int) -> np.ndarray:
    """Read one gzipped IDX file of unsigned bytes and check its magic number."""
    if not path.is_file():
        raise FileNotFoundError(f"Fashion-MNIST file not found: {path}; {_INSTALL_HINT}")
    with gzip.open(path, "rb") as f:
        data = f.read()
    header = 4 + 4 * ndim
    if len(data) < header:
        raise ValueError(f"{path}: truncated IDX header")
    found = int.from_bytes(data[:4], "big")
    if found != magic:
        raise ValueError(f"{path}: bad IDX magic number {found:#010x}, expected {magic:#010x}")
    dims = tuple(int.from_bytes(data[4 + 4 * i : 8 + 4 * i], "big") for i in range(ndim))
    body = np.frombuffer(data, dtype=np.uint8, offset=header)
    if body.size != int(np.prod(dims)):
        raise ValueError(f"{path}: expected {int(np.prod(dims))} bytes of data, found {body.size}")
    return body.reshape(dims)


def load_split(split: str, root: str | Path = DEFAULT_ROOT) -> tuple[np.ndarray, np.ndarray]:
    """Load a split (``"train"`` or ``"test"``/``"t10k"``).

    Returns ``(images, labels)``: uint8 ``(N, 28, 28)`` and int64 ``(N,)``.
    """
    images_path, labels_path = _split_paths(split, Path(root))
    images = _read_idx(images_path, _IMAGES_MAGIC, 3)
    labels = _read_idx(labels_path, _LABELS_MAGIC, 1).astype(np.int64)
    if images.shape[0] != labels.shape[0]:
        raise ValueError(
            f"Fashion-MNIST {split}: {images.shape[0]} images but {labels.shape[0]} labels"
        )
    return images.copy(), labels


def normalize(images: np.ndarray) -> np.ndarray:
    """Map uint8 images ``(N, 28, 28)`` to float32 NCHW ``(N, 1, 28, 28)``: (x/255 - MEAN)/STD."""
    x = np.asarray(images)
    if x.ndim == 2:
        x = x[None]
    if x.ndim == 3:
        x = x[:, None]
    if x.ndim != 4 or x.shape[1] != 1:
        raise ValueError(f"expected images of shape (N, 28, 28), got {np.shape(images)}")
    x = x.astype(np.float32) / np.float32(255.0)
    return ((x - np.float32(MEAN)) / np.float32(STD)).astype(np.float32)


def export_npz(split: str, out: str | Path, limit: int | None = None) -> Path:
    """Write a split as the `.npz` (`x` normalized float32 NCHW, `y` int64) that eval/finetune read."""
    images, labels = load_split(split)
    if limit is not None:
        images, labels = images[:limit], labels[:limit]
    out = Path(out)
    np.savez(out, x=normalize(images), y=labels)
    return out


if __name__ == "__main__":
    import argparse

    parser = argparse.ArgumentParser(description="Export a Fashion-MNIST split as .npz (x, y).")
    parser.add_argument("split", choices=["train", "test"])
    parser.add_argument("out")
    parser.add_argument("--limit", type=int, default=None)
    args = parser.parse_args()
    print(export_npz(args.split, args.out, args.limit))
