"""The `onnx-thinet` command line: a thin layer over the Python API that prints and exits."""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import os
import signal
import sys
from pathlib import Path
from typing import Annotated, Optional

import onnx
import typer
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn
from rich.table import Table
from rich.text import Text

from onnx_thinet.calibration.plan import parse_size
from onnx_thinet.channels.analysis import analyze, quantization_refusal
from onnx_thinet.check.metrics import cost_input_shapes, count_params, layer_costs
from onnx_thinet.cli.errors import cli_errors, interrupted
from onnx_thinet.errors import ThinetError
from onnx_thinet.io.canonical import canonicalize
from onnx_thinet.io.data import CalibrationData, load_calibration, parse_preprocess
from onnx_thinet.io.files import write_text_atomic
from onnx_thinet.io.graph import graph_inputs, load_model, save_model_atomic
from onnx_thinet.slim import PassInfo, SlimConfig, SlimResult, slim

app = typer.Typer(
    add_completion=False,
    no_args_is_help=True,
    help="ThiNet filter pruning for ONNX CNNs: a structurally thinner ONNX model, verified.",
)
out = Console()
err = Console(stderr=True)


@app.command("slim")
@cli_errors
def slim_command(
    model: Annotated[Path, typer.Argument(help="ONNX model to slim (never modified).")],
    calib: Annotated[Path, typer.Option("--calib", help=".npy (single input), .npz (keys = input names) or an image folder.")],
    keep_ratio: Annotated[float, typer.Option("--keep-ratio", help="Fraction of channels kept per prunable layer, in (0, 1].")] = 0.5,
    output: Annotated[Optional[Path], typer.Option("--output", "-o", help="Output path [default: MODEL.slim.onnx].")] = None,
    report: Annotated[Optional[Path], typer.Option("--report", help="Write the JSON report here.")] = None,
    method: Annotated[str, typer.Option("--method", help="thinet | thinet-ls | l1 | apoz | random | lasso.")] = "thinet",
    reconstruct: Annotated[str, typer.Option("--reconstruct", help="none | scale (ThiNet's per-channel least-squares factors) | full (refit each reader's weights and bias).")] = "full",
    correct: Annotated[bool, typer.Option("--correct/--no-correct", help="Targets from the original network, so each layer also absorbs earlier layers' error.")] = True,
    ridge: Annotated[Optional[float], typer.Option("--ridge", help="Relative ridge of the full refit [default: chosen by 2-fold cross-validation per layer].")] = None,
    seed: Annotated[int, typer.Option("--seed")] = 0,
    preprocess: Annotated[str, typer.Option("--preprocess", help="Image folders: imagenet | caffe | unit [,size=,resize=,mean=a:b:c,std=,layout=nchw|nhwc,bgr=].")] = "unit",
    samples_per_image: Annotated[Optional[int], typer.Option("--samples-per-image", help="Sampled outputs per image and layer [default: max(10, 20*channels/images)].")] = None,
    batch_size: Annotated[int, typer.Option("--batch-size")] = 32,
    holdout: Annotated[float, typer.Option("--holdout", help="Fraction of CALIB held out to measure the output error.")] = 0.1,
    channel_multiple: Annotated[int, typer.Option("--channel-multiple", help="Round kept channel counts up to a multiple (8 suits most GPU kernels).")] = 1,
    device: Annotated[str, typer.Option("--device", help="auto | cpu | cuda (onnxruntime provider).")] = "auto",
    simplify: Annotated[bool, typer.Option("--simplify/--no-simplify", help="Canonicalize with onnx-simplifier and onnxruntime's basic optimizer first.")] = True,
    prune_coupled: Annotated[bool, typer.Option("--prune-coupled", help="Also prune channels tied by residual Adds / gating Muls, jointly across the tied producers.")] = False,
    finetune_data: Annotated[Optional[Path], typer.Option("--finetune-data", help="Layer-by-layer schedule: fine-tune on this .npz/.npy after each pruning pass (needs torch).")] = None,
    finetune_steps: Annotated[int, typer.Option("--finetune-steps", help="Optimizer steps of each in-between fine-tune.")] = 0,
    only: Annotated[Optional[list[str]], typer.Option("--only", help="Prune only this producer (repeatable; names as `inspect` shows them).")] = None,
    force: Annotated[bool, typer.Option("--force", help="Overwrite an existing output.")] = False,
    quiet: Annotated[bool, typer.Option("--quiet", "-q", help="No progress (bar, or one line per pass when stderr is not a terminal) and no table.")] = False,
    max_memory: Annotated[Optional[str], typer.Option("--max-memory", help="Memory the run may use, e.g. 4G or 512M; batches shrink and activations go to disk to fit, and a run that cannot fit is refused [default: 80% of available memory, at most 4G].")] = None,
    input_shape: Annotated[Optional[list[str]], typer.Option("--input-shape", help="Count FLOPs at this input size: NAME=1,3,640,640 (repeatable) [default: a calibration sample's].")] = None,
    verbose: Annotated[bool, typer.Option("--verbose", "-v", help="Log what canonicalization and analysis tried.")] = False,
    target_flops: Annotated[Optional[float], typer.Option("--target-flops", help="Budget: FLOPs as a fraction of the original's; keep counts per layer from each layer's error curve (replaces --keep-ratio).")] = None,
    target_params: Annotated[Optional[float], typer.Option("--target-params", help="Budget: parameters as a fraction of the original's.")] = None,
    target_latency: Annotated[Optional[float], typer.Option("--target-latency", help="Budget: latency as a fraction of the original's, measured on --device at batch 1.")] = None,
    round_to: Annotated[int, typer.Option("--round-to", help="Keep counts are multiples of N (with budgets and ratios alike).")] = 1,
    min_agreement: Annotated[Optional[float], typer.Option("--min-agreement", help="Guard: held-out top-1 agreement with the original must stay at least A; prunes as far as the budget allows without crossing it.")] = None,
    max_error: Annotated[Optional[float], typer.Option("--max-error", help="Guard: held-out relative output error must stay at most E.")] = None,
    strict: Annotated[bool, typer.Option("--strict", help="Exit 3 when the result fails its checks (agreement under 90%, a collapsed output, a guard not met).")] = False,
    bench: Annotated[bool, typer.Option("--bench", help="Measure latency of original and slim models (as `bench`, batch 1) into the report.")] = False,
    threads: Annotated[Optional[int], typer.Option("--threads", help="Intra-op threads when measuring latency [default: all cores].")] = None,
) -> None:
    """Prune filters with ThiNet and write a thinner, verified ONNX model."""
    _set_verbose(verbose)
    config = SlimConfig(
        keep_ratio=keep_ratio, method=method, reconstruct=reconstruct, correct=correct, ridge=ridge, seed=seed,
        samples_per_image=samples_per_image, batch_size=batch_size, holdout=holdout,
        device=device, simplify=simplify, channel_multiple=channel_multiple,
        only=tuple(only) if only else None, prune_coupled=prune_coupled,
        finetune_data=str(finetune_data) if finetune_data else None, finetune_steps=finetune_steps,
        target_flops=target_flops, target_params=target_params, target_latency=target_latency,
        round_to=round_to, min_agreement=min_agreement, max_error=max_error, threads=threads,
        max_memory=parse_size(max_memory) if max_memory is not None else None,
    )
    config.validate()
    output = _checked_outputs(model, output, report, force)
    original, data, config = _load_inputs(model, calib, preprocess, input_shape, config)
    result = _run_with_progress(original, data, config, quiet)
    with _all_or_nothing(output, report):
        content = _write_slim(result, model, output, report, bench, threads, config.device)
    if not quiet:
        _print_slim_summary(result, content)
    out.print(f"wrote {output}", highlight=False)
    _finish_checks(result, content, strict, quiet)


