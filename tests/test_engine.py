"""The layer-level PruningEngine (old API) and its agreement with graphprune.prune."""
from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
import torchvision
from torch import nn

from graphprune import criteria
import graphprune
from graphprune.criteria import L1
from graphprune import Group
from graphprune.compat import PruningEngine
from graphprune.compat.engine import METHODS, removal_count


@pytest.fixture(scope="module")
def vgg16_bn():
    """torchvision's vgg16_bn (weights=None), built once; tests prune deep copies."""
    torch.manual_seed(0)
    return torchvision.models.vgg16_bn(weights=None).eval()


def _l1_rows(weight: torch.Tensor) -> np.ndarray:
    return weight.detach().abs().flatten(1).sum(1).double().numpy()


def test_readme_usage_verbatim(vgg16_bn):
    model = copy.deepcopy(vgg16_bn)
    original = model.features[0].weight.detach().clone()

    from graphprune.compat import PruningEngine
    pruner = PruningEngine(pruning_method="L1norm", individual=True)
    pruned_layer = model.features[0]
    pruner.set_pruning_ratio(0.1)
    pruner.set_layer(pruned_layer, main_layer=True)
    sorted_idx = pruner.get_sorted_idx()["current_layer"]
    model.features[0] = pruner.remove_filter_by_index(sorted_idx)
    pruned_layer = model.features[1]
    pruner.set_pruning_ratio(0.1)
    pruner.set_layer(pruned_layer)
    sorted_idx = pruner.get_sorted_idx()["current_layer"]
    model.features[1] = pruner.remove_Bn(sorted_idx)
    pruned_layer = model.features[3]
    pruner.set_pruning_ratio(0.1)
    pruner.set_layer(pruned_layer)
    sorted_idx = pruner.get_sorted_idx()["current_layer"]
    model.features[3] = pruner.remove_kernel_by_index(sorted_idx)

    # floor(0.1 * 64) = 6 filters, the six with the lowest L1 norm, least important first
    expected = np.argsort(_l1_rows(original), kind="stable")[:6]
    assert sorted_idx.tolist() == expected.tolist()
    conv0, bn1, conv3 = model.features[0], model.features[1], model.features[3]
    assert conv0.weight.shape == (58, 3, 3, 3) and conv0.bias.shape == (58,) and conv0.out_channels == 58
    assert bn1.num_features == 58 and all(t.shape == (58,) for t in (bn1.weight, bn1.bias, bn1.running_mean, bn1.running_var))
    assert conv3.weight.shape == (64, 58, 3, 3) and conv3.in_channels == 58
    keep = np.setdiff1d(np.arange(64), expected)
    assert torch.equal(conv0.weight, original[keep])
    assert torch.equal(conv3.weight, vgg16_bn.features[3].weight[:, keep])
    assert vgg16_bn.features[0].out_channels == 64  # the layers the engine was given are untouched
    with torch.no_grad():
        assert model(torch.randn(1, 3, 32, 32)).shape == (1, 1000)


def _chain(model):
    """(main conv, its BN, the next consumer) for every conv of a torchvision VGG-BN."""
    names = [n for n, m in model.named_modules() if isinstance(m, (nn.Conv2d, nn.BatchNorm2d))]
    convs = [n for n in names if isinstance(model.get_submodule(n), nn.Conv2d)]
    chain = []
    for i, conv in enumerate(convs):
        consumer = convs[i + 1] if i + 1 < len(convs) else "classifier.0"
        bn = f"features.{int(conv.split('.')[1]) + 1}"
        chain.append((conv, bn, consumer))
    return chain


def _replace(model: nn.Module, name: str, module: nn.Module) -> None:
    parent, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent), child, module)


class ProducerL1(criteria.Criterion):
    """L1 of the group's producer weight alone: the one-member scoring the engine's "L1norm" uses."""

    def scores(self, group):
        producer = [m for m in group.members if m.role == "out" and m.param == "weight"]
        assert len(producer) == 1
        single = Group(id=group.id, size=group.size, members=producer, blocked=[], notes=[], units=group.units)
        return L1().scores(single)


