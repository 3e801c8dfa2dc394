"""Errors that name the real problem and the remedy: TorchScript models, a list or tuple where
the other was meant, and data loaders whose batches the model or the loss rejects."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from graphprune import criteria
import graphprune
from conftest import assert_same_state, run_cli, stderr_lines, state_snapshot

X = torch.randn(2, 3, 6, 6, generator=torch.Generator().manual_seed(0))
LABELS = torch.tensor([1, 4])


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3, padding=1)
        self.bn = nn.BatchNorm2d(8)
        self.fc = nn.Linear(8, 5)

    def forward(self, x):
        return self.fc(F.relu(self.bn(self.conv(x))).mean((2, 3)))


class TwoInputs(nn.Module):
    def __init__(self):
        super().__init__()
        self.a, self.b = nn.Conv2d(3, 8, 1), nn.Conv2d(3, 8, 1)

    def forward(self, x, y):
        return self.a(x) + self.b(y)


class PairInput(nn.Module):
    """Takes a pair of images as its one input."""

    def __init__(self):
        super().__init__()
        self.a, self.b = nn.Conv2d(3, 8, 1), nn.Conv2d(3, 8, 1)

    def forward(self, pair):
        return self.a(pair[0]) + self.b(pair[1])


class ListInput(PairInput):
    """Takes a list of images as its one input, as detection models do."""

    def __init__(self):
        super().__init__()
        self.head = nn.Conv2d(8, 4, 1)

    def forward(self, images):
        return self.head(F.relu(super().forward(images)))


def unchanged(model: nn.Module):
    """A check that ``model``'s state and parameter objects are what they are now."""
    snapshot, params = state_snapshot(model), list(model.parameters())

    def check():
        assert_same_state(model, snapshot)
        assert [id(p) for p in model.parameters()] == [id(p) for p in params]

    return check


# --------------------------------------------------------------------------- 1. TorchScript
@pytest.mark.filterwarnings("ignore:`torch.jit:FutureWarning")
@pytest.mark.parametrize("make", [torch.jit.script, lambda m: torch.jit.trace(m, X)], ids=["script", "trace"])
def test_torchscript_models_are_rejected_up_front(make, tmp_path):
    scripted = make(Net().eval())
    check = unchanged(scripted)
    remedy = r"is a TorchScript module \(\w+\), which graphprune cannot trace or change; .*before scripting it"
    with pytest.raises(TypeError, match="model " + remedy):
        graphprune.prune(scripted, 0.5, X)
    with pytest.raises(TypeError, match=remedy):
        graphprune.analyze(scripted, X)
    with pytest.raises(TypeError, match=remedy):
        graphprune.save(scripted, tmp_path / "m.safetensors")
    assert not list(tmp_path.iterdir())
    check()


@pytest.mark.filterwarnings("ignore:`torch.jit:FutureWarning")
def test_torchscript_load_is_rejected_and_running_it_still_works(tmp_path):
    path = tmp_path / "m.safetensors"
    graphprune.save(graphprune.prune(Net(), 0.5, X), path)
    scripted = torch.jit.script(Net())
    check = unchanged(scripted)
    with pytest.raises(TypeError, match="TorchScript module.*torch.jit.script\\(graphprune.prune\\(model"):
        graphprune.load(scripted, path)
    check()
    # evaluate and finetune only run the model: a scripted one is fine
    assert 0.0 <= graphprune.evaluate(scripted, [(X, LABELS)]) <= 1.0
    assert len(graphprune.finetune(scripted, [(X, LABELS)], epochs=1, warmup_epochs=0, progress=False)) == 1


# --------------------------------------------------------------------------- 2. list / tuple
def test_a_list_of_positional_inputs_says_a_list_is_one_input():
    model = TwoInputs()
    check = unchanged(model)
    hint = r"A list is passed to forward\(\) as ONE input .*pass several positional inputs as a tuple"
    with pytest.raises(ValueError, match="TwoInputs raised TypeError on the example inputs.*" + hint):
        graphprune.analyze(model, [X, X])
    with pytest.raises(ValueError, match=hint):
        graphprune.prune(model, 0.5, [X, X])
    check()
    assert len(graphprune.analyze(model, (X, X)).groups) > 0  # the tuple is what was meant


