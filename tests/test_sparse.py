"""Group-level sparse training: GroupRegularizer's penalty, its gradient, growing
regularisation, network slimming and the group_norm criterion, on a CNN, a ViT and a BERT
(finetune and prune_schedule with it: test_sparse_training.py)."""
from __future__ import annotations

import warnings

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from conftest import assert_model_unchanged, model_state
from torch import nn

import graphprune
from graphprune.criteria import GroupL2Norm, get_criterion
from graphprune.criteria.group_norm import norm_members
from graphprune.pruning.planner import plan_removal
from graphprune.workflow.sparse import GroupRegularizer


class Net(nn.Module):
    """stem -> conv-bn-conv block added back to the stream -> conv_c -> cumsum over channels (blocks) -> head.

    Prunable: the stream (8: stem, bn, conv_a's columns, conv_b, conv_c's columns) and the
    block's inner width (6: conv_a, bn_a, conv_b's columns). Blocked: the input, conv_c's
    output and the head's input (a cumsum over channels blocks), the head's output."""

    def __init__(self):
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 3, padding=1)
        self.bn = nn.BatchNorm2d(8)
        self.conv_a = nn.Conv2d(8, 6, 3, padding=1, bias=False)
        self.bn_a = nn.BatchNorm2d(6)
        self.conv_b = nn.Conv2d(6, 8, 1)
        self.conv_c = nn.Conv2d(8, 5, 1)
        self.head = nn.Linear(5, 4)

    def forward(self, x):
        x = F.relu(self.bn(self.stem(x)))
        x = F.relu(x + self.conv_b(F.relu(self.bn_a(self.conv_a(x)))))
        return self.head(torch.cumsum(self.conv_c(x), 1).mean((2, 3)))


X = torch.randn(2, 3, 8, 8, generator=torch.Generator().manual_seed(1), dtype=torch.float64)


def net() -> Net:
    model = Net().double().eval()
    with torch.no_grad():
        for bn in (model.bn, model.bn_a):
            bn.running_mean.uniform_(-0.5, 0.5)
            bn.running_var.uniform_(0.5, 1.5)
            bn.weight.uniform_(0.5, 1.5)
            bn.bias.uniform_(-0.5, 0.5)
    return model


def squares(tensor: torch.Tensor, dim: int) -> torch.Tensor:
    return tensor.square().sum([d for d in range(tensor.dim()) if d != dim]) if tensor.dim() > 1 else tensor.square()


def hand_norms(m: Net) -> tuple:
    """The two prunable groups' channel norms, written out member by member."""
    stream = (squares(m.stem.weight, 0) + m.stem.bias ** 2 + m.bn.weight ** 2 + m.bn.bias ** 2
              + squares(m.conv_a.weight, 1) + squares(m.conv_b.weight, 0) + m.conv_b.bias ** 2
              + squares(m.conv_c.weight, 1)).sqrt()
    inner = (squares(m.conv_a.weight, 0) + m.bn_a.weight ** 2 + m.bn_a.bias ** 2 + squares(m.conv_b.weight, 1)).sqrt()
    return stream, inner


def gradients(model: nn.Module) -> dict:
    return {name: None if p.grad is None else p.grad.clone() for name, p in model.named_parameters()}


def zero_channels(group, channels) -> None:
    """Set every parameter entry of ``group`` whose position maps to one of ``channels`` to 0."""
    with torch.no_grad():
        for member in norm_members(group):
            positions = np.flatnonzero(np.isin(member.index_map, channels))
            member.tensor.index_fill_(member.dim, torch.as_tensor(positions), 0.0)


