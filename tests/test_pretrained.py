"""``graphprune.save_pretrained`` / ``graphprune.from_pretrained``: a pruned Hugging Face model
reloads in one call, whether its config can describe the pruning (a plain ``save_pretrained``
directory) or not (the config as built plus graphprune's weights file); equal logits."""
from __future__ import annotations

import json
import os
import warnings

import pytest
import torch
from test_hf import build, logits

import graphprune
from graphprune.io import pretrained

transformers = pytest.importorskip("transformers")


def pruned(name: str, **options):
    model, inputs = build(name)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        graphprune.prune(model, 0.3, inputs, **options)
    return model, inputs


@pytest.mark.parametrize("name, options, kind", [
    ("llama", {"prune_heads": True, "global_ranking": True}, "graphprune"),  # layers pruned unequally
    ("bert", {}, "graphprune"),  # a head width that hidden_size / num_heads ties
    ("gpt2", {}, "graphprune"),
    ("qwen2", {"uniform": True, "fit_config": True}, "transformers"),  # what the config can say
])
def test_a_pruned_model_reloads_in_one_call(name, options, kind, tmp_path):
    model, inputs = pruned(name, **options)
    assert graphprune.save_pretrained(model, tmp_path / "saved") == kind
    again = graphprune.from_pretrained(tmp_path / "saved")
    assert type(again) is type(model) and not again.training
    assert torch.equal(logits(again, inputs), logits(model, inputs))
    if kind == "transformers":  # transformers itself loads it too
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            plain = type(model).from_pretrained(tmp_path / "saved")
        assert torch.equal(logits(plain, inputs), logits(model, inputs))
    else:
        entry = json.loads((tmp_path / "saved" / "config.json").read_text())["graphprune"]
        assert entry["weights"] == pretrained.WEIGHTS and os.path.isfile(tmp_path / "saved" / pretrained.WEIGHTS)


def test_a_plain_hugging_face_directory_loads_too(tmp_path):
    model, inputs = build("llama")
    model.save_pretrained(tmp_path)
    assert torch.equal(logits(graphprune.from_pretrained(tmp_path), inputs), logits(model, inputs))


def test_an_interrupted_save_leaves_nothing(tmp_path, monkeypatch):
    model, _ = pruned("bert")
    from graphprune.io import persist

    monkeypatch.setattr(persist, "save", lambda *a, **k: (_ for _ in ()).throw(KeyboardInterrupt()))
    with pytest.raises(KeyboardInterrupt):
        graphprune.save_pretrained(model, tmp_path / "saved")
    assert os.listdir(tmp_path) == []


def test_mistakes_are_precise(tmp_path):
    with pytest.raises(TypeError, match="Sequential is not a Hugging Face model"):
        graphprune.save_pretrained(torch.nn.Sequential(torch.nn.Linear(2, 2)), tmp_path / "x")
    (tmp_path / "taken").mkdir()
    (tmp_path / "taken" / "f").write_text("x")
    with pytest.raises(ValueError, match="taken exists"):
        graphprune.save_pretrained(build("bert")[0], tmp_path / "taken")
    with pytest.raises(ValueError, match="no config.json"):
        graphprune.from_pretrained(tmp_path / "taken")
    assert graphprune.save_pretrained(pruned("bert")[0], tmp_path / "saved") == "graphprune"
    with pytest.raises(ValueError, match="torch_dtype would be ignored"):
        graphprune.from_pretrained(tmp_path / "saved", torch_dtype=torch.float16)


def test_the_warning_for_a_config_that_cannot_say_it_names_the_way_to_save(tmp_path):
    model, inputs = build("bert")
    with pytest.warns(graphprune.ConfigWarning, match="graphprune.save_pretrained / graphprune.from_pretrained round-trip it"):
        graphprune.prune(model, 0.3, inputs)
