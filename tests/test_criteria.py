"""Criteria: each ranks channels correctly where the answer is known."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

from graphprune import criteria
import graphprune
from graphprune.criteria import CRITERIA, get_criterion
from graphprune.criteria.geometric import geometric_median
from graphprune.criteria.kmeans import removal_ranks
from graphprune.analysis.groups import Group, Member


def member(tensor, role="out", dim=0, module="layer", param="weight", index_map=None):
    tensor = torch.as_tensor(tensor, dtype=torch.float32)
    if index_map is None:
        index_map = np.arange(tensor.shape[dim])
    return Member(module, param, dim, np.asarray(index_map, dtype=np.int64), role, tensor)


def group(*members, size=None, gid=0):
    size = size if size is not None else int(max(m.index_map.max() for m in members)) + 1
    return Group(id=gid, size=size, members=list(members), blocked=[], notes=[])


def removal_order(scores):
    return list(np.argsort(scores, kind="stable"))


class TinyNet(nn.Module):
    def __init__(self, classes=3):
        super().__init__()
        self.conv1 = nn.Conv2d(1, 6, 3, padding=1)
        self.bn1 = nn.BatchNorm2d(6)
        self.conv2 = nn.Conv2d(6, 8, 3, padding=1)
        self.bn2 = nn.BatchNorm2d(8)
        self.fc = nn.Linear(8, classes)

    def forward(self, x):
        x = torch.relu(self.bn1(self.conv1(x)))
        x = torch.relu(self.bn2(self.conv2(x)))
        return self.fc(x.mean((2, 3)))


def randomise_bn(model):
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.weight.uniform_(0.5, 1.5)
                m.bias.uniform_(-0.2, 0.2)
                m.running_mean.uniform_(-0.1, 0.1)
                m.running_var.uniform_(0.5, 1.5)
    return model


# ----- registry
def test_registry_names():
    assert set(CRITERIA) == {"l1", "l2", "fpgm", "bn_scale", "group_norm", "random", "taylor", "k_l1", "k_taylor",
                             "k_distance", "wanda", "flap", "obs"}
    for name in ("l1", "l2", "fpgm", "bn_scale", "group_norm", "random", "k_l1", "k_distance"):
        assert isinstance(get_criterion(name), criteria.Criterion)
    assert get_criterion("Random").seed == 0


@pytest.mark.parametrize("name", ["taylor", "k_taylor"])
def test_data_criteria_need_an_instance(name):
    with pytest.raises(ValueError, match=r"needs training data.*pass a K?Taylor instance"):
        get_criterion(name)


# ----- magnitude
def test_l1_and_l2_rank_by_norm():
    weights = torch.tensor([[1.0, 1, 1, 1], [3, 0, 0, 0], [0.5, 0, 0, 0], [2, 2, 0, 0]])
    g = group(member(weights))
    assert removal_order(criteria.L1().scores(g)) == [2, 1, 0, 3]  # L1: 4, 3, 0.5, 4 (stable tie)
    assert removal_order(criteria.L2().scores(g)) == [2, 0, 3, 1]  # L2: 2, 3, 0.5, 2.83


def test_members_are_averaged_over_the_members_that_cover_a_channel():
    # a concat: producer A writes channels 0-1, producer B channels 2-3; B's filters are 10x larger
    a = member([[1.0, 1.0], [2.0, 2.0]], index_map=[0, 1], module="a")
    b = member([[10.0, 10.0], [30.0, 30.0]], index_map=[2, 3], module="b")
    scores = criteria.L1().scores(group(a, b, size=4))
    np.testing.assert_allclose(scores, [0.5, 1.0, 1 / 3, 1.0])  # each producer normalised on its own


# ----- FPGM
def test_geometric_median_minimises_sum_of_distances():
    rng = np.random.default_rng(0)
    points = rng.normal(size=(9, 2))
    median = geometric_median(points)

    def cost(p):
        return np.linalg.norm(points - p, axis=1).sum()

    for _ in range(200):
        assert cost(median) <= cost(median + rng.normal(scale=0.05, size=2)) + 1e-9


def test_fpgm_prunes_the_filter_nearest_the_geometric_median_first():
    # 1-D filters 0, 1, 2, 10, 11: the geometric median is 2; distances 2, 1, 0, 8, 9
    filters = torch.tensor([[0.0], [1.0], [2.0], [10.0], [11.0]]) * torch.ones(1, 3)
    scores = criteria.FPGM().scores(group(member(filters)))
    assert removal_order(scores) == [2, 1, 0, 3, 4]
    # the largest filter by norm is not what FPGM keeps: the outlier at -20 is kept longest
    filters = torch.tensor([[5.0], [6.0], [7.0], [8.0], [-20.0]]) * torch.ones(1, 3)
    assert removal_order(criteria.FPGM().scores(group(member(filters))))[-1] == 4


def test_fpgm_ignores_consumers_and_uses_producer_weights():
    producer = member(torch.tensor([[0.0, 0], [1.0, 0], [9.0, 0]]))
    bias = member(torch.tensor([100.0, 0.0, 0.0]), param="bias")
    consumer = member(torch.tensor([[100.0, 0.0, 0.0]]), role="in", dim=1, module="next")
    scores = criteria.FPGM().scores(group(producer, bias, consumer))
    assert removal_order(scores) == [1, 0, 2]


# ----- network slimming
def test_bn_scale_ranks_by_absolute_gamma_and_falls_back_to_l1():
    conv = member(torch.ones(3, 4))
    gamma = member(torch.tensor([-3.0, 0.1, 2.0]), role="scale", module="bn")
    assert removal_order(criteria.BNScale().scores(group(conv, gamma))) == [1, 2, 0]
    plain = group(member(torch.tensor([[1.0, 1], [5.0, 5], [2.0, 2]])))
    criterion = criteria.BNScale()
    np.testing.assert_allclose(criterion.scores(plain), criteria.L1().scores(plain))
    assert criterion.fallback_groups == [plain.id]


# ----- random
def test_random_is_seeded_and_reproducible():
    g = group(member(torch.ones(50, 2)))
    first, again = criteria.Random(seed=3).scores(g), criteria.Random(seed=3).scores(g)
    np.testing.assert_array_equal(first, again)
    assert not np.array_equal(first, criteria.Random(seed=4).scores(g))
    assert criteria.Random().seed == 0
    with pytest.raises(ValueError, match="seed"):
        criteria.Random(seed=-1)
    with pytest.raises(TypeError, match="seed must be an integer"):
        criteria.Random(seed=1.5)


# ----- Taylor
def make_loader(batches=3, batch_size=5, classes=3, seed=0):
    generator = torch.Generator().manual_seed(seed)
    return [
        (torch.randn(batch_size, 1, 6, 6, generator=generator), torch.randint(0, classes, (batch_size,), generator=generator))
        for _ in range(batches)
    ]


def direct_taylor(model, loader):
    """|sum over H, W of a * dL/da| per sample and channel, averaged over samples, at bn1 and bn2."""
    totals, count = [0.0, 0.0], 0
    for x, y in loader:
        a1 = model.bn1(model.conv1(x))
        a2 = model.bn2(model.conv2(torch.relu(a1)))
        loss = nn.functional.cross_entropy(model.fc(torch.relu(a2).mean((2, 3))), y)
        g1, g2 = torch.autograd.grad(loss, [a1, a2])
        for i, (a, g) in enumerate(((a1, g1), (a2, g2))):
            totals[i] = totals[i] + (a * g).sum((2, 3)).abs().sum(0).detach().double()
        count += x.shape[0]
    return [t.numpy() / count for t in totals]


@pytest.mark.parametrize("capture", ["fx", "export"])  # torch.export has no module calls: a leaf's last node is one
def test_taylor_matches_direct_autograd(capture):
    model = randomise_bn(TinyNet()).eval()
    loader = make_loader()
    expected = direct_taylor(model, loader)
    report = graphprune.analyze(model, torch.randn(1, 1, 6, 6), capture=capture)
    criterion = criteria.Taylor(loader, progress=False)
    criterion.prepare(model, report)
    by_root = {g.root: g for g in report.prunable_groups}
    for root, want in zip(("conv1", "conv2"), expected):
        got = criterion.scores(by_root[root])
        np.testing.assert_allclose(got, want / want.max(), rtol=1e-4, atol=1e-7)  # one site: max-normalised
    assert criterion.samples == 15 and criterion.fallback_groups == []


def test_taylor_options_and_side_effects():
    model = randomise_bn(TinyNet())
    model.train()
    model.conv1.weight.requires_grad_(False)
    report = graphprune.analyze(model, torch.randn(1, 1, 6, 6))
    loader = make_loader(batches=4)
    calls = []

    def loss_fn(output, target):
        calls.append(output.shape)
        return nn.functional.cross_entropy(output, target)

    criterion = criteria.Taylor(loader, loss_fn=loss_fn, max_batches=2, device="cpu", progress=False)
    criterion.prepare(model, report)
    assert len(calls) == 2 and criterion.samples == 10
    assert model.training and not model.conv1.weight.requires_grad
    assert all(p.grad is None for p in model.parameters())
    first = criterion.scores(report.prunable_groups[0])
    # max_batches=2 of the same data equals a loader of those two batches
    again = criteria.Taylor(loader[:2], progress=False)
    again.prepare(model, report)
    np.testing.assert_allclose(again.scores(report.prunable_groups[0]), first)


def test_taylor_validates_its_arguments():
    with pytest.raises(TypeError, match="data_loader"):
        criteria.Taylor(None)
    with pytest.raises(ValueError, match="max_batches"):
        criteria.Taylor([], max_batches=0)
    with pytest.raises(RuntimeError, match="prepare"):
        criteria.Taylor([]).scores(group(member(torch.ones(2, 2))))
    model = TinyNet()
    report = graphprune.analyze(model, torch.randn(1, 1, 6, 6))
    with pytest.raises(ValueError, match="no batches"):
        criteria.Taylor([], progress=False).prepare(model, report)
    with pytest.raises(TypeError, match=r"\(inputs, targets\) pair"):
        criteria.Taylor([torch.randn(2, 1, 6, 6)], progress=False).prepare(model, report)


def test_taylor_through_prune_keeps_the_most_important_channels():
    model = randomise_bn(TinyNet()).eval()
    with torch.no_grad():  # channel 4 of conv2 carries everything the classifier uses
        model.fc.weight.zero_()
        model.fc.weight[:, 4] = torch.tensor([3.0, -3.0, 1.0])
    loader = make_loader()
    pruned = graphprune.prune(model, 0.5, torch.randn(1, 1, 6, 6), criterion=criteria.Taylor(loader, progress=False),
                              inplace=False)
    assert pruned.conv2.out_channels == 4
    # the other channels of conv2 do not reach the output (zero fc columns): Taylor scores them 0,
    # so channel 4 is among the kept ones and its fc column survives intact
    assert any(torch.allclose(pruned.fc.weight[:, j], torch.tensor([3.0, -3.0, 1.0])) for j in range(4))


# ----- K-means family
def clustered_filters(seed=0):
    """13 filters in 4 clusters: A (5), B (4), C (3) and a singleton D; L1 grows within each cluster."""
    rng = np.random.default_rng(seed)
    centres = {"A": [10, 0, 0, 0], "B": [0, 10, 0, 0], "C": [0, 0, 10, 0], "D": [0, 0, 0, -15]}
    layout = ["A"] * 5 + ["B"] * 4 + ["C"] * 3 + ["D"]
    rows = []
    for i, name in enumerate(layout):
        rows.append(np.array(centres[name], dtype=float) * (1 + 0.02 * i) + rng.normal(scale=0.1, size=4))
    return torch.tensor(np.array(rows), dtype=torch.float32), np.array([ord(n) - 65 for n in layout])


def test_removal_ranks_are_proportional_and_keep_singletons_last():
    labels = np.array([0] * 6 + [1] * 3 + [2])
    importance = np.arange(10, dtype=float)
    ranks = removal_ranks(labels, importance)
    order = list(np.argsort(ranks))
    assert sorted(ranks) == list(range(1, 11))
    assert order[-1] == 9  # the singleton
    assert set(order[-3:-1]) == {5, 8}  # then each cluster's most important member
    assert order[:3] == [0, 6, 1]  # cluster 0 (6 filters) loses at twice cluster 1's pace
    for m in range(1, 8):  # every prefix: each cluster loses about its share
        removed = labels[order[:m]]
        assert abs((removed == 0).sum() - (removed == 1).sum() * 2) <= 2


@pytest.mark.parametrize("cls", [criteria.KL1, criteria.KDistance])
def test_kmeans_auto_k_finds_the_clusters_and_is_deterministic(cls):
    filters, truth = clustered_filters()
    g = group(member(filters))
    criterion = cls(seed=0)
    scores = criterion.scores(g)
    assert criterion.chosen_k[g.id] == 4
    np.testing.assert_array_equal(scores, cls(seed=0).scores(g))
    order = list(np.argsort(scores))
    assert order[-1] == 12  # the singleton cluster goes last
    # removing 8 (more than n - k = 9 would need representatives) takes from every big cluster
    removed = truth[order[:8]]
    assert all((removed == c).sum() >= 1 for c in range(3)) and 3 not in removed
    kept = set(range(13)) - set(order[:9])
    assert {truth[i] for i in kept} == {0, 1, 2, 3}  # n - k removals keep one filter per cluster


def test_k_l1_orders_by_l1_within_clusters_and_k_distance_by_centroid_distance():
    filters, truth = clustered_filters()
    g = group(member(filters))
    scores = criteria.KL1(k=4).scores(g)
    l1 = filters.abs().sum(1).numpy()
    for c in range(3):
        idx = np.flatnonzero(truth == c)
        assert list(idx[np.argsort(scores[idx])]) == list(idx[np.argsort(l1[idx])])
    criterion = criteria.KDistance(k=4, variance=1.0)  # no PCA: distances in filter space
    scores = criterion.scores(g)
    for c in range(3):
        idx = np.flatnonzero(truth == c)
        points = filters.numpy().astype(float)[idx]
        distance = np.linalg.norm(points - points.mean(0), axis=1)
        assert list(idx[np.argsort(scores[idx])]) == list(idx[np.argsort(distance)])


def test_k_per_layer_name():
    filters, _ = clustered_filters()
    g = group(member(filters, module="features.conv"))
    criterion = criteria.KL1(k={"features.*": 2, "other": 7})
    criterion.scores(g)
    assert criterion.chosen_k[g.id] == 2
    criterion = criteria.KL1(k={g.id: 3})
    criterion.scores(g)
    assert criterion.chosen_k[g.id] == 3
    with pytest.raises(ValueError, match="k must be at least 1"):
        criteria.KL1(k=0)
    with pytest.raises(ValueError, match="k_range"):
        criteria.KL1(k_range=(1, 4))
    with pytest.raises(ValueError, match="n_init must be at least 1"):
        criteria.KL1(n_init=0)
    with pytest.raises(TypeError, match="variance must be a real number"):
        criteria.KL1(variance="0.5")
    with pytest.raises(TypeError, match="threads must be an integer"):
        criteria.KL1(threads=1.5)


@pytest.mark.parametrize("make", [
    lambda: criteria.KL1(k=4), lambda: criteria.KDistance(k=3), lambda: criteria.KL1(),
    lambda: criteria.KTaylor(make_loader(), k=3, progress=False),
])
def test_kmeans_never_raises_at_high_ratio(make):
    model = randomise_bn(TinyNet())
    pruned = graphprune.prune(model, 0.9, torch.randn(1, 1, 6, 6), criterion=make(), inplace=False)
    assert pruned.conv1.out_channels == 1 and pruned.conv2.out_channels == 1
    assert pruned(torch.randn(2, 1, 6, 6)).shape == (2, 3)


def test_kmeans_handles_degenerate_groups():
    same = group(member(torch.ones(5, 3)))  # all filters coincide: one cluster
    criterion = criteria.KL1()
    assert sorted(criterion.scores(same)) == [1, 2, 3, 4, 5]
    assert criterion.chosen_k[same.id] == 1
    pair = group(member(torch.tensor([[1.0, 0], [0, 3.0]])))
    assert list(np.argsort(criteria.KDistance(k=5).scores(pair))) in ([0, 1], [1, 0])


def test_k_taylor_uses_taylor_order_inside_clusters():
    model = randomise_bn(TinyNet()).eval()
    report = graphprune.analyze(model, torch.randn(1, 1, 6, 6))
    loader = make_loader()
    criterion = criteria.KTaylor(loader, k=1, progress=False)
    criterion.prepare(model, report)
    taylor = criteria.Taylor(loader, progress=False)
    taylor.prepare(model, report)
    for g in report.prunable_groups:
        expected = np.argsort(taylor.scores(g), kind="stable")
        assert list(np.argsort(criterion.scores(g), kind="stable")) == list(expected)


@pytest.mark.parametrize("shape, dim", [((6, 10), 1), ((6, 10), 0), ((5, 4, 3, 3), 1), ((5, 4, 3, 3), 0), ((4, 3, 7), 2), ((9,), 0)])
@pytest.mark.parametrize("p", [1, 2, 3])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_position_norms_in_small_chunks_match_vector_norm(monkeypatch, shape, dim, p, dtype):
    """Bounded chunks (here a few elements each) must add up to the one-shot p-norm."""
    monkeypatch.setattr(criteria.base, "_CHUNK_ELEMENTS", 7)
    tensor = torch.randn(*shape, generator=torch.Generator().manual_seed(0)).to(dtype)
    member = Member(module="m", param="weight", dim=dim, index_map=np.arange(shape[dim]), role="out", tensor=tensor)
    other = [d for d in range(tensor.dim()) if d != dim]
    expected = torch.linalg.vector_norm(tensor.double(), ord=p, dim=other) ** p if other else tensor.double().abs() ** p
    np.testing.assert_allclose(criteria.base.position_norms(member, p), expected.numpy(), rtol=1e-5)


@pytest.mark.parametrize("shape", [(6, 10), (5, 4, 3, 3), (3, 8, 2)])
@pytest.mark.parametrize("p", [1, 2])
@pytest.mark.parametrize("chunk", [40, 1 << 22])
def test_row_and_column_norms_read_once_match_position_norms(monkeypatch, shape, p, chunk):
    monkeypatch.setattr(criteria.base, "_CHUNK_ELEMENTS", chunk)
    tensor = torch.randn(*shape, generator=torch.Generator().manual_seed(1)).half()
    rows, columns = criteria.base.row_and_column_norms(tensor, p)
    for dim, got in ((0, rows), (1, columns)):
        expected = torch.linalg.vector_norm(tensor.double(), ord=p, dim=[d for d in range(len(shape)) if d != dim]) ** p
        np.testing.assert_allclose(got, expected.numpy(), rtol=1e-5)


def test_row_and_column_norms_decline_rows_larger_than_a_chunk(monkeypatch):
    monkeypatch.setattr(criteria.base, "_CHUNK_ELEMENTS", 7)
    assert criteria.base.row_and_column_norms(torch.ones(2, 4, 2), 1) is None  # one row: 8 elements
    assert criteria.base.row_and_column_norms(torch.ones(5), 1) is None  # no columns


@pytest.mark.parametrize("name", ["l1", "l2"])
def test_prepared_lp_scores_equal_unprepared_and_follow_new_weights_after_prepare(name):
    """prepare() reads shared weights once; the scores are those of scoring each member alone.
    A later prepare() sees weights changed in between."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 8, 3), nn.ReLU(), nn.Conv2d(8, 6, 3), nn.ReLU(), nn.Conv2d(6, 4, 1)).eval()
    report = graphprune.analyze(model, torch.randn(1, 3, 9, 9))
    plain = [get_criterion(name).scores(g) for g in report.prunable_groups]
    prepared = get_criterion(name)
    prepared.prepare(model, report)
    middle = model[2].weight
    assert {key for key in prepared._positions if key[0] == id(middle)} == {(id(middle), 0), (id(middle), 1)}
    for group, expected in zip(report.prunable_groups, plain):
        np.testing.assert_allclose(prepared.scores(group), expected, rtol=1e-12)
    with torch.no_grad():
        model[2].weight[0].mul_(100.0)
    prepared.prepare(model, report)
    for group, before in zip(report.prunable_groups, plain):
        now = get_criterion(name).scores(group)
        np.testing.assert_allclose(prepared.scores(group), now, rtol=1e-12)
        assert not np.allclose(now, before)  # both groups read the middle conv
