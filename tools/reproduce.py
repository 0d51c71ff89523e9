#!/usr/bin/env python3
"""Reproduce the ThiNet paper's comparison on our Fashion-MNIST reference models.

Everything is measured by onnx-thinet itself, without fine-tuning:

1. accuracy vs keep ratio for every channel-selection method (all methods share the same
   reconstruction settings, so they differ only in which channels they keep), with FLOPs and
   parameters of every slim model, and the unpruned accuracy;
2. optionally (``--variants``) the reconstruction variants at keep 0.5 for thinet/thinet-ls:
   reconstruct in (none, scale, full) x correct in (off, on);
3. the single-layer study: prune one producer at a time at keep 0.5 with each method.

Outputs (under ``--out``, default ``docs``): ``results.md``, ``results.json``,
``accuracy_vs_keep_<model>.png`` and ``single_layer_<model>.png``.

    python tools/reproduce.py --variants
    python tools/reproduce.py --test-limit 1000 --models vgg          # quick check
"""

from __future__ import annotations

import argparse
import hashlib
import importlib.util
import json
import shlex
import subprocess
import sys
import time
import traceback
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path

import numpy as np
import onnx

import onnx_thinet
from onnx_thinet import SlimConfig, analyze, canonicalize, slim
from onnx_thinet.check.evaluate import evaluate
from onnx_thinet.check.metrics import count_params, total_flops
from onnx_thinet.io.data import ArrayData
from onnx_thinet.io.graph import graph_inputs
from onnx_thinet.solve.selection import METHODS, RECONSTRUCTIONS

ROOT = Path(__file__).resolve().parent.parent
DEFAULT_MODELS = ("vgg", "resnet", "mobilenet")
DEFAULT_RATIOS = (0.3, 0.5, 0.7, 0.9)
VARIANT_KEEP = 0.5
VARIANT_METHODS = ("thinet", "thinet-ls")
SINGLE_LAYER_KEEP = 0.5
SEED = 0

Log = Callable[[str], None]


def _print(line: str) -> None:
    print(line, flush=True)


# --------------------------------------------------------------------------------------------
# data


