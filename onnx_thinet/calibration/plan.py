"""How a calibration run fits in memory: batch size, activations kept in memory, or a refusal.

The estimate counts the model's weights (the original, the reference and the copy being
pruned, plus onnxruntime's), one batch of the widest activations, and the largest single
layer's statistics. A budget below what one image needs is refused before any work starts;
otherwise batches shrink and stored activations go to disk until the estimate fits.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import os
import re
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import onnx

from onnx_thinet.channels.layout import ChannelGroup
from onnx_thinet.errors import ThinetError
from onnx_thinet.io.feeds import ONNX_TO_NUMPY

__all__ = ["MemoryPlan", "largest_statistics", "machine_memory", "parse_size", "plan_memory"]

logger = logging.getLogger(__name__)

MODEL_COPIES = 4  # original, reference, pruned copy, and the onnxruntime session's weights
ACTIVATION_COPIES = 6  # a batch's inputs, outputs, the reference's, and onnxruntime's buffers
DEFAULT_CAP = 4 * 2**30  # the default budget: what the run needs, not what the machine has
STORE_CAP = 2**30  # stored activations beyond this go to disk, whatever the budget
_UNITS = {"": 1, "B": 1, "K": 2**10, "M": 2**20, "G": 2**30, "T": 2**40}


@dataclass(frozen=True)
class MemoryPlan:
    """What the run will use: bytes per part, the batch size and the in-memory activation budget."""

    budget: int
    weights: int
    statistics: int
    statistics_layer: str
    activations_per_image: int
    batch_size: int
    store_ram: int

    @property
    def peak(self) -> int:
        return self.weights + self.statistics + self.activations_per_image * self.batch_size + self.store_ram

    def store_ram_for(self, statistics: int) -> int:
        """Stored activations kept in memory while a pass holds `statistics` bytes: half the room
        beside the weights and a batch. `store_ram` is this for the largest layer; a pass far
        from it keeps much more (VGG-16's conv passes beside its 25,088-wide FC layer)."""
        room = self.budget - self.weights - statistics - self.activations_per_image * self.batch_size
        return min(max(0, room // 2), STORE_CAP)


def parse_size(text: str) -> int:
    """`4G`, `512M`, `1.5GB`, `2000000000` → bytes (powers of 1024 for the units)."""
    match = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([KMGT]?)(I?B)?\s*", text.upper())
    if not match:
        raise ThinetError(f"max_memory: cannot read {text!r} (use e.g. 4G, 512M or a byte count)",
                          params=("max_memory",))
    return int(float(match.group(1)) * _UNITS[match.group(2)])


def machine_memory() -> int:
    """80% of the memory available now (/proc/meminfo MemAvailable, else physical), at most 4 GB."""
    try:
        with open("/proc/meminfo") as f:
            info = dict(line.split(":", 1) for line in f if ":" in line)
        available = int(info["MemAvailable"].split()[0]) * 1024
    except (OSError, KeyError, ValueError):
        available = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    return int(min(available * 0.8, DEFAULT_CAP))


def plan_memory(model: onnx.ModelProto, groups: Sequence[ChannelGroup], images: int, batch_size: int,
                budget: int, fixed_batch: int | None = None, keep_ratio: float = 1.0) -> MemoryPlan:
    """Choose the batch size and in-memory activation budget, or refuse when nothing fits."""
    weights = MODEL_COPIES * sum(_tensor_bytes(t.dims, t.data_type) for t in model.graph.initializer)
    statistics, layer = largest_statistics(model, groups, images, keep_ratio)
    per_image = ACTIVATION_COPIES * _widest_activation(model)
    smallest = fixed_batch or 1
    need = weights + statistics + per_image * smallest
    if need > budget:
        raise ThinetError(
            f"max_memory {_mb(budget)}: slimming needs at least {_mb(need)} "
            f"(weights {_mb(weights)}, statistics of {layer} {_mb(statistics)}, "
            f"activations of {smallest} image(s) {_mb(per_image * smallest)}); "
            "raise max_memory or slim a smaller model", params=("max_memory",))
    room = budget - weights - statistics
    batch = max(smallest, min(batch_size, room // max(per_image, 1)))
    if batch < batch_size:
        logger.info("batches of %d images to stay within --max-memory %s", batch, _mb(budget))
    plan = MemoryPlan(budget, weights, statistics, layer, per_image, int(batch), 0)
    return dataclasses.replace(plan, store_ram=plan.store_ram_for(statistics))


def largest_statistics(model: onnx.ModelProto, groups: Sequence[ChannelGroup], images: int,
                       keep_ratio: float) -> tuple[int, str]:
    """Bytes of the largest layer's statistics: channel Gram, refit moments or kept rows."""
    shapes = {t.name: tuple(t.dims) for t in model.graph.initializer}
    nodes = {n.name: n for n in model.graph.node}
    largest, name = 0, "no layer"
    for group in groups:
        for consumer in group.consumers:
            weight = shapes.get(nodes[consumer.node].input[consumer.weight.input_index], ())
            if len(weight) < 2:
                continue
            if consumer.kind.windowed:
                outputs = weight[0]
                dims = math.ceil(weight[1] * keep_ratio) * int(np.prod(weight[2:], dtype=np.int64))
                rows = dims  # moments: dims² however many rows
            else:
                dims_full, outputs = (weight[1], weight[0]) if consumer.transpose else weight[:2]
                dims = math.ceil(dims_full * keep_ratio)
                rows = min(dims, images * 4)  # kept rows when fewer than dims
            size = 8 * (3 * (rows * dims + dims * outputs) + 4 * group.channels**2)
            if size > largest:
                largest, name = size, consumer.node
    return largest, name


def _widest_activation(model: onnx.ModelProto) -> int:
    """Bytes per image of the largest intermediate tensor whose shape is known."""
    widest = 0
    for value in [*model.graph.input, *model.graph.value_info, *model.graph.output]:
        tensor = value.type.tensor_type
        dims = [d.dim_value if d.HasField("dim_value") else 0 for d in tensor.shape.dim]
        if not dims or any(d <= 0 for d in dims[1:]):
            continue
        widest = max(widest, _tensor_bytes([1, *dims[1:]], tensor.elem_type))
    return widest


def _tensor_bytes(dims, data_type: int) -> int:
    itemsize = np.dtype(ONNX_TO_NUMPY.get(data_type, np.float32)).itemsize
    return int(np.prod(dims, dtype=np.int64)) * itemsize


def _mb(size: int) -> str:
    return f"{size / 2**20:,.0f} MB" if size < 2**30 else f"{size / 2**30:.1f} GB"
