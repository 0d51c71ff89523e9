"""Activations of the calibration set kept between passes: in memory under a budget, else on disk.

A tensor is stored as one array per calibration batch. Arrays beyond the memory budget are
written to files in a private temporary folder and read back one batch at a time with plain
file reads (not memory maps), so the page cache holds them, not the process. Removing
channels from a stored tensor is recorded, not rewritten: the positions are deleted when a
batch is read.
"""

from __future__ import annotations

import logging
import shutil
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from onnx_thinet.channels.layout import without_positions

__all__ = ["ActivationStore"]

logger = logging.getLogger(__name__)


@dataclass
class _Stored:
    chunks: dict[int, np.ndarray | Path] = field(default_factory=dict)
    deletions: list[tuple[int, np.ndarray]] = field(default_factory=list)  # (axis, positions)
    shape: tuple[int, ...] = ()  # of the first batch, before deletions


class ActivationStore:
    """Per-batch arrays of named tensors, `ram_budget` bytes in memory and the rest on disk."""

    def __init__(self, batches: int, ram_budget: int):
        self.batches = batches
        self.ram_budget = ram_budget
        self.ram_bytes = 0
        self.disk_bytes = 0
        self._tensors: dict[str, _Stored] = {}
        self._folder: Path | None = None
        self._files = 0

    def __contains__(self, name: str) -> bool:
        stored = self._tensors.get(name)
        return stored is not None and len(stored.chunks) == self.batches

    def names(self) -> list[str]:
        return list(self._tensors)

    def put(self, name: str, batch: int, array: np.ndarray, borrowed: bool = False) -> None:
        """Store one batch of `name`; a `borrowed` array (an onnxruntime output in its session's
        arena) is copied when it stays in memory, so that the arena can go with the session."""
        stored = self._tensors.setdefault(name, _Stored())
        if stored.deletions:
            raise ValueError(f"{name}: cannot add batches to a tensor with deleted positions")
        array = np.ascontiguousarray(array)
        stored.shape = stored.shape or array.shape
        if self.ram_bytes + array.nbytes <= self.ram_budget:
            stored.chunks[batch] = np.array(array, copy=True) if borrowed else array
            self.ram_bytes += array.nbytes
            return
        stored.chunks[batch] = self._write(array)

    def _write(self, array: np.ndarray) -> Path:
        self._files += 1
        path = self._folder_path() / f"{self._files}.npy"
        np.save(path, array, allow_pickle=False)
        self.disk_bytes += array.nbytes
        return path

    def limit_ram(self, ram_budget: int) -> None:
        """A new memory budget; arrays beyond it go to disk now, the earliest stored first."""
        self.ram_budget = ram_budget
        for stored in self._tensors.values():
            for batch, chunk in stored.chunks.items():
                if self.ram_bytes <= ram_budget:
                    return
                if isinstance(chunk, np.ndarray):
                    stored.chunks[batch] = self._write(chunk)
                    self.ram_bytes -= chunk.nbytes

    def get(self, name: str, batch: int) -> np.ndarray:
        stored = self._tensors[name]
        chunk = stored.chunks[batch]
        array = np.load(chunk, allow_pickle=False) if isinstance(chunk, Path) else chunk
        for axis, positions in stored.deletions:
            array = without_positions(array, positions, axis)
        return array

    def delete_positions(self, name: str, axis: int, positions: np.ndarray) -> None:
        """From now on `name` reads without `positions` along `axis` (after earlier deletions)."""
        self._tensors[name].deletions.append((axis, np.asarray(positions, dtype=np.int64)))

    def axis_length(self, name: str, axis: int) -> int:
        """Length of `axis` of the stored tensor as it reads now (after deletions)."""
        stored = self._tensors[name]
        length = stored.shape[axis]
        for deleted_axis, positions in stored.deletions:
            if deleted_axis % len(stored.shape) == axis % len(stored.shape):
                length -= len(positions)
        return length

    def drop(self, name: str) -> None:
        stored = self._tensors.pop(name, None)
        if stored is None:
            return
        for chunk in stored.chunks.values():
            if isinstance(chunk, Path):
                self.disk_bytes -= max(chunk.stat().st_size - 128, 0) if chunk.exists() else 0
                chunk.unlink(missing_ok=True)
            else:
                self.ram_bytes -= chunk.nbytes

    def clear(self) -> None:
        for name in list(self._tensors):
            self.drop(name)

    def close(self) -> None:
        self.clear()
        if self._folder is not None:
            shutil.rmtree(self._folder, ignore_errors=True)
            self._folder = None

    def _folder_path(self) -> Path:
        if self._folder is None:
            self._folder = Path(tempfile.mkdtemp(prefix="onnx-thinet-activations-"))
            logger.info("activations beyond %d MB go to %s", self.ram_budget >> 20, self._folder)
        return self._folder