def test_old_calls_match_graphprune_prune(vgg16_bn):
    """Comparison chosen: the engine prunes convs of vgg16_bn (filters, BN, the next layer's kernels)
    layer by layer: features.0 and features.3 (the second is ranked after its inputs were pruned) and
    the last two (features.40 feeds classifier.0 through a 7x7 avgpool + flatten, 49 columns per
    channel). The same layers are pruned by ``graphprune.prune``, one call per layer in the same
    order, each restricted to that layer's group with ``ignored_layers`` (every other conv / BN /
    linear) and scored with the producer's own L1 (the engine's one-member scoring; the default "l1"
    also averages in the BN and consumer weights, so it ranks differently). Same ratio: the same
    filters go, and every tensor of the two models ends up bit-identical."""
    ratio = 0.3
    old, new = copy.deepcopy(vgg16_bn), copy.deepcopy(vgg16_bn)
    chain = _chain(old)
    assert len(chain) == 13
    chain = chain[:2] + chain[-2:]  # consecutive convs, and the last one feeding classifier.0 (CPU time)
    x = torch.randn(1, 3, 32, 32)
    parametrised = [n for n, m in new.named_modules() if isinstance(m, (nn.Conv2d, nn.BatchNorm2d, nn.Linear))]

    pruner = PruningEngine(pruning_method="L1norm", individual=True)
    removed_old = {}
    for conv, bn, consumer in chain:
        pruner.set_pruning_ratio(ratio)
        pruner.set_layer(old.get_submodule(conv), main_layer=True)
        idx = pruner.get_sorted_idx()["current_layer"]
        removed_old[conv] = sorted(idx.tolist())
        _replace(old, conv, pruner.remove_filter_by_index(idx))
        pruner.set_layer(old.get_submodule(bn))
        _replace(old, bn, pruner.remove_Bn(pruner.get_sorted_idx()["current_layer"]))
        pruner.set_layer(old.get_submodule(consumer))
        _replace(old, consumer, pruner.remove_kernel_by_index(pruner.get_sorted_idx()["current_layer"]))

    removed_new = {}
    for conv, bn, consumer in chain:
        before = new.get_submodule(conv).weight.detach().clone()
        ignored = [n for n in parametrised if n not in (conv, bn, consumer)]
        graphprune.prune(new, ratio, x, criterion=ProducerL1(), ignored_layers=ignored)
        after = new.get_submodule(conv).weight.detach()
        surviving = {row.numpy().tobytes() for row in after}
        removed_new[conv] = [i for i in range(before.shape[0]) if before[i].numpy().tobytes() not in surviving]

    assert removed_old == removed_new
    for conv, _, _ in chain:
        n = vgg16_bn.get_submodule(conv).out_channels
        assert len(removed_old[conv]) == int(np.floor(ratio * n))
    old_state, new_state = old.state_dict(), new.state_dict()
    assert list(old_state) == list(new_state)
    for key in old_state:
        assert torch.equal(old_state[key], new_state[key]), key
    with torch.no_grad():
        assert torch.equal(old(x), new(x))


def test_engine_indices_through_group_prune(vgg16_bn):
    """The engine's removal indices applied with Group.prune give the same tensors."""
    old, new = copy.deepcopy(vgg16_bn), copy.deepcopy(vgg16_bn)
    pruner = PruningEngine("L1norm", individual=True)
    pruner.set_pruning_ratio(0.25)
    pruner.set_layer(old.features[7], main_layer=True)
    idx = pruner.get_sorted_idx()["current_layer"]
    old.features[7] = pruner.remove_filter_by_index(idx)
    pruner.set_layer(old.features[8])
    old.features[8] = pruner.remove_Bn(idx)
    pruner.set_layer(old.features[10])
    old.features[10] = pruner.remove_kernel_by_index(idx)

    report = graphprune.analyze(new, torch.randn(1, 3, 32, 32))
    (group,) = [g for g in report.group_of("features.7") if g.root == "features.7"]
    producer = next(m for m in group.members if m.module == "features.7" and m.param == "weight")
    group.prune(producer.index_map[idx.numpy()])  # layer positions -> group channels
    for key, value in old.state_dict().items():
        assert torch.equal(value, new.state_dict()[key]), key


# ----------------------------------------------------------------- the old engine's defects


