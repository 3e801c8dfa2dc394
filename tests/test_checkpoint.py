"""``graphprune.prune_checkpoint`` and ``graphprune prune hf:DIR --stream``: a Hugging Face
checkpoint pruned shard by shard (analysis on the meta device, one pass to score, one to
write) loads with ``from_pretrained`` and equals the model pruned whole in memory, bit for
bit; a failure or Ctrl-C leaves no output behind; every problem is found before writing."""
from __future__ import annotations

import json
import os
import warnings

import pytest
import torch
from conftest import run_cli
from safetensors.torch import load_file

import graphprune
from graphprune.io import sharded

transformers = pytest.importorskip("transformers")

IDS = torch.randint(0, 100, (2, 12), generator=torch.Generator().manual_seed(0))
LLAMA = dict(vocab_size=100, hidden_size=64, num_hidden_layers=3, num_attention_heads=4, num_key_value_heads=2,
             intermediate_size=96, max_position_embeddings=32)


def quiet(call, *args, **kwargs):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return call(*args, **kwargs)


def save_llama(directory, *, shard: str = "40KB", **options) -> None:
    torch.manual_seed(0)
    config = transformers.LlamaConfig(**{**LLAMA, **options})
    model = quiet(transformers.LlamaForCausalLM, config).to(torch.bfloat16).eval()
    model.save_pretrained(directory, max_shard_size=shard)
    (directory / "tokenizer_config.json").write_text('{"model_max_length": 32}')


@pytest.fixture(scope="module")
def source(tmp_path_factory):
    directory = tmp_path_factory.mktemp("llama")
    save_llama(directory)
    return directory


def load(directory):
    return quiet(transformers.LlamaForCausalLM.from_pretrained, directory).eval()


def logits(model):
    with torch.no_grad():
        return model(IDS).logits


def pruned_in_memory(directory, ratio, **options):
    model = load(directory)
    return quiet(graphprune.prune, model, ratio, {"input_ids": IDS}, fit_config=True, **options)


@pytest.mark.parametrize("options", [{"uniform": True}, {"uniform": True, "prune_heads": True, "criterion": "l2"},
                                     {"criterion": "bn_scale", "uniform": True}])
def test_a_streamed_checkpoint_loads_and_equals_pruning_in_memory(source, tmp_path, options):
    done = graphprune.prune_checkpoint(source, tmp_path / "out", 0.25, progress=False, **options)
    assert len(json.loads((source / sharded.INDEX).read_text())["weight_map"]) > 1
    loaded = load(done.path)
    expected = pruned_in_memory(source, 0.25, **options)
    assert loaded.dtype == torch.bfloat16 and loaded.config.hidden_size == expected.config.hidden_size < 64
    assert torch.equal(logits(loaded), logits(expected))
    assert done.result.after["params"] == graphprune.count_parameters(expected)
    assert sorted(os.listdir(done.path)) == sorted(os.listdir(source))  # shards, index, config, tokenizer file
    index = json.loads((tmp_path / "out" / sharded.INDEX).read_text())
    sizes = sum(t.numel() * t.element_size() for s in set(index["weight_map"].values())
                for t in load_file(tmp_path / "out" / s).values())
    assert index["metadata"]["total_size"] == sizes


def test_a_single_file_checkpoint_with_tied_embeddings_streams(tmp_path):
    save_llama(tmp_path / "src", shard="10GB", tie_word_embeddings=True)
    assert not (tmp_path / "src" / sharded.INDEX).exists()
    done = graphprune.prune_checkpoint(tmp_path / "src", tmp_path / "out", 0.5, uniform=True, progress=False)
    assert set(load_file(tmp_path / "out" / sharded.SINGLE)) == set(load_file(tmp_path / "src" / sharded.SINGLE))
    assert torch.equal(logits(load(done.path)), logits(pruned_in_memory(tmp_path / "src", 0.5, uniform=True)))