def _checked_outputs(model: Path, output: Path | None, report: Path | None, force: bool) -> Path:
    """The model's output path (MODEL.slim.onnx by default), refused before any work when taken."""
    output = output or model.with_name(model.stem + ".slim.onnx")
    _check_output(model, output, force)
    if report is not None:
        _check_output(model, report, force)
    return output


def _load_inputs(model: Path, calib: Path, preprocess: str, input_shape: list[str] | None,
                 config: SlimConfig) -> tuple[onnx.ModelProto, CalibrationData, SlimConfig]:
    """The model, its calibration data and the config with any --input-shape counted in."""
    original = load_model(model)
    if input_shape:
        shapes = _parse_input_shapes(input_shape, original)
        config = dataclasses.replace(config, input_shapes=tuple(shapes.items()))
    data = load_calibration(calib, original, parse_preprocess(preprocess))
    return original, data, config


def _write_slim(result: SlimResult, model: Path, output: Path, report: Path | None, bench: bool,
                threads: int | None, device: str) -> dict:
    """Save the slim model and, when asked, its JSON report (with latencies under --bench)."""
    size_after = save_model_atomic(result.model, output)
    content = result.report() | {
        "model": str(model), "output": str(output),
        "file_bytes_before": _file_bytes(model), "file_bytes_after": size_after,
    }
    if bench:
        from onnx_thinet.budgeted import bench_device
        from onnx_thinet.check.bench import bench_models

        content["bench"] = bench_models(model, output, (1,), threads, bench_device(device))
    if report is not None:
        write_text_atomic(report, json.dumps(content, indent=2) + "\n")
    return content