def _fmnist():
    """tools/fmnist.py, imported from its file path (tools/ is not a package)."""
    path = Path(__file__).resolve().parent / "fmnist.py"
    spec = importlib.util.spec_from_file_location("_reproduce_fmnist", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def load_test_set(limit: int | None = None) -> tuple[np.ndarray, np.ndarray]:
    """The Fashion-MNIST test split, normalized: float32 [N,1,28,28] and int64 labels."""
    fmnist = _fmnist()
    images, labels = fmnist.load_split("test")
    if limit is not None:
        images, labels = images[:limit], labels[:limit]
    return fmnist.normalize(images), labels.astype(np.int64)


def input_name(model: onnx.ModelProto) -> str:
    inputs = graph_inputs(model)
    if len(inputs) != 1:
        raise ValueError(f"expected a model with one input, found {len(inputs)}")
    return inputs[0].name


def prunable_producers(model: onnx.ModelProto) -> list[str]:
    return [g.producer for g in analyze(canonicalize(model)).groups]


# --------------------------------------------------------------------------------------------
# measurements


def measure_baseline(model: onnx.ModelProto, x: np.ndarray, y: np.ndarray) -> dict:
    """Accuracy, FLOPs (per image) and parameters of the unpruned model."""
    clock = time.perf_counter()
    name = input_name(model)
    accuracy = evaluate(model, ArrayData({name: x}), y).accuracy
    shapes = {name: (1,) + tuple(x.shape[1:])}
    return {
        "accuracy": accuracy,
        "flops": total_flops(model, shapes),
        "params": count_params(model),
        "eval_seconds": round(time.perf_counter() - clock, 3),
    }


def run_one(
    model: onnx.ModelProto,
    calib: np.ndarray,
    x: np.ndarray,
    y: np.ndarray,
    config: SlimConfig,
    cache: dict | None = None,
) -> dict:
    """Slim `model` with `config`, evaluate it on (x, y), and return one flat record.

    A failure is recorded (``error``) instead of raised, so one broken method does not stop
    the whole reproduction. `cache` (keyed by the settings) avoids repeating identical runs.
    """
    key = run_key(config.method, config.keep_ratio, config.reconstruct, config.correct,
                  config.seed, config.only)
    if cache is not None and key in cache:
        return dict(cache[key])
    record = {
        "method": config.method,
        "keep_ratio": config.keep_ratio,
        "reconstruct": config.reconstruct,
        "correct": config.correct,
        "seed": config.seed,
        "only": list(config.only) if config.only else None,
        "accuracy": None,
        "error": None,
    }
    name = input_name(model)
    clock = time.perf_counter()
    try:
        result = slim(model, ArrayData({name: calib}), config)
    except Exception as exc:  # noqa: BLE001 - recorded and reported, never hidden
        record["error"] = f"{type(exc).__name__}: {exc}"
        record["slim_seconds"] = round(time.perf_counter() - clock, 3)
        traceback.print_exc(file=sys.stderr)
    else:
        record["slim_seconds"] = round(time.perf_counter() - clock, 3)
        record.update(
            flops_before=result.flops_before,
            flops_after=result.flops_after,
            params_before=result.params_before,
            params_after=result.params_after,
            output_rel_error=result.verification.rel_error,
            top1_agreement=result.verification.top1_agreement,
            groups=[
                {"producer": g.producer, "channels_before": g.channels_before,
                 "channels_after": g.channels_after, "error_before": g.error_before,
                 "error_after": g.error_after}
                for g in result.groups
            ],
        )
        clock = time.perf_counter()
        try:
            record["accuracy"] = evaluate(result.model, ArrayData({name: x}), y).accuracy
        except Exception as exc:  # noqa: BLE001
            record["error"] = f"evaluate: {type(exc).__name__}: {exc}"
            traceback.print_exc(file=sys.stderr)
        record["eval_seconds"] = round(time.perf_counter() - clock, 3)
    if cache is not None:
        cache[key] = dict(record)
    return record


def run_key(method, keep_ratio, reconstruct, correct, seed, only) -> tuple:
    """What identifies one run (with the model, the data and the package version)."""
    return (method, float(keep_ratio), reconstruct, bool(correct), int(seed),
            tuple(only) if only else None)


def _record_key(record: dict) -> tuple:
    return run_key(record["method"], record["keep_ratio"], record["reconstruct"],
                   record["correct"], record["seed"], record.get("only"))


def _describe(record: dict) -> str:
    if record["error"]:
        outcome = f"FAILED ({record['error']})"
    else:
        outcome = f"acc {100 * record['accuracy']:.2f}%"
    seconds = record.get("slim_seconds", 0) + record.get("eval_seconds", 0)
    return f"{outcome}  [{seconds:.1f}s]"


def run_sweep(
    model: onnx.ModelProto,
    calib: np.ndarray,
    x: np.ndarray,
    y: np.ndarray,
    methods: Sequence[str],
    ratios: Sequence[float],
    reconstruct: str = "full",
    correct: bool = False,
    seed: int = SEED,
    label: str = "model",
    log: Log = _print,
    cache: dict | None = None,
) -> list[dict]:
    """Accuracy, FLOPs and params for every method x keep ratio (all layers pruned)."""
    records = []
    for method in methods:
        for ratio in ratios:
            config = SlimConfig(keep_ratio=ratio, method=method, reconstruct=reconstruct,
                                correct=correct, seed=seed)
            record = run_one(model, calib, x, y, config, cache)
            log(f"{label} sweep {method} keep={ratio:g} -> {_describe(record)}")
            records.append(record)
    return records


def run_variants(
    model: onnx.ModelProto,
    calib: np.ndarray,
    x: np.ndarray,
    y: np.ndarray,
    methods: Sequence[str] = VARIANT_METHODS,
    keep: float = VARIANT_KEEP,
    seed: int = SEED,
    label: str = "model",
    log: Log = _print,
    cache: dict | None = None,
) -> list[dict]:
    """Every reconstruct x correct combination at one keep ratio."""
    records = []
    for method in methods:
        for correct in (False, True):
            for reconstruct in RECONSTRUCTIONS:
                config = SlimConfig(keep_ratio=keep, method=method, reconstruct=reconstruct,
                                    correct=correct, seed=seed)
                record = run_one(model, calib, x, y, config, cache)
                log(f"{label} variant {method} reconstruct={reconstruct} "
                    f"correct={'on' if correct else 'off'} keep={keep:g} -> {_describe(record)}")
                records.append(record)
    return records


def run_single_layer(
    model: onnx.ModelProto,
    calib: np.ndarray,
    x: np.ndarray,
    y: np.ndarray,
    methods: Sequence[str],
    keep: float = SINGLE_LAYER_KEEP,
    reconstruct: str = "full",
    correct: bool = False,
    seed: int = SEED,
    producers: Sequence[str] | None = None,
    label: str = "model",
    log: Log = _print,
    cache: dict | None = None,
) -> list[dict]:
    """Prune one producer at a time (``only=(name,)``) with each method."""
    producers = list(producers) if producers is not None else prunable_producers(model)
    records = []
    for index, producer in enumerate(producers):
        for method in methods:
            config = SlimConfig(keep_ratio=keep, method=method, reconstruct=reconstruct,
                                correct=correct, seed=seed, only=(producer,))
            record = run_one(model, calib, x, y, config, cache)
            record["layer"] = index
            log(f"{label} single-layer [{index}] {producer} {method} keep={keep:g} "
                f"-> {_describe(record)}")
            records.append(record)
    return records


# --------------------------------------------------------------------------------------------
# report


def _pct(value: float | None, digits: int = 2) -> str:
    return "—" if value is None else f"{100 * value:.{digits}f}"


def _cell(record: dict | None, best: float | None = None) -> str:
    if record is None:
        return ""
    if record["error"]:
        return "error"
    text = _pct(record["accuracy"])
    if best is not None and record["accuracy"] == best:
        text = f"**{text}**"
    return text


def _find(records: Iterable[dict], **match) -> dict | None:
    for r in records:
        if all(r.get(k) == v for k, v in match.items()):
            return r
    return None


def _fmt_count(n: float) -> str:
    if n >= 1e6:
        return f"{n / 1e6:.2f} M"
    if n >= 1e3:
        return f"{n / 1e3:.1f} k"
    return f"{n:.0f}"


def _cost_cell(records: list[dict], after: str, before_value: int) -> str:
    """Remaining cost and its reduction; a range when methods disagree (they should not)."""
    values = sorted({r[after] for r in records if not r["error"] and after in r})
    if not values:
        return "—"
    parts = [f"{_fmt_count(v)} (−{100 * (1 - v / before_value):.1f}%)" for v in values]
    return " … ".join([parts[0], parts[-1]]) if len(parts) > 1 else parts[0]


def sweep_table(result: dict) -> list[str]:
    """Markdown rows: method x keep ratio accuracy %, then FLOPs and params per ratio."""
    ratios = result["ratios"]
    methods = result["methods"]
    records = result["sweep"]
    base = result["baseline"]
    lines = [
        "| method | " + " | ".join(f"keep {r:g}" for r in ratios) + " |",
        "|---|" + "---:|" * len(ratios),
    ]
    best = {}
    for r in ratios:
        accs = [rec["accuracy"] for rec in records
                if rec["keep_ratio"] == r and rec["accuracy"] is not None]
        best[r] = max(accs) if accs else None
    for method in methods:
        cells = [_cell(_find(records, method=method, keep_ratio=r), best[r]) for r in ratios]
        lines.append(f"| {method} | " + " | ".join(cells) + " |")
    at = {r: [x for x in records if x["keep_ratio"] == r] for r in ratios}
    flops = [_cost_cell(at[r], "flops_after", base["flops"]) for r in ratios]
    params = [_cost_cell(at[r], "params_after", base["params"]) for r in ratios]
    lines.append("| FLOPs (reduction) | " + " | ".join(flops) + " |")
    lines.append("| params (reduction) | " + " | ".join(params) + " |")
    return lines


VARIANT_COLUMNS = [(rec, cor) for cor in (False, True) for rec in RECONSTRUCTIONS]


def variants_table(results: dict[str, dict]) -> list[str]:
    header = [f"{rec}{' + correct' if cor else ''}" for rec, cor in VARIANT_COLUMNS]
    lines = [
        "| model | method | unpruned | " + " | ".join(header) + " |",
        "|---|---|---:|" + "---:|" * len(header),
    ]
    for name, result in results.items():
        records = result.get("variants") or []
        for method in sorted({r["method"] for r in records}, key=VARIANT_METHODS.index):
            mine = [r for r in records if r["method"] == method]
            accs = [r["accuracy"] for r in mine if r["accuracy"] is not None]
            best = max(accs) if accs else None
            cells = [_cell(_find(mine, reconstruct=rec, correct=cor), best)
                     for rec, cor in VARIANT_COLUMNS]
            lines.append(f"| {name} | {method} | {_pct(result['baseline']['accuracy'])} | "
                         + " | ".join(cells) + " |")
    return lines


def single_layer_table(result: dict) -> list[str]:
    methods = result["methods"]
    records = result["single_layer"]
    lines = [
        "| # | layer | channels | " + " | ".join(methods) + " |",
        "|---:|---|---:|" + "---:|" * len(methods),
    ]
    for index, producer in enumerate(result["producers"]):
        mine = [r for r in records if r.get("layer") == index]
        if not mine:
            continue
        accs = [r["accuracy"] for r in mine if r["accuracy"] is not None]
        best = max(accs) if accs else None
        channels = next(
            (f"{g['channels_before']} → {g['channels_after']}"
             for r in mine for g in r.get("groups", []) if g["producer"] == producer), "")
        cells = [_cell(_find(mine, method=m), best) for m in methods]
        lines.append(f"| {index} | `{producer}` | {channels} | " + " | ".join(cells) + " |")
    return lines


def errors_of(results: dict[str, dict]) -> list[str]:
    out = []
    for name, result in results.items():
        for part in ("sweep", "variants", "single_layer"):
            for r in result.get(part) or []:
                if r["error"]:
                    where = f" only={r['only'][0]}" if r.get("only") else ""
                    out.append(f"{name} {part} {r['method']} keep={r['keep_ratio']:g} "
                               f"reconstruct={r['reconstruct']} correct={r['correct']}{where}: "
                               f"{r['error']}")
    return out


def write_markdown(results: dict[str, dict], settings: dict, path: Path) -> None:
    """docs/results.md: date-free and free of timings, so it only changes with the numbers."""
    lines = [
        "# Reproduction: ThiNet vs other channel-selection criteria (no fine-tuning)",
        "",
        "Generated by `tools/reproduce.py`; regenerate with:",
        "",
        "```sh",
        settings["command"],
        "```",
        "",
        "Settings:",
        "",
        f"- test set: Fashion-MNIST t10k, first {settings['test_images']} images; "
        "top-1 accuracy in %",
        f"- calibration: `{settings['calib']}` ({settings['calib_images']} images, "
        f"{settings['holdout']:.0%} of them held out for the tool's own verification)",
        f"- reconstruction for every method: `--reconstruct {settings['reconstruct']}`, "
        f"correction {'on' if settings['correct'] else 'off'} "
        "(methods differ only in which channels they keep)",
        f"- seed {settings['seed']} (random method and calibration sampling); "
        f"onnx-thinet {settings['version']}",
        "- FLOPs per image (a multiply-add is 2 FLOPs) and parameters of the slim model, with the "
        "reduction relative to the unpruned model; only provably safe channel groups are pruned",
        "- best method per column in **bold**",
        "",
    ]
    for name, result in results.items():
        base = result["baseline"]
        lines += [
            f"## {name}",
            "",
            f"`{result['path']}`: unpruned accuracy **{_pct(base['accuracy'])}%**, "
            f"{_fmt_count(base['flops'])} FLOPs, {_fmt_count(base['params'])} params; "
            f"{len(result['producers'])} prunable producers.",
            "",
            "### Accuracy (%) vs keep ratio, all prunable layers",
            "",
            *sweep_table(result),
            "",
            f"![accuracy vs keep ratio](accuracy_vs_keep_{name}.png)",
            "",
        ]
        if result.get("single_layer"):
            keep = settings["single_layer_keep"]
            lines += [
                f"### Single-layer study: one layer pruned at keep {keep:g}",
                "",
                *single_layer_table(result),
                "",
                f"![single-layer study](single_layer_{name}.png)",
                "",
            ]
    if any(r.get("variants") for r in results.values()):
        lines += [
            f"## Reconstruction variants at keep {settings['variant_keep']:g}",
            "",
            "All prunable layers pruned; accuracy (%) for each `--reconstruct` setting, without "
            "and with `--correct`. Best per row in **bold**.",
            "",
            *variants_table(results),
            "",
        ]
    errors = errors_of(results)
    if errors:
        lines += ["## Failed runs", ""] + [f"- {e}" for e in errors] + [""]
    path.write_text("\n".join(lines))


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def plot_sweep(name: str, result: dict, path: Path) -> None:
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(6, 4.2))
    ratios = result["ratios"]
    for method in result["methods"]:
        points = [(r, _find(result["sweep"], method=method, keep_ratio=r)) for r in ratios]
        xs = [r for r, rec in points if rec and rec["accuracy"] is not None]
        ys = [100 * rec["accuracy"] for _, rec in points if rec and rec["accuracy"] is not None]
        ax.plot(xs, ys, marker="o", label=method)
    base = result["baseline"]["accuracy"]
    ax.axhline(100 * base, color="black", linestyle="--", linewidth=1,
               label=f"unpruned ({100 * base:.2f}%)")
    ax.set_xlabel("keep ratio")
    ax.set_ylabel("top-1 accuracy (%)")
    ax.set_xticks(ratios)
    ax.set_title(f"{name}: accuracy vs keep ratio (no fine-tuning)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _short(producer: str) -> str:
    """'/blocks/blocks.0/body/body.0/Conv' -> 'blocks.0/body.0' (axis labels)."""
    parts = producer.strip("/").split("/")
    if len(parts) > 1 and parts[-1] in ("Conv", "Gemm", "MatMul"):
        parts = parts[:-1]
    following = parts[1:] + [""]
    kept = [p for p, nxt in zip(parts, following, strict=True) if not nxt.startswith(p + ".")]
    return "/".join(kept) or producer


def plot_single_layer(name: str, result: dict, path: Path, keep: float = SINGLE_LAYER_KEEP) -> None:
    plt = _pyplot()
    producers = result["producers"]
    fig, ax = plt.subplots(figsize=(max(6, 0.55 * len(producers) + 3), 4.6))
    for method in result["methods"]:
        recs = [_find(result["single_layer"], method=method, layer=i)
                for i in range(len(producers))]
        xs = [i for i, r in enumerate(recs) if r and r["accuracy"] is not None]
        ys = [100 * r["accuracy"] for r in recs if r and r["accuracy"] is not None]
        ax.plot(xs, ys, marker="o", label=method)
    base = result["baseline"]["accuracy"]
    ax.axhline(100 * base, color="black", linestyle="--", linewidth=1,
               label=f"unpruned ({100 * base:.2f}%)")
    ax.set_xticks(range(len(producers)))
    ax.set_xticklabels([_short(p) for p in producers], rotation=40, ha="right", fontsize=7)
    ax.set_ylabel("top-1 accuracy (%)")
    ax.set_title(f"{name}: one layer pruned at keep {keep:g} (no fine-tuning)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def write_json(payload: dict, path: Path) -> None:
    path.write_text(json.dumps(payload, indent=1, default=_json_default) + "\n")


def _json_default(value):
    if isinstance(value, np.generic):
        return value.item()
    raise TypeError(f"not JSON serializable: {type(value).__name__}")


# --------------------------------------------------------------------------------------------
# command line


def _csv(kind: Callable[[str], object]) -> Callable[[str], list]:
    def parse(text: str) -> list:
        items = [t.strip() for t in text.split(",") if t.strip()]
        if not items:
            raise argparse.ArgumentTypeError("expected a comma-separated list")
        return [kind(t) for t in items]

    return parse


def _method(text: str) -> str:
    if text not in METHODS:
        raise argparse.ArgumentTypeError(
            f"unknown method {text!r} (choose from {', '.join(METHODS)})")
    return text


def _ratio(text: str) -> float:
    value = float(text)
    if not 0.0 < value <= 1.0:
        raise argparse.ArgumentTypeError(f"keep ratio must be in (0, 1] (got {text})")
    return value


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--models", type=_csv(str), default=list(DEFAULT_MODELS),
                   help="comma-separated names; model files are models/fmnist_<name>.onnx")
    p.add_argument("--ratios", type=_csv(_ratio), default=list(DEFAULT_RATIOS),
                   help="comma-separated keep ratios")
    p.add_argument("--methods", type=_csv(_method), default=list(METHODS),
                   help="comma-separated channel-selection methods")
    p.add_argument("--reconstruct", choices=RECONSTRUCTIONS, default="full",
                   help="reconstruction applied with every method")
    p.add_argument("--correct", action=argparse.BooleanOptionalAction, default=False,
                   help="correct with statistics of the unpruned network, for every method")
    p.add_argument("--variants", action="store_true",
                   help=f"also run thinet/thinet-ls at keep {VARIANT_KEEP:g} with every "
                        "reconstruct x correct combination")
    p.add_argument("--skip-single-layer", action="store_true", help="skip the single-layer study")
    p.add_argument("--test-limit", type=int, default=None, metavar="N",
                   help="evaluate on the first N test images only (quick runs)")
    p.add_argument("--calib", type=Path, default=Path("models/fmnist_calib.npy"),
                   help="calibration images, float32 [N,1,28,28], normalized")
    p.add_argument("--model-dir", type=Path, default=Path("models"), help=argparse.SUPPRESS)
    p.add_argument("--out", type=Path, default=Path("docs"), help="output folder")
    p.add_argument("--resume", action="store_true",
                   help="reuse the successful runs in OUT/results.json when it was made from the "
                        "same model files, data and package sources (after an interrupted run)")
    args = p.parse_args(argv)
    if args.test_limit is not None and args.test_limit < 1:
        p.error("--test-limit must be at least 1")
    return args


def command_line(argv: Sequence[str]) -> str:
    """The command that regenerates the results (`--resume` only changes how, not what)."""
    return shlex.join(["python", "tools/reproduce.py", *[a for a in argv if a != "--resume"]])


def build_settings(args: argparse.Namespace, argv: Sequence[str], calib_images: int,
                   test_images: int) -> dict:
    """The machine-independent settings written into results.md and results.json."""
    return {
        "command": command_line(argv),
        "models": args.models,
        "ratios": args.ratios,
        "methods": args.methods,
        "reconstruct": args.reconstruct,
        "correct": args.correct,
        "variants": args.variants,
        "single_layer": not args.skip_single_layer,
        "variant_keep": VARIANT_KEEP,
        "single_layer_keep": SINGLE_LAYER_KEEP,
        "seed": SEED,
        "holdout": SlimConfig().holdout,
        "calib": str(args.calib),
        "calib_images": int(calib_images),
        "test_images": int(test_images),
        "version": onnx_thinet.__version__,
    }


def new_result(path, baseline: dict, producers: Sequence[str], ratios: Sequence[float],
               methods: Sequence[str]) -> dict:
    """One model's entry of results.json; run_* fill sweep, variants and single_layer."""
    return {"path": str(path), "baseline": baseline, "producers": list(producers),
            "ratios": list(ratios), "methods": list(methods),
            "sweep": [], "variants": [], "single_layer": []}


def main(argv: Sequence[str] | None = None) -> int:
    invocation = list(sys.argv) if argv is None else ["tools/reproduce.py", *argv]
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parse_args(argv)
    started = time.perf_counter()
    source = source_state()
    paths = {name: args.model_dir / f"fmnist_{name}.onnx" for name in args.models}
    missing = [str(p) for p in [*paths.values(), args.calib] if not p.is_file()]
    if missing:
        _print(f"error: missing input file(s): {', '.join(missing)}")
        return 2
    calib = np.load(args.calib).astype(np.float32)
    x, y = load_test_set(args.test_limit)
    args.out.mkdir(parents=True, exist_ok=True)
    settings = build_settings(args, argv, len(calib), len(x))
    _print(f"{settings['command']}\n{len(x)} test images, {len(calib)} calibration images")
    previous = _previous_runs(args.out / "results.json", settings, source) if args.resume else {}
    results: dict[str, dict] = {}
    seconds: dict[str, dict] = {}

    def save() -> None:  # after every part, so an interrupted run leaves usable output
        _write_all(results, settings, seconds, invocation, started, args.out, source)

    for name, path in paths.items():
        model = onnx.load(str(path))
        timing: dict[str, float] = {}
        seconds[name] = timing
        clock = time.perf_counter()
        baseline = measure_baseline(model, x, y)
        producers = prunable_producers(model)
        timing["baseline"] = round(time.perf_counter() - clock, 3)
        _print(f"{name}: unpruned acc {100 * baseline['accuracy']:.2f}%, "
               f"{len(producers)} prunable producers  [{timing['baseline']:.1f}s]")
        result = new_result(path, baseline, producers, args.ratios, args.methods)
        result["sha256"] = _sha256(path.read_bytes())
        results[name] = result
        cache = _reusable(previous.get(name), result["sha256"])
        if cache:
            _print(f"{name}: --resume reuses {len(cache)} run(s) from {args.out}/results.json")
        clock = time.perf_counter()
        result["sweep"] = run_sweep(model, calib, x, y, args.methods, args.ratios,
                                    args.reconstruct, args.correct, SEED, name, cache=cache)
        timing["sweep"] = round(time.perf_counter() - clock, 3)
        plot_sweep(name, result, args.out / f"accuracy_vs_keep_{name}.png")
        save()
        if args.variants:
            clock = time.perf_counter()
            result["variants"] = run_variants(model, calib, x, y, VARIANT_METHODS, VARIANT_KEEP,
                                              SEED, name, cache=cache)
            timing["variants"] = round(time.perf_counter() - clock, 3)
            save()
        if not args.skip_single_layer:
            clock = time.perf_counter()
            result["single_layer"] = run_single_layer(
                model, calib, x, y, args.methods, SINGLE_LAYER_KEEP, args.reconstruct,
                args.correct, SEED, producers, name, cache=cache)
            timing["single_layer"] = round(time.perf_counter() - clock, 3)
            plot_single_layer(name, result, args.out / f"single_layer_{name}.png")
        timing["total"] = round(sum(timing.values()), 3)
        _print(f"{name}: done in {timing['total']:.0f}s ({timing})")
        save()
    errors = errors_of(results)
    _print(f"wrote {args.out}/results.md, results.json and plots in "
           f"{time.perf_counter() - started:.0f}s")
    if errors:
        _print(f"{len(errors)} run(s) failed:\n  " + "\n  ".join(errors))
        return 1
    return 0


def _sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def source_state() -> dict:
    """The package as imported: git commit, uncommitted files and a hash of its sources."""
    package = Path(onnx_thinet.__file__).resolve().parent
    digest = hashlib.sha256()
    for file in sorted(package.rglob("*.py")):
        digest.update(file.relative_to(package).as_posix().encode() + b"\0" + file.read_bytes())
    state = {"package_sha256": digest.hexdigest(), "commit": None, "uncommitted": None}

    def git(*args: str) -> str:
        return subprocess.run(["git", *args], cwd=ROOT, capture_output=True, text=True,
                              timeout=30, check=True).stdout

    try:
        dirty = git("status", "--porcelain", "--", "onnx_thinet")
        state["commit"] = git("rev-parse", "HEAD").strip()
        state["uncommitted"] = [line[3:] for line in dirty.splitlines()]
    except (OSError, subprocess.SubprocessError):
        pass
    return state


RESUME_SETTINGS = ("test_images", "calib", "calib_images", "holdout", "seed", "version")


def _previous_runs(path: Path, settings: dict, source: dict) -> dict[str, dict]:
    """Per-model results of an earlier run that --resume may reuse (same data and package)."""
    try:
        earlier = json.loads(path.read_text())
    except (OSError, ValueError):
        return {}
    old = earlier.get("settings", {})
    same_settings = all(old.get(k) == settings[k] for k in RESUME_SETTINGS)
    same_package = (earlier.get("source") or {}).get("package_sha256") == source["package_sha256"]
    if not (same_settings and same_package):
        _print(f"--resume: {path} was made with other settings or package sources; starting fresh")
        return {}
    return earlier.get("models", {})


def _reusable(previous: dict | None, sha256: str) -> dict:
    """A run cache seeded with the successful runs of `previous` (same model file only)."""
    if not previous or previous.get("sha256") != sha256:
        return {}
    cache = {}
    for part in ("sweep", "variants", "single_layer"):
        for record in previous.get(part) or []:
            if not record.get("error"):
                kept = {k: v for k, v in record.items() if k != "layer"}
                cache[_record_key(record)] = kept | {"resumed": True}
    return cache


def _write_all(results, settings, seconds, invocation, started, out: Path, source=None) -> None:
    write_markdown(results, settings, out / "results.md")
    payload = {
        "command": settings["command"],
        "argv": [sys.executable, *invocation],
        "source": source,
        "settings": settings,
        "seconds": {"models": seconds, "total": round(time.perf_counter() - started, 3),
                    "cpu_total": round(time.process_time(), 3)},
        "models": results,
        "errors": errors_of(results),
    }
    write_json(payload, out / "results.json")


if __name__ == "__main__":
    sys.exit(main())
