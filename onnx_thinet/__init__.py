"""onnx-thinet: ThiNet filter pruning for ONNX CNNs, giving a structurally thinner ONNX graph."""

from __future__ import annotations

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
