"""Distillation fine-tuning: the loss falls, the result is a valid ONNX model closer to
the teacher, interrupted runs resume, and the CLI reports bad inputs in one line."""

from __future__ import annotations

import warnings
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import numpy_helper

torch = pytest.importorskip("torch")
ort = pytest.importorskip("onnxruntime")

import typer  # noqa: E402
from torch import nn  # noqa: E402
from torch.nn import functional as F  # noqa: E402
from typer.testing import CliRunner  # noqa: E402

from onnx_thinet.cli.torch_commands import register  # noqa: E402
from onnx_thinet.errors import ThinetError  # noqa: E402
from onnx_thinet.pytorch.finetune import CHECKPOINT_NAME, FinetuneResult, finetune  # noqa: E402

pytestmark = pytest.mark.torch

SHAPE = (3, 12, 12)
N = 48


class SmallCNN(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 8, 3, padding=1)
        self.bn1 = nn.BatchNorm2d(8)
        self.conv2 = nn.Conv2d(8, 8, 3, padding=1)
        self.fc = nn.Linear(8, 5)

    def forward(self, x):
        x = F.max_pool2d(F.relu(self.bn1(self.conv1(x))), 2)
        x = F.relu(self.conv2(x))
        return self.fc(torch.flatten(F.adaptive_avg_pool2d(x, 1), 1))


@pytest.fixture(scope="module")
def models(tmp_path_factory) -> tuple[Path, Path]:
    """(teacher, student): student = teacher with noise on every weight."""
    d = tmp_path_factory.mktemp("models")
    torch.manual_seed(0)
    net = SmallCNN().eval()
    teacher = d / "teacher.onnx"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(
            net,
            (torch.randn(2, *SHAPE),),
            str(teacher),
            dynamo=False,
            opset_version=13,
            input_names=["input"],
            output_names=["logits"],
            dynamic_axes={"input": {0: "N"}, "logits": {0: "N"}},
        )
    model = onnx.load(str(teacher))
    rng = np.random.default_rng(1)
    for init in model.graph.initializer:
        w = numpy_helper.to_array(init)
        if w.dtype == np.float32 and w.ndim >= 1:
            noisy = w + rng.standard_normal(w.shape).astype(np.float32) * (
                0.5 * float(w.std()) + 0.05
            )
            init.CopyFrom(numpy_helper.from_array(noisy.astype(np.float32), init.name))
    student = d / "student.onnx"
    onnx.save(model, str(student))
    return teacher, student


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> dict[str, Path]:
    d = tmp_path_factory.mktemp("data")
    rng = np.random.default_rng(2)
    x = rng.standard_normal((N, *SHAPE)).astype(np.float32)
    y = rng.integers(0, 5, N)
    paths = {"npz": d / "data.npz", "npy": d / "data.npy", "bad": d / "bad.npy"}
    np.savez(paths["npz"], x=x, y=y)
    np.save(paths["npy"], x)
    np.save(paths["bad"], x[:, :, :8, :8])
    return paths


def kl_to_teacher(teacher: Path, model: Path, x: np.ndarray) -> float:
    """Mean KL(teacher || model) of the softmax outputs: how far a model is from the teacher."""

    def probs(path: Path) -> np.ndarray:
        s = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
        z = s.run(None, {s.get_inputs()[0].name: x})[0].astype(np.float64)
        z = np.exp(z - z.max(1, keepdims=True))
        return z / z.sum(1, keepdims=True)

    p, q = probs(teacher), probs(model)
    return float(np.mean(np.sum(p * (np.log(p) - np.log(q)), axis=1)))


