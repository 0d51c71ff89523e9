"""User-facing errors: the CLI prints their message as one line and exits non-zero."""

from __future__ import annotations

__all__ = ["ThinetError"]


class ThinetError(Exception):
    """A problem with the user's input (model, data, options), not a bug in onnx-thinet."""
