"""torch.nn's own containers are no leaves without a rule: torch.fx traces into the transformer
layers, and where it cannot (TransformerEncoder, TransformerDecoder, Transformer check shapes in
Python) torch.export captures them, with nn.MultiheadAttention kept whole for its rule.
Cross-attention with its own key and value widths (``kdim``, ``vdim``), and a forward under
``torch.no_grad()`` captured by torch.export, prune too."""
from __future__ import annotations

import pytest
import torch
from torch import nn

import graphprune
from conftest import count_params, group_of, size_attrs
from graphprune.tracer.fx_capture import reference_paths
from oracle import dead_channel_oracle

D, FF, HEADS = 32, 64, 4


def _encoder_layer(norm_first: bool = False) -> nn.Module:
    return nn.TransformerEncoderLayer(D, HEADS, FF, dropout=0.0, batch_first=True, norm_first=norm_first)


def _decoder_layer() -> nn.Module:
    return nn.TransformerDecoderLayer(D, HEADS, FF, dropout=0.0, batch_first=True)


def _body(kind: str) -> nn.Module:
    if kind.startswith("encoder"):
        return nn.TransformerEncoder(_encoder_layer(kind == "encoder_norm_first"), 2, norm=nn.LayerNorm(D),
                                     enable_nested_tensor=False)
    if kind == "decoder":
        return nn.TransformerDecoder(_decoder_layer(), 2, norm=nn.LayerNorm(D))
    return nn.Transformer(D, HEADS, 1, 1, FF, dropout=0.0, batch_first=True)


class Layers(nn.Module):
    """Transformer layers called one by one from the model's own forward."""

    def __init__(self, kind: str):
        super().__init__()
        self.decoder = kind == "decoder_layer"
        make = _decoder_layer if self.decoder else lambda: _encoder_layer(kind == "encoder_layer_norm_first")
        self.src, self.tgt, self.head = nn.Linear(12, D), nn.Linear(12, D), nn.Linear(D, 5)
        self.layers = nn.ModuleList([make(), make()])

    def forward(self, x, y):
        memory = self.src(x)
        h = self.tgt(y) if self.decoder else memory
        for layer in self.layers:
            h = layer(h, memory) if self.decoder else layer(h)
        return self.head(h)


class Wrapped(nn.Module):
    """A torch.nn container between an input projection and a head."""

    def __init__(self, kind: str):
        super().__init__()
        self.kind, self.body = kind, _body(kind)
        self.src, self.tgt, self.head = nn.Linear(12, D), nn.Linear(12, D), nn.Linear(D, 5)

    def forward(self, x, y):
        if self.kind.startswith("encoder"):
            return self.head(self.body(self.src(x)))
        if self.kind == "decoder":
            return self.head(self.body(self.tgt(y), self.src(x)))
        return self.head(self.body(self.src(x), self.tgt(y)))


INPUTS = (torch.randn(2, 7, 12), torch.randn(2, 5, 12))


def _without_norms(model: nn.Module) -> nn.Module:
    """Every LayerNorm replaced by Identity: its statistics make the stream's pruning
    approximate, which the oracle cannot test. (Run it on torch's reference paths: the fast
    path reads the norms' weights.)"""
    for name, module in list(model.named_modules()):
        if isinstance(module, nn.LayerNorm):
            parent, _, attr = name.rpartition(".")
            setattr(model.get_submodule(parent), attr, nn.Identity())
    return model


@pytest.mark.parametrize("kind", ["encoder_layer", "encoder_layer_norm_first", "decoder_layer"])
def test_transformer_layers_are_traced_into_by_fx(kind):
    torch.manual_seed(0)
    report = graphprune.analyze(Layers(kind).eval(), INPUTS)
    assert torch.backends.mha.get_fastpath_enabled()  # switched off only while capturing
    assert report.session.analysis.front_end == "fx"
    assert group_of(report, "layers.0.self_attn.in_proj_weight", 1).prunable  # the stream, approximate (LayerNorm)
    with reference_paths():
        result = dead_channel_oracle(_without_norms(Layers(kind)), INPUTS, fraction=0.5, prune_heads=True, capture="fx")
    assert result["groups_tested"] == 3  # the stream with the heads, and each layer's feed-forward width


