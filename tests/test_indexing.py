"""Ops that index ONE dimension by positions computed at run time (gather, index_select,
advanced indexing and its writes, nonzero / one-argument where, topk / sort / argmax,
scatter / index_add / index_copy, grouped products): the dimension indexed blocks, and the
channel dims they only pass through stay prunable. Each rule is proven by the dead-channel
oracle under torch.fx and torch.export where the op appears under both."""
from __future__ import annotations

import warnings

import pytest
import torch
import torch.nn.functional as F
from conftest import group_of
from oracle import dead_channel_oracle
from torch import nn

import graphprune
from graphprune.analysis.reasons import BlockKind

CAPTURES = ["fx", "export"]
TOKENS = torch.randn(2, 5, 4, generator=torch.Generator().manual_seed(0))


class _Through(nn.Module):
    """``b(op(a(x)))``: ``a``'s 8 channels pass through ``op`` (which indexes tokens) to ``b``; an
    op that writes ``a``'s values writes them into ``c``'s, whose channels become ``a``'s."""

    def __init__(self, op: str):
        super().__init__()
        self.op, self.a, self.b, self.c = op, nn.Linear(4, 8), nn.Linear(8, 3), nn.Linear(4, 8)
        self.register_buffer("pos", torch.tensor([3, 0, 4, 1, 2]))

    def forward(self, x):
        y = self.a(x)  # (batch, tokens, channels)
        if self.op == "gather":  # each channel's values reordered along the tokens
            y = torch.gather(y, 1, y.argsort(dim=1))
        elif self.op == "index_select":
            y = y.index_select(1, self.pos[:3])
        elif self.op == "arange_argmax":  # open_clip's end-of-text pooling
            y = y[torch.arange(y.shape[0]), x.sum(-1).argmax(dim=-1)]
        elif self.op == "index_tensor":
            y = y[:, self.pos[:2]]
        elif self.op == "topk":
            y = y.topk(2, dim=1).values
        elif self.op == "sort":
            y = torch.sort(y, dim=1, descending=True)[0]
        elif self.op == "index_add":
            y = self.c(x).index_add_(1, self.pos, y)
        elif self.op == "index_copy":
            y = self.c(x).index_copy(1, self.pos, y)
        elif self.op == "scatter_add":
            y = self.c(x).scatter_add(1, y.argsort(dim=1), y)
        elif self.op == "index_put":  # two index tensors broadcast to (batch, tokens)
            y = self.c(x).index_put_((torch.arange(y.shape[0])[:, None], self.pos), y)
        elif self.op == "setitem":  # torch.fx cannot trace it; torch.export records aten.index_put_
            z = torch.zeros_like(y)
            z[:, self.pos] = y
            y = z
        return self.b(y)


@pytest.mark.parametrize("op, capture", [
    (op, capture) for op in ["gather", "index_select", "arange_argmax", "index_tensor", "topk", "sort", "index_add",
                             "index_copy", "scatter_add", "index_put", "setitem"]
    for capture in CAPTURES if (op, capture) != ("setitem", "fx")])
def test_channels_pass_through_an_op_that_indexes_tokens(op, capture):
    report = graphprune.analyze(_Through(op).eval(), TOKENS, capture=capture)
    group = group_of(report, "a.weight", 0)
    assert group.prunable and group.exact and "b" in group.layers(), group.status
    summary = dead_channel_oracle(_Through(op).eval(), TOKENS, capture=capture)
    assert summary["groups_tested"] == 1 and summary["params_after"] < summary["params_before"]


class _OnChannels(nn.Module):
    """``op`` indexes the channel dim itself: its positions are data, so the channels block."""

    def __init__(self, op: str):
        super().__init__()
        self.op, self.a, self.b = op, nn.Linear(4, 8), nn.Linear(2, 3)
        self.register_buffer("cols", torch.tensor([6, 1]))

    def forward(self, x):
        y = self.a(x)
        if self.op == "gather":
            return self.b(torch.gather(y, 2, self.cols.expand(2, 5, 2)))
        if self.op == "topk":
            return self.b(y.topk(2, dim=-1).values)
        if self.op == "index":
            return self.b(y[..., self.cols])
        return y.argmax(-1).float()  # argmax


