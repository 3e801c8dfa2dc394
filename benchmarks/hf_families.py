"""Hugging Face transformers families that hf_zoo.py does not cover, as long-tail cases (libraries.py).

Each family is ``model_type -> (Auto class, config fields, input kind)``: the family's default
config with the fields given made small, built from the config (random weights, no download).
"""
from __future__ import annotations

import warnings

import torch

from long_tail import Case

TEXT = dict(vocab_size=100, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, max_position_embeddings=64, pad_token_id=0, num_labels=3)
SEQ2SEQ = dict(vocab_size=100, d_model=64, encoder_layers=2, decoder_layers=2, encoder_attention_heads=4,
               decoder_attention_heads=4, encoder_ffn_dim=128, decoder_ffn_dim=128, max_position_embeddings=64,
               pad_token_id=0, decoder_start_token_id=2)
VIT = dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, intermediate_size=128, image_size=32,
           patch_size=8, num_labels=5)
CAUSAL, CLASSIFY = "AutoModelForCausalLM", "AutoModelForSequenceClassification"
IMAGE = "AutoModelForImageClassification"

HF_FAMILIES = {
    "deberta-v2": (CLASSIFY, {**TEXT, "relative_attention": True, "position_buckets": 16, "max_relative_positions": 32,
                              "pos_att_type": ["p2c", "c2p"], "type_vocab_size": 0}, "text"),
    "xlnet": (CLASSIFY, dict(vocab_size=100, d_model=64, n_layer=2, n_head=4, d_inner=128, num_labels=3), "text"),
    "codegen": (CAUSAL, dict(vocab_size=100, n_embd=64, n_layer=2, n_head=4, rotary_dim=8, n_positions=64, n_ctx=64),
                "text"),
    "mpt": (CAUSAL, dict(vocab_size=100, d_model=64, n_layers=2, n_heads=4, max_seq_len=64, expansion_ratio=2), "text"),
    "biogpt": (CAUSAL, TEXT, "text"),
    "gpt_bigcode": (CAUSAL, dict(vocab_size=100, n_embd=64, n_layer=2, n_head=4, n_positions=64, multi_query=True),
                    "text"),
    "olmo2": (CAUSAL, TEXT, "text"),
    "granite": (CAUSAL, TEXT, "text"),
    "cohere": (CAUSAL, TEXT, "text"),
    "qwen3_moe": (CAUSAL, {**TEXT, "num_experts": 4, "num_experts_per_tok": 2, "moe_intermediate_size": 32,
                           "decoder_sparse_step": 1}, "text"),
    "mbart": ("AutoModelForSeq2SeqLM", SEQ2SEQ, "seq2seq"),
    "whisper": ("AutoModelForSpeechSeq2Seq", {**SEQ2SEQ, "num_mel_bins": 16, "max_source_positions": 16,
                                              "max_target_positions": 32}, "speech"),
    "wav2vec2": ("AutoModelForAudioClassification", {
        **VIT, "conv_dim": (16, 16), "conv_kernel": (10, 3), "conv_stride": (5, 2), "num_conv_pos_embeddings": 16,
        "num_conv_pos_embedding_groups": 4, "classifier_proj_size": 32}, "audio"),
    "clip": ("AutoModel", {"text_config": dict(vocab_size=100, hidden_size=32, intermediate_size=64,
                                               num_hidden_layers=2, num_attention_heads=2, max_position_embeddings=16),
                           "vision_config": dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                                 num_attention_heads=2, image_size=32, patch_size=8),
                           "projection_dim": 16}, "clip"),
    "convnext": (IMAGE, dict(hidden_sizes=[16, 32, 64, 128], depths=[1, 1, 1, 1], num_labels=5), "image64"),
    "swin": (IMAGE, dict(embed_dim=16, depths=[1, 1], num_heads=[2, 2], window_size=4, image_size=32, patch_size=4,
                         num_labels=5), "image32"),
    "segformer": ("AutoModelForSemanticSegmentation", dict(hidden_sizes=[16, 32, 64, 128], depths=[1, 1, 1, 1],
                                                           num_attention_heads=[1, 2, 2, 4], decoder_hidden_size=32,
                                                           num_labels=3), "image64"),
    "deit": (IMAGE, {**VIT, "architectures": ["DeiTForImageClassification"]}, "image32"),
}
EXTRA = {  # families other cases build on (peft)
    "llama": (CAUSAL, TEXT, "text"),
    "bert": (CLASSIFY, TEXT, "text"),
}


def _inputs(kind: str) -> object:
    g = torch.Generator().manual_seed(9)
    ids = torch.randint(3, 100, (2, 12), generator=g)
    if kind.startswith("image"):
        side = int(kind[5:])
        return torch.randn(2, 3, side, side, generator=g)
    return {"text": {"input_ids": ids}, "seq2seq": {"input_ids": ids, "decoder_input_ids": ids[:, :6]},
            "speech": {"input_features": torch.randn(2, 16, 32, generator=g), "decoder_input_ids": ids[:, :6]},
            "audio": {"input_values": torch.randn(2, 400, generator=g)},
            "clip": {"input_ids": ids, "pixel_values": torch.randn(2, 3, 32, 32, generator=g)}}[kind]


def hf_case(kind: str) -> Case:
    """The long-tail case of transformers family ``kind`` (HF_FAMILIES or EXTRA)."""
    auto, fields, inputs = {**HF_FAMILIES, **EXTRA}[kind]

    def build():
        import transformers

        config = transformers.AutoConfig.for_model(kind, **fields)
        torch.manual_seed(0)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            model = getattr(transformers, auto).from_config(config).eval()
        return model, _inputs(inputs)

    return Case(f"hf_{kind}", build)