@pytest.mark.parametrize("name", ["bert", "vit"])
def test_an_encoder_checkpoint_streams_as_it_prunes_in_memory(name, tmp_path):
    from test_hf import build, logits as hf_logits

    model, inputs = build(name)
    model.save_pretrained(tmp_path / "src", max_shard_size="60KB")
    ratio = {"*intermediate.dense" if name == "bert" else "*mlp.fc1": 0.3}
    done = graphprune.prune_checkpoint(tmp_path / "src", tmp_path / "out", ratio, uniform=True, progress=False)
    loaded = quiet(type(model).from_pretrained, done.path).eval()
    expected = quiet(graphprune.prune, model, ratio, inputs, uniform=True, fit_config=True)
    assert loaded.config.intermediate_size == expected.config.intermediate_size < 128
    assert torch.equal(hf_logits(loaded, inputs), hf_logits(expected, inputs))


def test_random_scores_need_no_scoring_pass(source, tmp_path, monkeypatch):
    reads = []
    original = sharded.ShardedCheckpoint.tensors
    monkeypatch.setattr(sharded.ShardedCheckpoint, "tensors", lambda self, *a, **k: reads.append(k["desc"]) or original(self, *a, **k))
    done = graphprune.prune_checkpoint(source, tmp_path / "out", 0.5, criterion="random", uniform=True, progress=False)
    assert reads == ["writing pruned shards"]
    assert logits(load(done.path)).shape == (2, 12, 100)


@pytest.mark.parametrize("interrupt", [KeyboardInterrupt, OSError])
def test_an_interrupted_write_leaves_nothing_in_the_way_of_a_rerun(source, tmp_path, monkeypatch, interrupt):
    calls = []
    save = sharded.save_file

    def failing(*args, **kwargs):
        calls.append(args[1])
        if len(calls) == 2:
            raise interrupt("stopped")
        return save(*args, **kwargs)

    monkeypatch.setattr(sharded, "save_file", failing)
    with pytest.raises(interrupt):
        graphprune.prune_checkpoint(source, tmp_path / "out", 0.25, uniform=True, progress=False)
    assert os.listdir(tmp_path) == []
    monkeypatch.setattr(sharded, "save_file", save)
    done = graphprune.prune_checkpoint(source, tmp_path / "out", 0.25, uniform=True, progress=False)
    assert torch.equal(logits(load(done.path)), logits(pruned_in_memory(source, 0.25, uniform=True)))


def test_problems_are_found_before_anything_is_written(source, tmp_path):
    (tmp_path / "taken").mkdir()
    (tmp_path / "taken" / "file").write_text("x")
    with pytest.raises(ValueError, match="taken exists; remove it or choose another output directory"):
        graphprune.prune_checkpoint(source, tmp_path / "taken", 0.25)
    with pytest.raises(ValueError, match="criterion 'fpgm' cannot score a checkpoint shard by shard"):
        graphprune.prune_checkpoint(source, tmp_path / "out", 0.25, criterion="fpgm")
    with pytest.raises(ValueError, match="not a checkpoint directory with a config.json"):
        graphprune.prune_checkpoint(tmp_path / "taken", tmp_path / "out", 0.25)
    assert sorted(os.listdir(tmp_path)) == ["taken"]


def test_a_checkpoint_that_does_not_match_its_config_is_refused(source, tmp_path):
    broken = tmp_path / "broken"
    broken.mkdir()
    for name in os.listdir(source):
        (broken / name).write_bytes((source / name).read_bytes())
    config = json.loads((broken / "config.json").read_text())
    (broken / "config.json").write_text(json.dumps({**config, "intermediate_size": 80}))
    with pytest.raises(ValueError, match="tensors whose shape config.json does not give: .*mlp.*\\[96, 64\\] \\(the config says \\[80, 64\\]\\)"):
        graphprune.prune_checkpoint(broken, tmp_path / "out", 0.25)
    (broken / "config.json").write_text(json.dumps(config))
    index = json.loads((broken / sharded.INDEX).read_text())
    last = broken / sorted(set(index["weight_map"].values()))[-1]
    last.write_bytes(b"not a safetensors file")
    with pytest.raises(ValueError, match="shard model-.* is not a readable safetensors file"):
        graphprune.prune_checkpoint(broken, tmp_path / "out", 0.25)
    os.remove(last)
    with pytest.raises(ValueError, match="shard model-.* is missing"):
        graphprune.prune_checkpoint(broken, tmp_path / "out", 0.25)
    (broken / sharded.INDEX).write_text('{"weights": {}}')
    with pytest.raises(ValueError, match="model.safetensors.index.json is not an index of shards"):
        graphprune.prune_checkpoint(broken, tmp_path / "out", 0.25)
    assert not (tmp_path / "out").exists()