# ----- the penalty and its gradient
def test_penalty_is_the_hand_computed_group_norm_and_its_gradient_touches_exactly_the_members():
    model = net()
    regularizer = GroupRegularizer(model, X, coefficient=0.3)
    stream_group, inner_group = regularizer.groups
    assert (stream_group.size, inner_group.size) == (8, 6)
    stream, inner = hand_norms(model)
    norms = regularizer.channel_norms()
    np.testing.assert_allclose(norms[stream_group.id], stream.detach().numpy(), rtol=1e-12)
    np.testing.assert_allclose(norms[inner_group.id], inner.detach().numpy(), rtol=1e-12)

    (0.3 * (stream.sum() + inner.sum())).backward()
    expected = gradients(model)
    assert expected["head.weight"] is None and expected["head.bias"] is None and expected["conv_c.bias"] is None
    model.zero_grad(set_to_none=True)
    penalty = regularizer.penalty()
    assert penalty.dtype == torch.float64 and penalty.dim() == 0
    torch.testing.assert_close(penalty, 0.3 * (stream.sum() + inner.sum()).detach(), rtol=1e-12, atol=0)
    penalty.backward()
    by_autograd = gradients(model)
    model.zero_grad(set_to_none=True)
    regularizer.step()
    by_step = gradients(model)
    for name, grad in expected.items():  # the same parameters touched, with the same gradient
        for other in (by_autograd[name], by_step[name]):
            assert (grad is None) == (other is None), name
            if grad is not None:
                torch.testing.assert_close(other, grad, rtol=1e-10, atol=1e-12, msg=name)
    # conv_c's rows belong to the blocked group: only its columns (the stream) are penalised
    assert by_step["conv_c.weight"].abs().sum((0, 2, 3)).gt(0).all()
    np.testing.assert_array_equal(regularizer.coefficients()[inner_group.id], np.full(6, 0.3))


def test_step_adds_to_the_existing_gradient_and_skips_frozen_parameters():
    model = net()
    regularizer = GroupRegularizer(model, X, coefficient=0.1)
    model(X).sum().backward()
    task = gradients(model)
    model.zero_grad(set_to_none=True)
    regularizer.penalty().backward()
    alone = gradients(model)
    model.zero_grad(set_to_none=True)
    model(X).sum().backward()
    model.bn.weight.requires_grad_(False)
    model.bn.weight.grad = None
    regularizer.step()
    assert model.bn.weight.grad is None
    for name, p in model.named_parameters():
        if name != "bn.weight" and alone[name] is not None:
            torch.testing.assert_close(p.grad, task[name] + alone[name], msg=name)


def test_a_channel_at_zero_gets_no_gradient_and_no_nan():
    model = net()
    regularizer = GroupRegularizer(model, X, coefficient=1.0)
    zero_channels(regularizer.groups[1], [2])
    regularizer.penalty().backward()
    assert all(torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None)
    assert model.bn_a.weight.grad[2] == 0 and model.conv_a.weight.grad[2].abs().sum() == 0
    model.zero_grad(set_to_none=True)
    regularizer.step()
    assert model.bn_a.weight.grad[2] == 0 and torch.isfinite(model.conv_a.weight.grad).all()


# ----- pruning what the regulariser emptied
def test_zeroed_channels_are_what_group_norm_prunes_and_removing_them_keeps_the_outputs():
    model = net()
    report = graphprune.analyze(model, X)
    stream, inner = report.prunable_groups
    zero_channels(stream, [1, 4, 6, 7])
    zero_channels(inner, [0, 2, 5])
    zeroed = model(X)
    scores = {g: GroupL2Norm().scores(g) for g in (stream, inner)}
    assert np.flatnonzero(scores[stream] == 0).tolist() == [1, 4, 6, 7]
    assert np.flatnonzero(scores[inner] == 0).tolist() == [0, 2, 5]
    plan = plan_removal(report.prunable_groups, 0.5, get_criterion("group_norm"))
    assert {g.id: idx.tolist() for g, idx in plan.items()} == {stream.id: [1, 4, 6, 7], inner.id: [0, 2, 5]}
    graphprune.prune(model, 0.5, X, criterion="group_norm")
    assert (model.stem.out_channels, model.conv_a.out_channels) == (4, 3)
    torch.testing.assert_close(model(X), zeroed, rtol=1e-12, atol=1e-12)


