"""The command line's ``finetune | sensitivity | report | export``, on graphprune.models'
resnet20 (32x32) trained and evaluated on the digits, with ``--limit-batches`` to keep them fast."""
from __future__ import annotations

import contextlib
import io
import json
import re
import shutil
from pathlib import Path

import pytest
import torch

import graphprune
from graphprune import count_parameters
from conftest import run_cli, stderr_lines
from graphprune.cli.app import main


# ---------------------------------------------------------------- finetune / sensitivity / report / export


@pytest.fixture(scope="module")
def cifar_files(tmp_path_factory):
    """resnet20 pruned at 0.5 (prune --output), then fine-tuned for one short epoch with the
    unpruned model as teacher (finetune --output)."""
    directory = tmp_path_factory.mktemp("cifar")
    pruned, tuned = directory / "pruned.safetensors", directory / "tuned.safetensors"
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        assert main(["prune", "resnet20", "--ratio", "0.5", "--json", "-q", "-o", str(pruned)]) == 0, err.getvalue()
    prune_result = json.loads(out.getvalue())
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = main(["finetune", str(pruned), "--epochs", "1", "--limit-batches", "2", "--batch-size", "32",
                     "--teacher", "resnet20", "-o", str(tuned)])
    return {"pruned": pruned, "tuned": tuned, "prune": prune_result, "code": code,
            "out": out.getvalue(), "err": err.getvalue()}


def test_finetune_prints_accuracy_per_epoch_and_saves(cifar_files):
    assert cifar_files["code"] == 0, cifar_files["err"]
    out, err, tuned = cifar_files["out"], cifar_files["err"], cifar_files["tuned"]
    assert "distilling from resnet20" in out and "2 training and 2 test batches of up to 32" in out
    before = re.search(r"^before\s+-\s+-\s+([\d.]+)%$", out, re.MULTILINE)
    epoch = re.search(r"^1\s+([\d.]+)\s+([\d.e-]+)\s+([\d.]+)%$", out, re.MULTILINE)
    assert before and epoch, out
    assert 0 <= float(before[1]) <= 100 and float(epoch[1]) > 0 and 0 <= float(epoch[3]) <= 100
    assert "fine-tune 1/1" in err and "Traceback" not in err  # the progress bar went to stderr
    assert json.loads(Path(str(tuned) + ".json").read_text())["model"] == "cifar:resnet20"
    # the saved weights are the fine-tuned model: the same accuracy on the same 2 test batches
    model = graphprune.load(graphprune.models.get_model("resnet20"), tuned)
    assert count_parameters(model) == cifar_files["prune"]["params_after"]
    _, test = graphprune.data.digits_loaders(batch_size=32)
    accuracy = graphprune.evaluate(model, [batch for _, batch in zip(range(2), test)])
    assert f"{100 * accuracy:.2f}%" == f"{epoch[3]}%"


def test_finetune_json(cifar_files, capsys):
    code, out, err = run_cli(capsys, ["finetune", str(cifar_files["tuned"]), "--epochs", "2", "--limit-batches", "1",
                                   "--lr", "0.05", "--json", "-q"])
    assert code == 0, err
    assert err == ""  # --quiet: no progress, no epoch lines
    result = json.loads(out)
    assert result["source"] == "cifar:resnet20" and result["epochs"] == 2 and result["lr"] == 0.05
    assert result["output"] is None and result["warmup_epochs"] == pytest.approx(0.2)
    assert [h["epoch"] for h in result["history"]] == [1, 2]
    assert all(0 <= h["accuracy"] <= 1 and h["loss"] > 0 for h in result["history"])
    assert result["accuracy"] == result["history"][-1]["accuracy"] and 0 <= result["accuracy_before"] <= 1


def test_sensitivity_json_and_plot(cifar_files, tmp_path, capsys):
    plot = tmp_path / "sensitivity.png"
    code, out, err = run_cli(capsys, ["sensitivity", str(cifar_files["tuned"]), "--ratios", "0.5,0.25",
                                   "--limit-batches", "1", "--max-drop", "0.05", "--plot", str(plot), "--json", "-q"])
    assert code == 0, err
    result = json.loads(out)
    assert result["ratios"] == [0.25, 0.5] and result["metric"] == "accuracy" and result["max_drop"] == 0.05
    groups = {row["group"] for row in result["table"]}
    assert len(groups) == 12 and len(result["table"]) == 2 * 12  # resnet20: 12 prunable groups
    assert all(row["drop"] == pytest.approx(result["baseline"] - row["metric"]) for row in result["table"])
    assert set(result["ratios_for"].values()) <= {0.0, 0.25, 0.5} and "conv1" in result["ratios_for"]
    for key, ratio in result["ratios_for"].items():
        rows = [r for r in result["table"] if r["key"] == key and r["ratio"] == ratio]
        assert ratio == 0.0 or rows[0]["drop"] <= 0.05
    assert plot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and result["plot"] == str(plot)


