"""A pruned model is an ordinary nn.Module: torch.export and ONNX (run with onnxruntime) accept it."""
from __future__ import annotations

import pytest
import torch
import torchvision

import graphprune

X = torch.randn(1, 3, 64, 64, generator=torch.Generator().manual_seed(0))


@pytest.fixture(scope="module")
def pruned_resnet18():
    torch.manual_seed(0)
    model = torchvision.models.resnet18(weights=None).eval()
    before = sum(p.numel() for p in model.parameters())
    graphprune.prune(model, 0.5, X)
    assert sum(p.numel() for p in model.parameters()) < 0.5 * before
    assert model.conv1.out_channels == 32 and model.fc.in_features == 256
    return model


def test_torch_export(pruned_resnet18):
    program = torch.export.export(pruned_resnet18, (X,))
    with torch.no_grad():
        expected = pruned_resnet18(X)
        produced = program.module()(X)
    torch.testing.assert_close(produced, expected, atol=1e-5, rtol=1e-5)
    weights = {name: tuple(t.shape) for name, t in program.state_dict.items()}
    assert weights["conv1.weight"] == (32, 3, 7, 7)


def test_onnx_export_runs_in_onnxruntime(pruned_resnet18, tmp_path):
    pytest.importorskip("onnx")
    pytest.importorskip("onnxscript")  # torch.onnx.export's exporter is built on it
    ort = pytest.importorskip("onnxruntime")
    path = tmp_path / "resnet18_pruned.onnx"
    torch.onnx.export(pruned_resnet18, (X,), str(path), input_names=["input"], output_names=["logits"], verbose=False)
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    (logits,) = session.run(None, {"input": X.numpy()})
    with torch.no_grad():
        expected = pruned_resnet18(X)
    assert logits.shape == (1, 1000)
    torch.testing.assert_close(torch.from_numpy(logits), expected, atol=1e-4, rtol=1e-4)
