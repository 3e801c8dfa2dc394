"""``graphprune prune`` does what ``graphprune.prune`` does: trained weights from the files people
have (``--weights``, ``--model-arg``), every option under its API name, ``--bench`` and ``bench``;
the pruned model equals the Python API's."""
from __future__ import annotations

import json

import pytest
import torch
import torchvision
from conftest import run_cli
from safetensors.torch import save_file

import graphprune
from graphprune.cli.app import build_parser
from graphprune.cli.options import prune_options
from graphprune.io.weights import load_weights

X = torch.randn(1, 3, 64, 64, generator=torch.Generator().manual_seed(0))
SMALL = ["resnet18", "--input-shape", "1,3,64,64", "--model-arg", "num_classes=10", "--quiet"]


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A resnet18 with 10 classes and weights unlike a fresh one's, saved as people save them."""
    torch.manual_seed(1)
    model = torchvision.models.resnet18(num_classes=10).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.mul_(1.5).add_(0.01)
    folder = tmp_path_factory.mktemp("weights")
    state = model.state_dict()
    torch.save(state, folder / "plain.pth")
    torch.save({"epoch": 3, "state_dict": {f"module.{k}": v for k, v in state.items()}}, folder / "ddp.pt")
    save_file(state, str(folder / "plain.safetensors"))
    return model, folder


def api_pruned(model, **options):
    fresh = torchvision.models.resnet18(num_classes=10).eval()
    fresh.load_state_dict(model.state_dict())
    return graphprune.prune(fresh, options.pop("ratio", None), X, **options)


def cli_pruned(capsys, tmp_path, argv):
    code, out, err = run_cli(capsys, ["prune", *SMALL, *argv, "--output", str(tmp_path / "out.safetensors")])
    assert code == 0, err
    return graphprune.load(torchvision.models.resnet18(num_classes=10).eval(), tmp_path / "out.safetensors"), out


@pytest.mark.parametrize("name", ["plain.pth", "ddp.pt", "plain.safetensors"])
def test_trained_weights_prune_as_the_api_prunes_them(trained, capsys, tmp_path, name):
    model, folder = trained
    pruned, _ = cli_pruned(capsys, tmp_path, ["--weights", str(folder / name), "--ratio", "0.4"])
    with torch.no_grad():
        assert torch.equal(pruned(X), api_pruned(model, ratio=0.4)(X))


@pytest.mark.parametrize("argv, options", [
    (["--ratio", "0.5", "--round-to", "8", "--ignored-layers", "layer4"], {"ratio": 0.5, "round_to": 8, "ignored_layers": ["layer4"]}),
    (["--ratio", "0.4", "--global-ranking", "--max-ratio", "0.6", "--criterion", "l2"],
     {"ratio": 0.4, "global_ranking": True, "max_ratio": 0.6, "criterion": "l2"}),
    (["--target-params", "0.5", "--tolerance", "0.05"], {"target_params": 0.5, "tolerance": 0.05}),
    (["--ratio", "layer4*=0.5,layer3*=0.25", "--steps", "2", "--schedule", "geometric"],
     {"ratio": {"layer4*": 0.5, "layer3*": 0.25}, "steps": 2, "schedule": "geometric"}),
])
def test_every_option_means_what_it_means_in_python(trained, capsys, tmp_path, argv, options):
    model, folder = trained
    pruned, _ = cli_pruned(capsys, tmp_path, ["--weights", str(folder / "plain.pth"), *argv])
    expected = api_pruned(model, **options)
    assert [p.shape for p in pruned.parameters()] == [p.shape for p in expected.parameters()]
    with torch.no_grad():
        assert torch.equal(pruned(X), expected(X))


def test_the_options_map_one_to_one_onto_prune():
    args = build_parser().parse_args(["prune", "resnet18", "--ratio", "0.3", "--uniform", "--prune-heads", "--fit-config",
                                      "--leaf-modules", "a,b", "--capture", "fx", "--no-verify"])
    options = prune_options(args)
    assert options["leaf_modules"] == ["a", "b"] and options["verify"] is False and options["capture"] == "fx"
    assert options["uniform"] and options["prune_heads"] and options["fit_config"]
    import inspect
    assert set(options) <= set(inspect.signature(graphprune.prune).parameters)


