"""PyTorch commands of the onnx-thinet CLI: export-torch and finetune.

Why a separate module: these commands need the optional torch dependency; the main
CLI calls ``register(app)`` and the commands import torch only when they run.
"""

from __future__ import annotations

import functools
import logging
import os
from collections.abc import Callable
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)

from onnx_thinet.errors import ThinetError

__all__ = ["register"]

logger = logging.getLogger(__name__)


def _user_errors(fn: Callable[..., None]) -> Callable[..., None]:
    """ThinetError -> one 'error: ...' line on stderr and exit 2; never a traceback.

    Unexpected exceptions become one 'error: internal error: ...' line and exit 1
    (ONNX_THINET_DEBUG=1 shows the traceback), like the main CLI.
    """

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> None:
        try:
            return fn(*args, **kwargs)
        except ThinetError as exc:
            typer.echo(f"error: {exc}", err=True)
            raise typer.Exit(2) from None
        except (typer.Exit, typer.Abort, KeyboardInterrupt):
            raise
        except Exception as exc:
            if os.environ.get("ONNX_THINET_DEBUG") == "1":
                raise
            typer.echo(
                f"error: internal error: {type(exc).__name__}: {exc} "
                "(set ONNX_THINET_DEBUG=1 for the traceback)",
                err=True,
            )
            raise typer.Exit(1) from None

    return wrapper


def _require_onnx_file(path: Path, what: str) -> None:
    """Catch the common mistakes before any heavy import."""
    if not path.exists():
        raise ThinetError(f"{what} not found: {path}")
    if not path.is_file():
        raise ThinetError(f"{what} is not a file: {path}")


@_user_errors
def export_torch_command(
    model: Annotated[
        Path, typer.Argument(help="ONNX model to convert (e.g. the pruned SLIM.onnx).")
    ],
    output: Annotated[
        Path, typer.Option("--output", "-o", help="Directory for model.py and weights.pt.")
    ],
) -> None:
    """Write a readable PyTorch nn.Module (model.py + weights.pt) equivalent to an ONNX model."""
    from onnx_thinet.pytorch.export import export_torch

    _require_onnx_file(model, "model")
    model_py = export_torch(model, output)
    directory = model_py.parent
    typer.echo(f"wrote {model_py} and {directory / 'weights.pt'}")
    typer.echo("load it with:")
    typer.echo(f"    import sys; sys.path.insert(0, {str(directory)!r})")
    typer.echo("    from model import load")
    typer.echo("    net = load()  # torch.nn.Module in eval mode")


@_user_errors
def finetune_command(
    model: Annotated[Path, typer.Argument(help="Pruned student model (SLIM.onnx).")],
    teacher: Annotated[
        Path, typer.Option("--teacher", help="Original, unpruned model (ORIGINAL.onnx).")
    ],
    data: Annotated[
        Path,
        typer.Option("--data", help=".npz with x (and optional int labels y), or .npy of inputs."),
    ],
    output: Annotated[
        Path, typer.Option("--output", "-o", help="Where to write the fine-tuned ONNX model.")
    ],
    epochs: Annotated[int, typer.Option("--epochs", min=1, help="Passes over the data.")] = 10,
    device: Annotated[str, typer.Option("--device", help="cpu or cuda.")] = "cpu",
    lr: Annotated[
        float, typer.Option("--lr", help="Peak learning rate (Adam, cosine decay).")
    ] = 1e-3,
    batch_size: Annotated[int, typer.Option("--batch-size", min=1)] = 64,
    temperature: Annotated[
        float, typer.Option("--temperature", help="Distillation temperature.")
    ] = 4.0,
    checkpoint_dir: Annotated[
        Path | None,
        typer.Option(
            "--checkpoint-dir", help="Save a checkpoint here every epoch; resume from it."
        ),
    ] = None,
    resume: Annotated[
        bool, typer.Option("--resume/--no-resume", help="Resume from --checkpoint-dir.")
    ] = True,
    augment: Annotated[
        bool, typer.Option(
            "--augment/--no-augment",
            help="Random shifts and flips (images); off by default: measured worse for short runs.",
        ),
    ] = False,
    max_steps: Annotated[
        int | None, typer.Option("--max-steps", min=1, help="Stop after this many steps.")
    ] = None,
    seed: Annotated[int, typer.Option("--seed")] = 0,
    force: Annotated[
        bool, typer.Option("--force", help="Overwrite --output if it exists.")
    ] = False,
) -> None:
    """Recover a pruned model's accuracy by distilling the original model into it."""
    from onnx_thinet.pytorch.finetune import finetune

    _require_onnx_file(model, "student model")
    _require_onnx_file(teacher, "teacher model")
    if not data.is_file():
        raise ThinetError(f"data file not found: {data}")
    if output.exists() and not force:
        raise ThinetError(f"{output} already exists; pass --force to overwrite it")
    if output.resolve() in (model.resolve(), teacher.resolve()) and not force:
        raise ThinetError("--output must differ from the student and teacher models")
    try:
        result = _run_with_progress(
            finetune,
            model,
            teacher,
            data,
            epochs,
            output,
            device=device,
            lr=lr,
            batch_size=batch_size,
            temperature=temperature,
            checkpoint_dir=checkpoint_dir,
            resume=resume,
            augment=augment,
            max_steps=max_steps,
            seed=seed,
        )
    except KeyboardInterrupt:
        where = f"; rerun to resume from {checkpoint_dir}" if checkpoint_dir else ""
        typer.echo(f"interrupted{where}", err=True)
        raise typer.Exit(130) from None
    typer.echo(
        f"wrote {result.output}: {result.epochs} epochs, {result.steps} steps, "
        f"{result.seconds_per_epoch:.2f} s/epoch, {result.samples_per_second:.0f} samples/s, "
        f"distillation loss {result.initial_loss:.4f} -> {result.final_loss:.4f}"
    )


def _run_with_progress(finetune, *args, **kwargs):  # type: ignore[no-untyped-def]
    """Run finetune with a rich progress bar (loss, samples/s) on stderr."""
    console = Console(stderr=True)
    columns = (
        TextColumn("[bold]epoch {task.fields[epoch]}"),
        BarColumn(),
        MofNCompleteColumn(),
        TextColumn("loss {task.fields[loss]:.4f}"),
        TextColumn("{task.fields[sps]:.0f} samples/s"),
        TimeElapsedColumn(),
        TimeRemainingColumn(),
    )
    bar = Progress(*columns, console=console)
    state: dict[str, int] = {}

    def report(p) -> None:  # type: ignore[no-untyped-def]
        if "task" not in state:  # start lazily: input errors print no empty bar
            bar.start()
            state["task"] = bar.add_task(
                "finetune", total=p.total_steps, epoch="-", loss=float("nan"), sps=0.0
            )
        bar.update(
            state["task"],
            total=p.total_steps,
            completed=p.step,
            epoch=f"{p.epoch}/{p.epochs}",
            loss=p.loss,
            sps=p.samples_per_second,
        )

    try:
        return finetune(*args, progress=report, **kwargs)
    finally:
        bar.stop()


def register(app: typer.Typer) -> None:
    """Add the export-torch and finetune commands to the main onnx-thinet app."""
    app.command("export-torch")(export_torch_command)
    app.command("finetune")(finetune_command)
