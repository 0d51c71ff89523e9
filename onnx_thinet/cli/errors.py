"""How the CLI reports failures: one `error:` line, exit 2 for the user's mistakes, exit 1 for ours.

The library names Python parameters in its messages (`keep_ratio`); here they become the
flags the user typed (`--keep-ratio`). Internal errors ask for a report; the traceback is
shown only with ONNX_THINET_DEBUG=1.
"""

from __future__ import annotations

import functools
import os
import re
import signal
from collections.abc import Callable
from typing import Any

import typer

from onnx_thinet.errors import InternalError, ThinetError

__all__ = ["EXIT_INTERNAL", "EXIT_USER", "as_flags", "cli_errors", "interrupted"]

EXIT_USER = 2  # the input (model, data, options) is wrong
EXIT_INTERNAL = 1  # onnx-thinet is wrong: please report

# Parameters whose flag is not `--` + the name with dashes.
_FLAG_TEXT = {"resume=False": "--no-resume"}
_REPORT = "please report this bug with the command that failed"


def as_flags(message: str, params: tuple[str, ...]) -> str:
    """`message` with each named parameter written as its CLI flag (keep_ratio -> --keep-ratio)."""
    for text, flag in _FLAG_TEXT.items():
        if text.split("=")[0] in params:
            message = message.replace(text, flag)
    for name in params:
        message = re.sub(rf"(?<![\w-]){re.escape(name)}\b", "--" + name.replace("_", "-"), message)
    return message


def cli_errors(fn: Callable[..., Any]) -> Callable[..., Any]:
    """Run a command; print any failure as one `error:` line on stderr and exit 2 or 1."""

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return fn(*args, **kwargs)
        except ThinetError as exc:
            _print(f"error: {as_flags(str(exc), exc.params)}")
            raise typer.Exit(EXIT_USER) from None
        except KeyboardInterrupt as exc:  # SIGINT, or SIGTERM through cli.main's handler
            raise typer.Exit(interrupted(exc)) from None
        except (typer.Exit, typer.Abort):
            raise
        except Exception as exc:  # InternalError and anything unforeseen: a bug of ours
            if os.environ.get("ONNX_THINET_DEBUG") == "1":
                raise
            kind = "" if isinstance(exc, InternalError) else f"{type(exc).__name__}: "
            detail = " ".join(str(exc).split())
            _print(f"error: internal error: {kind}{detail} ({_REPORT}; "
                   "set ONNX_THINET_DEBUG=1 for the traceback)")
            raise typer.Exit(EXIT_INTERNAL) from None

    return wrapper


def interrupted(exc: KeyboardInterrupt) -> int:
    """One line for SIGINT/SIGTERM; returns the exit code shells use for that signal (130, 143)."""
    name = str(exc) or "SIGINT"
    _print(f"error: interrupted by {name}; nothing written")
    return 128 + getattr(signal, name, signal.SIGINT)


def _print(line: str) -> None:
    typer.echo(line, err=True)
