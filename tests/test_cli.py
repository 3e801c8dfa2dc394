"""The command line: ``graphprune analyze | prune``, usage errors, MODEL resolution
(torchvision's resnet18 at 64x64). The other commands are in test_cli_workflow.py."""
from __future__ import annotations

import contextlib
import importlib.util
import io
import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torchvision

import graphprune
from graphprune import count_parameters
from conftest import run_cli, stderr_lines
from graphprune.cli.app import main

SMALL = ["resnet18", "--input-shape", "1,3,64,64"]


def _number(text: str) -> int:
    return int(text.replace(",", ""))


@pytest.fixture(scope="module")
def pruned_json(tmp_path_factory):
    """One ``prune --json --output`` run shared by the tests that inspect its result."""
    path = tmp_path_factory.mktemp("cli") / "pruned.safetensors"
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = main(["prune", *SMALL, "--ratio", "0.5", "--json", "--output", str(path)])
    return code, out.getvalue(), err.getvalue(), path


def test_prune_prints_parameters_and_flops_before_and_after(capsys):
    assert main(["prune", *SMALL, "--ratio", "0.5"]) == 0
    out = capsys.readouterr().out
    params = re.search(r"^parameters\s+([\d,]+) \(.*?\)\s+([\d,]+) \(.*?\)\s+([\d.]+) \(", out, re.MULTILINE)
    flops = re.search(r"^FLOPs\s+([\d,]+) \(.*?\)\s+([\d,]+) \(.*?\)\s+([\d.]+) \(", out, re.MULTILINE)
    assert params and flops, out
    before, after, ratio = _number(params[1]), _number(params[2]), float(params[3])
    assert before == 11_689_512  # resnet18
    assert 0 < after < before
    assert ratio == pytest.approx(after / before, abs=1e-3)
    assert 0 < _number(flops[2]) < _number(flops[1])
    seconds = re.search(r"time \(analysis \+ pruning\): ([\d.]+) s", out)
    assert seconds and float(seconds[1]) > 0


def test_prune_json_has_numbers(pruned_json):
    code, out, _, _ = pruned_json
    assert code == 0
    result = json.loads(out)  # stdout is JSON only; progress went to stderr
    for key in ("model", "ratio", "criterion", "input", "params_before", "params_after", "params_ratio",
                "flops_before", "flops_after", "flops_ratio", "seconds", "output"):
        assert key in result, key
    assert result["model"] == "resnet18" and result["ratio"] == 0.5 and result["criterion"] == "l1"
    assert 0 < result["params_after"] < result["params_before"] == 11_689_512
    assert 0 < result["flops_after"] < result["flops_before"]
    assert result["params_ratio"] == pytest.approx(result["params_after"] / result["params_before"])
    assert result["flops_ratio"] == pytest.approx(result["flops_after"] / result["flops_before"])
    assert result["seconds"] > 0


def test_prune_shows_progress_on_stderr(pruned_json):
    _, _, err, _ = pruned_json
    assert "pruning" in err and "Traceback" not in err


def test_prune_output_is_a_loadable_pruned_model(pruned_json):
    _, out, _, path = pruned_json
    result = json.loads(out)
    assert result["output"] == str(path) and path.is_file()
    assert result["source"] == "torchvision:resnet18" and result["sidecar"] == str(path) + ".json"
    assert path.read_bytes()[:2] != b"PK"  # not a torch.save zip archive: safetensors + JSON spec
    sidecar = json.loads(Path(result["sidecar"]).read_text())
    assert sidecar["model"] == "torchvision:resnet18" and sidecar["input_shape"] == [1, 3, 64, 64]
    model = graphprune.load(torchvision.models.resnet18(weights=None), path).eval()
    assert count_parameters(model) == result["params_after"]
    with torch.no_grad():
        assert model(torch.randn(2, 3, 64, 64)).shape == (2, 1000)