@pytest.mark.parametrize("capture", CAPTURES)
@pytest.mark.parametrize("op, words", [("gather", "gathers along"), ("topk", "orders this dimension"),
                                       ("index", "indexes this dimension"), ("argmax", "returns a position")])
def test_an_op_that_indexes_the_channels_blocks_them_with_a_reason(op, words, capture):
    group = group_of(graphprune.analyze(_OnChannels(op).eval(), TOKENS, capture=capture), "a.weight", 0)
    assert not group.prunable and group.blocked[0].kind is BlockKind.COLLAPSED and words in group.blocked[0]


class _Placed(nn.Module):
    """Two index tensors on a (channels, h, batch, w) view: separated by a slice, their dims
    come first (n, channels, batch); adjacent (on (batch, channels, h, w)), they replace the
    dims they index in place (batch, channels, n). The channel dim must be found in both."""

    def __init__(self, adjacent: bool):
        super().__init__()
        self.adjacent, self.conv, self.head = adjacent, nn.Conv2d(3, 8, 1), nn.Linear(8, 2)
        self.register_buffer("rows", torch.tensor([0, 2, 3]))
        self.register_buffer("cols", torch.tensor([1, 1, 0]))

    def forward(self, x):
        y = self.conv(x)  # (batch, channels, h, w)
        if self.adjacent:
            return self.head(y[:, :, self.rows, self.cols].transpose(1, 2))  # (batch, n, channels)
        return self.head(y.permute(1, 2, 0, 3)[:, self.rows, :, self.cols].transpose(1, 2))  # (n, batch, channels)


@pytest.mark.parametrize("capture", CAPTURES)
@pytest.mark.parametrize("adjacent", [True, False])
def test_index_tensors_place_their_dims_as_torch_does(adjacent, capture):
    images = torch.randn(2, 3, 4, 4)
    group = group_of(graphprune.analyze(_Placed(adjacent).eval(), images, capture=capture), "conv.weight", 0)
    assert group.prunable and "head" in group.layers(), group.status
    assert dead_channel_oracle(_Placed(adjacent).eval(), images, capture=capture)["groups_tested"] == 1


class _Router(nn.Module):
    """A hand-written top-k mixture of experts (Mixtral's eager loop): router logits, softmax,
    topk; for each expert, ``torch.where`` of its mask gives the tokens it takes, ``x[top]``
    picks them, the routing weight is ``weights[top, idx, None]`` and ``index_add_`` adds the
    expert's output back. The residual width and each expert's hidden width prune."""

    def __init__(self, dim: int = 8, hidden: int = 12, experts: int = 3, top_k: int = 2):
        super().__init__()
        self.top_k, self.num_experts = top_k, experts
        self.up, self.gate, self.head = nn.Linear(4, dim), nn.Linear(dim, experts, bias=False), nn.Linear(dim, 3)
        self.experts = nn.ModuleList(nn.Sequential(nn.Linear(dim, hidden), nn.SiLU(), nn.Linear(hidden, dim))
                                     for _ in range(experts))

    def forward(self, x):
        h = self.up(x)
        flat = h.view(-1, h.shape[-1])
        weights, chosen = torch.topk(self.gate(flat).softmax(-1), self.top_k, dim=-1)
        mask = F.one_hot(chosen, self.num_experts).permute(2, 1, 0)  # (experts, top_k, tokens)
        out = torch.zeros_like(flat)
        for e, expert in enumerate(self.experts):
            idx, top = torch.where(mask[e])
            out.index_add_(0, top, expert(flat[top]) * weights[top, idx, None])
        return self.head(out.view(h.shape) + h)


