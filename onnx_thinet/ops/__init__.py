"""One registry entry per ONNX op: its channel rule, whether coupled pruning may traverse it,
and its PyTorch translator, declared together in one module per op family."""

from __future__ import annotations

from onnx_thinet.ops import (  # noqa: F401  (importing a family fills the registry)
    activations,
    axes,
    conv,
    elementwise,
    indexing,
    normalization,
    pooling,
    resize,
    shapes,
)
from onnx_thinet.ops import registry as _registry
from onnx_thinet.ops.registry import *  # noqa: F403  (the registry's API is the package's)

__all__ = list(_registry.__all__)