def test_sensitivity_prints_table_and_ratios(cifar_files, capsys):
    code, out, err = run_cli(capsys, ["sensitivity", str(cifar_files["pruned"]), "--ratios", "0.5", "--limit-batches", "1"])
    assert code == 0, err
    assert out.startswith("sensitivity of CifarResNet (l1): baseline ")
    assert re.search(r"^\s+1\s+conv1\s+8\s+-?[\d.]+$", out, re.MULTILINE), out  # pruned: 8 channels left
    assert "per-group ratios keeping the accuracy drop within 0.02 (module: ratio):" in out
    assert re.search(r"^  layer3\.2\.conv1: (0|0\.5)$", out, re.MULTILINE)
    assert "sensitivity" in err  # the progress bar


def test_report_json(cifar_files, capsys):
    code, out, err = run_cli(capsys, ["report", "resnet20", str(cifar_files["pruned"]), "--repeats", "2", "--json", "-q"])
    assert code == 0, err
    result = json.loads(out)
    assert result["before"] == "resnet20" and result["after"] == str(cifar_files["pruned"])
    prune_result = cifar_files["prune"]
    assert result["parameters"] == {"before": prune_result["params_before"], "after": prune_result["params_after"],
                                    "ratio": pytest.approx(prune_result["params_ratio"])}
    assert result["flops"]["before"] == prune_result["flops_before"] and result["flops"]["after"] == prune_result["flops_after"]
    assert result["flops"]["ratio"] == pytest.approx(prune_result["flops_ratio"])
    latency = result["latency"]
    assert latency["before"] > 0 and latency["after"] > 0 and latency["ratio"] == pytest.approx(latency["after"] / latency["before"])
    assert result["speedup"] == pytest.approx(1 / latency["ratio"])
    conv1 = next(row for row in result["groups"] if row["root"] == "conv1")
    assert (conv1["before"], conv1["after"], conv1["kept"]) == (16, 8, 0.5)


def test_report_text_without_latency(cifar_files, capsys):
    code, out, err = run_cli(capsys, ["report", "cifar:resnet20", str(cifar_files["pruned"]), "--no-latency"])
    assert code == 0, err
    assert out.startswith(f"graphprune: cifar:resnet20 (before) vs {cifar_files['pruned']} (after)\n")
    assert re.search(r"^parameters\s+272,474\s+[\d,]+\s+0\.\d+$", out, re.MULTILINE), out
    assert "latency" not in out and "FLOPs" in out
    assert "measuring parameters, FLOPs..." in err


def _loaded(path) -> torch.nn.Module:
    return graphprune.load(graphprune.models.get_model("resnet20"), path).eval()


def test_export_onnx_runs_in_onnxruntime(cifar_files, tmp_path, capsys):
    pytest.importorskip("onnxscript")
    ort = pytest.importorskip("onnxruntime")
    path = tmp_path / "pruned.onnx"
    code, out, err = run_cli(capsys, ["export", str(cifar_files["pruned"]), "--format", "onnx", "-o", str(path), "--json"])
    assert code == 0, err
    result = json.loads(out)  # torch.onnx's progress lines went to stderr, not into the JSON
    assert result["format"] == "onnx" and result["files"] == [str(path)] and result["bytes"] == path.stat().st_size
    x = torch.randn(1, 3, 32, 32)
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    (logits,) = session.run(None, {"input": x.numpy()})
    with torch.no_grad():
        torch.testing.assert_close(torch.from_numpy(logits), _loaded(cifar_files["pruned"])(x), atol=1e-4, rtol=1e-4)


