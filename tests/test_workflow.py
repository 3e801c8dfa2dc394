"""The end-to-end pipeline of issue 5, judged on real accuracy.

A CIFAR-style ResNet-20 trained from scratch on scikit-learn's digits (upsampled to 16x16,
3 channels) goes through prune -> fine-tune with distillation (the unpruned model is the
teacher) -> graphprune.save -> graphprune.load into a freshly built ResNet-20 -> ONNX
(onnxruntime). The loaded model must give bit-identical outputs, ONNX must agree with it,
and the test accuracy must stay within 0.5 points of the unpruned model's.

Everything is seeded and runs on one thread (conftest), so the numbers are fixed:
unpruned 98.89%, pruned (50% of every group, 25% of the parameters left) 9.72% before and
99.44% after fine-tuning. The test set has 360 images, so one image is 0.28 points; with
other model seeds (1..7) the fine-tuned accuracy lands between -0.83 and +0.28 points of
the baseline (seed 1, whose baseline is 100%, is the one that misses the 0.5-point bound).
The figures are torch 2.14.1's: with torch 2.11 (seed 0, one thread, another x86 CPU) the
baseline reaches 100% and the fine-tuned model 99.17%, so this test and the ONNX accuracy
check miss by one image there. One seed on 360 images is a coarse judge; see
benchmarks/criteria.py for a pooled one.
"""
from __future__ import annotations

import copy

import pytest
import torch

import graphprune
from graphprune.data import digits_loaders
from graphprune.models import get_model

from conftest import assert_same_state, state_snapshot

SEED = 0
IMAGE_SIZE = 16          # resnet20 ends in adaptive pooling: 16x16 digits train 4x faster than 32x32
TRAIN_EPOCHS = 15        # training loss ~1e-3 by then (benchmarks/accuracy.py's digits protocol)
RATIO = 0.5              # floor(0.5 * n) channels removed from every prunable group
FINETUNE = dict(epochs=5, lr=0.02, warmup_epochs=0, alpha=0.9, temperature=4.0)
TOLERANCE = 0.5          # accuracy points


def _loaders():
    """Fresh loaders each time: the training loader's shuffling generator is seeded when it is built."""
    return digits_loaders(batch_size=64, image_size=IMAGE_SIZE, seed=SEED)


def _test_images() -> torch.Tensor:
    return torch.cat([images for images, _ in _loaders()[1]])


def _points(accuracy: float) -> float:
    return 100.0 * accuracy


@pytest.fixture(scope="module")
def baseline():
    """ResNet-20 trained from scratch on the digits, and its test accuracy."""
    torch.manual_seed(SEED)
    model = get_model("resnet20", num_classes=10)
    train, test = _loaders()
    graphprune.finetune(model, train, epochs=TRAIN_EPOCHS, lr=0.1, warmup_epochs=1, progress=False)
    return model.eval(), graphprune.evaluate(model, test)


@pytest.fixture(scope="module")
def pipeline(baseline, tmp_path_factory):
    """prune -> fine-tune with the unpruned model as teacher -> save -> load into a fresh resnet20."""
    teacher, _ = baseline
    teacher_state = state_snapshot(teacher)
    train, test = _loaders()
    student = copy.deepcopy(teacher)
    graphprune.prune(student, RATIO, _test_images()[:1])
    pruned_accuracy = graphprune.evaluate(student, test)
    torch.manual_seed(SEED)
    graphprune.finetune(student, train, teacher=teacher, progress=False, **FINETUNE)
    assert_same_state(teacher, teacher_state)  # the teacher is read, never trained
    path = tmp_path_factory.mktemp("workflow") / "resnet20_pruned.safetensors"
    graphprune.save(student, path)
    loaded = graphprune.load(get_model("resnet20", num_classes=10), path).eval()
    return {"student": student.eval(), "loaded": loaded, "pruned_accuracy": pruned_accuracy, "path": path}


def test_pruning_removes_half_of_every_group(baseline, pipeline):
    teacher, _ = baseline
    loaded = pipeline["loaded"]
    assert loaded.conv1.out_channels == 8 and loaded.layer3[0].conv1.out_channels == 32
    assert loaded.fc.in_features == 32 and loaded.fc.out_features == 10
    assert graphprune.count_parameters(loaded) < 0.3 * graphprune.count_parameters(teacher)


def test_loaded_model_is_identical(pipeline):
    student, loaded = pipeline["student"], pipeline["loaded"]
    assert list(loaded.state_dict()) == list(student.state_dict())
    for name, tensor in student.state_dict().items():
        assert torch.equal(loaded.state_dict()[name], tensor), name
    images = _test_images()
    with torch.no_grad():
        assert torch.equal(loaded(images), student(images))


def test_onnx_export_agrees_with_loaded_model(baseline, pipeline, tmp_path):
    pytest.importorskip("onnx")
    pytest.importorskip("onnxscript")  # torch.onnx.export's exporter is built on it
    ort = pytest.importorskip("onnxruntime")
    loaded = pipeline["loaded"]
    images = _test_images()
    path = tmp_path / "resnet20_pruned.onnx"
    torch.onnx.export(loaded, (images[:2],), str(path), input_names=["images"], output_names=["logits"],
                      dynamic_shapes=({0: "batch"},), verbose=False)
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    (logits,) = session.run(None, {"images": images.numpy()})
    with torch.no_grad():
        expected = loaded(images)
    torch.testing.assert_close(torch.from_numpy(logits), expected, atol=1e-4, rtol=1e-4)
    labels = torch.cat([labels for _, labels in _loaders()[1]])
    onnx_accuracy = (torch.from_numpy(logits).argmax(1) == labels).float().mean().item()
    _, base_accuracy = baseline
    assert _points(onnx_accuracy) >= _points(base_accuracy) - TOLERANCE


def test_accuracy_within_half_a_point(baseline, pipeline):
    _, base_accuracy = baseline
    accuracy = graphprune.evaluate(pipeline["loaded"], _loaders()[1])
    message = (f"unpruned {_points(base_accuracy):.2f}%, pruned {_points(pipeline['pruned_accuracy']):.2f}%, "
               f"fine-tuned and loaded {_points(accuracy):.2f}%")
    assert _points(base_accuracy) >= 97.0, message  # the baseline really learned the digits
    assert _points(accuracy) >= _points(base_accuracy) - TOLERANCE, message
