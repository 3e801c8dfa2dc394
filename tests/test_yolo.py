"""ultralytics YOLO, built from its yaml (no downloads): detect, segment and pose models (and
YOLOv10's end-to-end head, never tuned for) prune at 0.3 through the one call, keep every output's shape, save and load, and still predict
through the ``YOLO`` object; the Detect head's DFL bins and class channels are never pruned.
A pruned model exports to ONNX and trains a step through ultralytics' own trainer.
ultralytics is a test extra; without it these tests are skipped."""
from __future__ import annotations

import os
import warnings

import numpy as np
import pytest
import torch
from conftest import count_params
from oracle import flat_outputs

import graphprune

ultralytics = pytest.importorskip("ultralytics")
X = torch.randn(1, 3, 64, 64, generator=torch.Generator().manual_seed(0))


def build(config: str):
    """The ``YOLO`` object of ``config`` with random weights, its model in eval mode."""
    torch.manual_seed(0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        yolo = ultralytics.YOLO(config, verbose=False)
    yolo.model.eval()
    return yolo


def outputs(model) -> list:
    with torch.no_grad():
        return flat_outputs(model(X))


@pytest.mark.parametrize("config", ["yolov8n.yaml", "yolo11n.yaml", "yolov8n-seg.yaml", "yolov8n-pose.yaml", "yolov10n.yaml"])
def test_a_yolo_model_prunes_through_the_one_call(config, tmp_path):
    yolo = build(config)
    expected, params = outputs(yolo.model), count_params(yolo.model)
    report = graphprune.analyze(yolo.model, X)
    graphprune.prune(yolo.model, 0.3, X, report=report)
    assert count_params(yolo.model) <= 0.85 * params
    produced = outputs(yolo.model)
    assert [t.shape for t in produced] == [t.shape for t in expected]

    head = yolo.model.model[-1]  # Detect: box bins (4 x reg_max) and classes stay whole
    assert all(seq[-1].out_channels == 4 * head.reg_max for seq in head.cv2)
    assert all(seq[-1].out_channels == head.nc for seq in head.cv3)

    graphprune.save(yolo.model, tmp_path / "m.safetensors")
    loaded = graphprune.load(build(config).model, tmp_path / "m.safetensors")
    assert all(torch.equal(a, b) for a, b in zip(outputs(loaded), produced))

    image = (np.random.default_rng(0).random((96, 128, 3)) * 255).astype(np.uint8)
    assert len(yolo.predict(image, imgsz=64, verbose=False)) == 1


@pytest.fixture
def global_torch_state():
    """ultralytics' trainer sets process-wide torch state (deterministic algorithms, threads,
    environment variables); put it back for the tests that follow in this process."""
    deterministic, threads = torch.are_deterministic_algorithms_enabled(), torch.get_num_threads()
    environment = dict(os.environ)
    yield
    torch.use_deterministic_algorithms(deterministic)
    torch.set_num_threads(threads)
    os.environ.clear()
    os.environ.update(environment)


def test_a_pruned_yolo_exports_to_onnx_and_trains_through_ultralytics(tmp_path, global_torch_state):
    onnx = pytest.importorskip("onnx")
    from ultralytics.models.yolo.detect import DetectionTrainer

    yolo = build("yolov8n.yaml")
    graphprune.prune(yolo.model, 0.3, X)
    pruned = yolo.model
    torch.onnx.export(pruned, (X,), str(tmp_path / "m.onnx"), dynamo=False, opset_version=17)
    onnx.checker.check_model(str(tmp_path / "m.onnx"))

    class PrunedTrainer(DetectionTrainer):  # ultralytics' trainer would build a fresh model from the yaml
        def get_model(self, cfg=None, weights=None, verbose=True):
            return pruned

    data = _synthetic_dataset(tmp_path / "data")
    before = [p.detach().clone() for p in pruned.parameters()]
    yolo.train(trainer=PrunedTrainer, data=data, epochs=1, imgsz=64, batch=2, workers=0, device="cpu", plots=False,
               val=False, amp=False, project=str(tmp_path), name="run", exist_ok=True, verbose=False)
    assert any(not torch.equal(a, b.detach()) for a, b in zip(before, pruned.parameters()))  # it learned


def _synthetic_dataset(root) -> str:
    """Four 64x64 images with one box each, in YOLO format, for training and for validation."""
    import cv2

    rng = np.random.default_rng(0)
    for split in ("train", "val"):
        os.makedirs(root / "images" / split)
        os.makedirs(root / "labels" / split)
        for i in range(4):
            cv2.imwrite(str(root / "images" / split / f"{i}.jpg"), (rng.random((64, 64, 3)) * 255).astype(np.uint8))
            (root / "labels" / split / f"{i}.txt").write_text(f"{i % 2} 0.5 0.5 0.4 0.3\n")
    names = "".join(f"  {i}: class{i}\n" for i in range(80))
    (root / "data.yaml").write_text(f"path: {root}\ntrain: images/train\nval: images/val\nnames:\n{names}")
    return str(root / "data.yaml")