def test_growing_regularisation_drives_the_scheduled_channels_to_zero_and_they_are_pruned():
    model = net()
    regularizer = GroupRegularizer(model, X, coefficient=0.0, target_ratio=0.5, delta=0.5, max_coefficient=1.0)
    before = regularizer.channel_norms()
    raised = regularizer.update()
    stream, inner = regularizer.groups
    for group in (stream, inner):
        scheduled = raised[group.id]
        assert scheduled.size == group.size // 2
        coefficients = regularizer.coefficients()[group.id]
        assert set(np.flatnonzero(coefficients).tolist()) == set(scheduled.tolist())  # only the scheduled ones
        np.testing.assert_array_equal(coefficients[scheduled], 0.5)
        assert np.all(before[group.id][scheduled] <= np.delete(before[group.id], scheduled).min())  # the smallest
    assert regularizer.update()[stream.id].tolist() == raised[stream.id].tolist()
    regularizer.update()
    np.testing.assert_array_equal(regularizer.coefficients()[stream.id][raised[stream.id]], 1.0)  # capped

    others = {name: p.detach().clone() for name, p in model.named_parameters()}
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01)
    for _ in range(300):  # the penalty alone: only the scheduled channels move
        optimizer.zero_grad(set_to_none=True)
        regularizer.step()
        optimizer.step()
    after = regularizer.channel_norms()
    for group in (stream, inner):
        scheduled = raised[group.id]
        assert after[group.id][scheduled].max() < 0.05 < before[group.id].min()
        kept = np.delete(np.arange(group.size), scheduled)  # smaller only where they share a tensor with one
        assert (after[group.id][kept] > 1.0).all() and (after[group.id][kept] <= before[group.id][kept]).all()
    kept = np.delete(np.arange(8), raised[stream.id])
    assert torch.equal(model.conv_c.weight[:, kept], others["conv_c.weight"][:, kept])  # read by no scheduled channel
    assert torch.equal(model.head.weight, others["head.weight"]) and torch.equal(model.conv_c.bias, others["conv_c.bias"])
    plan = plan_removal(regularizer.report.prunable_groups, 0.5, GroupL2Norm())
    assert {g.id: idx.tolist() for g, idx in plan.items()} == {g.id: raised[g.id].tolist() for g in (stream, inner)}


def test_blocked_groups_are_never_penalised():
    model = net()
    regularizer = GroupRegularizer(model, X, coefficient=1.0, ignored_layers=["stem"])
    assert [g.size for g in regularizer.groups] == [6]  # the stream touches stem: blocked
    regularizer.step()
    touched = {name for name, p in model.named_parameters() if p.grad is not None}
    assert touched == {"conv_a.weight", "bn_a.weight", "bn_a.bias", "conv_b.weight"}
    assert model.conv_a.weight.grad.abs().sum((0, 2, 3)).gt(0).all()  # rows only (its columns are the stream)
    _, inner = hand_norms(model)
    model.zero_grad(set_to_none=True)
    inner.sum().backward()
    assert model.conv_b.bias.grad is None and model.stem.weight.grad is None
    penalty = regularizer.penalty()
    torch.testing.assert_close(penalty, inner.sum().detach())

    slimming = GroupRegularizer(model, X, mode="bn_scale", coefficient=1.0, ignored_layers=["bn"])
    assert [g.size for g in slimming.groups] == [6]
    assert [p is model.bn_a.weight for p in slimming.parameters()] == [True]