def test_a_list_is_still_one_input():
    model = ListInput()
    assert graphprune.analyze(model, [X, X]).groups
    graphprune.prune(model, 0.5, [X, X])
    assert model.a.out_channels == model.b.out_channels == 4 and model([X, X]).shape == (2, 4, 6, 6)


def test_a_tuple_meant_as_one_input_says_how_to_wrap_it():
    model, x = PairInput(), X[:1]
    with pytest.raises(ValueError, match=r"example_inputs holds 2 positional inputs but forward\(\) takes 1 \(pair\)\. "
                                         r"A tuple's items are passed to forward\(\) as positional inputs; to pass the "
                                         r"tuple as ONE input, wrap it: \(example_inputs,\)"):
        graphprune.analyze(model, (x, x))
    assert graphprune.analyze(model, ((x, x),)).groups


def test_inputs_of_the_wrong_shape_get_no_container_hint():
    with pytest.raises(ValueError, match=r"Pass example_inputs that the model accepts\.$"):
        graphprune.analyze(Net(), torch.randn(1, 2, 6, 6))


# --------------------------------------------------------------------------- 3. data criteria
REMEDY = r"must yield \(inputs, targets\) batches that the model and .* accept; inputs as in example_inputs"


@pytest.mark.parametrize("make", [criteria.Taylor, criteria.KTaylor], ids=["taylor", "k_taylor"])
def test_criterion_loader_with_wrong_input_shape(make):
    model = Net().eval()
    check = unchanged(model)
    loader = [(X, LABELS), (torch.randn(2, 2, 6, 6), LABELS)]
    name = make.__name__
    with pytest.raises(ValueError, match=rf"batch 1 of {name}'s data_loader \(inputs tensor\(2, 2, 6, 6\) float32, "
                                         rf"targets tensor\(2,\) int64\): the model's forward \(Net\) raised "
                                         rf"RuntimeError: .*expected input\[2, 2, 6, 6\].*{REMEDY}") as caught:
        graphprune.prune(model, 0.5, X, criterion=make(loader, progress=False))
    assert isinstance(caught.value.__cause__, RuntimeError)
    check()


def test_criterion_loader_with_targets_out_of_range():
    model = Net().eval()
    check = unchanged(model)
    loader = [(X, torch.tensor([1, 7]))]
    with pytest.raises(ValueError, match=r"batch 0 of Taylor's data_loader \(.*model outputs tensor\(2, 5\) float32\): "
                                         r"loss_fn \(cross_entropy\) raised IndexError: Target 7 is out of bounds\. "
                                         r"Taylor's data_loader " + REMEDY) as caught:
        graphprune.prune(model, 0.5, X, criterion=criteria.Taylor(loader, progress=False))
    assert isinstance(caught.value.__cause__, IndexError)
    check()


def test_criterion_keeps_its_own_errors_interrupts_and_empty_loaders():
    model = Net().eval()
    check = unchanged(model)

    def interrupted(outputs, targets):
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        graphprune.prune(model, 0.5, X, criterion=criteria.Taylor([(X, LABELS)], interrupted, progress=False))
    with pytest.raises(ValueError, match="^loss_fn must return a scalar tensor$") as caught:  # graphprune's own check
        graphprune.prune(model, 0.5, X, criterion=criteria.Taylor([(X, LABELS)], lambda o, t: o, progress=False))
    assert caught.value.__cause__ is None
    with pytest.raises(ValueError, match="Taylor's data_loader yielded no batches"):
        graphprune.prune(model, 0.5, X, criterion=criteria.Taylor([], progress=False))
    with pytest.raises(TypeError, match=r"each batch of Taylor's data_loader must be an \(inputs, targets\) pair"):
        graphprune.prune(model, 0.5, X, criterion=criteria.Taylor([X], progress=False))
    check()


