"""Hugging Face transformers, built from small configs in code (no downloads): BERT, GPT-2
(``Conv1D``, q/k/v split by ``split_size``), LLaMA and Qwen2 (RMSNorm, rotary embeddings,
grouped-query attention, a KV cache in the outputs) and ViT. Each prunes at 0.3 through the
one call, keeps its output shape, saves and loads; the oracle proves the head groups.
transformers is a test extra; without it these tests are skipped."""
from __future__ import annotations

import warnings

import pytest
import torch
from conftest import assert_model_unchanged, count_params, model_state
from oracle import dead_channel_oracle

import graphprune

transformers = pytest.importorskip("transformers")

IDS = torch.randint(0, 100, (2, 12), generator=torch.Generator().manual_seed(0))
PIXELS = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(0))
_DECODER = dict(vocab_size=100, hidden_size=96, num_hidden_layers=2, num_attention_heads=8, num_key_value_heads=4,
                intermediate_size=128, max_position_embeddings=32)  # GQA: two query heads per key/value head
CONFIGS = {
    "bert": ("BertForSequenceClassification", "BertConfig", dict(vocab_size=100, hidden_size=64, num_hidden_layers=2,
             num_attention_heads=4, intermediate_size=128, max_position_embeddings=32)),
    "gpt2": ("GPT2LMHeadModel", "GPT2Config", dict(vocab_size=100, n_embd=64, n_layer=2, n_head=4, n_positions=32,
             bos_token_id=0, eos_token_id=0)),
    "llama": ("LlamaForCausalLM", "LlamaConfig", _DECODER),
    "qwen2": ("Qwen2ForCausalLM", "Qwen2Config", _DECODER),
    "vit": ("ViTForImageClassification", "ViTConfig", dict(image_size=32, patch_size=8, hidden_size=64, num_hidden_layers=2,
            num_attention_heads=4, intermediate_size=128, num_labels=10)),
    # families this project never tuned for: fused q/k/v with x.T (aten.numpy_T), ALiBi by baddbmm
    "falcon": ("FalconForCausalLM", "FalconConfig", dict(vocab_size=100, hidden_size=64, num_hidden_layers=2,
               num_attention_heads=4)),
    "bloom": ("BloomForCausalLM", "BloomConfig", dict(vocab_size=100, hidden_size=64, n_layer=2, n_head=4)),
}


def build(name: str) -> tuple:
    """``(model in eval mode, example inputs)`` of the small config ``name``."""
    model_class, config_class, options = CONFIGS[name]
    torch.manual_seed(0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = getattr(transformers, model_class)(getattr(transformers, config_class)(**options)).eval()
    return model, (PIXELS if name == "vit" else {"input_ids": IDS})


def logits(model, inputs) -> torch.Tensor:
    with torch.no_grad():
        return model(**inputs).logits if isinstance(inputs, dict) else model(inputs).logits


@pytest.mark.filterwarnings("ignore::graphprune.ConfigWarning")  # tied sizes pruned apart: the config cannot say it
@pytest.mark.parametrize("name", list(CONFIGS))
def test_a_small_hf_model_prunes_through_the_one_call(name, tmp_path):
    model, inputs = build(name)
    expected = logits(model, inputs)
    before = model_state(model)
    report = graphprune.analyze(model, inputs)
    assert_model_unchanged(model, before)
    assert report.prunable_groups

    params = count_params(model)
    graphprune.prune(model, 0.3, inputs, report=report)
    produced = logits(model, inputs)
    assert produced.shape == expected.shape and produced.isfinite().all()
    assert count_params(model) <= 0.85 * params

    graphprune.save(model, tmp_path / "m.safetensors")
    loaded = graphprune.load(build(name)[0], tmp_path / "m.safetensors")
    assert torch.equal(logits(loaded, inputs), produced)


@pytest.mark.parametrize("prune_heads", [False, True])
@pytest.mark.parametrize("name", ["llama", "gpt2"])
def test_attention_groups_of_hf_models_pass_the_oracle(name, prune_heads):
    # torch.export records their sizes as numbers, which these models do read off shapes
    summary = dead_channel_oracle(build(name)[0], build(name)[1], assumed=True, prune_heads=prune_heads)
    assert summary["groups_tested"] >= 3 and summary["params_after"] < summary["params_before"]


def test_grouped_query_heads_prune_with_their_key_value_head_and_generate_runs():
    model, inputs = build("llama")
    report = graphprune.analyze(model, inputs, prune_heads=True)
    assert "DynamicCache" in str(report)  # the KV cache: an output left out, its sizes follow the pruning
    heads = [g for g in report.prunable_groups if g.root.endswith("q_proj")]
    assert [g.size for g in heads] == [4, 4]  # a unit: a key/value head and its two query heads
    graphprune.prune(model, 0.5, inputs, report=report)
    attention = model.model.layers[0].self_attn
    assert attention.q_proj.out_features == 4 * 12 and attention.k_proj.out_features == 2 * 12
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        tokens = model.generate(IDS[:1, :5], max_new_tokens=4, do_sample=False, pad_token_id=0)
    assert tokens.shape == (1, 9)


@pytest.mark.parametrize("fraction", [0.25, 0.5])
def test_head_groups_pass_the_oracle_where_other_attributes_share_their_sizes(fraction):
    # 8 heads of head_dim 8, and 4 key/value heads in 6 layers: layer 4's layer_idx is 4 too.
    # torch.export records each of those sizes as the number, so only the source statement
    # tells which attribute (if any) holds it; a wrong guess resized head_dim or layer_idx.
    options = dict(_DECODER, hidden_size=64, num_hidden_layers=6)
    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(transformers.LlamaConfig(**options)).eval()
    summary = dead_channel_oracle(model, {"input_ids": IDS}, assumed=True, prune_heads=True, fraction=fraction)
    assert summary["groups_tested"] >= 6 and summary["params_after"] < summary["params_before"]
    attention = model.model.layers[4].self_attn
    assert (attention.head_dim, attention.layer_idx) == (8, 4)
