"""Models on the meta device: shapes, not values, decide the groups, so a model built under
``torch.device("meta")`` analyses into the very groups of the materialised one, and prunes by
its shapes where the criterion reads no values (``random``, ``Precomputed``). A criterion that
needs values says so. ``fit_config=True`` prunes only what ``model.config`` can describe."""
from __future__ import annotations

import re
import warnings

import numpy as np
import pytest
import torch
import torchvision
from conftest import assert_model_unchanged, model_state
from torch import nn

import graphprune
from graphprune.analysis.reasons import BlockKind
from graphprune.criteria import L1, Precomputed


def on_meta(value):
    return torch.utils._pytree.tree_map(lambda t: t.to("meta") if isinstance(t, torch.Tensor) else t, value)


def signature(report) -> list:
    """Everything a group is, but the tensors' values: members, index maps, reasons, notes."""
    return [(g.id, g.size, [(m.module, m.param, m.dim, m.role, m.index_map.tolist()) for m in g.members],
             [str(r) for r in g.blocked], [str(n) for n in g.notes], g.param_share) for g in report.groups]


def _hf(model_class: str, config_class: str, **options):
    transformers = pytest.importorskip("transformers")
    return lambda: getattr(transformers, model_class)(getattr(transformers, config_class)(**options))


IDS = torch.randint(0, 100, (1, 12), generator=torch.Generator().manual_seed(0))
LLAMA = dict(vocab_size=100, hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
             intermediate_size=96, max_position_embeddings=32)
FAMILIES = {
    "resnet18": (lambda: torchvision.models.resnet18(num_classes=10), torch.randn(1, 3, 64, 64)),
    "vit": (lambda: torchvision.models.VisionTransformer(32, 8, 2, 4, 64, 96, num_classes=10), torch.randn(1, 3, 32, 32)),
    "llama": (lambda: _hf("LlamaForCausalLM", "LlamaConfig", **LLAMA)(), {"input_ids": IDS}),
    "bert": (lambda: _hf("BertModel", "BertConfig", vocab_size=100, hidden_size=64, num_hidden_layers=2,
                         num_attention_heads=4, intermediate_size=96, max_position_embeddings=32)(), {"input_ids": IDS}),
}


def build(name: str, device: str = "cpu") -> tuple:
    make, inputs = FAMILIES[name]
    torch.manual_seed(0)
    with warnings.catch_warnings(), torch.device(device):
        warnings.simplefilter("ignore")
        model = make().eval()
    return model, (on_meta(inputs) if device == "meta" else inputs)


@pytest.mark.parametrize("prune_heads", [False, True])
@pytest.mark.parametrize("name", list(FAMILIES))
def test_a_model_on_meta_analyses_into_the_groups_of_the_materialised_one(name, prune_heads):
    real, inputs = build(name)
    meta, meta_inputs = build(name, "meta")
    before = model_state(meta)
    expected = signature(graphprune.analyze(real, inputs, prune_heads=prune_heads))
    assert signature(graphprune.analyze(meta, meta_inputs, prune_heads=prune_heads)) == expected
    assert_model_unchanged(meta, before)
    assert all(t.is_meta for t in meta.parameters())


@pytest.mark.filterwarnings("ignore::graphprune.ConfigWarning")  # the rotary group is pruned too
@pytest.mark.parametrize("name", ["resnet18", "llama"])
def test_pruning_on_meta_by_shapes_gives_the_materialised_shapes(name):
    real, inputs = build(name)
    meta, meta_inputs = build(name, "meta")
    graphprune.prune(real, 0.4, inputs, criterion="random", uniform=True)
    graphprune.prune(meta, 0.4, meta_inputs, criterion="random", uniform=True)
    shapes = {k: v.shape for k, v in real.state_dict().items()}
    assert {k: v.shape for k, v in meta.state_dict().items()} == shapes
    assert all(t.is_meta for t in meta.parameters())
    assert graphprune.count_parameters(meta) == graphprune.count_parameters(real) < graphprune.count_parameters(build(name)[0])


@pytest.mark.parametrize("options, needs", [
    ({}, "criterion 'l1' ranks channels by their values"),
    ({"criterion": "fpgm"}, "criterion 'fpgm'"),
    ({"criterion": "random", "calibration": [torch.randn(1, 3, 64, 64)], "recover": "lstsq"}, "recover refits weights"),
    ({"criterion": "random", "ratio": None, "target_latency": 0.5}, "target_latency times the model"),
])
def test_what_needs_values_on_meta_says_so_and_leaves_the_model_alone(options, needs):
    meta, inputs = build("resnet18", "meta")
    before = model_state(meta)
    options = {"ratio": 0.5, **options}
    with pytest.raises(ValueError, match=re.escape(needs) + ".*graphprune.prune_checkpoint"):
        graphprune.prune(meta, options.pop("ratio"), inputs, **options)
    assert_model_unchanged(meta, before)


