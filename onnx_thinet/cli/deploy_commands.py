"""`onnx-thinet export-triton`: a Triton Inference Server model repository for a (slim) model."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer

__all__ = ["register"]


def register(app: typer.Typer) -> None:
    from onnx_thinet.cli.errors import cli_errors
    from onnx_thinet.cli.main import out

    @app.command("export-triton")
    @cli_errors
    def export_triton_command(
        model: Annotated[Path, typer.Argument(help="ONNX model to serve (usually the slim one).")],
        repo: Annotated[Path, typer.Option("--repo", help="Triton model repository folder (created if missing).")],
        name: Annotated[Optional[str], typer.Option("--name", help="Model name in the repository [default: file stem].")] = None,
        max_batch: Annotated[int, typer.Option("--max-batch", help="max_batch_size when the batch axis is dynamic (0: no batching).")] = 32,
        device: Annotated[str, typer.Option("--device", help="cpu | gpu instance group.")] = "cpu",
        force: Annotated[bool, typer.Option("--force", help="Replace an existing model of that name.")] = False,
    ) -> None:
        """Write REPO/NAME/1/model.onnx and REPO/NAME/config.pbtxt for Triton's onnxruntime backend."""
        from onnx_thinet.deploy.triton import write_triton_repository
        from onnx_thinet.errors import ThinetError
        from onnx_thinet.io.graph import load_model

        chosen = name or model.name.removesuffix(".onnx").replace(".", "_")
        target = repo / chosen
        if target.exists() and not force:
            raise ThinetError(f"{target}: already exists (use --force to replace it)")
        folder = write_triton_repository(load_model(model), repo, chosen, max_batch, device)
        out.print(f"wrote {folder / '1' / 'model.onnx'} and {folder / 'config.pbtxt'}", highlight=False)
