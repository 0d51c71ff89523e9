"""The acceptance architectures of tools/zoo.py, at tiny widths, through the public API.

VGG-16 as tf2onnx writes it (NHWC), ResNet-50 with BatchNorm as Mul + Add, YOLOv8n and
MobileNetV2 with SE blocks: each must slim to fewer FLOPs, run at batch 1 and 3 with the original
output shape, and be unchanged at keep ratio 1.0.
"""

from __future__ import annotations

import functools
import importlib.util
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("torch")

from onnx_thinet import SlimConfig, slim  # noqa: E402
from onnx_thinet.io.data import ArrayData  # noqa: E402

pytestmark = pytest.mark.torch

_spec = importlib.util.spec_from_file_location("zoo", Path(__file__).resolve().parents[1] / "tools" / "zoo.py")
zoo = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(zoo)

TINY = {
    "vgg16_tf2onnx": {"size": 32, "width": 0.0625},
    "resnet50_bn_decomposed": {"size": 32, "width": 0.0625},
    "yolov8n": {"size": 64, "width": 0.5},
    "mobilenetv2_se": {"size": 32, "width": 0.125},
}


@functools.cache
def _build(name: str):
    model = zoo.BUILDERS[name](**TINY[name])  # checks itself against PyTorch (rel < 1e-4)
    return name, model, zoo.calibration_for(model, 16, seed=1)


@pytest.fixture(params=sorted(TINY))
def built(request):
    return _build(request.param)


def _run(model, x):
    return zoo.run_onnx(model, x)


def test_builders_write_the_exporters_patterns(built):
    name, model, _ = built
    ops = {n.op_type for n in model.graph.node}
    expected = {
        "vgg16_tf2onnx": {"Transpose", "Shape", "Gather", "Unsqueeze", "Concat", "Reshape", "MatMul"},
        "resnet50_bn_decomposed": {"Mul", "Add", "Conv", "Gemm"},
        "yolov8n": {"Sigmoid", "Mul", "Split", "Resize", "MaxPool", "Softmax", "Concat"},
        "mobilenetv2_se": {"Clip", "GlobalAveragePool", "HardSigmoid", "Mul", "Add"},
    }[name]
    assert expected <= ops
    assert "BatchNormalization" not in ops
    _, dims = zoo.input_layout(model)
    assert dims[-1] == 3 if name == "vgg16_tf2onnx" else dims[1] == 3


COUPLED = {"resnet50_bn_decomposed", "mobilenetv2_se", "yolov8n"}  # where --prune-coupled forms joint groups
# The graph handling is what these tests check; least-squares channel scales keep them fast. The
# default refit (full, cross-validated ridge, corrected targets) runs here on the two cheap models
# and on all four, at real widths, in tools/zoo.py.
FAST = {"reconstruct": "scale", "correct": False}
DEFAULT_TOO = {"vgg16_tf2onnx", "resnet50_bn_decomposed"}


def _check_slim(model, x, config):
    input_name, _ = zoo.input_layout(model)
    result = slim(model, ArrayData({input_name: x}), config)
    assert result.flops_after < result.flops_before
    assert result.params_after < result.params_before
    for batch in (1, 3):
        out, ref = _run(result.model, x[:batch]), _run(model, x[:batch])
        assert out.shape == ref.shape
        assert np.isfinite(out).all()
    assert np.isfinite(result.verification.rel_error)


def test_slims_to_fewer_flops_and_runs_at_batch_1_and_3(built):
    _, model, x = built
    _check_slim(model, x, SlimConfig(keep_ratio=0.5, **FAST))


@pytest.mark.parametrize("name", sorted(COUPLED))
def test_prune_coupled_slims_and_runs_at_batch_1_and_3(name):
    _, model, x = _build(name)
    _check_slim(model, x, SlimConfig(keep_ratio=0.5, prune_coupled=True, **FAST))


@pytest.mark.parametrize("name", sorted(DEFAULT_TOO))
def test_default_config_slims(name):
    _, model, x = _build(name)
    _check_slim(model, x, SlimConfig(keep_ratio=0.5))


def _assert_identity(model, x, config):
    input_name, _ = zoo.input_layout(model)
    result = slim(model, ArrayData({input_name: x}), config)
    out, ref = _run(result.model, x[:3]), _run(model, x[:3])
    assert out.shape == ref.shape
    assert zoo.rel_error(out, ref) < 1e-4


def test_keep_ratio_one_is_the_identity(built):
    _, model, x = built
    _assert_identity(model, x, SlimConfig(keep_ratio=1.0, **FAST))


def test_keep_ratio_one_is_the_identity_with_the_default_refit():
    """The slow default refit at keep ratio 1.0, on the model with the most kinds of groups."""
    _, model, x = _build("resnet50_bn_decomposed")
    _assert_identity(model, x, SlimConfig(keep_ratio=1.0))