def test_bn_slimming_is_an_l1_penalty_on_the_norm_scales_of_prunable_groups():
    model = net()
    with torch.no_grad():
        model.bn_a.weight[1] = -0.25
        model.bn_a.weight[3] = 0.0
    regularizer = GroupRegularizer(model, X, mode="bn_scale", coefficient=0.1)
    assert regularizer.mode == "bn_scale" and [g.size for g in regularizer.groups] == [8, 6]
    torch.testing.assert_close(regularizer.penalty(), 0.1 * (model.bn.weight.abs().sum() + model.bn_a.weight.abs().sum()))
    regularizer.step()
    assert {n for n, p in model.named_parameters() if p.grad is not None} == {"bn.weight", "bn_a.weight"}
    torch.testing.assert_close(model.bn_a.weight.grad, 0.1 * model.bn_a.weight.detach().sign())
    assert model.bn_a.weight.grad[3] == 0
    np.testing.assert_allclose(regularizer.channel_norms()[regularizer.groups[1].id], model.bn_a.weight.detach().abs().numpy())


# ----- any architecture, unchanged
def check_on(model: nn.Module, inputs, **options) -> GroupRegularizer:
    """The regulariser leaves the model alone, penalises the prunable groups with the
    group_norm criterion's norms, and its step() is its penalty's gradient."""
    before = model_state(model)
    regularizer = GroupRegularizer(model, inputs, coefficient=1e-2, **options)
    assert_model_unchanged(model, before)
    report = graphprune.analyze(model, inputs, **options)
    assert [g.id for g in regularizer.groups] == [g.id for g in report.prunable_groups]
    own = {id(p) for p in model.parameters()}
    assert all(id(p) in own for p in regularizer.parameters())
    norms = regularizer.channel_norms()
    for group in report.prunable_groups:
        np.testing.assert_allclose(norms[group.id], GroupL2Norm().scores(group), rtol=1e-6)
    regularizer.penalty().backward()
    by_autograd = gradients(model)
    model.zero_grad(set_to_none=True)
    regularizer.step()
    for name, p in model.named_parameters():
        assert (p.grad is None) == (by_autograd[name] is None), name
        if p.grad is not None:
            torch.testing.assert_close(p.grad, by_autograd[name], rtol=1e-4, atol=1e-7, msg=name)
    model.zero_grad(set_to_none=True)
    return regularizer


def check_head_unit(model: nn.Module, inputs, regularizer: GroupRegularizer, producer: str, heads: int, run) -> None:
    """The heads of ``producer``'s group are units: zero one, and group_norm prunes exactly it."""
    head_group = next(g for g in regularizer.groups if producer in g.producer_layers())
    assert head_group.size == heads
    assert any(np.bincount(m.index_map).min() > 1 for m in head_group.members)  # several positions per head
    zero_channels(head_group, [2])
    norms = regularizer.channel_norms()[head_group.id]
    assert norms[2] == 0 and (np.delete(norms, 2) > 0).all()
    expected = run(model)
    graphprune.prune(model, {producer: 1 / heads}, inputs, criterion="group_norm", prune_heads=True)
    torch.testing.assert_close(run(model), expected, rtol=1e-9, atol=1e-9)


def test_on_a_cnn():
    model = graphprune.models.get_model("resnet20").eval()
    regularizer = check_on(model, torch.randn(1, 3, 16, 16))
    assert len(regularizer.groups) >= 10
    slimming = GroupRegularizer(model, torch.randn(1, 3, 16, 16), mode="bn_scale")
    assert all(isinstance(model.get_submodule(n.rpartition(".")[0]), nn.BatchNorm2d)
               for n, p in model.named_parameters() if any(p is q for q in slimming.parameters()))


def test_on_a_vit_with_heads_as_units():
    timm = pytest.importorskip("timm")
    from timm.models.vision_transformer import VisionTransformer

    model = VisionTransformer(img_size=32, patch_size=8, embed_dim=64, depth=2, num_heads=4, mlp_ratio=2,
                              num_classes=10).double().eval()
    assert timm is not None
    x = torch.randn(2, 3, 32, 32, dtype=torch.float64)
    regularizer = check_on(model, x, prune_heads=True)
    slimming = GroupRegularizer(model, x, mode="bn_scale", prune_heads=True)
    scales = [n for n, p in model.named_parameters() if any(p is q for q in slimming.parameters())]
    assert len(scales) == 5 and all(isinstance(model.get_submodule(n[: -len(".weight")]), nn.LayerNorm) for n in scales)
    with torch.no_grad():
        check_head_unit(model, x, regularizer, "blocks.0.attn.qkv", 4, lambda m: m(x))


