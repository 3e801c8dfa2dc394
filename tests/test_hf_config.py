"""A pruned Hugging Face model's config describes it: the fields follow the pruning, found by
rebuilding the model class on the meta device; attributes only ``__init__`` reads follow too;
with ``uniform=True`` ``save_pretrained`` -> ``from_pretrained`` gives the same outputs. Where no
config can describe the pruned model, it is left alone and a ConfigWarning says why."""
from __future__ import annotations

import warnings

import pytest
import torch
from conftest import assert_model_unchanged, model_state
from test_hf import IDS, build, logits

import graphprune
from graphprune.pruning import model_config

transformers = pytest.importorskip("transformers")


def reloaded(model, tmp_path):
    model.save_pretrained(tmp_path)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return type(model).from_pretrained(tmp_path).eval()


def int_fields(config) -> dict:
    return {k: v for k, v in config.to_dict().items() if type(v) is int}


def test_a_uniform_plan_of_llama_heads_round_trips_through_save_pretrained(tmp_path):
    model, inputs = build("llama")
    with warnings.catch_warnings():
        warnings.simplefilter("error", graphprune.ConfigWarning)
        graphprune.prune(model, 0.25, inputs, prune_heads=True, uniform=True)
    fields = int_fields(model.config)
    assert {k: fields[k] for k in ("hidden_size", "intermediate_size", "num_attention_heads", "num_key_value_heads",
                                   "head_dim")} == {"hidden_size": 72, "intermediate_size": 96, "num_attention_heads": 6,
                                                    "num_key_value_heads": 3, "head_dim": 12}
    mlp = model.model.layers[1].mlp  # attributes only __init__ reads follow the config
    assert (mlp.hidden_size, mlp.intermediate_size) == (72, 96)
    loaded = reloaded(model, tmp_path)
    assert torch.equal(logits(loaded, inputs), logits(model, inputs))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        tokens = loaded.generate(IDS[:1, :5], max_new_tokens=3, do_sample=False, pad_token_id=0)
    assert tokens.shape == (1, 8)


def test_the_fitting_config_is_among_the_first_rebuilt(monkeypatch):
    # the values implied by sizes no other field moves are tried first (hidden and MLP widths);
    # only fields whose sizes move together (heads and head_dim) are combined
    model, inputs = build("llama")
    rebuilt, rebuild = [], model_config._rebuild
    monkeypatch.setattr(model_config, "_rebuild", lambda *a: rebuilt.append(a[2]) or rebuild(*a))
    graphprune.prune(model, 0.25, inputs, prune_heads=True, uniform=True)
    trials = [values for values in rebuilt if len(values) > 1]  # combinations, not the one-field probes
    assert 1 <= len(trials) <= 8 and model.config.hidden_size == 72
    assert {dict(trials[0])[k] for k in (("hidden_size", None), ("intermediate_size", None))} == {72, 96}


@pytest.mark.parametrize("name, ratio", [("bert", {"*intermediate.dense": 0.3}), ("qwen2", {"*mlp.up_proj": 0.3})])
def test_pruning_only_what_the_config_can_say_round_trips(name, ratio, tmp_path):
    model, inputs = build(name)
    size = model.config.intermediate_size
    with warnings.catch_warnings():
        warnings.simplefilter("error", graphprune.ConfigWarning)
        graphprune.prune(model, ratio, inputs, uniform=True)
    assert model.config.intermediate_size == size - int(0.3 * size)
    assert torch.equal(logits(reloaded(model, tmp_path), inputs), logits(model, inputs))


def test_a_config_that_cannot_describe_the_model_is_left_alone_with_a_warning(tmp_path, monkeypatch):
    model, inputs = build("llama")
    fields = int_fields(model.config)
    rebuilt, rebuild = [], model_config._rebuild
    monkeypatch.setattr(model_config, "_rebuild", lambda *a: rebuilt.append(a[2]) or rebuild(*a))
    with pytest.warns(graphprune.ConfigWarning, match="no longer describes the pruned LlamaForCausalLM: "
                                                      r"intermediate_size would have to be \d+ and \d+ at once"):
        graphprune.prune(model, 0.3, inputs, prune_heads=True, global_ranking=True)  # layers pruned unequally
    assert not [values for values in rebuilt if len(values) > 1]  # seen from the one-field probes: no combination tried
    assert int_fields(model.config) == fields
    produced = logits(model, inputs)
    graphprune.save(model, tmp_path / "m.safetensors")
    assert torch.equal(logits(graphprune.load(build("llama")[0], tmp_path / "m.safetensors"), inputs), produced)


