"""Calibration recovery (graphprune/recovery): exact where the removed channels can be
recovered exactly, harmless where they were dead (the oracle's models), atomic, and checked."""
from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
from conftest import assert_model_unchanged, model_state
from oracle import _choose, flat_outputs
from small_net import small_net
from torch import nn

import graphprune
from graphprune.recovery import Recovery
from graphprune.tracer import call_model


class MLP(nn.Module):
    def __init__(self, width: int = 12):
        super().__init__()
        self.fc1, self.fc2, self.fc3 = nn.Linear(6, width), nn.Linear(width, width), nn.Linear(width, 3)

    def forward(self, x):
        return self.fc3(torch.relu(self.fc2(torch.relu(self.fc1(x)))))


class ConvBN(nn.Module):
    """conv (no bias) -> BN -> ReLU -> conv -> BN -> pool -> fc; and a grouped conv."""

    def __init__(self, groups: int = 1):
        super().__init__()
        self.conv1, self.bn1 = nn.Conv2d(3, 8, 3, padding=1, bias=False), nn.BatchNorm2d(8)
        self.conv2, self.bn2 = nn.Conv2d(8, 8, 3, padding=1, bias=False, groups=groups), nn.BatchNorm2d(8)
        self.fc = nn.Linear(8, 4)

    def forward(self, x):
        x = torch.relu(self.bn1(self.conv1(x)))
        return self.fc(self.bn2(self.conv2(x)).mean((2, 3)))


class Attention(nn.Module):
    """Single-head attention block with an output projection and an MLP, residual stream kept."""

    def __init__(self, width: int = 8):
        super().__init__()
        self.q, self.k, self.v, self.o = (nn.Linear(width, width) for _ in range(4))
        self.up, self.down = nn.Linear(width, 16), nn.Linear(16, width)

    def forward(self, x):
        weights = torch.softmax(self.q(x) @ self.k(x).transpose(1, 2), -1)
        x = x + self.o(weights @ self.v(x))
        return x + self.down(torch.relu(self.up(x)))


class Fixed(graphprune.criteria.Criterion):
    """Removes the channels ``drop[group size]`` lists first (lowest score)."""

    def __init__(self, drop: dict):
        self.drop = drop

    def scores(self, group) -> np.ndarray:
        scores = np.ones(group.size)
        scores[self.drop.get(group.size, [])] = 0.0
        return scores


def _error(model: nn.Module, reference: nn.Module, x: torch.Tensor) -> float:
    with torch.no_grad():
        out, ref = model(x), reference(x)
    return float((out - ref).square().sum() / ref.square().sum())


def _duplicated_mlp() -> tuple[MLP, list]:
    """fc1's channels 6..11 repeat 0..5, so removing 6..11 loses nothing a refit cannot restore."""
    torch.manual_seed(0)
    model = MLP().eval()
    with torch.no_grad():
        model.fc1.weight[6:] = model.fc1.weight[:6]
        model.fc1.bias[6:] = model.fc1.bias[:6]
    return model, list(range(6, 12))


def test_lstsq_recovers_duplicated_channels_exactly():
    model, drop = _duplicated_mlp()
    reference, x = copy.deepcopy(model), torch.randn(200, 6)
    calibration = [torch.randn(64, 6) for _ in range(4)]
    plain = graphprune.prune(copy.deepcopy(model), {"fc1": 0.5}, x[:2], criterion=Fixed({12: drop}))
    recovery = Recovery("lstsq", ridge=0.0, progress=False)
    fitted = graphprune.prune(model, {"fc1": 0.5}, x[:2], criterion=Fixed({12: drop}), calibration=calibration,
                              recover=recovery)
    assert fitted.fc1.out_features == 6 and fitted.fc2.in_features == 6 and fitted.fc2.out_features == 12
    assert _error(plain, reference, x) > 1e-2
    assert _error(fitted, reference, x) < 1e-9
    assert recovery.layers["fc2"]["method"] == "lstsq" and recovery.layers["fc2"]["error_after"] < 1e-6


