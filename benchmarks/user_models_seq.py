"""The sequence, recurrent and attention models of the user-model sweep (user_models.py)."""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from long_tail import Case

VOCAB = 50


def ids(b: int = 2, t: int = 12) -> torch.Tensor:
    return torch.randint(1, VOCAB, (b, t), generator=torch.Generator().manual_seed(2))


def seq(b: int = 2, t: int = 10, d: int = 32) -> torch.Tensor:
    return torch.randn(b, t, d, generator=torch.Generator().manual_seed(3))


class LSTMLM(nn.Module):
    def __init__(self, dim: int = 32):
        super().__init__()
        self.embed, self.lstm = nn.Embedding(VOCAB, dim), nn.LSTM(dim, 48, num_layers=2, batch_first=True)
        self.lm_head = nn.Linear(48, VOCAB)

    def forward(self, tokens):
        out, _ = self.lstm(self.embed(tokens))
        return self.lm_head(out)


class BiGRUClassifier(nn.Module):
    def __init__(self):
        super().__init__()
        self.embed, self.gru = nn.Embedding(VOCAB, 32), nn.GRU(32, 24, batch_first=True, bidirectional=True)
        self.fc = nn.Linear(48, 3)

    def forward(self, tokens):
        out, h = self.gru(self.embed(tokens))
        return self.fc(torch.cat([h[-2], h[-1]], -1) + out.mean(1))


