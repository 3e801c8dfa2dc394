"""The surgery's tensor work: the selection (exact values, layout kept, any chunking) and the
transaction (shapes first, values after the check, originals freed one by one, rollback)."""
import weakref

import pytest
import torch
from torch import nn

import graphprune
from conftest import assert_same_state, failing_allocation, size_attrs, state_snapshot
from graphprune.pruning import surgery


def _select(data, index):
    out = surgery._empty_selection(data, index)
    surgery._select_into(out, data, index)
    return out


def _expected(data, index):
    for dim in sorted(index):
        data = data.index_select(dim, index[dim])
    return data


@pytest.mark.parametrize("chunk_bytes", [1, 64, 1 << 22])
@pytest.mark.parametrize("layout", [torch.contiguous_format, torch.channels_last])
def test_select_along_several_dims_equals_successive_index_selects(monkeypatch, chunk_bytes, layout):
    monkeypatch.setattr(surgery, "_CHUNK_BYTES", chunk_bytes)
    data = torch.randn(9, 7, 5, 4).contiguous(memory_format=layout)
    index = {0: torch.tensor([0, 3, 4, 8]), 1: torch.tensor([1, 2, 6]), 3: torch.tensor([0, 3])}
    selected = _select(data, index)
    assert torch.equal(selected, _expected(data, index))
    assert selected.is_contiguous(memory_format=layout)
    if layout is torch.channels_last:
        assert not selected.is_contiguous()


def test_select_along_one_dim_keeps_channels_last():
    data = torch.randn(6, 5, 3, 3).contiguous(memory_format=torch.channels_last)
    selected = _select(data, {1: torch.tensor([0, 4])})
    assert torch.equal(selected, data[:, [0, 4]])
    assert selected.is_contiguous(memory_format=torch.channels_last)


def test_select_of_a_strided_tensor_returns_a_contiguous_copy():
    data = torch.randn(8, 10).t()  # neither contiguous nor channels-last
    index = {0: torch.tensor([1, 9]), 1: torch.tensor([0, 2, 7])}
    selected = _select(data, index)
    assert torch.equal(selected, _expected(data, index)) and selected.is_contiguous()


# --------------------------------------------------------------------------- the transaction
def _net():
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8), nn.ReLU(), nn.Conv2d(8, 6, 1), nn.Flatten(), nn.Linear(96, 5)).eval()


def _planned(model):
    x = torch.randn(2, 3, 6, 6)
    report = graphprune.analyze(model, x)
    plan = {group: [0, 2] for group in report.prunable_groups}
    return plan, next(iter(plan))._surgery


def _kept_weights(model):
    """What conv 0 and conv 3 hold after channels 0 and 2 of both groups went."""
    keep8, keep6 = [1, 3, 4, 5, 6, 7], [1, 3, 4, 5]
    return model[0].weight.detach()[keep8].clone(), model[3].weight.detach()[keep6][:, keep8].clone()


@pytest.mark.parametrize("alike", [True, False], ids=["cpu", "gpu-like"])
def test_verify_judges_the_new_shapes_before_any_value_is_copied(monkeypatch, alike):
    monkeypatch.setattr(surgery, "placeholders_alike", lambda device: alike)
    model = _net()
    plan, surgery_ = _planned(model)
    expected = _kept_weights(model)
    seen = []

    def verify(removed, filled):
        w = model[3].weight
        seen.append((filled, tuple(w.shape), w.stride(), w.data_ptr() == model[0].weight.data_ptr()))
        assert alike or float(w.detach().abs().sum()) == 0.0

    surgery_.prune_groups(plan, verify=verify)
    # on the CPU, storage laid out as the kept values will be (untouched pages cost nothing);
    # elsewhere one aliased zero, which owns no memory
    assert seen == [(False, (4, 6, 1, 1), (6, 1, 1, 1) if alike else (0, 0, 0, 0), False)]
    assert torch.equal(model[0].weight, expected[0]) and torch.equal(model[3].weight, expected[1])
    assert model[3].weight.is_contiguous()