def _finish_checks(result: SlimResult, content: dict, strict: bool, quiet: bool) -> None:
    """Print the plan and the guard's outcome, and any failed check prominently (even with
    --quiet); with --strict, exit 3 on failure."""
    from onnx_thinet.cli.bench_commands import print_budget

    if not quiet:
        print_budget(out, content)
    failures = list(result.warnings)
    if result.guard is not None and not result.guard["budget_reached"] and result.flops_after >= result.flops_before:
        failures.append("the guard could not be met by any pruned model: nothing was pruned")
    for line in failures:
        err.print(Text("WARNING: ", style="bold red") + Text(line), soft_wrap=True)
    if failures and strict:
        raise typer.Exit(3)


_pending_signals: list[str] = []
_raised: list[bool] = []
_SWALLOWING = ("onnxsim",)  # C++ extensions that catch every exception raised inside them


def _raise_interrupt(signum: int, frame) -> None:
    """SIGINT and SIGTERM unwind like Ctrl-C, so temp files and partial outputs are removed.

    Only one signal raises: more signals during that cleanup must not cut it short. Inside
    onnxsim the raise would be swallowed (with onnxsim's own warnings), so it waits for the
    next checkpoint.
    """
    _pending_signals.append(signal.Signals(signum).name)
    if not _raised and not _inside(frame, _SWALLOWING):
        _raised.append(True)
        raise KeyboardInterrupt(_pending_signals[0])


def _inside(frame, modules: tuple[str, ...]) -> bool:
    while frame is not None:
        if frame.f_globals.get("__name__", "").startswith(modules):
            return True
        frame = frame.f_back
    return False


def _checkpoint(*_progress) -> None:
    """Raise a pending signal's interrupt (one that arrived inside onnxsim)."""
    if _pending_signals:
        _raised.append(True)
        raise KeyboardInterrupt(_pending_signals[0])


@contextlib.contextmanager
def _all_or_nothing(*paths: Path | None):
    """On an interrupt, delete the outputs (and `.data` siblings) this run created or replaced."""
    watched = [q for p in paths if p is not None for q in (p, p.with_name(p.name + ".data"))]
    before = {q: _identity(q) for q in watched}
    try:
        _checkpoint()
        yield
    except KeyboardInterrupt:
        for q in watched:
            if _identity(q) not in (None, before[q]):
                q.unlink(missing_ok=True)
        raise


def _identity(path: Path) -> tuple[int, int] | None:
    try:
        stat = path.stat()
    except OSError:
        return None
    return stat.st_ino, stat.st_mtime_ns


def _check_output(model: Path, output: Path, force: bool) -> None:
    if model.exists() and output.exists() and output.resolve() == model.resolve():
        raise ThinetError(f"{output}: refusing to overwrite the input model; choose another --output")
    if output.exists() and not force:
        raise ThinetError(f"{output}: already exists (use --force to overwrite)")
    if output.exists() and output.is_dir():
        raise ThinetError(f"{output}: is a directory")


def _run_with_progress(original, data, config: SlimConfig, quiet: bool) -> SlimResult:
    """A progress bar on a terminal; otherwise (CI, scripts, job schedulers) one line per pass."""
    if quiet:
        return slim(original, data, config, progress=_checkpoint)
    if not sys.stderr.isatty() and os.environ.get("ONNX_THINET_PROGRESS") != "1":
        return slim(original, data, config, progress=_checkpoint, pass_progress=_print_pass)
    columns = (TextColumn("calibrating"), BarColumn(), MofNCompleteColumn(), TextColumn("images"),
               TimeRemainingColumn())
    with Progress(*columns, console=err, transient=True) as bar:
        task = bar.add_task("calibrating", total=None)

        def update(done: int, total: int) -> None:
            _checkpoint()
            bar.update(task, completed=done, total=total)

        return slim(original, data, config, progress=update)