def test_a_config_its_own_validation_refuses_is_not_written():
    model, inputs = build("llama")  # layers alike, but a hidden width that is no multiple of the head count
    with pytest.warns(graphprune.ConfigWarning, match="LlamaConfig refuses it"):
        graphprune.prune(model, 0.3, inputs, prune_heads=True, global_ranking=True, uniform=True)
    assert model.config.hidden_size == 96


def test_head_width_under_rotary_embeddings_is_not_what_the_config_says():
    # the rotary frequencies and the attention scale depend on head_dim: a config with a
    # smaller head_dim would build another function, so the config stays and says so
    model, inputs = build("llama")
    with pytest.warns(graphprune.ConfigWarning, match="rotary_emb"):
        graphprune.prune(model, 0.25, inputs, uniform=True)
    assert model.config.head_dim == 12


def test_an_interrupt_while_describing_the_config_leaves_the_model_as_it_was(monkeypatch):
    model, inputs = build("llama")
    before, config = model_state(model), int_fields(model.config)

    def interrupted(model):
        raise KeyboardInterrupt

    monkeypatch.setattr("graphprune.session.describe_pruned", interrupted)
    with pytest.raises(KeyboardInterrupt):
        graphprune.prune(model, 0.25, inputs, prune_heads=True, uniform=True)
    assert_model_unchanged(model, before)
    assert int_fields(model.config) == config


def test_describing_the_config_does_not_change_the_model():
    model, _ = build("llama")
    before = model_state(model)
    update = model_config.describe_pruned(model)
    assert update.problem is None and update.fields == {} and update.attributes == {}
    assert_model_unchanged(model, before)


class _TinyConfig:
    """Any config object with ``to_dict`` (not only Hugging Face's) is kept true."""

    def __init__(self, inner: int = 32):
        self.inner = inner

    def to_dict(self) -> dict:
        return {"inner": self.inner}


class _Tiny(torch.nn.Module):
    """A model built from its config, with a buffer computed from it (saved or not)."""

    saved = True

    def __init__(self, config: _TinyConfig):
        super().__init__()
        self.config = config
        self.up, self.down = torch.nn.Linear(8, config.inner), torch.nn.Linear(config.inner, 8)
        self.register_buffer("scale", torch.tensor(config.inner**-0.5), persistent=self.saved)

    def forward(self, x):
        return self.down(torch.relu(self.up(x)) * self.scale)


class _TinyUnsaved(_Tiny):
    saved = False


def test_any_config_object_follows_and_an_unsaved_buffer_computed_from_it_is_checked():
    x = torch.randn(2, 8, generator=torch.Generator().manual_seed(0))
    model = _Tiny(_TinyConfig()).eval()
    with warnings.catch_warnings():
        warnings.simplefilter("error", graphprune.ConfigWarning)
        graphprune.prune(model, 0.25, x)
    assert model.config.inner == 24 and model.up.out_features == 24
    # not saved, the buffer would be computed again from inner=24: another scale, another model
    model = _TinyUnsaved(_TinyConfig()).eval()
    with pytest.warns(graphprune.ConfigWarning, match="scale, computed from the config and not saved"):
        graphprune.prune(model, 0.25, x)
    assert model.config.inner == 32 and model.up.out_features == 24


class _TinyWithFixedLayer(_Tiny):
    """A width the model's code fixes, which no field of its config sets."""

    def __init__(self, config: _TinyConfig):
        super().__init__(config)
        self.extra, self.out = torch.nn.Linear(8, 6), torch.nn.Linear(6, 8)

    def forward(self, x):
        return super().forward(x) + self.out(torch.relu(self.extra(x)))


def test_a_size_no_field_sets_is_named_without_rebuilding_any_combination(monkeypatch):
    x = torch.randn(2, 8, generator=torch.Generator().manual_seed(0))
    model = _TinyWithFixedLayer(_TinyConfig()).eval()
    rebuilt, rebuild = [], model_config._rebuild
    monkeypatch.setattr(model_config, "_rebuild", lambda *a: rebuilt.append(a[2]) or rebuild(*a))
    with pytest.warns(graphprune.ConfigWarning, match=r"extra.bias has 3 along dim 0, which no field of the config sets"):
        graphprune.prune(model, 0.5, x)
    assert len(rebuilt) == 2 and model.extra.out_features == 3  # the config as it is, and inner doubled
