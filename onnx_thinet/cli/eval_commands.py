"""`onnx-thinet eval`: accuracy of a model on labelled data, and agreement with the original."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated, Optional

import typer

__all__ = ["register"]


def register(app: typer.Typer) -> None:
    from onnx_thinet.cli.errors import cli_errors
    from onnx_thinet.cli.main import out

    @app.command("eval")
    @cli_errors
    def eval_command(
        model: Annotated[Path, typer.Argument(help="ONNX model to evaluate.")],
        data: Annotated[Path, typer.Option("--data", help=".npz with x and y, or an image folder with one sub-folder per class.")],
        reference: Annotated[Optional[Path], typer.Option("--reference", help="Original model: report top-1 agreement and output error.")] = None,
        preprocess: Annotated[str, typer.Option("--preprocess", help="For image folders, as in `slim`.")] = "unit",
        batch_size: Annotated[int, typer.Option("--batch-size")] = 256,
        device: Annotated[str, typer.Option("--device")] = "auto",
        as_json: Annotated[bool, typer.Option("--json", help="Print JSON.")] = False,
    ) -> None:
        """Top-1 accuracy on labelled data; with --reference, agreement and output error."""
        from onnx_thinet.check.evaluate import evaluate, load_labelled
        from onnx_thinet.io.data import parse_preprocess
        from onnx_thinet.io.graph import load_model

        candidate = load_model(model)
        original = load_model(reference) if reference is not None else None
        dataset, labels = load_labelled(data, candidate, parse_preprocess(preprocess))
        result = evaluate(candidate, dataset, labels, original, batch_size=batch_size, device=device)
        if as_json:
            out.print_json(json.dumps(result.__dict__))
            return
        out.print(f"samples: {result.samples}", highlight=False)
        out.print(f"top-1 accuracy: {result.accuracy:.4f}", highlight=False)
        if original is not None:
            out.print(f"top-1 agreement with reference: {result.top1_agreement:.4f}", highlight=False)
            out.print(f"mean |output - reference|: {result.mean_abs_error:.4g} "
                      f"(relative {result.rel_error:.4g})", highlight=False)
