"""The committed Fashion-MNIST reference models: accuracy after slimming, and the PyTorch round trip."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest

from onnx_thinet import SlimConfig, load_model, slim
from onnx_thinet.check.evaluate import evaluate
from onnx_thinet.io.data import ArrayData

ROOT = Path(__file__).resolve().parent.parent
MODELS = ("vgg", "resnet", "mobilenet")
FMNIST = Path("/usr/share/datasets/fashion-mnist/t10k-images-idx3-ubyte.gz")


def _fmnist():
    spec = importlib.util.spec_from_file_location("fmnist", ROOT / "tools" / "fmnist.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _calib() -> np.ndarray:
    return np.load(ROOT / "models" / "fmnist_calib.npy")


@pytest.fixture(scope="module")
def slimmed() -> dict:
    """Each reference model slimmed once at keep 0.5 with the CLI defaults."""
    out = {}
    for name in MODELS:
        model = load_model(ROOT / "models" / f"fmnist_{name}.onnx")
        out[name] = (model, slim(model, ArrayData({"input": _calib()}), SlimConfig(keep_ratio=0.5)))
    return out


@pytest.mark.fmnist
@pytest.mark.skipif(not FMNIST.exists(), reason="needs apt-get install -y dataset-fashion-mnist")
def test_vgg_at_half_the_channels_loses_at_most_three_points_without_finetuning(slimmed):
    fmnist = _fmnist()
    images, labels = fmnist.load_split("test")
    data = ArrayData({"input": fmnist.normalize(images)})
    model, result = slimmed["vgg"]
    before = evaluate(model, data, labels).accuracy
    after = evaluate(result.model, data, labels).accuracy
    assert result.flops_after < 0.3 * result.flops_before
    assert before - after <= 0.03, (before, after)


def test_every_reference_model_slims_to_fewer_flops_and_agrees_with_the_original(slimmed):
    test = np.load(ROOT / "models" / "fmnist_test_1k.npz")
    for name, (model, result) in slimmed.items():
        assert result.flops_after < 0.6 * result.flops_before, name
        agreement = evaluate(result.model, ArrayData({"input": test["x"]}), reference=model).top1_agreement
        assert agreement > 0.9, (name, agreement)


def _ort(model, x):
    session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    return session.run(None, {"input": x})[0]


@pytest.mark.torch
@pytest.mark.parametrize("name", MODELS)
def test_round_trip_through_pytorch_on_reference_models(tmp_path, slimmed, name):
    torch = pytest.importorskip("torch")
    from onnx_thinet import export_torch, to_onnx
    from onnx_thinet.io.graph import save_model_atomic
    from onnx_thinet.pytorch.export import load_exported

    x = np.load(ROOT / "models" / "fmnist_test_1k.npz")["x"][:37]
    original, result = slimmed[name]
    for label, model in (("original", original), ("slim", result.model)):
        path = tmp_path / f"{label}.onnx"
        save_model_atomic(model, path)
        module = load_exported(export_torch(path, tmp_path / label))
        with torch.no_grad():
            torch_out = module(torch.from_numpy(x)).numpy()
        reference = _ort(model, x)
        scale = np.abs(reference).max()
        assert np.abs(torch_out - reference).max() <= 1e-5 * scale
        back = to_onnx(module, path, tmp_path / f"{label}.back.onnx")
        assert np.abs(_ort(load_model(back), x) - reference).max() <= 1e-5 * scale
