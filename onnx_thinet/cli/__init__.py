"""The `onnx-thinet` command line: a thin layer over the Python API."""

from __future__ import annotations

from onnx_thinet.cli.main import app, main

__all__ = ["app", "main"]
