"""Two kinds of failure: the user's input is wrong (ThinetError) or onnx-thinet is (InternalError).

The CLI prints a ThinetError as one `error:` line and exits 2; an InternalError (or any other
unexpected exception) as one `error: internal error: ...` line asking for a report, exit 1.
Library messages name Python parameters (`keep_ratio`); the CLI turns the names listed in
`ThinetError.params` into its flags (`--keep-ratio`) when it prints.
"""

from __future__ import annotations

__all__ = ["InternalError", "ThinetError", "one_line"]


class ThinetError(Exception):
    """A problem with the user's input (model, data, options), not a bug in onnx-thinet.

    `params` names the API parameters the message mentions, so that a front end can show
    them under its own names (the CLI shows `keep_ratio` as `--keep-ratio`).
    """

    def __init__(self, message: str, *, params: tuple[str, ...] = ()) -> None:
        super().__init__(message)
        self.params = tuple(params)


class InternalError(Exception):
    """A broken invariant inside onnx-thinet (a rewrite the checker refuses, ...): a bug to report."""


def one_line(exc: BaseException, limit: int = 300) -> str:
    """The first line of an exception's message (third-party messages run over many lines),
    or its type name when it has none: what a one-line error shows of a cause."""
    text = str(exc).strip().splitlines()
    return text[0][:limit] if text else type(exc).__name__