@pytest.mark.parametrize("ratio, n, expected", [(0.9, 10, 9), (1.0, 10, 9), (0.95, 10, 9), (0.05, 10, 0), (0.5, 3, 1), (0.7, 2, 1), (0.99, 1, 0)])
def test_removal_count_floors_and_keeps_one(ratio, n, expected):
    assert removal_count(ratio, n) == expected
    conv = nn.Conv2d(3, n, 3)
    pruner = PruningEngine("L1norm", pruning_ratio=ratio)
    pruner.set_layer(conv, main_layer=True)
    idx = pruner.get_sorted_idx()["current_layer"]
    assert len(idx) == expected
    pruned = pruner.remove_filter_by_index(idx)
    assert pruned.out_channels == n - expected >= 1 and pruned.weight.shape[0] == n - expected


def test_linear_main_layer_ranks_output_rows():
    fc = nn.Linear(3, 5)
    with torch.no_grad():
        fc.weight.copy_(torch.tensor([[5.0, 5, 5], [0.1, 0.1, 0.1], [3, 3, 3], [0.2, 0.2, 0.2], [4, 4, 4]]))
        fc.weight[:, 0] *= 100  # a huge input column must not matter: rows are ranked
    pruner = PruningEngine("L1norm")
    pruner.set_pruning_ratio(0.4)
    pruner.set_layer(fc, main_layer=True)
    idx = pruner.get_sorted_idx()["current_layer"]
    assert idx.tolist() == [1, 3]
    pruned = pruner.remove_filter_by_index(idx, linear=True)
    assert pruned.weight.shape == (3, 3) and pruned.bias.shape == (3,) and pruned.out_features == 3
    assert torch.equal(pruned.weight, fc.weight[[0, 2, 4]])


@pytest.mark.parametrize("dims", [1, 3])
def test_conv1d_and_conv3d(dims):
    Conv, BN = (nn.Conv1d, nn.BatchNorm1d) if dims == 1 else (nn.Conv3d, nn.BatchNorm3d)
    model = nn.Sequential(Conv(2, 8, 3, padding=1), BN(8), nn.ReLU(), Conv(8, 4, 3, padding=1)).eval()
    pruner = PruningEngine("L1norm", individual=True)
    pruner.set_pruning_ratio(0.5)
    pruner.set_layer(model[0], main_layer=True)
    idx = pruner.get_sorted_idx()["current_layer"]
    expected = np.argsort(_l1_rows(model[0].weight), kind="stable")[:4]
    assert sorted(idx.tolist()) == sorted(expected.tolist())
    model[0] = pruner.remove_filter_by_index(idx)
    pruner.set_layer(model[1])
    model[1] = pruner.remove_Bn(idx)
    pruner.set_layer(model[3])
    model[3] = pruner.remove_kernel_by_index(idx)
    assert model[0].out_channels == model[1].num_features == model[3].in_channels == 4
    x = torch.randn(2, 2, *([6] * dims))
    with torch.no_grad():
        assert model(x).shape == (2, 4, *([6] * dims))


def test_depthwise_chain():
    """expand conv (main) -> BN -> depthwise conv -> BN -> project conv."""
    model = nn.Sequential(nn.Conv2d(4, 12, 1), nn.BatchNorm2d(12), nn.Conv2d(12, 12, 3, padding=1, groups=12),
                          nn.BatchNorm2d(12), nn.Conv2d(12, 6, 1)).eval()
    pruner = PruningEngine("L1norm", individual=True, pruning_ratio=0.5)
    pruner.set_layer(model[0], main_layer=True)
    idx = pruner.get_sorted_idx()["current_layer"]
    model[0] = pruner.remove_filter_by_index(idx)
    for i, method in ((1, "remove_Bn"), (2, "remove_filter_by_index"), (3, "remove_Bn"), (4, "remove_kernel_by_index")):
        pruner.set_layer(model[i])
        kwargs = {"group": True} if i == 2 else {}
        model[i] = getattr(pruner, method)(idx, **kwargs)
    dw = model[2]
    assert dw.in_channels == dw.out_channels == dw.groups == 6 and dw.weight.shape == (6, 1, 3, 3)
    with torch.no_grad():
        assert model(torch.randn(1, 4, 5, 5)).shape == (1, 6, 5, 5)


