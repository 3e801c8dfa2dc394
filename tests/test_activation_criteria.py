"""Activation-aware criteria: Wanda and FLAP's fluctuation (criteria/activation.py)."""
from __future__ import annotations

import numpy as np
import pytest
import torch
import torchvision
from conftest import assert_model_unchanged, model_state
from torch import nn

import graphprune
from graphprune import criteria
from graphprune.analysis.groups import Group, Member
from graphprune.criteria import CRITERIA, OBS, Fluctuation, Wanda, get_criterion


class MLP(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(4, 6), nn.Linear(6, 3)

    def forward(self, x):
        return self.fc2(torch.relu(self.fc1(x)))


class SharedMLP(nn.Module):
    """``shared`` runs twice: its statistics must add both calls' inputs."""

    def __init__(self):
        super().__init__()
        self.fc1, self.shared, self.fc2 = nn.Linear(4, 6), nn.Linear(6, 6), nn.Linear(6, 3)

    def forward(self, x):
        return self.fc2(self.shared(torch.relu(self.shared(torch.relu(self.fc1(x))))))


class ConvNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv1, self.conv2, self.fc = nn.Conv2d(3, 6, 3, padding=1), nn.Conv2d(6, 4, 3, padding=1), nn.Linear(4, 2)

    def forward(self, x):
        return self.fc(self.conv2(torch.relu(self.conv1(x))).mean((2, 3)))


class QKAttention(nn.Module):
    """Query/key channels are read only by a matmul: no Linear or Conv consumes them."""

    def __init__(self):
        super().__init__()
        self.q, self.k, self.v, self.out = nn.Linear(8, 6), nn.Linear(8, 6), nn.Linear(8, 8), nn.Linear(8, 4)

    def forward(self, x):
        attention = torch.softmax(self.q(x) @ self.k(x).transpose(-2, -1), dim=-1)
        return self.out(attention @ self.v(x))


def group_of(report, name: str, role: str = "out"):
    return next(g for g in report.groups if any(m.name == name and m.role == role for m in g.members))


def prepared(criterion, model, example):
    report = graphprune.analyze(model, example)
    criterion.prepare(model, report)
    return report


def mlp_with(channel: int, weight_row: float, bias: float) -> MLP:
    """An MLP whose hidden ``channel`` has the largest fc2 column; every other channel's
    pre-activation stays positive on small inputs (its ReLU is the identity)."""
    model = MLP().eval()
    with torch.no_grad():
        model.fc1.bias.fill_(3.0)
        model.fc1.weight[channel] = weight_row
        model.fc1.bias[channel] = bias
        model.fc2.weight[:, channel] = 10 * model.fc2.weight.abs().max()
    return model


LOADER = [torch.randn(8, 4, generator=torch.Generator().manual_seed(i)) * 0.1 for i in range(3)]


# ----- what the scores say
def test_a_channel_whose_input_is_always_zero_ranks_lowest_though_l1_ranks_it_highest():
    model = mlp_with(2, weight_row=5.0, bias=-100.0)  # big weights, ReLU always 0
    x = LOADER[0]
    report = graphprune.analyze(model, x)
    hidden = group_of(report, "fc1.weight")
    for criterion in (Wanda(LOADER, progress=False), Fluctuation(LOADER, progress=False)):
        criterion.prepare(model, report)
        scores = criterion.scores(hidden)
        assert scores[2] == 0 and (np.delete(scores, 2) > 0).all(), (criterion, scores)
    assert np.argmax(criteria.L1().scores(hidden)) == 2
    pruned = graphprune.prune(model, 0.5, x, criterion=Wanda(LOADER, progress=False), inplace=False)
    assert pruned.fc1.bias.min() > -100  # the dead channel went
    kept_by_l1 = graphprune.prune(model, 0.5, x, inplace=False)
    assert kept_by_l1.fc1.bias.min() == -100


def test_a_channel_whose_input_is_constant_has_no_fluctuation_but_a_large_wanda_score():
    model = mlp_with(3, weight_row=0.0, bias=5.0)  # ReLU output 5 for every sample
    report = graphprune.analyze(model, LOADER[0])
    hidden = group_of(report, "fc1.weight")
    flap, wanda = Fluctuation(LOADER, progress=False), Wanda(LOADER, progress=False)
    flap.prepare(model, report)
    wanda.prepare(model, report)
    assert flap.scores(hidden)[3] == 0 and np.argmin(flap.scores(hidden)) == 3
    assert np.argmax(wanda.scores(hidden)) == 3


def direct(consumer_weight: torch.Tensor, inputs: list, channel_dim: int) -> tuple[np.ndarray, np.ndarray]:
    """Wanda and FLAP position scores of one consumer, computed by hand from its inputs."""
    values = torch.cat([x.movedim(channel_dim, -1).reshape(-1, x.shape[channel_dim]) for x in inputs]).double()
    w = consumer_weight.detach().double().movedim(1, 0).reshape(consumer_weight.shape[1], -1)
    wanda = w.abs().sum(1) * values.norm(dim=0)
    flap = w.square().sum(1) * values.var(dim=0, unbiased=False)
    return wanda.numpy(), flap.numpy()


def test_conv_scores_follow_the_formulas_over_samples_and_pixels():
    model = ConvNet().eval()
    loader = [torch.randn(2, 3, 5, 5) for _ in range(2)]
    report = graphprune.analyze(model, loader[0])
    hidden = group_of(report, "conv1.weight")
    with torch.no_grad():
        inputs = [torch.relu(model.conv1(x)) for x in loader]
    wanda, flap = direct(model.conv2.weight, inputs, 1)
    for criterion, expected in ((Wanda(loader, progress=False), wanda), (Fluctuation(loader, progress=False), flap)):
        criterion.prepare(model, report)
        np.testing.assert_allclose(criterion.scores(hidden), expected / expected.max(), rtol=1e-6)
        assert criterion.statistics.counts["conv2"] == 2 * 2 * 5 * 5


def test_a_module_called_twice_adds_both_calls():
    model = SharedMLP().eval()
    report = graphprune.analyze(model, LOADER[0])
    hidden = group_of(report, "fc1.weight")
    with torch.no_grad():
        first = [torch.relu(model.fc1(x)) for x in LOADER]
        second = [torch.relu(model.shared(h)) for h in first]
        third = [model.shared(h) for h in second]
    criterion = Wanda(LOADER, progress=False)
    criterion.prepare(model, report)
    assert criterion.statistics.counts["shared"] == 2 * sum(len(x) for x in LOADER)
    shared, _ = direct(model.shared.weight, first + second, 1)
    fc2, _ = direct(model.fc2.weight, third, 1)
    np.testing.assert_allclose(criterion.scores(hidden), (shared / shared.max() + fc2 / fc2.max()) / 2, rtol=1e-6)

def test_obs_removes_copies_first_and_ranks_by_the_error_a_refit_leaves():
    """Hidden channels 0, 1, 2 are copies with the largest weights: a refit can give all their
    output to the one left, so OBS removes two of them first; L1 ranks them highest."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 6), nn.ReLU(), nn.Linear(6, 3)).eval()
    with torch.no_grad():
        model[0].bias.fill_(3.0)  # every ReLU stays on: no channel is dead, none is free but the copies
        model[0].weight[1:3] = model[0].weight[0]
        model[2].weight[:, :3] *= 20
    loader = [torch.randn(64, 8) for _ in range(2)]
    criterion = OBS(loader, progress=False, ridge=1e-8)  # the damping would cost the copies' large weights
    report = prepared(criterion, model, loader[0])
    scores = criterion.scores(group_of(report, "0.weight"))
    assert sorted(scores[:3])[:2] == [0.0, 1.0] and sorted(scores) == list(range(6))
    assert set(np.argsort(criteria.L1().scores(group_of(report, "0.weight")))[-3:]) == {0, 1, 2}
    assert criterion.fallback_groups == []


def test_obs_on_convolutions_and_attention():
    model, x = ConvNet().eval(), torch.randn(4, 3, 5, 5)
    criterion = OBS([x], progress=False)
    report = prepared(criterion, model, x)
    scores = criterion.scores(group_of(report, "conv1.weight"))
    assert sorted(scores) == list(range(scores.size))
    attention, tokens = QKAttention().eval(), torch.randn(2, 5, 8)
    criterion = OBS([tokens], progress=False)
    report = prepared(criterion, attention, tokens)
    criterion.scores(group_of(report, "q.weight"))
    assert criterion.fallback_groups == [group_of(report, "q.weight").id]


def test_obs_reads_only_what_a_refit_can_fit():
    """A Conv3d consumer's inputs are no rows of a matrix: OBS leaves it unread (the group falls
    back to L1) instead of failing in the calibration pass; Wanda still reads it."""
    model = nn.Sequential(nn.Conv3d(2, 4, 3, padding=1), nn.ReLU(), nn.Conv3d(4, 3, 3, padding=1)).eval()
    x = torch.randn(2, 2, 4, 4, 4)
    obs, wanda = OBS([x], progress=False), Wanda([x], progress=False)
    report = prepared(obs, model, x)
    hidden = group_of(report, "0.weight")
    np.testing.assert_array_equal(obs.scores(hidden), criteria.L1().scores(hidden))
    assert obs.fallback_groups == [hidden.id]
    wanda.prepare(model, report)
    wanda.scores(hidden)
    assert wanda.fallback_groups == []


def test_query_key_channels_fall_back_to_l1():
    model, x = QKAttention().eval(), torch.randn(2, 5, 8)
    criterion = Wanda([x], progress=False)
    report = prepared(criterion, model, x)
    query_key, value = group_of(report, "q.weight"), group_of(report, "v.weight")
    assert query_key.prunable and query_key is not value
    np.testing.assert_array_equal(criterion.scores(query_key), criteria.L1().scores(query_key))
    criterion.scores(value)
    assert criterion.fallback_groups == [query_key.id]


def test_batches_may_be_pairs_and_max_batches_limits_them():
    model = MLP().eval()
    pairs = [(x, torch.zeros(8)) for x in LOADER]
    report = graphprune.analyze(model, LOADER[0])
    hidden = group_of(report, "fc1.weight")
    plain, paired = Fluctuation(LOADER[:2], progress=False), Fluctuation(pairs, max_batches=2, progress=False)
    plain.prepare(model, report)
    paired.prepare(model, report)
    assert paired.statistics.counts["fc2"] == 16
    np.testing.assert_array_equal(plain.scores(hidden), paired.scores(hidden))


# ----- contract
def test_prepare_leaves_the_model_unchanged():
    model = ConvNet().train()
    model.conv1.weight.grad = torch.ones_like(model.conv1.weight)
    model.fc.bias.requires_grad_(False)
    report = graphprune.analyze(model, torch.randn(1, 3, 5, 5))
    before = model_state(model)
    for criterion in (Wanda([torch.randn(2, 3, 5, 5)], progress=False), Fluctuation([torch.randn(2, 3, 5, 5)], progress=False)):
        criterion.prepare(model, report)
        assert_model_unchanged(model, before)


def test_scores_before_prepare_raise():
    member = Member("fc", "weight", 1, np.arange(3), "in", torch.ones(2, 3))
    with pytest.raises(RuntimeError, match="Wanda needs prepare"):
        Wanda(LOADER).scores(Group(id=0, size=3, members=[member], blocked=[], notes=[]))


@pytest.mark.parametrize("kwargs, error, message", [
    ({"data_loader": None}, TypeError, "Wanda's data_loader must be an iterable of batches.*NoneType"),
    ({"data_loader": torch.ones(2, 3)}, TypeError, "data_loader must be an iterable of batches.*Tensor"),
    ({"data_loader": {"x": 1}}, TypeError, "data_loader must be an iterable of batches.*dict"),
    ({"max_batches": 0}, ValueError, "max_batches must be at least 1, got 0"),
    ({"max_batches": 1.5}, TypeError, "max_batches must be a positive integer or None, got float"),
    ({"max_batches": True}, TypeError, "max_batches must be a positive integer or None, got bool"),
    ({"device": 3}, TypeError, "device must be a str, a torch.device or None, got int"),
])
def test_bad_arguments_raise(kwargs, error, message):
    with pytest.raises(error, match=message):
        Wanda(**{"data_loader": LOADER, **kwargs})


def test_bad_loaders_and_devices_raise_in_prepare():
    model = MLP()
    report = graphprune.analyze(model, LOADER[0])
    with pytest.raises(ValueError, match="Fluctuation's data_loader yielded no batches"):
        Fluctuation([], progress=False).prepare(model, report)
    with pytest.raises(ValueError, match=r"given device=meta but the model is on cpu; move the model first"):
        Wanda(LOADER, device="meta", progress=False).prepare(model, report)
    with pytest.raises(ValueError, match=r"batch 0 of Wanda's data_loader"):
        Wanda([torch.randn(2, 5)], progress=False).prepare(model, report)


def test_registered_by_name():
    assert CRITERIA["wanda"] is Wanda and CRITERIA["flap"] is Fluctuation and CRITERIA["obs"] is OBS
    assert Wanda.requires_data and Fluctuation.name == "flap"
    with pytest.raises(ValueError, match="needs training data.*pass a Wanda instance"):
        get_criterion("wanda")


# ----- end to end
@pytest.mark.parametrize("criterion", [Wanda, Fluctuation])
def test_prune_resnet18(criterion):
    model = torchvision.models.resnet18(weights=None).eval()
    x = torch.randn(1, 3, 32, 32)
    loader = [torch.randn(2, 3, 32, 32) for _ in range(2)]
    before = sum(p.numel() for p in model.parameters())
    chosen = criterion(loader, progress=False)
    pruned = graphprune.prune(model, 0.5, x, criterion=chosen)
    assert pruned(x).shape == (1, 1000)
    assert sum(p.numel() for p in pruned.parameters()) < 0.5 * before
    assert chosen.fallback_groups == []


@pytest.mark.filterwarnings("ignore::graphprune.ConfigWarning")  # heads pruned unequally: no config describes it
def test_prune_tiny_bert_and_transformer_layer():
    transformers = pytest.importorskip("transformers")
    config = transformers.BertConfig(vocab_size=50, hidden_size=16, num_hidden_layers=2, num_attention_heads=2,
                                     intermediate_size=32, max_position_embeddings=16)
    bert = transformers.BertModel(config).eval()
    batch = {"input_ids": torch.randint(0, 50, (2, 8))}
    criterion = Wanda([batch, batch], progress=False)
    pruned = graphprune.prune(bert, 0.5, batch, criterion=criterion)
    assert pruned(**batch).last_hidden_state.shape == (2, 8, 16)
    assert pruned.encoder.layer[0].intermediate.dense.out_features == 16
    layer = nn.TransformerEncoderLayer(16, 2, dim_feedforward=32, batch_first=True).eval()
    x = torch.randn(2, 5, 16)
    pruned = graphprune.prune(layer, 0.5, x, criterion=Fluctuation([x], progress=False))
    assert pruned(x).shape == (2, 5, 16) and pruned.linear1.out_features == 16


def test_named_with_calibration_loader():
    model, x = MLP().eval(), LOADER[0]
    pruned = graphprune.prune(model, 0.5, x, criterion="wanda", calibration=LOADER)
    assert pruned(x).shape == (8, 3) and pruned.fc1.out_features == 3