# --------------------------------------------------------------------------- 4. finetune, evaluate, CLI
def test_finetune_and_evaluate_loaders_with_wrong_batches():
    model = Net()
    wrong_shape, wrong_targets = [(torch.randn(2, 2, 6, 6), LABELS)], [(X, torch.tensor([1, 9]))]
    kwargs = dict(epochs=1, warmup_epochs=0, progress=False)
    with pytest.raises(ValueError, match=r"batch 0 of train_loader .*: the model's forward \(Net\) raised Runtime"):
        graphprune.finetune(model, wrong_shape, **kwargs)
    with pytest.raises(ValueError, match=r"cross-entropy raised IndexError: Target 9 is out of bounds\. train_loader "
                                         + REMEDY):
        graphprune.finetune(model, wrong_targets, **kwargs)
    with pytest.raises(ValueError, match=r"batch 0 of eval_loader .*: the model's forward \(Net\) raised"):
        graphprune.finetune(model, [(X, LABELS)], eval_loader=wrong_shape, lr=1e-12, **kwargs)
    check = unchanged(model)  # evaluate only reads the model
    with pytest.raises(ValueError, match=r"batch 0 of evaluate's loader .*: the model's forward \(Net\) raised"):
        graphprune.evaluate(model, wrong_shape)
    # too many targets used to be broadcast into a wrong accuracy
    with pytest.raises(ValueError, match=r"the top-1 accuracy raised ValueError: targets must be class indices of "
                                         r"shape \(2,\) .*got shape \(3,\)\. evaluate's loader " + REMEDY):
        graphprune.evaluate(model, [(X, torch.tensor([1, 2, 3]))])
    check()


def test_finetune_teacher_with_other_outputs():
    teacher = nn.Sequential(nn.Flatten(), nn.Linear(3 * 6 * 6, 7))
    with pytest.raises(ValueError, match=r"the teacher outputs tensor\(2, 7\) float32 but the model tensor\(2, 5\) "
                                         r"float32 on batch 0 of train_loader; distillation needs a teacher"):
        graphprune.finetune(Net(), [(X, LABELS)], epochs=1, warmup_epochs=0, teacher=teacher, progress=False)


def test_cli_rejected_input_shape_names_the_remedy(capsys):
    code, out, err = run_cli(capsys, ["analyze", "cifar:resnet20", "--input-shape", "1,2,8,8", "--quiet"])
    assert code == 2 and out == ""
    (line,) = stderr_lines(err)
    assert "does not accept a random tensor of shape (1, 2, 8, 8)" in line
    assert line.endswith("give an --input-shape that it accepts (N,C,H,W for images, N,L for token ids)")


class _Untraceable(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.a, self.b = torch.nn.Conv2d(3, 8, 3), torch.nn.Conv2d(8, 4, 3)

    def forward(self, x):
        h = self.a(x)
        if h.mean() > 0:  # control flow on a value: neither torch.fx nor torch.export (strict shapes) takes it whole
            h = h.relu()
        return self.b(h)[:, : int(h.abs().sum().item()) % 3 + 1]


def test_a_model_that_cannot_be_traced_says_where_why_and_what_to_try():
    with pytest.warns(UserWarning) as caught:
        graphprune.prune(_Untraceable().eval(), 0.5, torch.randn(1, 3, 16, 16))
    message = "\n".join(str(w.message) for w in caught)
    assert "no prunable channel group" in message
    assert "test_errors.py:" in message and "if h.mean() > 0:" in message  # the file, line and code
    assert "TraceError: symbolically traced variables cannot be used as inputs to control flow" in message
    assert "try: capture='export' or capture='fx'" in message and "leaf_modules=[...]" in message


def test_measure_latency_checks_its_counts():
    model = nn.Linear(4, 2)
    with pytest.raises(TypeError, match="repeats must be an integer"):
        graphprune.measure_latency(model, torch.randn(1, 4), repeats=2.5)
    with pytest.raises(ValueError, match="warmup must be at least 0"):
        graphprune.measure_latency(model, torch.randn(1, 4), warmup=-1)