class CRNN(nn.Module):
    def __init__(self):
        super().__init__()
        self.cnn = nn.Sequential(nn.Conv2d(1, 16, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
                                 nn.Conv2d(16, 32, 3, padding=1), nn.ReLU(), nn.MaxPool2d((2, 1)))
        self.rnn, self.out = nn.LSTM(32 * 4, 32, bidirectional=True, batch_first=True), nn.Linear(64, 20)

    def forward(self, image):
        f = self.cnn(image)
        b, c, h, w = f.shape
        out, _ = self.rnn(f.permute(0, 3, 1, 2).reshape(b, w, c * h))
        return self.out(out).log_softmax(-1)


class EncoderClassifier(nn.Module):
    def __init__(self, norm_first: bool):
        super().__init__()
        layer = nn.TransformerEncoderLayer(32, 4, 64, dropout=0.0, batch_first=True, norm_first=norm_first)
        self.encoder = nn.TransformerEncoder(layer, 2, enable_nested_tensor=False)
        self.fc = nn.Linear(32, 4)

    def forward(self, x):
        return self.fc(self.encoder(x).mean(1))


class Seq2Seq(nn.Module):
    def __init__(self):
        super().__init__()
        self.src, self.tgt = nn.Embedding(VOCAB, 32), nn.Embedding(VOCAB, 32)
        self.transformer = nn.Transformer(32, 4, 2, 2, 64, dropout=0.0, batch_first=True)
        self.generator = nn.Linear(32, VOCAB)

    def forward(self, src, tgt):
        mask = self.transformer.generate_square_subsequent_mask(tgt.shape[1])
        return self.generator(self.transformer(self.src(src), self.tgt(tgt), tgt_mask=mask))


class CrossAttention(nn.Module):
    def __init__(self):
        super().__init__()
        self.q, self.kv_proj = nn.Linear(16, 32), nn.Linear(8, 24)
        self.attn = nn.MultiheadAttention(32, 4, kdim=24, vdim=24, batch_first=True)
        self.fc = nn.Linear(32, 6)

    def forward(self, query, memory):
        m = self.kv_proj(memory)
        out, _ = self.attn(self.q(query), m, m)
        return self.fc(out)


class EinsumAttention(nn.Module):
    def __init__(self, dim: int = 32, heads: int = 4):
        super().__init__()
        self.heads, self.to_qkv, self.to_out = heads, nn.Linear(dim, 3 * dim, bias=False), nn.Linear(dim, dim)
        self.fc = nn.Linear(dim, 5)

    def forward(self, x):
        b, n, _ = x.shape
        q, k, v = (t.reshape(b, n, self.heads, -1).transpose(1, 2) for t in self.to_qkv(x).chunk(3, dim=-1))
        attn = torch.einsum("bhid,bhjd->bhij", q, k).mul(q.shape[-1] ** -0.5).softmax(-1)
        out = torch.einsum("bhij,bhjd->bhid", attn, v).transpose(1, 2).reshape(b, n, -1)
        return self.fc(self.to_out(out) + x)


class MaskedAttention(nn.Module):
    """Hand-written causal attention with ``masked_fill`` and a padding mask."""

    def __init__(self, dim: int = 32, heads: int = 4):
        super().__init__()
        self.embed, self.heads = nn.Embedding(VOCAB, dim), heads
        self.q, self.k, self.v, self.o = (nn.Linear(dim, dim) for _ in range(4))
        self.register_buffer("causal", torch.tril(torch.ones(12, 12, dtype=torch.bool)), persistent=False)
        self.lm = nn.Linear(dim, VOCAB)

    def forward(self, tokens):
        x = self.embed(tokens)
        b, n, d = x.shape
        q, k, v = (p(x).view(b, n, self.heads, d // self.heads).transpose(1, 2) for p in (self.q, self.k, self.v))
        scores = q @ k.transpose(-2, -1) / math.sqrt(d // self.heads)
        scores = scores.masked_fill(~self.causal[:n, :n], float("-inf"))
        scores = scores.masked_fill((tokens == 0)[:, None, None, :], -1e4)
        out = (scores.softmax(-1) @ v).transpose(1, 2).reshape(b, n, d)
        return self.lm(x + self.o(out))


class GatherPool(nn.Module):
    """Tokens picked with ``index_select`` and ``gather`` (pooling at given positions)."""

    def __init__(self):
        super().__init__()
        self.embed, self.mix, self.fc = nn.Embedding(VOCAB, 32), nn.Linear(32, 48), nn.Linear(96, 3)
        self.register_buffer("picks", torch.tensor([0, 3, 7]))

    def forward(self, tokens):
        h = F.gelu(self.mix(self.embed(tokens)))
        first = h.index_select(1, self.picks).mean(1)
        best = tokens.argmax(1)[:, None, None].expand(-1, 1, h.shape[-1])
        return self.fc(torch.cat([first, torch.gather(h, 1, best).squeeze(1)], -1))


class CLIPText(nn.Module):
    """CLIP-style text tower: the end-of-text token (the largest id) is pooled and projected."""

    def __init__(self, dim: int = 32):
        super().__init__()
        self.token, self.pos = nn.Embedding(VOCAB, dim), nn.Parameter(torch.randn(12, dim) * 0.02)
        self.layer = nn.TransformerEncoderLayer(dim, 4, 64, dropout=0.0, batch_first=True, norm_first=True)
        self.ln_final, self.text_projection = nn.LayerNorm(dim), nn.Parameter(torch.randn(dim, 16) * dim ** -0.5)

    def forward(self, text):
        x = self.ln_final(self.layer(self.token(text) + self.pos))
        return x[torch.arange(x.shape[0]), text.argmax(dim=-1)] @ self.text_projection


class TopKMoE(nn.Module):
    """A hand-written top-2 mixture of experts, routed with ``index_add_``."""

    def __init__(self, dim: int = 32, experts: int = 4):
        super().__init__()
        self.router = nn.Linear(dim, experts, bias=False)
        self.experts = nn.ModuleList(nn.Sequential(nn.Linear(dim, 64), nn.GELU(), nn.Linear(64, dim))
                                     for _ in range(experts))
        self.head = nn.Linear(dim, 5)

    def forward(self, x):
        tokens = x.reshape(-1, x.shape[-1])
        weights, chosen = self.router(tokens).softmax(-1).topk(2, dim=-1)
        out = torch.zeros_like(tokens)
        for e, expert in enumerate(self.experts):
            rows, slot = torch.where(chosen == e)
            out = out.index_add(0, rows, expert(tokens[rows]) * weights[rows, slot, None])
        return self.head(out.view_as(x) + x)


class GLUMLP(nn.Module):
    def __init__(self, dim: int = 32):
        super().__init__()
        self.gate_up, self.down = nn.Linear(dim, 128), nn.Linear(64, dim)
        self.glu_in, self.glu_out, self.fc = nn.Linear(dim, 96), nn.Linear(48, dim), nn.Linear(dim, 4)

    def forward(self, x):
        gate, up = self.gate_up(x).chunk(2, dim=-1)
        x = x + self.down(F.silu(gate) * up)
        return self.fc(x + self.glu_out(F.glu(self.glu_in(x), dim=-1)))


class TensorSplit(nn.Module):
    def __init__(self):
        super().__init__()
        self.proj, self.a, self.b = nn.Linear(32, 48), nn.Linear(16, 8), nn.Linear(32, 8)
        self.conv, self.fc = nn.Conv2d(3, 24, 3, padding=1), nn.Linear(8 + 8 + 16, 3)

    def forward(self, x, image):
        p, q, r = torch.tensor_split(self.proj(x).mean(1), (16, 32), dim=-1)
        parts = torch.tensor_split(self.conv(image), 3, dim=1)
        pooled = (parts[0] * parts[1] + parts[2]).mean((2, 3))
        return self.fc(torch.cat([self.a(p), self.b(torch.cat([q, r], -1)), pooled[:, :8].repeat(1, 2)], -1))


class CosineHead(nn.Module):
    def __init__(self):
        super().__init__()
        self.backbone = nn.Sequential(nn.Linear(32, 64), nn.ReLU(), nn.Linear(64, 48))
        self.weight, self.scale = nn.Parameter(torch.randn(10, 48)), 16.0

    def forward(self, x):
        return self.scale * F.normalize(self.backbone(x), dim=-1) @ F.normalize(self.weight, dim=-1).T


class RoPEAttention(nn.Module):
    """Llama-style rotary embedding through ``view_as_complex``."""

    def __init__(self, dim: int = 32, heads: int = 4, length: int = 10):
        super().__init__()
        self.heads, self.wq, self.wk, self.wv = heads, nn.Linear(dim, dim), nn.Linear(dim, dim), nn.Linear(dim, dim)
        self.wo, self.fc = nn.Linear(dim, dim), nn.Linear(dim, 3)
        half = dim // heads // 2
        angles = torch.outer(torch.arange(length).float(), 1.0 / 10000 ** (torch.arange(half).float() / half))
        self.register_buffer("freqs_cis", torch.polar(torch.ones_like(angles), angles), persistent=False)

    def rotate(self, t):
        c = torch.view_as_complex(t.float().reshape(*t.shape[:-1], -1, 2))
        return torch.view_as_real(c * self.freqs_cis[None, :, None, :]).flatten(3).type_as(t)

    def forward(self, x):
        b, n, d = x.shape
        q, k, v = (w(x).view(b, n, self.heads, -1) for w in (self.wq, self.wk, self.wv))
        q, k = self.rotate(q), self.rotate(k)
        out = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), is_causal=True)
        return self.fc(self.wo(out.transpose(1, 2).reshape(b, n, d)))


class WhereOneArg(nn.Module):
    """``torch.where(cond)`` with one argument: the tokens kept are found at run time."""

    def __init__(self):
        super().__init__()
        self.embed, self.proj, self.fc = nn.Embedding(VOCAB, 32), nn.Linear(32, 40), nn.Linear(40, 2)

    def forward(self, tokens):
        h = self.proj(self.embed(tokens))
        batch, position = torch.where(tokens > 0)
        pooled = torch.zeros(tokens.shape[0], h.shape[-1]).index_add(0, batch, h[batch, position])
        return self.fc(pooled)


class GRUCellLoop(nn.Module):
    def __init__(self):
        super().__init__()
        self.inp, self.cell, self.out = nn.Linear(8, 24), nn.GRUCell(24, 32), nn.Linear(32, 8)

    def forward(self, x):
        h = x.new_zeros(x.shape[0], 32)
        outs = []
        for t in range(x.shape[1]):
            h = self.cell(F.relu(self.inp(x[:, t])), h)
            outs.append(self.out(h))
        return torch.stack(outs, 1)


class BagOfWords(nn.Module):
    def __init__(self):
        super().__init__()
        self.bag, self.hidden = nn.EmbeddingBag(VOCAB, 32, mode="mean"), nn.Linear(32, 64)
        self.fc = nn.Linear(64, 4)

    def forward(self, tokens):
        return self.fc(F.relu(self.hidden(self.bag(tokens))))


class TinyViT(nn.Module):
    """A hand-written ViT: cls token concatenated, position embedding added, fused qkv."""

    def __init__(self, dim: int = 32, heads: int = 4):
        super().__init__()
        self.patch, self.heads = nn.Conv2d(3, dim, 8, 8), heads
        self.cls_token, self.pos = nn.Parameter(torch.zeros(1, 1, dim)), nn.Parameter(torch.randn(1, 17, dim) * 0.02)
        self.norm1, self.qkv, self.proj = nn.LayerNorm(dim), nn.Linear(dim, 3 * dim), nn.Linear(dim, dim)
        self.norm2 = nn.LayerNorm(dim)
        self.mlp = nn.Sequential(nn.Linear(dim, 4 * dim), nn.GELU(), nn.Linear(4 * dim, dim))
        self.head = nn.Linear(dim, 10)

    def forward(self, x):
        x = self.patch(x).flatten(2).transpose(1, 2)
        x = torch.cat([self.cls_token.expand(x.shape[0], -1, -1), x], dim=1) + self.pos
        b, n, c = x.shape
        qkv = self.qkv(self.norm1(x)).reshape(b, n, 3, self.heads, c // self.heads).permute(2, 0, 3, 1, 4)
        attn = (qkv[0] @ qkv[1].transpose(-2, -1) * (c // self.heads) ** -0.5).softmax(-1)
        x = x + self.proj((attn @ qkv[2]).transpose(1, 2).reshape(b, n, c))
        x = x + self.mlp(self.norm2(x))
        return self.head(x[:, 0])


class LatentQueryPool(nn.Module):
    """Perceiver-style pooling: learned queries attend over the inputs (SDPA)."""

    def __init__(self, dim: int = 32):
        super().__init__()
        self.latents, self.kv = nn.Parameter(torch.randn(4, dim)), nn.Linear(dim, 2 * dim)
        self.q, self.fc = nn.Linear(dim, dim), nn.Linear(dim, 3)

    def forward(self, x):
        k, v = self.kv(x).chunk(2, -1)
        q = self.q(self.latents).expand(x.shape[0], -1, -1)
        return self.fc(F.scaled_dot_product_attention(q, k, v).mean(1))


class ProjectedLSTM(nn.Module):
    def __init__(self):
        super().__init__()
        self.inp, self.lstm = nn.Linear(16, 32), nn.LSTM(32, 48, proj_size=24, batch_first=True)
        self.fc = nn.Linear(24, 5)

    def forward(self, x):
        return self.fc(self.lstm(F.relu(self.inp(x)))[0][:, -1])


class Bilinear(nn.Module):
    """A weight read directly by a matmul (``x @ self.w``), then ``torch.bmm``."""

    def __init__(self):
        super().__init__()
        self.enc, self.w = nn.Linear(32, 40), nn.Parameter(torch.randn(40, 40) * 0.1)
        self.fc = nn.Linear(10, 2)

    def forward(self, x):
        h = torch.tanh(self.enc(x))
        scores = torch.bmm(h @ self.w, h.transpose(1, 2))
        return self.fc(scores)


SEQUENCE_CASES = [
    Case("lstm_lm", lambda: (LSTMLM().eval(), ids())),
    Case("bigru_classifier", lambda: (BiGRUClassifier().eval(), ids())),
    Case("crnn", lambda: (CRNN().eval(), torch.randn(2, 1, 16, 24))),
    Case("tx_encoder_post_norm", lambda: (EncoderClassifier(False).eval(), seq())),
    Case("tx_encoder_pre_norm", lambda: (EncoderClassifier(True).eval(), seq())),
    Case("nn_transformer_seq2seq", lambda: (Seq2Seq().eval(), (ids(), ids(t=7)))),
    Case("mha_kdim_vdim", lambda: (CrossAttention().eval(), (seq(d=16), seq(t=6, d=8)))),
    Case("einsum_attention", lambda: (EinsumAttention().eval(), seq())),
    Case("masked_fill_attention", lambda: (MaskedAttention().eval(), ids())),
    Case("gather_index_select", lambda: (GatherPool().eval(), ids())),
    Case("clip_eot_pool", lambda: (CLIPText().eval(), ids())),
    Case("topk_moe_index_add", lambda: (TopKMoE().eval(), seq())),
    Case("glu_mlp", lambda: (GLUMLP().eval(), seq())),
    Case("tensor_split", lambda: (TensorSplit().eval(), (seq(), torch.randn(2, 3, 8, 8)))),
    Case("cosine_head", lambda: (CosineHead().eval(), torch.randn(4, 32)), head=("backbone.2",)),
    Case("complex_rope", lambda: (RoPEAttention().eval(), seq())),
    Case("where_one_arg", lambda: (WhereOneArg().eval(), ids())),
    Case("grucell_loop", lambda: (GRUCellLoop().eval(), torch.randn(2, 5, 8))),
    Case("embedding_bag", lambda: (BagOfWords().eval(), ids())),
    Case("tiny_vit", lambda: (TinyViT().eval(), torch.randn(2, 3, 32, 32))),
    Case("latent_query_sdpa", lambda: (LatentQueryPool().eval(), seq())),
    Case("lstm_proj_size", lambda: (ProjectedLSTM().eval(), seq(d=16))),
    Case("bilinear_bmm", lambda: (Bilinear().eval(), seq())),
]