def test_distillation_moves_student_to_teacher(models, data, tmp_path: Path) -> None:
    teacher, student = models
    seen = []
    out = tmp_path / "tuned.onnx"
    res = finetune(
        student,
        teacher,
        data["npz"],
        4,
        out,
        lr=5e-3,
        batch_size=16,
        max_steps=10,
        augment=True,
        progress=seen.append,
    )
    assert isinstance(res, FinetuneResult)
    assert res.output == out and out.is_file()
    assert res.steps == 10 and len(seen) == 10 and seen[-1].step == 10
    assert res.epochs == 3  # 3 steps per epoch: epochs 1-3 complete, the 4th stops at step 10
    assert res.final_loss < res.initial_loss  # distillation loss decreased
    assert res.seconds > 0 and res.seconds_per_epoch > 0 and res.samples_per_second > 0
    onnx.checker.check_model(onnx.load(str(out)), full_check=True)
    x = np.load(data["npy"])[:20]
    assert kl_to_teacher(teacher, out, x) < kl_to_teacher(teacher, student, x)
    tuned = onnx.load(str(out))
    assert tuned.graph.input[0].name == "input" and tuned.graph.output[0].name == "logits"
    assert tuned.graph.input[0].type.tensor_type.shape.dim[0].dim_param == "N"
    sess = ort.InferenceSession(str(out), providers=["CPUExecutionProvider"])
    assert sess.run(None, {"input": x[:7]})[0].shape == (7, 5)  # dynamic batch kept


def test_npy_without_labels_or_augmentation(models, data, tmp_path: Path) -> None:
    teacher, student = models
    res = finetune(
        student, teacher, data["npy"], 1, tmp_path / "t.onnx", lr=5e-3, batch_size=16, augment=False
    )
    assert res.steps == 3 and res.epochs == 1 and len(res.history) == 1
    assert res.final_loss < res.initial_loss


def test_resume_after_interruption_matches_uninterrupted_run(models, data, tmp_path: Path) -> None:
    teacher, student = models
    kw = {"lr": 5e-3, "batch_size": 16, "seed": 3, "augment": True}
    full = finetune(student, teacher, data["npz"], 2, tmp_path / "full.onnx", **kw)

    def interrupt(p) -> None:
        if p.step == 4:  # mid-epoch 2: the last checkpoint is the end of epoch 1
            raise KeyboardInterrupt

    ckdir = tmp_path / "ck"
    with pytest.raises(KeyboardInterrupt):
        finetune(
            student,
            teacher,
            data["npz"],
            2,
            tmp_path / "r.onnx",
            checkpoint_dir=ckdir,
            progress=interrupt,
            **kw,
        )
    assert (ckdir / CHECKPOINT_NAME).is_file()
    assert not (tmp_path / "r.onnx").exists()
    resumed = finetune(
        student, teacher, data["npz"], 2, tmp_path / "r.onnx", checkpoint_dir=ckdir, **kw
    )
    assert resumed.resumed_from_epoch == 1
    assert resumed.steps == full.steps == 6
    x = np.load(data["npy"])[:8]
    a = ort.InferenceSession(str(tmp_path / "full.onnx"), providers=["CPUExecutionProvider"])
    b = ort.InferenceSession(str(tmp_path / "r.onnx"), providers=["CPUExecutionProvider"])
    np.testing.assert_allclose(
        a.run(None, {"input": x})[0], b.run(None, {"input": x})[0], rtol=1e-4, atol=1e-5
    )
    # a finished run resumes to "nothing left to do"
    again = finetune(
        student, teacher, data["npz"], 2, tmp_path / "r2.onnx", checkpoint_dir=ckdir, **kw
    )
    assert again.steps == 6 and again.resumed_from_epoch == 2
    # a checkpoint from another run is refused unless resume is off
    with pytest.raises(ThinetError, match="different run"):
        finetune(
            student,
            teacher,
            data["npz"],
            2,
            tmp_path / "r3.onnx",
            checkpoint_dir=ckdir,
            lr=5e-3,
            batch_size=8,
        )
    fresh = finetune(
        student,
        teacher,
        data["npz"],
        1,
        tmp_path / "r3.onnx",
        checkpoint_dir=ckdir,
        lr=5e-3,
        batch_size=8,
        resume=False,
        max_steps=2,
    )
    assert fresh.steps == 2 and fresh.resumed_from_epoch == 0