def test_saved_model_is_a_model_argument(pruned_json, capsys):
    """The saved file names its model and input shape: analyze needs nothing else."""
    _, out, _, path = pruned_json
    assert main(["analyze", str(path), "--json", "--quiet"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["source"] == "torchvision:resnet18"
    assert result["parameters"] == json.loads(out)["params_after"]
    assert result["input"] == "tensor(1, 3, 64, 64)"


def test_saved_model_without_sidecar_needs_source_equals_file(pruned_json, tmp_path, capsys):
    _, out, _, path = pruned_json
    bare = tmp_path / "bare.safetensors"
    shutil.copy(path, bare)
    assert main(["analyze", str(bare), "--quiet"]) == 2
    assert "has no 'bare.safetensors.json'" in capsys.readouterr().err
    assert main(["analyze", f"torchvision:resnet18={bare}", "--input-shape", "1,3,64,64", "--json", "-q"]) == 0
    assert json.loads(capsys.readouterr().out)["parameters"] == json.loads(out)["params_after"]


def test_analyze_prints_report_and_counts(capsys):
    assert main(["analyze", *SMALL]) == 0
    out = capsys.readouterr().out
    assert out.startswith("graphprune analysis of ResNet:")
    assert "prunable" in out and "blocked: reaches output" in out
    counts = re.search(r"parameters: ([\d,]+) .*FLOPs: ([\d,]+)", out)
    assert counts and _number(counts[1]) == 11_689_512 and _number(counts[2]) > 0


def test_analyze_json(capsys):
    assert main(["analyze", *SMALL, "--json", "--quiet"]) == 0
    captured = capsys.readouterr()
    assert captured.err == ""
    result = json.loads(captured.out)
    assert result["model"] == "resnet18" and result["parameters"] == 11_689_512 and result["flops"] > 0
    assert result["groups"] == len(result["rows"]) == result["prunable_groups"] + result["blocked_groups"]
    assert result["prunable_groups"] > 0
    assert {"group", "root", "channels", "members", "layers", "status", "param_share"} <= set(result["rows"][0])


@pytest.mark.parametrize(
    "argv, message",
    [
        (["prune", "resnet1800", "--ratio", "0.5"], "unknown model 'resnet1800'"),
        (["analyze", "not_a_model"], "unknown model"),
        (["prune", *SMALL, "--ratio", "1.5"], "ratio must lie in [0, 1)"),
        (["prune", *SMALL, "--ratio", "-0.1"], "ratio must lie in [0, 1)"),
        (["prune", *SMALL, "--ratio", "half"], "ratio must be a number"),
        (["prune", *SMALL], "--ratio"),
        (["prune", *SMALL, "--ratio", "0.5", "--criterion", "nope"], "--criterion"),
        (["prune", *SMALL, "--ratio", "0.5", "--criterion", "taylor"], "needs training data"),
        (["analyze", "resnet18", "--input-shape", "1,3,x"], "input shape"),
        (["analyze", "resnet18", "--input-shape", "1,0,64,64"], "input shape"),
        (["analyze", "resnet18", "--input-shape", "1,1,64,64", "--quiet"], "does not accept"),
        (["prune", *SMALL, "--ratio", "0.5", "--output", "/nonexistent-dir/m.pt"], "does not exist"),
        ([], "COMMAND"),
        (["frobnicate"], "invalid choice"),
    ],
)
def test_bad_input_exits_2_with_one_line(capsys, argv, message):
    assert main(argv) == 2
    captured = capsys.readouterr()
    assert captured.out == ""
    lines = stderr_lines(captured.err)
    assert len(lines) == 1, captured.err
    assert lines[0].startswith("graphprune") and "error: " in lines[0] and message in lines[0]


def test_rejected_input_shape_ends_with_one_error_line_after_progress(capsys):
    assert main(["prune", "resnet18", "--ratio", "0.5", "--input-shape", "1,1,64,64"]) == 2
    lines = stderr_lines(capsys.readouterr().err)
    assert [line for line in lines if "error" in line] == lines[-1:]
    assert "expected input[1, 1, 64, 64] to have 3 channels" in lines[-1]
    assert not any("Traceback" in line for line in lines)


def test_pruning_failure_exits_1_with_one_line(capsys, monkeypatch):
    import graphprune.api

    def failing_prune(*args, **kwargs):
        raise graphprune.PruningError("pruning failed and the model was restored:\n  details on a second line")

    monkeypatch.setattr(graphprune.api, "prune", failing_prune)
    assert main(["prune", *SMALL, "--ratio", "0.5", "--quiet"]) == 1
    captured = capsys.readouterr()
    assert captured.out == ""
    assert stderr_lines(captured.err) == [
        "graphprune prune: error: PruningError: pruning failed and the model was restored: details on a second line "
        "(--traceback for details)"
    ]


def test_help_explains_the_saved_format(capsys):
    assert main(["prune", "--help"]) == 0
    out = " ".join(capsys.readouterr().out.split())
    assert "graphprune.save" in out and "safetensors" in out and "no pickle" in out and "FILE.json" in out


def test_main_help_lists_commands_and_model_syntax(capsys):
    assert main(["--help"]) == 0
    out = capsys.readouterr().out
    for word in ("analyze", "prune", "finetune", "sensitivity", "report", "export", "cifar:NAME", "timm:NAME",
                 "hf:DIR", "yolo:CFG.yaml", "SOURCE=FILE"):
        assert word in out, word


def _script(name: str) -> str:
    found = shutil.which(name) or str(Path(sys.executable).with_name(name))
    if not os.access(found, os.X_OK):
        pytest.skip(f"the {name!r} console script is not installed (pip install -e .)")
    return found


def test_console_script_analyze():
    result = subprocess.run(
        [_script("graphprune"), "analyze", *SMALL],
        check=False, capture_output=True, text=True, timeout=300,
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith("graphprune analysis of ResNet:")
    assert re.search(r"parameters: 11,689,512 ", result.stdout)


def test_python_dash_m_reports_usage_errors():
    result = subprocess.run(
        [sys.executable, "-m", "graphprune", "prune", "resnet18", "--ratio", "2"],
        check=False, capture_output=True, text=True, timeout=300,
    )
    assert result.returncode == 2
    assert stderr_lines(result.stderr) == [
        "graphprune prune: error: argument --ratio: ratio must lie in [0, 1), got 2 (see 'graphprune prune --help')"
    ]


# ---------------------------------------------------------------- MODEL resolution


@pytest.mark.parametrize(
    "model, source, parameters",
    [
        ("resnet20", "cifar:resnet20", 272_474),  # only graphprune.models has it
        ("cifar:resnet20", "cifar:resnet20", 272_474),
        ("cifar:resnet18", "cifar:resnet18", 11_173_962),  # both have it: the prefix picks graphprune.models
        ("torchvision:resnet18", "torchvision:resnet18", 11_689_512),
    ],
)
def test_model_names_resolve(capsys, model, source, parameters):
    shape = [] if model.startswith("cifar") or model == "resnet20" else ["--input-shape", "1,3,32,32"]
    code, out, err = run_cli(capsys, ["analyze", model, *shape, "--json", "-q"])
    assert code == 0, err
    result = json.loads(out)
    assert result["source"] == source and result["parameters"] == parameters
    assert result["input"] == "tensor(1, 3, 32, 32)"  # the CIFAR default input


def test_timm_prefix_without_timm_is_a_usage_error(capsys):
    if importlib.util.find_spec("timm") is not None:
        pytest.skip("timm is installed")
    code, out, err = run_cli(capsys, ["analyze", "timm:resnet18"])
    assert code == 2 and out == ""
    assert stderr_lines(err) == [
        "graphprune analyze: error: 'timm:resnet18' needs timm, which is not installed (pip install timm)"
    ]


def test_a_hugging_face_checkpoint_directory_is_a_model(capsys, tmp_path):
    pytest.importorskip("transformers")
    from test_hf import build

    build("bert")[0].save_pretrained(tmp_path / "bert")
    code, out, err = run_cli(capsys, ["prune", f"hf:{tmp_path / 'bert'}", "--ratio", "0.3", "--quiet", "--output",
                                      str(tmp_path / "pruned")])
    assert code == 0, err
    assert f"graphprune.from_pretrained('{tmp_path / 'pruned'}') loads it" in " ".join(out.split())
    code, out, err = run_cli(capsys, ["report", f"hf:{tmp_path / 'bert'}", f"hf:{tmp_path / 'pruned'}",
                                      "--no-latency", "--json", "--quiet"])
    assert code == 0, err
    assert json.loads(out)["input"] == "{input_ids: tensor(1, 16)}"


def test_a_yolo_config_is_a_model(capsys):
    pytest.importorskip("ultralytics")
    code, out, err = run_cli(capsys, ["analyze", "yolo:yolov8n.yaml", "--input-shape", "1,3,64,64", "--json", "--quiet"])
    assert code == 0, err
    assert json.loads(out)["prunable_groups"] > 0


@pytest.mark.parametrize("spec, message", [
    ("hf:/no/such/dir", "not a directory with a Hugging Face config.json"),
    ("yolo:yolov8n.pt", "give a model config such as yolov8n.yaml"),
])
def test_bad_hf_and_yolo_names_are_usage_errors(capsys, spec, message):
    pytest.importorskip("transformers" if spec.startswith("hf") else "ultralytics")
    code, out, err = run_cli(capsys, ["analyze", spec])
    assert code == 2 and out == "" and message in err


def test_the_command_line_and_the_package_start_without_importing_torch():
    """``graphprune --help`` and ``import graphprune`` load no torch (it takes seconds); a
    public name loads what it needs on first use."""
    script = ("import sys, contextlib, io\n"
              "import graphprune\n"
              "assert 'torch' not in sys.modules, 'import graphprune'\n"
              "from graphprune.cli.app import main\n"
              "with contextlib.redirect_stdout(io.StringIO()), contextlib.suppress(SystemExit):\n"
              "    main(['--help'])\n"
              "assert 'torch' not in sys.modules, 'graphprune --help'\n"
              "assert callable(graphprune.prune) and 'torch' in sys.modules\n"
              "assert 'prune' in dir(graphprune) and graphprune.criteria.CRITERIA['l1'].__name__ == 'L1'\n")
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-2000:]
