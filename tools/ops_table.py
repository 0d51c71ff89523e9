"""Print the supported-ops table (markdown) from the op registry: for each ONNX op, whether
slim prunes through it (channel rule), how --prune-coupled traverses it, and whether
export-torch translates it. Usage: python3 tools/ops_table.py"""

from __future__ import annotations

import inspect

from onnx_thinet.ops import REGISTRY


def _family(entry) -> str:
    fn = entry.translate or entry.rule
    return inspect.getmodule(fn).__name__.rsplit(".", 1)[-1] if fn else ""


def main() -> None:
    print("| op | family | slim prunes through | `--prune-coupled` traverses | export-torch |")
    print("| --- | --- | --- | --- | --- |")
    for op, entry in sorted(REGISTRY.items(), key=lambda kv: (_family(kv[1]), kv[0])):
        rule = "yes" if entry.rule is not None else "no"
        traverse = {"no": "no", "data": "input 0", "operands": "all operands", "split": "split window"}
        torch = "yes" if entry.translate is not None else f"no: {entry.untranslated}"
        print(f"| {op} | {_family(entry)} | {rule} | {traverse[entry.traverse]} | {torch} |")


if __name__ == "__main__":
    main()