def test_the_command_line_streams_as_the_api_does(source, tmp_path, capsys):
    code, out, err = run_cli(capsys, ["prune", f"hf:{source}", "--ratio", "0.25", "--uniform", "--stream", "--output",
                                      str(tmp_path / "cli"), "--quiet"])
    assert code == 0, err
    assert "left whole, as its config cannot describe them" in out
    assert "LlamaForCausalLM.from_pretrained" in out
    done = graphprune.prune_checkpoint(source, tmp_path / "api", 0.25, uniform=True, progress=False)
    for shard in json.loads((source / sharded.INDEX).read_text())["weight_map"].values():
        cli, api = load_file(tmp_path / "cli" / shard), load_file(os.path.join(done.path, shard))
        assert cli.keys() == api.keys() and all(torch.equal(cli[k], api[k]) for k in cli)


@pytest.mark.parametrize("argv, message", [
    (["prune", "resnet18", "--ratio", "0.3", "--stream", "--output", "x"], "--stream prunes a Hugging Face checkpoint"),
    (["prune", "hf:{source}", "--ratio", "0.3", "--stream"], "--stream needs --output DIR"),
    (["prune", "hf:{source}", "--ratio", "0.3", "--stream", "--output", "{source}"], "exists; remove it"),
])
def test_command_line_stream_mistakes_are_usage_errors(source, capsys, argv, message):
    code, out, err = run_cli(capsys, [a.format(source=source) for a in argv])
    assert code == 2 and message in err


@pytest.mark.parametrize("name", ["wanda", "flap"])
def test_activation_aware_scores_stream_with_one_module_loaded_at_a_time(source, tmp_path, name, monkeypatch):
    calibration = [{"input_ids": IDS[:1]}, {"input_ids": IDS[1:]}]
    loaded = []
    original = sharded.ShardedCheckpoint.reader

    def counting_reader(self):
        reader = original(self)
        read = reader.__enter__()

        def counted(tensor_name):
            loaded.append(tensor_name)
            return read(tensor_name)
        return _Wrapped(counted, reader)

    monkeypatch.setattr(sharded.ShardedCheckpoint, "reader", counting_reader)
    done = graphprune.prune_checkpoint(source, tmp_path / "out", 0.25, criterion=name, calibration=calibration,
                                       uniform=True, progress=False)
    assert len(loaded) == 2 * len(json.loads((source / sharded.INDEX).read_text())["weight_map"])  # each, per batch
    expected = pruned_in_memory(source, 0.25, criterion=name, calibration=calibration, uniform=True)
    assert torch.equal(logits(load(done.path)), logits(expected))


class _Wrapped:
    def __init__(self, read, reader):
        self.read, self.reader = read, reader

    def __enter__(self):
        return self.read

    def __exit__(self, *exc):
        return self.reader.__exit__(*exc)


def test_criteria_that_need_gradients_or_whole_weights_do_not_stream(source, tmp_path):
    with pytest.raises(ValueError, match="criterion 'obs' cannot score a checkpoint shard by shard"):
        graphprune.prune_checkpoint(source, tmp_path / "out", 0.25, criterion="obs", calibration=[{"input_ids": IDS}])
    with pytest.raises(ValueError, match="criterion 'wanda' needs training data"):
        graphprune.prune_checkpoint(source, tmp_path / "out", 0.25, criterion="wanda")
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("options, error, message", [
    ({"ratio": 1.5}, ValueError, "ratio must lie in"),
    ({"ratio": None}, ValueError, "prune needs a ratio or a budget"),
    ({"ratio": 0.3, "round_to": 0}, ValueError, "round_to must be at least 1"),
    ({"ratio": 0.3, "uniform": "yes"}, TypeError, "uniform must be True or False"),
    ({"ratio": 0.3, "progress": 1}, TypeError, "progress must be True or False"),
])
def test_bad_options_are_refused_before_any_shard_is_read(source, tmp_path, monkeypatch, options, error, message):
    monkeypatch.setattr(sharded.ShardedCheckpoint, "tensors", lambda *a, **k: pytest.fail("a shard was read"))
    with pytest.raises(error, match=message):
        graphprune.prune_checkpoint(source, tmp_path / "out", options.pop("ratio"), **options)