@pytest.mark.parametrize("kind", ["encoder", "encoder_norm_first", "decoder", "transformer"])
def test_containers_fx_cannot_trace_are_captured_by_export(kind):
    torch.manual_seed(0)
    model = _without_norms(Wrapped(kind))
    # nn.Transformer checks its inputs' width against d_model, which follows its layers' width
    with reference_paths():
        result = dead_channel_oracle(model, INPUTS, fraction=0.5, prune_heads=True)
    assert result["groups_tested"] == 3  # the stream with the heads, each MLP's width
    assert graphprune.analyze(Wrapped(kind), INPUTS).session.analysis.front_end == "export"


@pytest.mark.parametrize("kind, ratio, most_left", [("encoder_norm_first", 0.5, 0.3), ("encoder", 0.3, 0.6),
                                                    ("decoder", 0.5, 0.3), ("transformer", 0.5, 0.3)])
def test_containers_prune_keep_outputs_and_reload(kind, ratio, most_left, tmp_path):
    torch.manual_seed(0)
    model = Wrapped(kind).eval()
    before, shape = count_params(model), model(*INPUTS).shape
    graphprune.prune(model, ratio, INPUTS)
    assert count_params(model) / before < most_left
    assert model(*INPUTS).shape == shape
    graphprune.save(model, tmp_path / "pruned.safetensors")
    fresh = Wrapped(kind).eval()
    graphprune.load(fresh, tmp_path / "pruned.safetensors")
    assert size_attrs(fresh) == size_attrs(model)
    with torch.no_grad():
        assert torch.equal(fresh(*INPUTS), model(*INPUTS))


class CrossAttention(nn.Module):
    """Queries of width 32 attend to keys of width 24 and values of width 20 (no LayerNorm)."""

    def __init__(self, batch_first: bool = True, **options):
        super().__init__()
        self.batch_first = batch_first
        self.q_in, self.k_in, self.v_in = nn.Linear(12, 32), nn.Linear(10, 24), nn.Linear(9, 20)
        self.attention = nn.MultiheadAttention(32, HEADS, kdim=24, vdim=20, batch_first=batch_first, **options)
        self.head = nn.Linear(32, 5)

    def forward(self, x, memory, values):
        h = self.q_in(x)
        q, k, v = h, self.k_in(memory), self.v_in(values)
        if not self.batch_first:
            q, k, v = q.transpose(0, 1), k.transpose(0, 1), v.transpose(0, 1)
        out = self.attention(q, k, v, need_weights=False)[0]
        return self.head((h + (out if self.batch_first else out.transpose(0, 1))).mean(1))


CROSS_INPUTS = (torch.randn(2, 7, 12), torch.randn(2, 5, 10), torch.randn(2, 5, 9))


@pytest.mark.parametrize("capture", ["fx", "export"])
@pytest.mark.parametrize("options", [{}, {"add_bias_kv": True}, {"add_zero_attn": True}, {"batch_first": False}])
def test_cross_attention_with_its_own_key_and_value_widths(capture, options):
    torch.manual_seed(0)
    model = CrossAttention(**options)
    result = dead_channel_oracle(model, CROSS_INPUTS, fraction=0.5, prune_heads=True, capture=capture)
    assert result["groups_tested"] == 3  # the query stream with the heads, the key stream, the value stream
    a = model.attention  # kdim and vdim follow their streams, embed_dim and num_heads the heads
    assert (a.kdim, a.vdim) == (a.k_proj_weight.shape[1], a.v_proj_weight.shape[1]) and a.kdim < 24 and a.vdim < 20
    assert a.embed_dim == a.q_proj_weight.shape[1] == a.num_heads * a.head_dim < 32
    model = CrossAttention(**options).eval()
    graphprune.prune(model, 0.5, CROSS_INPUTS, capture=capture)
    assert model.attention.head_dim == model.attention.q_proj_weight.shape[1] // HEADS < 8
    assert model(*CROSS_INPUTS).shape == (2, 5)


