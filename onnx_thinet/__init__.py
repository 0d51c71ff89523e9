"""onnx-thinet: ThiNet filter pruning for ONNX CNNs, giving a structurally thinner ONNX graph."""

from __future__ import annotations

import os

# OpenBLAS's worker threads spin for about 0.1 s after each threaded product before they
# sleep, on the cores onnxruntime's threads run on next: a Conv run right after a two-thread
# product took 1.6x as long. OpenBLAS reads this when it loads (with numpy or scipy), so it is
# set first; a value the user set wins. Slim with it: ResNet-50 18.0, 17.9 s → 16.3, 16.2 s
# (29 → 24.5 CPU-s), VGG-16 52.5, 50.2 s → 48.1, 47.1 s, alternating runs (docs/engine.md).
os.environ.setdefault("OPENBLAS_THREAD_TIMEOUT", "4")

from onnx_thinet.channels.analysis import Analysis, analyze
from onnx_thinet.channels.layout import ChannelGroup, Consumer, Coupled, ParamSlice, Skipped
from onnx_thinet.errors import InternalError, ThinetError
from onnx_thinet.io.canonical import canonicalize
from onnx_thinet.io.data import Preprocess, load_calibration, parse_preprocess
from onnx_thinet.io.graph import load_model, save_model_atomic
from onnx_thinet.pytorch.export import export_torch, to_onnx
from onnx_thinet.slim import GroupResult, SlimConfig, SlimResult, slim

__all__ = [
    "Analysis",
    "ChannelGroup",
    "Consumer",
    "Coupled",
    "GroupResult",
    "InternalError",
    "ParamSlice",
    "Preprocess",
    "SlimConfig",
    "SlimResult",
    "Skipped",
    "ThinetError",
    "analyze",
    "canonicalize",
    "export_torch",
    "load_calibration",
    "load_model",
    "parse_preprocess",
    "save_model_atomic",
    "slim",
    "to_onnx",
]

__version__ = "0.1.0"
