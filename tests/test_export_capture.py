"""The second capture front-end: torch.export, whose aten ops are read as the torch calls they
stand for, so the one rule table serves both; chosen with ``capture=``, and taken by
``"auto"`` where torch.fx cannot trace the root's forward."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
import torchvision
from conftest import assert_model_unchanged, group_of, model_state, run_oracle
from oracle import dead_channel_oracle
from torch import nn

import graphprune
import graphprune.pruning.audit as audit_module
from graphprune.analysis.reasons import BlockKind
from graphprune.tracer import trace

X = torch.randn(1, 3, 32, 32, generator=torch.Generator().manual_seed(0))


class ShapeControlFlow(nn.Module):
    """Python control flow on the input's shape in the root's forward (as timm's crossvit):
    torch.fx cannot trace it, torch.export can."""

    def __init__(self):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU())
        self.body = nn.Sequential(nn.Conv2d(16, 16, 3, padding=1, groups=4), nn.BatchNorm2d(16), nn.GELU())
        self.fc = nn.Linear(16, 10)

    def forward(self, x):
        if x.shape[-1] != 32:
            x = F.interpolate(x, size=(32, 32))
        y = self.stem(x)
        y = y + self.body(y)
        return self.fc(y.mean((2, 3)))


class Attention(nn.Module):
    """Heads sized as HF writes them: ``view(*shape, -1, self.head_dim)``."""

    def __init__(self, dim: int = 32, heads: int = 4):
        super().__init__()
        self.head_dim = dim // heads
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)
        self.norm = nn.LayerNorm(dim)
        self.fc1, self.fc2 = nn.Linear(dim, 2 * dim), nn.Linear(2 * dim, dim)

    def forward(self, x):
        if x.shape[0] > 64:  # control flow on a size: not fx-traceable
            x = x[:64]
        q, k, v = self.qkv(self.norm(x)).chunk(3, dim=-1)
        q, k, v = (t.view(*x.shape[:2], -1, self.head_dim).transpose(1, 2) for t in (q, k, v))
        attn = F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(*x.shape[:2], -1)
        x = x + self.proj(attn)
        return x + self.fc2(F.gelu(self.fc1(x)))


class StreamSizedHeads(nn.Module):
    """A head width computed from the *stream's* width (``C // heads``, as timm's crossvit
    writes its cross attention), while the query has its own width. torch.export records the
    size as the literal 8, which equals the ``head_dim`` attribute the code never reads:
    pruning the query breaks the forward. The audit cannot name the node torch.export failed
    at; bisection must find the group, and the others are still pruned."""

    def __init__(self, dim: int = 32, heads: int = 4):
        super().__init__()
        self.num_heads, self.head_dim = heads, dim // heads
        self.embed = nn.Linear(8, dim)
        self.q, self.proj = nn.Linear(dim, dim), nn.Linear(dim, dim)
        self.mlp = nn.Sequential(nn.Linear(dim, 64), nn.GELU(), nn.Linear(64, dim))

    def forward(self, x):
        if x.shape[1] > 100:
            x = x[:, :100]
        x = self.embed(x)
        B, N, C = x.shape
        q = self.q(x).reshape(B, N, self.num_heads, C // self.num_heads)
        x = x + self.proj(q.reshape(B, N, -1))
        return x + self.mlp(x)


def test_capture_is_validated():
    with pytest.raises(ValueError, match="capture must be 'fx', 'export' or 'auto'"):
        graphprune.analyze(ShapeControlFlow().eval(), X, capture="jit")


def test_auto_captures_with_export_where_fx_cannot():
    model = ShapeControlFlow().eval()
    assert trace(model, X, capture="auto").graph["front_end"] == "export"
    assert trace(torchvision.models.resnet18().eval(), X).graph["front_end"] == "fx"  # fx first where it works
    report = graphprune.analyze(model, X)
    stem = group_of(report, "stem.0.weight", 0)
    assert stem.prunable and {"stem.0", "stem.1", "body.0", "body.1", "fc"} <= set(stem.layers())
    run_oracle(ShapeControlFlow().eval(), X, groups=1)
    pruned = graphprune.prune(model, 0.5, X)
    assert pruned.stem[0].out_channels == 8 and pruned.body[0].groups == 2 and pruned(X).shape == (1, 10)


@pytest.mark.parametrize("name", ["resnet18", "mobilenet_v3_small", "shufflenet_v2_x0_5", "convnext_tiny"])
def test_export_finds_what_fx_finds(name):
    """The same prunable groups from either front-end; the oracle proves them under export."""
    model = torchvision.models.get_model(name).eval()
    by_fx = {g.root: g.size for g in graphprune.analyze(model, X, capture="fx").prunable_groups}
    by_export = {g.root: g.size for g in graphprune.analyze(model, X, capture="export").prunable_groups}
    # shufflenet's channel shuffle sizes its view from x.size(): torch.export records literals
    assert by_export.items() <= by_fx.items() and len(by_export) >= len(by_fx) - 2
    summary = dead_channel_oracle(torchvision.models.get_model(name).eval(), X, capture="export", max_groups=6)
    assert summary["groups_tested"] == 6 and summary["params_after"] < summary["params_before"]


def test_analysis_under_export_leaves_the_model_unchanged():
    model = Attention().eval()
    before = model_state(model)
    first = graphprune.analyze(model, torch.randn(2, 5, 32), capture="export")
    second = graphprune.analyze(model, torch.randn(2, 5, 32), capture="export")
    assert_model_unchanged(model, before)
    assert [(g.root, g.size, g.prunable) for g in first.groups] == [(g.root, g.size, g.prunable) for g in second.groups]


def test_heads_sized_by_an_attribute_follow_under_export():
    x = torch.randn(2, 5, 32)
    report = graphprune.analyze(Attention().eval(), x)
    assert report.graph.graph["front_end"] == "export"
    qkv = group_of(report, "qkv.weight", 0)
    assert qkv.prunable and {"qkv", "proj"} <= set(qkv.layers())
    assert group_of(report, "fc1.weight", 0).prunable
    run_oracle(Attention().eval().double(), x.double(), groups=1)  # the heads' group changes the softmax scale: not exact
    model = Attention().eval()
    graphprune.prune(model, 0.5, x)
    assert model.head_dim == 4 and model.qkv.out_features == 48 and model(x).shape == (2, 5, 32)


def test_an_aten_op_without_a_rule_blocks():
    class Renormed(nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.b = nn.Conv2d(3, 8, 1), nn.Conv2d(8, 8, 1)

        def forward(self, x):
            return self.b(torch.renorm(self.a(x), 2, 1, 5.0))  # an op no rule knows

    report = graphprune.analyze(Renormed().eval(), X, capture="export")
    group = group_of(report, "a.weight", 0)
    assert not group.prunable and any("renorm" in r and r.kind is BlockKind.NO_RULE for r in group.blocked)


def test_a_group_that_breaks_the_forward_is_found_by_bisection():
    x = torch.randn(2, 6, 8)
    model = StreamSizedHeads().eval()
    report = graphprune.analyze(model, x)
    query = group_of(report, "q.weight", 0)
    assert report.graph.graph["front_end"] == "export" and query.prunable  # the literal matched head_dim
    graphprune.prune(model, 0.5, x, report=report)
    assert [r.kind for r in query.blocked] == [BlockKind.AUDIT]
    assert model.q.out_features == 32 and model.head_dim == 8  # left whole, and its attribute with it
    assert model.mlp[0].out_features == 32 and model(x).shape == (2, 6, 32)  # the MLP was pruned all the same


class LiteralChannels(nn.Module):
    """``view(1, 8, -1)`` with the channel count written as a number: once channels are gone
    it regroups the values and the forward fails. torch.export records ``x.size(1)`` the same
    way, so the size is taken to follow, which only the audit can confirm."""

    def __init__(self):
        super().__init__()
        self.a, self.c = nn.Conv2d(3, 8, 1), nn.Linear(8, 5)
        self.b, self.d = nn.Conv2d(3, 6, 1), nn.Conv2d(6, 2, 1)

    def forward(self, x):
        if x.shape[-1] > 64:
            x = x[..., :64]
        return self.c(self.a(x).view(1, 8, -1).mean(-1)), self.d(self.b(x).relu())


def test_a_literal_size_under_export_is_an_assumption_the_audit_checks():
    report = graphprune.analyze(LiteralChannels().eval(), X)
    a = group_of(report, "a.weight", 0)
    assert a.prunable and a.assumptions and "torch.export recorded the size 8" in a.assumptions[0]
    assert not group_of(graphprune.analyze(LiteralChannels().eval(), X, capture="fx"), "a.weight", 0).prunable

    model = LiteralChannels().eval()
    report = graphprune.analyze(model, X)
    graphprune.prune(model, 0.5, report=report)
    assert model.a.out_channels == 8 and group_of(report, "a.weight", 0).blocked[0].kind is BlockKind.AUDIT
    assert model.b.out_channels == 3  # the rest is pruned

    model = LiteralChannels().eval()
    report = graphprune.analyze(model, X)
    graphprune.prune(model, 0.5, report=report, verify=False)  # nothing would check the size: not pruned
    assert model.a.out_channels == 8 and model.b.out_channels == 3
    assert "verify=False" in group_of(report, "a.weight", 0).blocked[0]


class _Wrapped(nn.Module):
    """StreamSizedHeads' attention inside a submodule, beside a second, sound block."""

    def __init__(self):
        super().__init__()
        self.attn, self.other = StreamSizedHeads(), nn.Sequential(nn.Linear(32, 48), nn.ReLU(), nn.Linear(48, 32))

    def forward(self, x):
        y = self.attn(x)
        return y + self.other(y)