def test_a_top_k_router_keeps_the_residual_and_the_experts_prunable():
    x = torch.randn(2, 6, 4, generator=torch.Generator().manual_seed(1))
    report = graphprune.analyze(_Router().eval(), x, capture="fx")  # torch.where has a data-dependent size
    residual = group_of(report, "up.weight", 0)
    assert residual.prunable and {"gate", "head", "experts.0.0", "experts.2.2"} <= set(residual.layers())
    assert all(group_of(report, f"experts.{e}.0.weight", 0).prunable for e in range(3))
    assert not group_of(report, "gate.weight", 0).prunable  # the experts themselves: chosen by value
    assert not [r for g in report.groups for r in g.blocked if "failed" in r or r.kind is BlockKind.NO_RULE]
    summary = dead_channel_oracle(_Router().eval(), x, capture="fx")
    assert summary["groups_tested"] == 4 and summary["params_after"] < summary["params_before"]


class _Nonzero(nn.Module):
    def __init__(self):
        super().__init__()
        self.a, self.b = nn.Linear(4, 8), nn.Linear(8, 3)

    def forward(self, x):
        y = self.a(x)
        keep = torch.nonzero(x[..., 0] > 0, as_tuple=True)
        picked = self.b(y[keep]).sum(0) + self.b(y[torch.where(x[..., 1] > 0)]).sum(0)
        return picked + self.b(y[x[..., 2] > 0]).sum(0)  # a mask over (batch, tokens)


def test_nonzero_one_argument_where_and_masks_give_index_tensors():
    report = graphprune.analyze(_Nonzero().eval(), TOKENS, capture="fx")
    assert group_of(report, "a.weight", 0).prunable
    assert dead_channel_oracle(_Nonzero().eval(), TOKENS, capture="fx")["groups_tested"] == 1


def test_a_literal_list_index_blocks_only_the_dim_it_indexes():
    class Picked(nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.b = nn.Linear(4, 8), nn.Linear(8, 3)

        def forward(self, x):
            return self.b(self.a(x)[:, [0, 2, 2]])

    assert group_of(graphprune.analyze(Picked().eval(), TOKENS, capture="fx"), "a.weight", 0).prunable
    assert dead_channel_oracle(Picked().eval(), TOKENS, capture="fx")["groups_tested"] == 1


# ----- the experts of transformers' mixture-of-experts layers (torch.export records grouped products)
def _mixtral():
    transformers = pytest.importorskip("transformers")
    config = transformers.MixtralConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                        num_attention_heads=4, num_key_value_heads=2, num_local_experts=4,
                                        num_experts_per_tok=2, vocab_size=100)
    torch.manual_seed(0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return transformers.MixtralForCausalLM(config).eval()


@pytest.mark.filterwarnings("ignore::graphprune.ConfigWarning")  # head_dim pruned: the config cannot say it
def test_mixtral_experts_prune_their_hidden_width_and_the_residual_runs_through(monkeypatch):
    ids = {"input_ids": torch.randint(3, 100, (2, 12), generator=torch.Generator().manual_seed(0))}
    report = graphprune.analyze(_mixtral(), ids)
    experts = group_of(report, "model.layers.0.mlp.experts.gate_up_proj", 1)
    assert experts.prunable and experts.exact and experts.size == 8  # 2 x 64 rows tied in runs of 8 (the kernel)
    residual = group_of(report, "model.layers.0.mlp.experts.gate_up_proj", 2)
    assert residual.prunable and residual.size == 4 and "model.layers.1.mlp.gate" in residual.layers()
    assert not group_of(report, "model.layers.0.mlp.experts.down_proj", 0).prunable  # the experts, by offsets
    model = _mixtral()
    graphprune.prune(model, 0.3, ids)  # torch's grouped_mm kernel takes the pruned sizes in eager mode
    assert model(**ids).logits.shape == (2, 12, 100)
    assert model.model.layers[0].mlp.experts.gate_up_proj.shape[1] % 8 == 0
    # float64: the fallback (torch.mm per expert) that torch.export records, where torch's kernel takes no doubles
    monkeypatch.setattr("transformers.integrations.moe._can_use_grouped_mm", lambda *args: False)
    summary = dead_channel_oracle(_mixtral(), ids)
    assert summary["groups_tested"] >= 2 and summary["params_after"] < summary["params_before"]