def test_export_torch_export_loads_back(cifar_files, tmp_path, capsys):
    path = tmp_path / "pruned.pt2"
    code, out, err = run_cli(capsys, ["export", str(cifar_files["pruned"]), "--format", "torch.export", "-o", str(path)])
    assert code == 0, err
    assert out.startswith(f"graphprune: exported {cifar_files['pruned']} (a random tensor of shape (1, 3, 32, 32)) "
                          f"as torch.export to {path}")
    program = torch.export.load(str(path))
    assert tuple(program.state_dict["conv1.weight"].shape) == (8, 3, 3, 3)
    x = torch.randn(1, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(program.module()(x), _loaded(cifar_files["pruned"])(x))


@pytest.mark.parametrize("fmt", ["dot", "png"])
def test_export_channel_graph(cifar_files, tmp_path, capsys, fmt):
    path = tmp_path / f"graph.{fmt}"
    code, _, err = run_cli(capsys, ["export", str(cifar_files["pruned"]), "-f", fmt, "-o", str(path), "-q"])
    assert code == 0, err
    if fmt == "png":
        assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    else:
        text = path.read_text()
        assert "digraph" in text and "layer3.2.conv1" in text and "g1" in text


# ---------------------------------------------------------------- bad input to the new commands


@pytest.fixture
def broken_files(cifar_files, tmp_path):
    """A resnet20 file whose sidecar names resnet56, and a text file posing as a saved model."""
    wrong = tmp_path / "wrong.safetensors"
    shutil.copy(cifar_files["pruned"], wrong)
    Path(str(wrong) + ".json").write_text(json.dumps({"format": "graphprune.cli-model", "model": "cifar:resnet56"}))
    fake = tmp_path / "fake.safetensors"
    fake.write_text("not a model")
    Path(str(fake) + ".json").write_text(json.dumps({"format": "graphprune.cli-model", "model": "cifar:resnet20"}))
    return {"wrong": str(wrong), "fake": str(fake), "dir": str(tmp_path)}


@pytest.mark.parametrize(
    "argv, message",
    [
        (["finetune", "resnet20"], "--epochs"),
        (["finetune", "resnet20", "--epochs", "0"], "argument --epochs: must be >= 1, got 0"),
        (["finetune", "resnet20", "--epochs", "1", "--lr", "0"], "argument --lr: must be > 0"),
        (["finetune", "resnet20", "--epochs", "1", "--warmup-epochs", "1"], "--warmup-epochs (1) must be less than --epochs (1)"),
        (["finetune", "resnet20", "--epochs", "1", "--alpha", "2"], "--alpha must lie in [0, 1]"),
        (["finetune", "resnet20", "--epochs", "1", "--input-shape", "1,3,32,16"], "square image inputs"),
        (["finetune", "resnet20", "--epochs", "1", "--teacher", "resnet18"], "they must match for distillation"),
        (["finetune", "resnet20", "--epochs", "1", "--teacher", "nope"], "unknown model 'nope'"),
        (["finetune", "resnet20", "--epochs", "1", "-o", "{dir}/missing/x.safetensors"], "does not exist"),
        (["sensitivity", "resnet20", "--ratios", "0.5,1.2"], "every ratio must lie in (0, 1), got 1.2"),
        (["sensitivity", "resnet20", "--ratios", "half"], "comma-separated numbers"),
        (["sensitivity", "resnet20", "--max-drop", "-1"], "argument --max-drop: must be >= 0"),
        (["sensitivity", "resnet20", "--plot", "{dir}/missing/s.png"], "--plot"),
        (["report", "resnet20"], "AFTER"),
        (["report", "resnet20", "resnet20", "--repeats", "0"], "--repeats"),
        (["export", "resnet20", "--format", "tflite", "-o", "{dir}/x"], "invalid choice: 'tflite'"),
        (["export", "resnet20", "--format", "onnx"], "--output"),
        (["export", "resnet20", "--format", "dot", "-o", "{dir}"], "is a directory"),
        (["analyze", "{dir}/missing.safetensors"], "no such file"),
        (["analyze", "cifar:resnet1000"], "unknown model 'resnet1000'"),
        (["analyze", "cifar:resnet20=nothing.safetensors"], "no such file: 'nothing.safetensors'"),
        (["report", "resnet20", "{wrong}"], "cannot load"),
        (["analyze", "{fake}"], "not a readable safetensors file"),
    ],
)
def test_new_commands_reject_bad_input_with_one_line(capsys, broken_files, argv, message):
    argv = [arg.format(**broken_files) for arg in argv]
    assert main(argv) == 2
    captured = capsys.readouterr()
    assert captured.out == ""
    lines = [line for line in stderr_lines(captured.err) if "error" in line]
    assert len(lines) == 1 and lines == stderr_lines(captured.err)[-1:], captured.err
    assert lines[0].startswith(f"graphprune {argv[0]}") and message in lines[0], lines[0]
