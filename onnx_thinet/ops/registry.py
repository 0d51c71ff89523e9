"""The op registry: one entry per ONNX op type, declaring together its channel rule (how pruned
channels pass through it), whether coupled pruning may trace producers through it, and its
PyTorch translator, or why it has none. Filled by the op family modules of this package."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import onnx

from onnx_thinet.channels.rules import Rule

if TYPE_CHECKING:
    from onnx_thinet.pytorch.codegen import Codegen

__all__ = [
    "REGISTRY",
    "TRAVERSE",
    "OpEntry",
    "Translator",
    "channel_rule",
    "register",
    "rule_ops",
    "translatable_ops",
    "translator",
    "traversal",
    "untranslated",
]

Translator = Callable[["Codegen", onnx.NodeProto], None]


@dataclass(frozen=True)
class OpEntry:
    """Everything onnx-thinet knows about one op type."""

    op_type: str
    rule: Rule | None  # None: channels never pass (the op is never proven per-channel)
    traverse: str  # how coupled pruning traces tied producers back: see TRAVERSE
    translate: Translator | None
    untranslated: str | None  # why there is no translator (required when translate is None)


REGISTRY: dict[str, OpEntry] = {}

# "no": never; "data": back through input 0 (a per-channel op whose other inputs are
# constants); "operands": through every computed operand (residual sums, gating products);
# "split": back through a channel Split, narrowed to the window of one output.
TRAVERSE = ("no", "data", "operands", "split")


def _add(entry: OpEntry) -> None:
    if entry.op_type in REGISTRY:
        raise ValueError(f"duplicate registry entry for op {entry.op_type}")
    if entry.traverse not in TRAVERSE:
        raise ValueError(f"op {entry.op_type}: traverse must be one of {TRAVERSE}")
    if entry.translate is None and not entry.untranslated:
        raise ValueError(f"op {entry.op_type} has no translator and does not say why")
    REGISTRY[entry.op_type] = entry


def register(
    *op_types: str,
    rule: Rule | None = None,
    traverse: str = "no",
    untranslated: str | None = None,
) -> Callable[[Any], Any]:
    """Decorate a translator: one registry entry per op type; a second entry is a bug.

    Decorating ``None``-returning placeholders is not allowed: an op without a translator is
    declared with ``register(..., untranslated="why")(None)``.
    """

    def add(translate: Translator | None) -> Translator | None:
        for op_type in op_types:
            _add(OpEntry(op_type, rule, traverse, translate, untranslated))
        return translate

    return add


def channel_rule(op_type: str) -> Rule | None:
    entry = REGISTRY.get(op_type)
    return None if entry is None else entry.rule


def traversal(op_type: str) -> str:
    """How coupled pruning may trace producers back through this op (one of TRAVERSE)."""
    entry = REGISTRY.get(op_type)
    return "no" if entry is None else entry.traverse


def translator(op_type: str) -> Translator | None:
    entry = REGISTRY.get(op_type)
    return None if entry is None else entry.translate


def rule_ops() -> list[str]:
    """Op types with a channel rule (what slim can prune through), sorted."""
    return sorted(op for op, e in REGISTRY.items() if e.rule is not None)


def translatable_ops() -> list[str]:
    """Op types export-torch can translate, sorted."""
    return sorted(op for op, e in REGISTRY.items() if e.translate is not None)


def untranslated() -> dict[str, str]:
    """Op types without a translator, with the reason each declares."""
    return {op: e.untranslated or "" for op, e in sorted(REGISTRY.items()) if e.translate is None}