def test_library_errors(models, data, tmp_path: Path) -> None:
    teacher, student = models
    out = tmp_path / "o.onnx"
    with pytest.raises(ThinetError, match="expects"):
        finetune(student, teacher, data["bad"], 1, out)
    with pytest.raises(ThinetError, match="not found"):
        finetune(student, teacher, tmp_path / "nope.npz", 1, out)
    empty = tmp_path / "nox.npz"
    np.savez(empty, a=np.zeros(3))
    with pytest.raises(ThinetError, match="no array 'x'"):
        finetune(student, teacher, empty, 1, out)
    if not torch.cuda.is_available():
        with pytest.raises(ThinetError, match="CUDA is not available"):
            finetune(student, teacher, data["npz"], 1, out, device="cuda")


# ---------------------------------------------------------------- CLI


@pytest.fixture()
def cli():
    app = typer.Typer()
    register(app)
    runner = CliRunner()
    return lambda *args: runner.invoke(app, [str(a) for a in args])


def test_cli_export_torch(cli, models, tmp_path: Path) -> None:
    _, student = models
    res = cli("export-torch", student, "--output", tmp_path / "gen")
    assert res.exit_code == 0, res.output
    assert (tmp_path / "gen" / "model.py").is_file() and (tmp_path / "gen" / "weights.pt").is_file()
    assert "wrote" in res.stdout and "from model import load" in res.stdout
    res = cli("export-torch", tmp_path / "missing.onnx", "--output", tmp_path / "gen2")
    assert res.exit_code == 2
    assert res.stderr.strip().startswith("error:") and "not found" in res.stderr
    assert "Traceback" not in res.output


def test_cli_finetune_and_errors(cli, models, data, tmp_path: Path) -> None:
    teacher, student = models
    out = tmp_path / "tuned.onnx"
    base = [
        "finetune",
        student,
        "--teacher",
        teacher,
        "--data",
        data["npz"],
        "--epochs",
        1,
        "--batch-size",
        16,
        "--max-steps",
        2,
        "--output",
        out,
    ]
    res = cli(*base)
    assert res.exit_code == 0, res.output
    assert out.is_file() and "s/epoch" in res.stdout and "distillation loss" in res.stdout

    def fails(args, needle: str) -> None:
        r = cli(*args)
        assert r.exit_code == 2, r.output
        lines = r.stderr.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("error:") and needle in lines[0], r.stderr

    fails(base, "--force")  # output exists
    assert cli(*base, "--force").exit_code == 0
    other = tmp_path / "other.onnx"
    fails(
        ["finetune", student, "--teacher", teacher, "--data", data["bad"], "--output", other],
        "expects",
    )
    junk = tmp_path / "junk.onnx"
    junk.write_text("not a model")
    fails(
        ["finetune", junk, "--teacher", teacher, "--data", data["npz"], "--output", other],
        "not a readable ONNX model",
    )
    fails(
        [
            "finetune",
            student,
            "--teacher",
            tmp_path / "none.onnx",
            "--data",
            data["npz"],
            "--output",
            other,
        ],
        "not found",
    )
    if not torch.cuda.is_available():
        fails([*base[:-1], other, "--device", "cuda"], "CUDA is not available")


def test_auto_device_is_the_default_and_follows_torch() -> None:
    import inspect

    from onnx_thinet import SlimConfig
    from onnx_thinet.pytorch.distill import resolve_device
    from onnx_thinet.pytorch.finetune_graph import finetune_graph

    assert SlimConfig().device == "auto"
    for fn in (finetune, finetune_graph):
        assert inspect.signature(fn).parameters["device"].default == "auto"
    want = "cuda" if torch.cuda.is_available() else "cpu"
    assert resolve_device(torch, "auto").type == want