def test_flatten_into_linear_removes_each_channels_columns():
    model = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.Flatten(), nn.Linear(4 * 2 * 2, 5)).eval()
    x = torch.randn(1, 3, 2, 2)
    pruner = PruningEngine("L1norm", pruning_ratio=0.5)
    pruner.set_layer(model[0], main_layer=True)
    idx = pruner.get_sorted_idx()["current_layer"]
    with torch.no_grad():
        zeroed = copy.deepcopy(model)
        zeroed[0].weight[idx] = 0
        zeroed[0].bias[idx] = 0
        expected = zeroed(x)
    model[0] = pruner.remove_filter_by_index(idx)
    pruner.set_layer(model[2])
    model[2] = pruner.remove_kernel_by_index(idx, linear=True)
    assert model[2].in_features == 8
    with torch.no_grad():
        torch.testing.assert_close(model(x), expected)


def test_stays_on_the_layers_device_and_dtype():
    """Remove on a meta-device, float64 layer: nothing is moved to another device or dtype."""
    conv = nn.Conv2d(3, 8, 3, device="meta", dtype=torch.float64)
    bn = nn.BatchNorm2d(8, device="meta", dtype=torch.float64)
    pruner = PruningEngine("L1norm")
    pruner.set_layer(conv)
    out = pruner.remove_filter_by_index(torch.tensor([1, 5]))
    pruner.set_layer(bn)
    norm = pruner.remove_Bn([0, 7])
    for tensor in (out.weight, out.bias, norm.weight, norm.running_var):
        assert tensor.device.type == "meta" and tensor.dtype == torch.float64
    assert out.weight.shape == (6, 3, 3, 3) and isinstance(out.weight, nn.Parameter)


def test_scoring_stays_on_the_layers_device():
    device = "cuda" if torch.cuda.is_available() else "cpu"
    conv = nn.Conv2d(3, 8, 3).to(device)
    pruner = PruningEngine("L1norm", pruning_ratio=0.5)
    pruner.set_layer(conv, main_layer=True)
    out = pruner.remove_filter_by_index(pruner.get_sorted_idx()["current_layer"])
    assert out.weight.device == conv.weight.device


def test_unknown_method_lists_valid_names():
    with pytest.raises(ValueError) as info:
        PruningEngine(pruning_method="L2norm")
    for name in METHODS:
        assert name in str(info.value)


def test_missing_criterion_is_not_implemented(monkeypatch):
    monkeypatch.delitem(criteria.CRITERIA, "k_distance")
    with pytest.raises(NotImplementedError, match="k_distance"):
        PruningEngine("K-Distance")


def test_errors_are_raised_not_printed():
    pruner = PruningEngine("L1norm")
    with pytest.raises(RuntimeError, match="set_layer"):
        pruner.remove_filter_by_index([0])
    pruner.set_layer(nn.Conv2d(3, 4, 1))
    with pytest.raises(ValueError, match="main layer"):
        pruner.remove_filter_by_index(pruner.get_sorted_idx()["current_layer"])
    with pytest.raises(ValueError, match=r"\[0, 4\)"):
        pruner.remove_filter_by_index([4])
    with pytest.raises(ValueError, match="at least one"):
        pruner.remove_filter_by_index([0, 1, 2, 3])
    with pytest.raises(ValueError, match="duplicates"):
        pruner.remove_filter_by_index([1, 1])
    with pytest.raises(TypeError, match="remove_Bn"):
        pruner.remove_Bn([0])
    with pytest.raises(ValueError):
        pruner.set_pruning_ratio(1.5)
    with pytest.raises(TypeError):
        pruner.set_layer(nn.ReLU(), main_layer=True)
    with pytest.raises(ValueError, match="grouped"):
        pruner.set_layer(nn.Conv2d(4, 8, 1, groups=2), main_layer=True)