@pytest.mark.parametrize("argv, message", [
    (["--ratio", "0.3", "--target-flops", "0.5"], "give one of --ratio and the budgets, not --ratio and --target-flops"),
    ([], "give --ratio, or a budget"),
    (["--ratio", "0.3", "--round-to", "0"], "round_to must be at least 1"),
    (["--ratio", "layer4*=2"], "ratio of 'layer4*' must lie in [0, 1)"),
    (["--ratio", "0.3", "--ignored-layers", "nope"], "ignored_layers has entries that are not submodules of ResNet: ['nope']"),
    (["--ratio", "0.3", "--bench", "--rounds", "2"], "must be >= 4"),
])
def test_option_mistakes_are_usage_errors(capsys, argv, message):
    code, out, err = run_cli(capsys, ["prune", *SMALL, *argv])
    assert code == 2 and message in " ".join(err.split()), err


@pytest.mark.parametrize("make, message", [
    (lambda s: {k: v for k, v in s.items() if not k.startswith("fc.")}, "2 of ResNet's tensors are not in the file: fc.weight, fc.bias"),
    (lambda s: {**s, "extra.weight": torch.ones(1)}, "1 tensors of the file are not in ResNet: extra.weight"),
    (lambda s: {**s, "fc.bias": torch.ones(3)}, "fc.bias [3] in the file, [10] in ResNet"),
    (lambda s: {"optimizer": {"lr": 0.1}}, "holds a dict ('optimizer') with no state_dict of tensors"),
])
def test_weights_that_do_not_fit_say_which_tensors(trained, tmp_path, make, message):
    torch.save(make(trained[0].state_dict()), tmp_path / "w.pt")
    fresh = torchvision.models.resnet18(num_classes=10)
    before = {k: v.clone() for k, v in fresh.state_dict().items()}
    with pytest.raises(ValueError, match=message.replace("[", r"\[").replace("(", r"\(").replace(")", r"\)")):
        load_weights(fresh, tmp_path / "w.pt")
    assert all(torch.equal(before[k], v) for k, v in fresh.state_dict().items())


def test_weights_mistakes_on_the_command_line_say_what_to_do(trained, capsys):
    _, folder = trained
    code, _, err = run_cli(capsys, ["prune", "resnet18", "--weights", str(folder / "plain.pth"), "--ratio", "0.3", "-q"])
    assert code == 2 and "--model-arg num_classes=10" in err and "fc.weight [10, 512] in the file" in err
    code, _, err = run_cli(capsys, ["prune", str(folder / "plain.pth"), "--ratio", "0.3", "-q"])
    assert code == 2 and "looks like trained weights" in err and "--weights" in err
    code, _, err = run_cli(capsys, ["prune", f"resnet18={folder / 'plain.safetensors'}", "--ratio", "0.3", "-q"])
    assert code == 2 and "holds trained weights, not a model graphprune saved" in err


def test_a_lightning_style_prefix_and_old_batchnorm_counters_load():
    model = torchvision.models.resnet18(num_classes=10)
    state = {f"model.{k}": v + 1 for k, v in model.state_dict().items() if not k.endswith("num_batches_tracked")}
    fresh = load_weights(torchvision.models.resnet18(num_classes=10), _saved(state))
    assert torch.equal(fresh.fc.weight, model.fc.weight + 1)


def _saved(state) -> str:
    import tempfile

    path = tempfile.mktemp(suffix=".ckpt")
    torch.save({"state_dict": state, "hyper_parameters": {"lr": 0.1}}, path)
    return path


def test_bench_times_before_and_after(capsys, tmp_path):
    code, out, err = run_cli(capsys, ["prune", *SMALL, "--ratio", "0.5", "--bench", "--rounds", "4", "--json"])
    assert code == 0, err
    result = json.loads(out)
    assert len(result["latency_medians_s"]) == 2 and result["rounds"] == 4 and result["speedup"] > 0
    assert isinstance(result["latency_trustworthy"], bool)
    pruned, _ = cli_pruned(capsys, tmp_path, ["--ratio", "0.5"])
    code, out, err = run_cli(capsys, ["bench", "resnet18", str(tmp_path / "out.safetensors"), *SMALL[1:], "--rounds", "5"])
    assert code == 0, err
    assert "median (ms)" in out and "5 interleaved rounds" in out and "speed-up:" in out