def test_on_a_hugging_face_bert_with_heads_as_units():
    transformers = pytest.importorskip("transformers")
    config = transformers.BertConfig(vocab_size=100, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                                     intermediate_size=128, max_position_embeddings=32)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = transformers.BertForSequenceClassification(config).double().eval()
    inputs = {"input_ids": torch.randint(0, 100, (2, 12), generator=torch.Generator().manual_seed(0))}
    regularizer = check_on(model, inputs, prune_heads=True, capture="auto")
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")  # model.config no longer describes the pruned model
        check_head_unit(model, inputs, regularizer, "bert.encoder.layer.0.attention.self.query", 4,
                        lambda m: m(**inputs).logits)


# ----- arguments
def test_a_report_is_reused_and_checked():
    model = net()
    report = graphprune.analyze(model, X)
    regularizer = GroupRegularizer(model, report=report, coefficient=0.5)
    assert regularizer.report is report and regularizer.model is model
    assert [g.id for g in regularizer.groups] == [g.id for g in report.prunable_groups]
    with pytest.raises(ValueError, match="describes another Net object"):
        GroupRegularizer(net(), report=report)
    with pytest.raises(ValueError, match="fixed by analyze"):
        GroupRegularizer(model, report=report, ignored_layers=["stem"])
    with pytest.raises(TypeError, match="report must be a Report"):
        GroupRegularizer(model, report="report")
    wrapped = nn.DataParallel(model)
    assert GroupRegularizer(wrapped, X).model is model


@pytest.mark.parametrize("options, error, message", [
    ({"mode": "l1"}, ValueError, r"mode must be one of \['group_norm', 'bn_scale'\], got 'l1'"),
    ({"coefficient": -1}, ValueError, "coefficient must be >= 0, got -1"),
    ({"coefficient": "big"}, TypeError, "coefficient must be a real number, got str"),
    ({"coefficient": float("nan")}, ValueError, "coefficient must be finite"),
    ({"delta": 0.1}, ValueError, "delta sets growing regularisation, which needs target_ratio"),
    ({"max_coefficient": 1.0}, ValueError, "max_coefficient sets growing regularisation"),
    ({"target_ratio": 1.5}, ValueError, r"ratio must lie in \[0, 1\), got 1.5"),
    ({"target_ratio": {"nope": 0.5}}, ValueError, "nope"),
    ({"target_ratio": 0.5, "delta": 0}, ValueError, "delta must be > 0"),
    ({"target_ratio": 0.5, "coefficient": 0}, ValueError, "delta must be > 0"),
    ({"target_ratio": 0.5, "coefficient": 1.0, "max_coefficient": 0.5}, ValueError,
     r"max_coefficient \(0.5\) must be at least coefficient \(1\)"),
    ({"prune_heads": "yes"}, TypeError, "prune_heads must be True or False"),
    ({"ignored_layers": ["nope"]}, ValueError, "nope"),
])
def test_invalid_arguments_give_clear_errors(options, error, message):
    model = net()
    before = model_state(model)
    with pytest.raises(error, match=message):
        GroupRegularizer(model, X, **options)
    assert_model_unchanged(model, before)


def test_misuse_gives_clear_errors():
    with pytest.raises(TypeError, match="model must be a torch.nn.Module, got str"):
        GroupRegularizer("model", X)
    model = net()
    regularizer = GroupRegularizer(model, X)
    with pytest.raises(RuntimeError, match="needs target_ratio"):
        regularizer.update()
    graphprune.prune(model, 0.5, X)
    for call in (regularizer.penalty, regularizer.step, regularizer.check):
        with pytest.raises(ValueError, match="the model changed since the GroupRegularizer was built"):
            call()
    assert "GroupRegularizer(group_norm, coefficient=0.0001: 2 groups of Net)" == repr(regularizer)