@pytest.mark.parametrize("device_reuses_memory", [True, False], ids=["cpu", "gpu-like"])
def test_gradients_keep_the_values_of_the_kept_channels(monkeypatch, device_reuses_memory):
    model = _net()
    nn.functional.mse_loss(model(torch.randn(2, 3, 6, 6)), torch.zeros(2, 5)).backward()
    keep8, keep6 = [1, 3, 4, 5, 6, 7], [1, 3, 4, 5]
    expected = {0: model[0].weight.grad[keep8].clone(), 1: model[1].weight.grad[keep8].clone(),
                3: model[3].weight.grad[keep6][:, keep8].clone()}
    plan, surgery_ = _planned(model)
    monkeypatch.setattr(surgery, "_reuses_freed_memory", lambda device: device_reuses_memory)
    surgery_.prune_groups(plan)
    for index, grad in expected.items():
        assert torch.equal(model[index].weight.grad, grad), index


def test_a_verify_that_needs_the_values_runs_again_after_the_copy():
    model = _net()
    plan, surgery_ = _planned(model)
    expected = _kept_weights(model)
    seen = []

    def verify(removed, filled):
        seen.append((filled, torch.equal(model[3].weight, expected[1])))
        if not filled:
            raise surgery.ValuesNeeded("measures the model")

    surgery_.prune_groups(plan, verify=verify)
    assert seen == [(False, False), (True, True)]
    assert torch.equal(model[0].weight, expected[0])


@pytest.mark.parametrize("device_reuses_memory, failing_at", [(True, 1), (False, 1), (False, 4)],
                         ids=["cpu-first", "gpu-like-first", "gpu-like-fourth"])
def test_running_out_of_memory_before_any_original_is_dropped_restores_everything(
        monkeypatch, device_reuses_memory, failing_at):
    # On the CPU the first allocation comes before any original is dropped; on a device whose
    # allocator does not favour freed memory (a GPU), every allocation does.
    model = _net()
    plan, surgery_ = _planned(model)
    snapshot, attrs, params = state_snapshot(model), size_attrs(model), list(model.parameters())
    monkeypatch.setattr(surgery, "_reuses_freed_memory", lambda device: device_reuses_memory)
    calls = failing_allocation(monkeypatch, failing_at)
    with pytest.raises(graphprune.PruningError, match="model was restored.*out of memory"):
        surgery_.prune_groups(plan)
    assert len(calls) == failing_at
    assert_same_state(model, snapshot)
    assert size_attrs(model) == attrs and all(a is b for a, b in zip(model.parameters(), params))
    monkeypatch.undo()
    surgery_.prune_groups(plan)  # nothing was left half-done
    assert model[3].weight.shape == (4, 6, 1, 1)


def test_running_out_of_memory_after_an_original_was_dropped_says_so(monkeypatch):
    model = _net()
    plan, surgery_ = _planned(model)
    calls = failing_allocation(monkeypatch, 4)
    with pytest.raises(graphprune.PruningError, match="could not be restored; load it again.*out of memory"):
        surgery_.prune_groups(plan)
    assert len(calls) == 4


@pytest.mark.parametrize("step", ["_empty_selection", "_select_into"], ids=["allocation", "copy"])
def test_on_the_cpu_each_original_is_freed_before_the_next_allocation_and_copy(monkeypatch, step):
    model = _net()
    plan, surgery_ = _planned(model)
    tensors = dict(model.state_dict(keep_vars=True))
    storages = {name: weakref.ref(t.untyped_storage()) for name, t in tensors.items()}
    shapes = {name: t.shape for name, t in tensors.items()}
    alive_at_each_call = []
    original = getattr(surgery, step)

    def spying(*args):
        alive_at_each_call.append({name for name, ref in storages.items() if ref() is not None})
        return original(*args)

    monkeypatch.setattr(surgery, step, spying)
    surgery_.prune_groups(plan)
    pruned = {name for name, t in tensors.items() if t.shape != shapes[name]}
    assert len(pruned) == 9  # conv 0 weight and bias, 4 BatchNorm tensors, conv 3 weight and bias, fc weight
    assert [len(alive & pruned) for alive in alive_at_each_call] == list(range(9, 0, -1))


def test_a_failure_inside_the_copy_says_the_model_could_not_be_restored(monkeypatch):
    model = _net()
    plan, surgery_ = _planned(model)
    copy_into, calls = surgery._select_into, []

    def failing(out, data, index):
        calls.append(out.shape)
        if len(calls) == 3:
            raise RuntimeError("injected failure")
        copy_into(out, data, index)

    monkeypatch.setattr(surgery, "_select_into", failing)
    with pytest.raises(graphprune.PruningError, match="could not be restored; load it again.*injected failure"):
        surgery_.prune_groups(plan)
