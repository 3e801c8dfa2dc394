"""How the shape audit finds the groups to blame when a pruned model no longer runs, and
what that costs: torch.export records a size read off a shape as a number, so a size taken
from another group's tensor (``B, C, H, W = x.shape`` in an attention block) is invisible
to the analysis; the audit finds it, names the module it fails in (through the proxies
torch.export calls modules by), and bisects among the groups reaching it with plain forward
runs, not captures."""
from __future__ import annotations

import torch
from conftest import group_of
from torch import nn

import graphprune
import graphprune.pruning.audit as audit_module
from graphprune.analysis.reasons import BlockKind

X = torch.randn(1, 3, 4, 4, generator=torch.Generator().manual_seed(0))


class _Attention(nn.Module):
    """Ultralytics' position-sensitive attention, reduced: its output is viewed back to the
    channel count of its input, read off the input's shape."""

    def __init__(self, dim: int, heads: int = 2):
        super().__init__()
        self.heads, self.head_dim = heads, dim // heads
        self.key_dim = self.head_dim // 2
        self.qkv = nn.Conv2d(dim, dim + 2 * self.key_dim * heads, 1)
        self.proj = nn.Conv2d(dim, dim, 1)
        self.mix = nn.Sequential(nn.Conv2d(dim, 8, 1), nn.ReLU(), nn.Conv2d(8, dim, 1))  # a group of its own

    def forward(self, x):
        x = x + self.mix(x)
        b, c, h, w = x.shape
        q, k, v = self.qkv(x).view(b, self.heads, 2 * self.key_dim + self.head_dim, h * w).split(
            [self.key_dim, self.key_dim, self.head_dim], dim=2)
        attention = (q.transpose(-2, -1) @ k).softmax(dim=-1)
        return self.proj((v @ attention.transpose(-2, -1)).view(b, c, h, w))


class _Block(nn.Module):
    def __init__(self):
        super().__init__()
        self.attn = _Attention(16)

    def forward(self, x):
        return self.attn(x).relu()


class _Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.a, self.blocks = nn.Conv2d(3, 16, 1), nn.Sequential(_Block())
        self.b, self.c = nn.Conv2d(16, 6, 1), nn.Conv2d(6, 2, 1)

    def forward(self, x):
        y = self.blocks(self.a(x))  # torch.export calls the block's attention through a proxy of it
        return y + self.c(self.b(y).relu()).sum(1, keepdim=True)


def test_a_size_read_off_another_groups_shape_is_blamed_without_bisecting_by_captures(monkeypatch):
    torch.manual_seed(0)
    model = _Net().eval()
    report = graphprune.analyze(model, X, capture="export")
    assert group_of(report, "a.weight", 0).prunable  # export wrote the size 16 down as a number
    failures, captures, retraced = [], [], audit_module._retraced

    def counted(*args, **kwargs):
        captures.append(1)
        try:
            return retraced(*args, **kwargs)
        except audit_module.AuditError as exc:
            failures.append(exc)
            raise

    monkeypatch.setattr(audit_module, "_retraced", counted)
    graphprune.prune(model, 0.5, X, report=report)
    assert failures[0].module == "blocks.0.attn" and not failures[0].runs  # found through torch.export's module proxies
    assert len(captures) == 2  # the audit that fails and the one that passes; the blame runs the model
    blocked = group_of(report, "a.weight", 0).blocked
    assert blocked and blocked[0].kind is BlockKind.AUDIT and "no longer runs" in str(blocked[0])
    assert model.a.out_channels == 16 and model.b.out_channels == 3 and model.blocks[0].attn.mix[0].out_channels == 4
    assert model(X).shape == (1, 16, 4, 4)


def test_the_failing_module_is_found_through_a_proxy_that_shares_its_attributes():
    # torch.export (make_fx's module-stack tracer) calls submodules through proxies of another
    # class that share the module's attribute dict; the failing module is the real one's name
    model = _Net().eval()
    attention = model.blocks[0].attn
    proxy_class = type("AttrProxy", (type(attention),), {})
    proxy = proxy_class.__new__(proxy_class)
    proxy.__dict__ = attention.__dict__
    attention.qkv = nn.Conv2d(16, 24, 1)  # no longer the size its view expects
    try:
        proxy(torch.randn(1, 16, 4, 4))
    except RuntimeError as exc:
        error = exc
    wrapped = RuntimeError("captured")
    wrapped.__cause__ = error
    assert audit_module._failing_module(model, wrapped) == "blocks.0.attn"