class Weights(nn.Module):
    """Attention whose weights (per head, or averaged over the heads) are an output."""

    def __init__(self, average: bool):
        super().__init__()
        self.average, self.embed, self.head = average, nn.Linear(12, 32), nn.Linear(32, 5)
        self.attention = nn.MultiheadAttention(32, HEADS, batch_first=True)

    def forward(self, x):
        h = self.embed(x)
        out, weights = self.attention(h, h, h, average_attn_weights=self.average)
        return self.head(h + out), weights


@pytest.mark.parametrize("capture", ["fx", "export"])
def test_attention_weights_follow_the_heads(capture):
    x = torch.randn(2, 7, 12)
    per_head, averaged = (graphprune.analyze(Weights(a).eval(), x, prune_heads=True, capture=capture) for a in (0, 1))
    assert "reaches output" in group_of(per_head, "embed.weight", 0).status  # the weights' head dim would shrink
    assert "averaged over the heads" in group_of(averaged, "embed.weight", 0).status


class NoGrad(nn.Module):
    """A forward under torch.no_grad(), with blocks under enable_grad and autocast inside."""

    def __init__(self):
        super().__init__()
        self.embed, self.head = nn.Linear(8, 16), nn.Linear(16, 4)
        self.mlp, self.out = nn.Linear(16, 32), nn.Linear(32, 16)
        self.attention = nn.MultiheadAttention(16, HEADS, batch_first=True)

    @torch.no_grad()
    def forward(self, x):
        h = self.embed(x)
        h = h + self.attention(h, h, h, need_weights=False)[0]
        with torch.enable_grad(), torch.autocast("cpu", enabled=False):
            h = h + self.out(torch.relu(self.mlp(h)))
        return self.head(h)


def test_a_forward_under_no_grad_is_seen_through_by_export():
    torch.manual_seed(0)
    x = torch.randn(2, 5, 8)
    by_fx, by_export = (graphprune.analyze(NoGrad().eval(), x, capture=c, prune_heads=True) for c in ("fx", "export"))
    # torch.export captured what torch.fx did: no scope left opaque, the attention kept whole
    assert sorted((g.size, g.status) for g in by_export.groups) == sorted((g.size, g.status) for g in by_fx.groups)
    assert sorted(g.size for g in by_export.prunable_groups) == [HEADS, 32]  # heads with the stream, the MLP's width
    result = dead_channel_oracle(NoGrad(), x, fraction=0.5, prune_heads=True, capture="export", assumed=True)
    assert result["groups_tested"] == 2


class CausalSeq2Seq(Wrapped):
    """nn.Transformer with the causal mask its own helper makes, as PyTorch's tutorials write it:
    the layers check whether the mask is causal by its values, a branch torch.export decides on
    the example (``draft_export``)."""

    def __init__(self):
        super().__init__("transformer")

    def forward(self, x, y):
        mask = self.body.generate_square_subsequent_mask(y.shape[1])
        return self.head(self.body(self.src(x), self.tgt(y), tgt_mask=mask))


def test_a_transformer_with_a_causal_mask_is_captured_on_the_example_values():
    torch.manual_seed(0)
    report = graphprune.analyze(CausalSeq2Seq().eval(), INPUTS)
    assert report.session.analysis.front_end == "export"
    assert group_of(report, "src.weight", 0).prunable
    with reference_paths():
        result = dead_channel_oracle(_without_norms(CausalSeq2Seq()), INPUTS, fraction=0.5, prune_heads=True)
    assert result["groups_tested"] == 3
    model = CausalSeq2Seq().eval()
    graphprune.prune(model, 0.5, INPUTS)
    assert model.body.d_model == 16 and model(*INPUTS).shape == (2, 5, 5)