def test_bias_compensation_restores_a_constant_channel_through_batch_norm():
    """A channel that is constant on every input is its mean: bias compensation restores it
    exactly, through the BatchNorm after a conv without a bias."""
    torch.manual_seed(0)
    model = ConvBN().eval()
    with torch.no_grad():
        model.conv1.weight[7] = 0.0  # bn1's output of channel 7 is its shift: a constant
        model.bn1.bias[7] = 2.0
    reference, x = copy.deepcopy(model), torch.randn(8, 3, 6, 6)
    recovery = Recovery("bias", progress=False)
    kept = graphprune.prune(model, {"conv1": 0.125}, x[:1], criterion=Fixed({8: [7]}), calibration=[x[:4], x[4:]],
                            recover=recovery)
    assert kept.conv2.in_channels == 7 and kept.bn2.running_mean.shape == (8,)
    assert recovery.layers["conv2"]["method"] == "bias"
    assert _error(kept, reference, x) < 1e-10


class Upsampler(nn.Module):
    """conv -> ReLU -> transposed conv: the transposed conv's input is its weight's dim 0."""

    def __init__(self):
        super().__init__()
        self.conv, self.up = nn.Conv2d(3, 8, 3, padding=1), nn.ConvTranspose2d(8, 4, 2, stride=2)

    def forward(self, x):
        return self.up(torch.relu(self.conv(x)))


def test_transposed_conv_gets_bias_compensation():
    torch.manual_seed(0)
    model, x = Upsampler().eval(), torch.randn(8, 3, 6, 6)
    reference = copy.deepcopy(model)
    plain = graphprune.prune(copy.deepcopy(model), 0.5, x[:1])
    recovery = Recovery("lstsq", progress=False)
    graphprune.prune(model, 0.5, x[:1], calibration=[x], recover=recovery)
    assert model.up.in_channels == 4 and recovery.layers["up"]["method"] == "bias"
    assert recovery.layers["up"]["error_after"] < recovery.layers["up"]["error_before"]
    assert _error(model, reference, x) < _error(plain, reference, x)


def test_recovery_reduces_the_error_of_a_random_network():
    torch.manual_seed(0)
    model, x = MLP(32).eval(), torch.randn(512, 6)
    reference = copy.deepcopy(model)
    calibration = [torch.randn(128, 6) for _ in range(4)]
    errors = {}
    for recover in (None, "bias", "lstsq", Recovery("lstsq", sequential=True, progress=False)):
        pruned = graphprune.prune(copy.deepcopy(model), 0.5, x[:2], calibration=calibration, recover=recover)
        errors[recover if isinstance(recover, (str, type(None))) else "sequential"] = _error(pruned, reference, x)
    assert errors["lstsq"] < 0.5 * errors[None] and errors["sequential"] < 0.5 * errors[None]
    assert errors["bias"] < errors[None]


