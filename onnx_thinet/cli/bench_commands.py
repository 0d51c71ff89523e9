"""`onnx-thinet bench`: measured latency of the original and the slim model, FLOPs gain beside it."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated, Optional

import typer
from rich.console import Console
from rich.table import Table

__all__ = ["parse_batches", "print_bench", "print_budget", "register"]


def parse_batches(text: str) -> tuple[int, ...]:
    from onnx_thinet.errors import ThinetError

    try:
        batches = tuple(int(part) for part in text.split(",") if part.strip())
    except ValueError:
        raise ThinetError(f"--batch must be comma-separated integers such as 1,8 (got {text!r})") from None
    if not batches or min(batches) < 1:
        raise ThinetError(f"--batch must list batch sizes of at least 1 (got {text!r})")
    return batches


def print_bench(console: Console, report: dict) -> None:
    table = Table(title=f"latency ({report['device']}, threads {report['threads'] or 'all'})", title_justify="left")
    for col in ("batch", "original median / p90 ms", "slim median / p90 ms", "throughput/s orig → slim",
                "latency gain", "FLOPs gain"):
        table.add_column(col)
    for row in report["batches"]:
        o, s = row["original"], row["slim"]
        table.add_row(str(row["batch"]), f"{o['median_ms']:.3f} / {o['p90_ms']:.3f}",
                      f"{s['median_ms']:.3f} / {s['p90_ms']:.3f}", f"{o['throughput']:,.1f} → {s['throughput']:,.1f}",
                      f"x{row['latency_gain']:.2f}", f"x{row['flops_gain']:.2f}")
    console.print(table)
    console.print(f"params {report['params']['original']:,} → {report['params']['slim']:,} "
                  f"(x{report['params_gain']:.2f}); {report['isolation']}", highlight=False)


def print_budget(console: Console, content: dict) -> None:
    """The plan's per-layer keep ratios and the guard's outcome, when the run had them."""
    budget, guard = content.get("budget"), content.get("guard")
    if budget and budget.get("layers"):
        table = Table(title=f"budget: {budget['target']} {budget['asked']:.3g} of the original "
                            f"(got {budget['flops_fraction']:.3g} FLOPs, {budget['params_fraction']:.3g} params)",
                      title_justify="left")
        for col in ("producer", "keep", "ratio", "why"):
            table.add_column(col, overflow="fold")
        for layer in budget["layers"]:
            table.add_row(layer["producer"], f"{layer['keep']}/{layer['channels']}", f"{layer['keep_ratio']:.2f}",
                          layer["why"])
        console.print(table)
    if budget and budget.get("latency"):
        lat = budget["latency"]
        console.print(f"latency: asked {lat['asked']:.3g} of the original, planned structure measured "
                      f"{lat['measured_fraction']:.3g} at {lat['flops_fraction']:.3g} of the FLOPs", highlight=False)
    if guard:
        agreement = guard["achieved_agreement"]
        achieved = (f"agreement {agreement:.2%}, " if agreement is not None else "") + f"error {guard['achieved_error']:.4g}"
        console.print(f"guard: {achieved} on {guard['holdout_samples']} held-out images; stopped at "
                      f"{guard['stopped_at']} ({len(guard['tries'])} tries)", highlight=False)
    if content.get("bench"):
        print_bench(console, content["bench"])


def register(app: typer.Typer) -> None:
    from onnx_thinet.cli.errors import cli_errors
    from onnx_thinet.cli.main import _check_output, out
    from onnx_thinet.io.files import write_text_atomic

    @app.command("bench")
    @cli_errors
    def bench_command(
        original: Annotated[Path, typer.Argument(help="The original ONNX model.")],
        slim: Annotated[Path, typer.Argument(help="The slim ONNX model.")],
        batch: Annotated[str, typer.Option("--batch", help="Batch sizes, comma-separated.")] = "1",
        threads: Annotated[Optional[int], typer.Option("--threads", help="Intra-op threads [default: all cores].")] = None,
        device: Annotated[str, typer.Option("--device", help="cpu | cuda (onnxruntime provider).")] = "cpu",
        rounds: Annotated[int, typer.Option("--rounds", help="Alternating rounds per model (about 0.25 s each).")] = 12,
        report: Annotated[Optional[Path], typer.Option("--report", help="Write the JSON report here.")] = None,
        force: Annotated[bool, typer.Option("--force", help="Overwrite an existing report.")] = False,
    ) -> None:
        """Latency (median, p90) and throughput of both models, each in its own process; FLOPs beside."""
        from onnx_thinet.check.bench import bench_models
        from onnx_thinet.errors import ThinetError

        if device not in ("cpu", "cuda"):
            raise ThinetError(f"--device must be cpu or cuda (got {device!r})")
        if threads is not None and threads < 1 or rounds < 1:
            raise ThinetError("--threads and --rounds must be at least 1")
        for path in (original, slim):
            if not path.is_file():
                raise ThinetError(f"{path}: no such model file")
        if report is not None:
            _check_output(original, report, force)
        batches = parse_batches(batch)
        content = bench_models(original, slim, batches, threads, device, rounds)
        if report is not None:
            write_text_atomic(report, json.dumps(content, indent=2) + "\n")
        print_bench(out, content)