def test_the_audit_names_the_module_torch_export_failed_in():
    x = torch.randn(2, 6, 8)
    model = _Wrapped().eval()
    report = graphprune.analyze(model, x)
    graphprune.prune(model, 0.5, report=report)
    query = group_of(report, "attn.q.weight", 0)
    assert query.blocked[0].kind is BlockKind.AUDIT and "at module 'attn'" in query.blocked[0]
    assert model.other[0].out_features == 24 and model.attn.mlp[0].out_features == 32


class _AntialiasedResize(nn.Module):
    """A position embedding resized with ``antialias=True`` (timm's ``resample_abs_pos_embed``):
    torch.export records ``aten._upsample_bicubic2d_aa``, which resamples the spatial dims only."""

    def __init__(self):
        super().__init__()
        self.pos = nn.Parameter(torch.randn(1, 8, 4, 4))
        self.a, self.b = nn.Conv2d(3, 8, 1), nn.Conv2d(8, 4, 1)

    def forward(self, x):
        pos = F.interpolate(self.pos, size=x.shape[-2:], mode="bicubic", antialias=True)
        return self.b(self.a(x) + pos)


def test_antialiased_resampling_keeps_the_channels_under_export():
    report = graphprune.analyze(_AntialiasedResize().eval(), X, capture="export")
    group = group_of(report, "a.weight", 0)
    assert group.prunable and ("pos", 1, "param") in {(m.name, m.dim, m.role) for m in group.members}
    summary = dead_channel_oracle(_AntialiasedResize().eval(), X, capture="export")
    assert summary["groups_tested"] >= 1 and summary["params_after"] < summary["params_before"]