def test_a_model_partly_on_meta_is_refused():
    model = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 2))
    model[2].to("meta")
    with pytest.raises(ValueError, match="some tensors on the meta device and others on cpu"):
        graphprune.analyze(model, torch.randn(1, 4))


def test_meta_inputs_for_a_real_model_are_refused():
    model, inputs = build("resnet18")
    with pytest.raises(ValueError, match="example_inputs are on meta but the model is on cpu"):
        graphprune.analyze(model, on_meta(inputs))


def test_precomputed_scores_prune_exactly_as_the_criterion_that_computed_them():
    model, inputs = build("resnet18")
    report = graphprune.analyze(model, inputs)
    l1 = L1()
    l1.prepare(model, report)
    given = Precomputed({g.id: l1.scores(g) for g in report.prunable_groups})
    by_scores = graphprune.prune(model, 0.5, inputs, criterion=given, inplace=False)
    by_l1 = graphprune.prune(model, 0.5, inputs, inplace=False)
    assert torch.equal(by_scores(inputs), by_l1(inputs))


def test_precomputed_scores_must_cover_each_group_at_its_size():
    model, inputs = build("resnet18")
    report = graphprune.analyze(model, inputs)
    group = report.prunable_groups[0]
    with pytest.raises(ValueError, match=f"no scores given for group {report.prunable_groups[1].id}"):
        graphprune.prune(model, 0.5, inputs, criterion=Precomputed({group.id: np.ones(group.size)}), inplace=False)
    with pytest.raises(ValueError, match=f"has {group.size} channels, but 3 scores were given"):
        Precomputed({group.id: [1, 2, 3]}).scores(group)
    with pytest.raises(TypeError, match="scores must be a mapping"):
        Precomputed([1, 2])


def test_fit_config_leaves_whole_the_groups_the_config_cannot_describe(tmp_path):
    model, inputs = build("llama")
    with warnings.catch_warnings():
        warnings.simplefilter("error", graphprune.ConfigWarning)
        result = graphprune.prune(model, 0.25, inputs, uniform=True, fit_config=True, inplace=False, return_result=True)
    pruned = result.model
    assert (pruned.config.hidden_size, pruned.config.intermediate_size) == (48, 72)
    blocked = [g for g in graphprune.analyze(model, inputs).groups if g.root == "model.rotary_emb"]
    assert blocked, "the rotary group (head width under rotary embeddings) exists"
    pruned.save_pretrained(tmp_path)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        loaded = type(pruned).from_pretrained(tmp_path).eval()
    with torch.no_grad():
        assert torch.equal(loaded(**inputs).logits, pruned(**inputs).logits)
    with pytest.warns(graphprune.ConfigWarning, match="no longer describes"):
        graphprune.prune(model, 0.25, inputs, uniform=True, inplace=False)


def test_fit_config_records_why_a_group_was_left_whole():
    model, inputs = build("llama", "meta")
    report = graphprune.analyze(model, inputs)
    graphprune.prune(model, 0.25, report=report, criterion="random", uniform=True, fit_config=True)
    whole = [g for g in report.groups if any(r.kind is BlockKind.CONFIG for r in g.blocked)]
    assert [g.root for g in whole] == ["model.rotary_emb"]
    assert whole[0].blocked[0].startswith("model.config cannot describe it: ")
    assert model.config.hidden_size == 48


def test_fit_config_needs_a_config_and_a_flag():
    model, inputs = build("resnet18")
    with pytest.raises(ValueError, match="fit_config=True, but ResNet has no config"):
        graphprune.prune(model, 0.5, inputs, fit_config=True, inplace=False)
    with pytest.raises(TypeError, match="fit_config must be True or False"):
        graphprune.prune(model, 0.5, inputs, fit_config="yes")


class _ReadsValues(nn.Module):
    def __init__(self):
        super().__init__()
        self.a, self.b = nn.Linear(4, 8), nn.Linear(8, 2)

    def forward(self, x):
        h = self.a(x)
        return self.b(h * 2 if h.sum() > 0 else h)


def test_a_forward_that_reads_values_cannot_be_analysed_on_meta_and_says_so():
    with torch.device("meta"):
        model = _ReadsValues()
    with pytest.raises(ValueError, match="reads values, which a model on the meta device does not hold: analyse it materialised"):
        graphprune.analyze(model, torch.randn(2, 4, device="meta"))


def test_explicit_channels_prune_a_model_on_meta():
    meta, inputs = build("resnet18", "meta")
    report = graphprune.analyze(meta, inputs)
    stem = next(g for g in report.groups if g.root == "conv1")
    stem.prune(list(range(0, 64, 2)))
    assert meta.conv1.weight.shape == (32, 3, 7, 7) and meta.conv1.weight.is_meta
    assert meta.layer1[0].conv1.weight.shape[1] == meta.bn1.num_features == 32