def test_individual_false_keeps_the_previous_main_layer():
    model = nn.Sequential(nn.Conv2d(3, 8, 3), nn.Conv2d(8, 8, 3), nn.Conv2d(8, 4, 3)).eval()
    x = torch.randn(1, 3, 9, 9)
    pruner = PruningEngine("L1norm", pruning_ratio=0.5, individual=False)
    pruner.set_layer(model[0], main_layer=True)
    first = pruner.get_sorted_idx()["current_layer"]
    assert pruner.get_sorted_idx()["previous_layer"] is None
    model[0] = pruner.remove_conv_filter_kernel()  # outputs only: no previous main layer
    pruner.set_layer(model[1], main_layer=True)
    history = pruner.get_sorted_idx()
    assert torch.equal(history["previous_layer"], first)
    model[1] = pruner.remove_conv_filter_kernel()
    pruner.set_layer(model[2])
    model[2] = pruner.remove_kernel_by_index(history["current_layer"])
    assert [m.weight.shape[:2] for m in model] == [(4, 3), (4, 4), (4, 4)]
    with torch.no_grad():
        assert model(x).shape == (1, 4, 3, 3)

    individual = PruningEngine("L1norm", pruning_ratio=0.5, individual=True)
    individual.set_layer(nn.Conv2d(3, 8, 3), main_layer=True)
    individual.set_layer(nn.Conv2d(8, 8, 3), main_layer=True)
    assert individual.get_sorted_idx()["previous_layer"] is None


# ----------------------------------------------------------------- the other methods


def _loader(batches=2, size=4, seed=0):
    generator = torch.Generator().manual_seed(seed)
    return [(torch.randn(size, 3, 8, 8, generator=generator), torch.randint(0, 5, (size,), generator=generator)) for _ in range(batches)]


def _small_net():
    return nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(), nn.Conv2d(8, 8, 3, padding=1),
                         nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 5)).eval()


@pytest.mark.parametrize("method", ["Taylor", "K-Taylor"])
def test_data_driven_methods(method):
    model = _small_net()
    with torch.no_grad():  # a dead filter has zero activation, hence zero Taylor importance
        model[0].weight[5] = 0
        model[0].bias[5] = 0
    pruner = PruningEngine(method, model=model, data_loader=_loader(), max_batches=2, progress=False, individual=True)
    pruner.set_pruning_ratio(0.25)
    pruner.set_layer(model[0], main_layer=True)
    idx = pruner.get_sorted_idx()["current_layer"]
    assert len(idx) == 2 and len(set(idx.tolist())) == 2
    if method == "Taylor":
        assert idx[0].item() == 5
    model[0] = pruner.remove_filter_by_index(idx)
    pruner.set_layer(model[1])
    model[1] = pruner.remove_Bn(idx)
    pruner.set_layer(model[3])
    model[3] = pruner.remove_kernel_by_index(idx)
    pruner.set_layer(model[3], main_layer=True)  # the replaced layer is found in the model again
    assert len(pruner.get_sorted_idx()["current_layer"]) == 2
    with torch.no_grad():
        assert model(torch.randn(1, 3, 8, 8)).shape == (1, 5)


def test_taylor_needs_model_and_data():
    with pytest.raises(ValueError, match="data"):
        PruningEngine("Taylor")
    with pytest.raises(ValueError, match="data_loader"):
        PruningEngine("Taylor", model=_small_net())
    model = _small_net()
    pruner = PruningEngine("Taylor", tool_net=model, taylor_loader=_loader(), progress=False)  # the old names
    with pytest.raises(ValueError, match="not a submodule"):
        pruner.set_layer(nn.Conv2d(3, 8, 3), main_layer=True)


@pytest.mark.parametrize("method", ["K-L1norm", "K-Distance"])
def test_kmeans_methods(method):
    torch.manual_seed(0)
    conv = nn.Conv2d(3, 16, 3)
    pruner = PruningEngine(method, pruning_ratio=0.25, k=4)
    pruner.set_layer(conv, main_layer=True)
    idx = pruner.get_sorted_idx()["current_layer"]
    assert len(idx) == 4 and len(set(idx.tolist())) == 4 and idx.max() < 16
    assert pruner.criterion.chosen_k == {0: 4}
    assert pruner.remove_filter_by_index(idx).out_channels == 12


def test_list_k_gives_each_main_layer_its_k():
    pruner = PruningEngine("K-L1norm", pruning_ratio=0.25, list_k=[2, 3])
    pruner.set_layer(nn.Conv2d(3, 12, 3), main_layer=True)
    pruner.set_layer(nn.Conv2d(12, 12, 3), main_layer=True)
    assert pruner.criterion.chosen_k == {1: 3}  # chosen_k is reset for every main layer