class _LiteralBlock(nn.Module):
    """A view with the channel count written as a number, which fails once channels are gone."""

    def __init__(self):
        super().__init__()
        self.a, self.c = nn.Conv2d(3, 8, 1), nn.Linear(8, 5)

    def forward(self, x):
        return self.c(self.a(x).view(x.shape[0], 8, x.shape[2] * x.shape[3]).mean(-1))


class _TwoLiteralBlocks(nn.Module):
    def __init__(self):
        super().__init__()
        self.first, self.second = _LiteralBlock(), _LiteralBlock()
        self.b, self.d = nn.Conv2d(3, 6, 1), nn.Conv2d(6, 2, 1)

    def forward(self, x):
        return self.first(x) + self.second(x), self.d(self.b(x).relu())


def test_a_failed_assumption_blocks_the_groups_of_the_same_code_with_it(monkeypatch):
    model = _TwoLiteralBlocks().eval()
    report = graphprune.analyze(model, X, capture="export")
    sites = {a.site for b in ("first", "second") for a in group_of(report, f"{b}.a.weight", 0).assumptions}
    assert len(sites) == 1 and "test_export_capture.py:" in sites.pop()
    captures = []
    retraced = audit_module._retraced
    monkeypatch.setattr(audit_module, "_retraced", lambda *a, **k: captures.append(1) or retraced(*a, **k))
    graphprune.prune(model, 0.5, report=report)
    reasons = [group_of(report, f"{b}.a.weight", 0).blocked for b in ("first", "second")]
    assert all(r and r[0].kind is BlockKind.AUDIT for r in reasons)
    assert len(captures) == 2  # the failing audit blames both at the line it failed at; then the audit that passes
    assert model.first.a.out_channels == model.second.a.out_channels == 8 and model.b.out_channels == 3


class _State:
    """State a model hands back beside its result (as a Hugging Face KV cache), of a type
    torch.export cannot flatten."""

    def __init__(self, tensor):
        self.tensor = tensor


class _WithState(nn.Module):
    def __init__(self):
        super().__init__()
        self.a, self.b = nn.Conv2d(3, 8, 1), nn.Conv2d(8, 2, 1)

    def forward(self, x):
        y = self.a(x)
        if x.shape[-1] > 64:  # torch.fx cannot trace this: torch.export is used
            y = y[..., :64]
        return self.b(y), _State(y)


def test_an_output_torch_export_cannot_flatten_is_left_out_in_one_capture(monkeypatch):
    import torch.utils._pytree as pytree

    exports, export = [], torch.export.export
    monkeypatch.setattr(torch.export, "export", lambda *a, **k: exports.append(1) or export(*a, **k))
    report = graphprune.analyze(_WithState().eval(), X)
    assert report.session.analysis.front_end == "export" and f"{__name__}._State" in str(report)
    assert len(exports) == 1  # left out as the forward returns it, not after a failed capture
    assert group_of(report, "a.weight", 0).prunable  # the state's tensor is no output of fixed shape
    assert _State not in pytree.SUPPORTED_NODES  # its registration was taken back
    model = _WithState().eval()
    graphprune.prune(model, 0.5, X)
    assert model.a.out_channels == 4 and model(X)[1].tensor.shape[1] == 4


def test_an_export_capture_is_audited_on_placeholders_before_any_value_is_copied(monkeypatch):
    from graphprune.pruning import surgery

    commits, commit = [], surgery._Transaction.commit
    monkeypatch.setattr(surgery._Transaction, "commit", lambda self, release=True: commits.append(release) or commit(self, release))
    model = _WithState().eval()
    report = graphprune.analyze(model, X)
    assert report.session.analysis.state.graph.graph["recorded_on_meta"]  # fake tensors: no value was read
    graphprune.prune(model, 0.5, report=report)
    assert commits == [True]  # the audit passed on the placeholders; the values were copied once, at the end
    assert model.a.out_channels == 4