def _oracle_with_recovery(model: nn.Module, x, method: str, seed: int = 0) -> int:
    """The dead-channel oracle with a refit: channels whose consumers read zeros are pruned,
    then every consumer is refit on the model's own inputs; outputs must not move."""
    model, x = model.double().eval(), x.double()
    report = graphprune.analyze(model, x)
    rng, plan = np.random.default_rng(seed), {}
    for group in [g for g in report.prunable_groups if g.exact and not g.assumptions]:
        plan[group] = _choose(group, rng, 0.3)
        for member in group.members:
            if member.role in ("in", "out", "param"):
                tensor = getattr(model.get_submodule(member.module), member.param)
                positions = np.flatnonzero(np.isin(member.index_map, plan[group]))
                with torch.no_grad():
                    tensor.index_fill_(member.dim, torch.as_tensor(positions), 0.0)
    reference = copy.deepcopy(model)
    report.session.apply(plan)
    recovery = Recovery(method.replace("sequential", "lstsq"), ridge=0.0, sequential=method == "sequential", progress=False)
    layers = recovery.run(reference, model, report.session.surgery.kept_positions(), [x[: len(x) // 2], x[len(x) // 2:]])
    with torch.no_grad():
        for e, p in zip(flat_outputs(call_model(reference, x)), flat_outputs(call_model(model, x))):
            assert e.shape != p.shape or torch.allclose(e, p, rtol=1e-5, atol=1e-6), (e - p).abs().max()
    return sum(r["method"] != "none" for r in layers.values())


@pytest.mark.parametrize("method", ["lstsq", "bias", "sequential"])
@pytest.mark.parametrize("build, shape", [
    (lambda: small_net(), (16, 3, 8, 8)), (lambda: ConvBN(), (16, 3, 6, 6)), (lambda: Upsampler(), (16, 3, 6, 6)),
    (lambda: MLP(), (64, 6)), (lambda: Attention(), (16, 5, 8)),
])
def test_refit_keeps_the_oracle_exact(build, shape, method):
    torch.manual_seed(0)
    assert _oracle_with_recovery(build(), torch.randn(shape), method) > 0


def test_failure_or_interrupt_during_recovery_leaves_the_model_bit_identical():
    torch.manual_seed(0)
    model, x = small_net(), torch.randn(4, 3, 8, 8)
    before = model_state(model)

    class Interrupting:
        def __init__(self, error):
            self.error, self.passes = error, 0

        def __iter__(self):
            self.passes += 1
            if self.passes > 1:  # the survey passes; the fit fails
                raise self.error
            yield x

    for error in (KeyboardInterrupt(), RuntimeError("disk gone")):
        with pytest.raises(type(error)):
            graphprune.prune(model, 0.5, x[:1], calibration=Interrupting(error), recover="lstsq")
        assert_model_unchanged(model, before)
    with pytest.raises(ValueError, match="batch 0 of the calibration batches"):
        graphprune.prune(model, 0.5, x[:1], calibration=[torch.randn(2, 5)], recover="bias")
    assert_model_unchanged(model, before)


def test_arguments_are_checked():
    model, x = MLP(), torch.randn(2, 6)
    with pytest.raises(ValueError, match="pass calibration="):
        graphprune.prune(model, 0.5, x, recover="lstsq")
    with pytest.raises(ValueError, match="recovery method"):
        graphprune.prune(model, 0.5, x, calibration=[x], recover="exact")
    with pytest.raises(TypeError, match="recover must be"):
        graphprune.prune(model, 0.5, x, calibration=[x], recover=3)
    with pytest.raises(TypeError, match="not an iterator"):
        graphprune.prune(model, 0.5, x, calibration=iter([x, x]), recover="bias")
    with pytest.raises(TypeError, match="iterable of batches"):
        graphprune.prune(model, 0.5, x, calibration=x, recover="lstsq")
    for bad in ({"ridge": -1}, {"max_batches": 0}, {"sequential": "yes"}):
        with pytest.raises((TypeError, ValueError)):
            Recovery(**bad)


def test_recovered_model_saves_loads_and_ratio_zero_is_a_no_op(tmp_path):
    torch.manual_seed(0)
    model, x = small_net(), torch.randn(8, 3, 8, 8)
    before = model_state(model)
    graphprune.prune(model, 0.0, x[:1], calibration=[x], recover="lstsq")
    assert_model_unchanged(model, before)
    graphprune.prune(model, 0.5, x[:1], calibration=[x[:4], x[4:]], recover="lstsq")
    graphprune.save(model, tmp_path / "m.pt")
    loaded = graphprune.load(small_net(), tmp_path / "m.pt")
    with torch.no_grad():
        assert torch.equal(loaded(x), model(x))


def test_steps_and_budget_compose_kept_positions():
    """Two steps: the second step's kept positions are of the first step's tensors; recovery
    must pair each layer with the original's right rows (else the duplicate is not recovered)."""
    model, drop = _duplicated_mlp()
    reference, x = copy.deepcopy(model), torch.randn(200, 6)
    recovery = Recovery("lstsq", ridge=0.0, progress=False)
    graphprune.prune(model, {"fc1": 0.5}, x[:2], criterion=Fixed({12: drop, 9: [6, 7, 8]}), steps=2,
                     calibration=[torch.randn(64, 6) for _ in range(3)], recover=recovery)
    assert model.fc1.out_features == 6
    assert _error(model, reference, x) < 1e-9


def test_too_little_data_for_least_squares_falls_back_to_bias():
    torch.manual_seed(0)
    model, x = MLP(32).eval(), torch.randn(4, 6)
    recovery = Recovery("lstsq", progress=False)
    graphprune.prune(model, 0.5, x[:1], calibration=[x], recover=recovery)
    assert recovery.layers["fc2"]["method"] == "bias" and "too few for least squares" in recovery.layers["fc2"]["why"]
