"""PyTorch commands of the onnx-thinet CLI: export-torch and finetune.

Why a separate module: these commands need the optional torch dependency; the main
CLI calls ``register(app)`` and the commands import torch only when they run.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Annotated

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

from onnx_thinet.cli.errors import cli_errors
from onnx_thinet.errors import ThinetError

__all__ = ["register"]

logger = logging.getLogger(__name__)


def _require_onnx_file(path: Path, what: str) -> None:
    """Catch the common mistakes before any heavy import."""
    if not path.exists():
        raise ThinetError(f"{what} not found: {path}")
    if not path.is_file():
        raise ThinetError(f"{what} is not a file: {path}")


@cli_errors
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


# The finetune command's options, one alias each so the command reads as a list.
Teacher = Annotated[Path, typer.Option("--teacher", help="Original, unpruned model (ORIGINAL.onnx).")]
Data = Annotated[
    Path, typer.Option("--data", help=".npz with x (and optional int labels y), or .npy of inputs.")
]
Output = Annotated[Path, typer.Option("--output", "-o", help="Where to write the fine-tuned ONNX model.")]
Epochs = Annotated[int, typer.Option("--epochs", min=1, help="Passes over the data.")]
Device = Annotated[
    str, typer.Option("--device", help="auto (cuda when torch sees a GPU) | cpu | cuda.")
]
Lr = Annotated[float, typer.Option("--lr", help="Peak learning rate (Adam, cosine decay).")]
BatchSize = Annotated[int, typer.Option("--batch-size", min=1)]
Temperature = Annotated[float, typer.Option("--temperature", help="Distillation temperature.")]
CheckpointDir = Annotated[
    Path | None,
    typer.Option("--checkpoint-dir", help="Save a checkpoint here every epoch; resume from it."),
]
Resume = Annotated[bool, typer.Option("--resume/--no-resume", help="Resume from --checkpoint-dir.")]
Augment = Annotated[
    bool,
    typer.Option(
        "--augment/--no-augment",
        help="Random shifts and flips (images); off by default: measured worse for short runs.",
    ),
]
MaxSteps = Annotated[int | None, typer.Option("--max-steps", min=1, help="Stop after this many steps.")]
Seed = Annotated[int, typer.Option("--seed")]
Force = Annotated[bool, typer.Option("--force", help="Overwrite --output if it exists.")]


@cli_errors
def finetune_command(
    model: Annotated[Path, typer.Argument(help="Pruned student model (SLIM.onnx).")],
    teacher: Teacher,
    data: Data,
    output: Output,
    epochs: Epochs = 10,
    device: Device = "auto",
    lr: Lr = 1e-3,
    batch_size: BatchSize = 64,
    temperature: Temperature = 4.0,
    checkpoint_dir: CheckpointDir = None,
    resume: Resume = True,
    augment: Augment = False,
    max_steps: MaxSteps = None,
    seed: Seed = 0,
    force: Force = False,
) -> None:
    """Recover a pruned model's accuracy by distilling the original model into it."""
    from onnx_thinet.pytorch.finetune import finetune

    _check_finetune_paths(model, teacher, data, output, force)
    options = dict(device=device, lr=lr, batch_size=batch_size, temperature=temperature,
                   checkpoint_dir=checkpoint_dir, resume=resume, augment=augment,
                   max_steps=max_steps, seed=seed)
    try:
        result = _run_with_progress(finetune, model, teacher, data, epochs, output, **options)
    except KeyboardInterrupt:
        where = f"; rerun to resume from {checkpoint_dir}" if checkpoint_dir else ""
        typer.echo(f"interrupted{where}", err=True)
        raise typer.Exit(130) from None
    typer.echo(
        f"wrote {result.output}: {result.epochs} epochs, {result.steps} steps, "
        f"{result.seconds_per_epoch:.2f} s/epoch, {result.samples_per_second:.0f} samples/s, "
        f"distillation loss {result.initial_loss:.4f} -> {result.final_loss:.4f}"
    )


def _check_finetune_paths(model: Path, teacher: Path, data: Path, output: Path, force: bool) -> None:
    """The common mistakes, before torch is imported."""
    _require_onnx_file(model, "student model")
    _require_onnx_file(teacher, "teacher model")
    if not data.is_file():
        raise ThinetError(f"data file not found: {data}")
    if output.exists() and not force:
        raise ThinetError(f"{output} already exists; pass --force to overwrite it")
    if output.resolve() in (model.resolve(), teacher.resolve()) and not force:
        raise ThinetError("--output must differ from the student and teacher models")


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