def _print_pass(info: PassInfo) -> None:
    layers = ", ".join(info.producers)
    print(f"pass {info.index}/{info.passes}: {layers} (elapsed {_duration(info.elapsed)}, "
          f"ETA {_duration(info.eta)})", file=sys.stderr, flush=True)


def _duration(seconds: float) -> str:
    seconds = int(round(seconds))
    return f"{seconds // 60}m{seconds % 60:02d}s" if seconds >= 60 else f"{seconds}s"


def _file_bytes(path: Path) -> int:
    data = path.with_name(path.name + ".data")
    return path.stat().st_size + (data.stat().st_size if data.exists() else 0)


def _print_slim_summary(result: SlimResult, content: dict) -> None:
    table = Table(title="pruned groups", title_justify="left")
    for col in ("producer", "consumers", "channels", "recon. error (slice)", "recon. error (rescaled)"):
        table.add_column(col, overflow="fold")  # names wrap, never ellipsized
    for g in result.groups:
        table.add_row(g.producer, ", ".join(g.consumers), f"{g.channels_before} → {g.channels_after}",
                      f"{g.error_before:.4f}", f"{g.error_after:.4f}")
    out.print(table)
    kept = [*result.analysis.coupled, *result.analysis.skipped]
    if kept:
        out.print(f"kept unpruned: {len(result.analysis.coupled)} coupled, "
                  f"{len(result.analysis.skipped)} not provably safe (see `inspect` or --report)")
    sizes = ", ".join(f"{k}={'x'.join(str(d) for d in v)}" for k, v in result.flops_input_shapes.items())
    totals = Table(title=f"totals (FLOPs per sample at {sizes})", title_justify="left")
    for col in ("", "before", "after", "ratio"):
        totals.add_column(col)
    for label, key in (("params", "params"), ("FLOPs", "flops"), ("file bytes", "file_bytes")):
        before, after = content[f"{key}_before"], content[f"{key}_after"]
        totals.add_row(label, f"{before:,}", f"{after:,}", f"{before / max(after, 1):.2f}x")
    out.print(totals)
    v = result.verification
    agreement = "" if v.top1_agreement is None else f", top-1 agreement {v.top1_agreement:.2%}"
    out.print(f"held-out output error ({v.samples} samples): relative {v.rel_error:.4g}, "
              f"max abs {v.max_abs_error:.4g}{agreement}", highlight=False)
    timings = ", ".join(f"{k} {s:.2f}s" for k, s in result.timings.items())
    out.print(f"{result.forward_passes} calibration passes; {timings}", highlight=False)


@app.command("inspect")
@cli_errors
def inspect_command(
    model: Annotated[Path, typer.Argument(help="ONNX model to analyse.")],
    simplify: Annotated[bool, typer.Option("--simplify/--no-simplify")] = True,
    prune_coupled: Annotated[bool, typer.Option("--prune-coupled", help="Show the joint groups --prune-coupled would cut.")] = False,
    as_json: Annotated[bool, typer.Option("--json", help="Print JSON instead of tables.")] = False,
    input_shape: Annotated[Optional[list[str]], typer.Option("--input-shape", help="Count FLOPs at this input size: NAME=1,3,640,640 (repeatable) [default: the model's static size].")] = None,
    verbose: Annotated[bool, typer.Option("--verbose", "-v", help="Log what canonicalization and analysis tried.")] = False,
) -> None:
    """Show prunable groups, coupled channels, params and FLOPs per layer (no calibration)."""
    _set_verbose(verbose)
    original = load_model(model)
    fixed = _parse_input_shapes(input_shape or [], original)
    canonical = canonicalize(original, simplify=simplify)
    analysis = analyze(canonical, prune_coupled=prune_coupled)
    costs = layer_costs(canonical, fixed)
    sizes = cost_input_shapes(canonical, fixed)
    info = {
        "params": count_params(canonical),
        "flops": None if sizes is None else sum(c.flops or 0 for c in costs),
        "flops_input_shapes": None if sizes is None else {k: list(v) for k, v in sizes.items()},
        "layers": [{"node": c.node, "op": c.op_type, "params": c.params, "flops": c.flops} for c in costs],
        "groups": [{"producer": g.producer, "channels": g.channels, "consumers": [c.node for c in g.consumers],
                    "path": list(g.path)} for g in analysis.groups],
        "coupled": [{"producer": c.producer, "channels": c.channels, "node": c.node, "reason": c.reason}
                    for c in analysis.coupled],
        "skipped": [{"producer": s.producer, "node": s.node, "reason": s.reason} for s in analysis.skipped],
        "refusal": quantization_refusal(original),
    }
    if as_json:
        out.print_json(json.dumps(info))
        return
    _print_inspect(info)


def _set_verbose(verbose: bool) -> None:
    """`--verbose`: the library's info log (what was tried, what was skipped and why) on stderr."""
    if not verbose:
        return
    package = logging.getLogger("onnx_thinet")
    package.setLevel(logging.INFO)
    if not logging.getLogger().handlers and not package.handlers:
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(logging.Formatter("%(levelname)s %(name)s: %(message)s"))
        package.addHandler(handler)


def _parse_input_shapes(specs: list[str], model) -> dict[str, tuple[int, ...]]:
    """`NAME=1,3,640,640` for each graph input named; one clear error for anything else."""
    names = [i.name for i in graph_inputs(model)]
    shapes = {}
    for spec in specs:
        name, _, dims = spec.rpartition("=")
        if not name and len(names) == 1:
            name = names[0]
        try:
            shape = tuple(int(d) for d in dims.split(","))
        except ValueError:
            shape = ()
        if name not in names or not shape or min(shape) < 1:
            raise ThinetError(f"--input-shape {spec!r}: expected NAME=D0,D1,... with positive dims "
                              f"for one of the inputs {', '.join(names)}")
        shapes[name] = shape
    return shapes


def _size_text(info: dict) -> str:
    sizes = info["flops_input_shapes"]
    if sizes is None:
        return "FLOPs unknown: the input size is dynamic (pass --input-shape NAME=1,3,H,W)"
    shown = ", ".join(f"{k}={'x'.join(str(d) for d in v)}" for k, v in sizes.items())
    return f"{info['flops']:,} FLOPs per sample at {shown}"


def _print_inspect(info: dict) -> None:
    layers = Table(title="layers (batch 1)", title_justify="left")
    for col in ("node", "op", "params", "FLOPs"):
        layers.add_column(col, overflow="fold")  # names wrap, never ellipsized
    for row in info["layers"]:
        layers.add_row(row["node"], row["op"], f"{row['params']:,}",
                       "?" if row["flops"] is None else f"{row['flops']:,}")
    out.print(layers)
    groups = Table(title="prunable groups", title_justify="left")
    for col in ("producer", "channels", "consumers", "through"):
        groups.add_column(col, overflow="fold")  # names wrap, never ellipsized
    for g in info["groups"]:
        groups.add_row(g["producer"], str(g["channels"]), ", ".join(g["consumers"]), " → ".join(g["path"]))
    out.print(groups)
    kept = Table(title="kept unpruned", title_justify="left")
    for col in ("producer", "why", "at"):
        kept.add_column(col, overflow="fold")  # names wrap, never ellipsized
    for c in info["coupled"]:
        kept.add_row(c["producer"], f"coupled: {c['reason']}", c["node"])
    for s in info["skipped"]:
        kept.add_row(s["producer"], s["reason"], s["node"])
    out.print(kept)
    out.print(f"total: {info['params']:,} params, {_size_text(info)}", highlight=False)
    if info["refusal"]:
        out.print(f"slim refuses this model: {info['refusal']}", highlight=False, markup=False)


def _register_optional_commands() -> None:
    """Commands that live in their own modules (evaluation, PyTorch round trip)."""
    for module_name in ("onnx_thinet.cli.eval_commands", "onnx_thinet.cli.torch_commands",
                        "onnx_thinet.cli.bench_commands", "onnx_thinet.cli.deploy_commands"):
        try:
            module = __import__(module_name, fromlist=["register"])
        except ModuleNotFoundError as exc:
            if exc.name != module_name:
                raise
            continue
        module.register(app)


_register_optional_commands()


def main() -> None:
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, _raise_interrupt)
    logging.basicConfig(level=os.environ.get("ONNX_THINET_LOG", "WARNING"), format="%(levelname)s %(name)s: %(message)s")
    try:
        app()
    except KeyboardInterrupt as exc:  # outside a command (argument parsing, exit)
        sys.exit(interrupted(exc))


if __name__ == "__main__":
    main()
