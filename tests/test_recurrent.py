"""Recurrent layers (nn.LSTM, nn.GRU, nn.RNN) prune: a hidden unit owns one row of every gate in
every layer and direction, hidden_size / proj_size keep one count, and the next layer reads
both directions concatenated. Under torch.fx the layer is a module, under torch.export the
aten.lstm / gru / rnn_* op inside it; both are checked with the dead-channel oracle."""
from __future__ import annotations

import pytest
import torch
from conftest import count_params, group_of, trained_and_reloaded
from oracle import dead_channel_oracle
from torch import nn

import graphprune
from graphprune.tracer import call_model
from graphprune.analysis import sizes
from graphprune.analysis.reasons import BlockKind


class _LanguageModel(nn.Module):
    """Embedding -> 2-layer LSTM -> linear over the vocabulary (sequence-first)."""

    def __init__(self, embed: int = 12, hidden: int = 16, vocab: int = 30):
        super().__init__()
        self.emb, self.rnn, self.head = nn.Embedding(vocab, embed), nn.LSTM(embed, hidden, 2), nn.Linear(hidden, vocab)

    def forward(self, tokens):
        out, _ = self.rnn(self.emb(tokens))
        return self.head(out)


class _GRUClassifier(nn.Module):
    """A bidirectional GRU (batch-first) whose last layer's two final states are classified."""

    def __init__(self):
        super().__init__()
        self.emb = nn.Embedding(30, 10)
        self.rnn = nn.GRU(10, 12, num_layers=2, bidirectional=True, batch_first=True)
        self.head = nn.Linear(24, 3)

    def forward(self, tokens):
        _, h = self.rnn(self.emb(tokens))
        return self.head(torch.cat((h[-2], h[-1]), dim=1))


class _CRNN(nn.Module):
    """Text recognition: conv features, columns read as a sequence by a 2-layer BiLSTM."""

    def __init__(self):
        super().__init__()
        self.features = nn.Sequential(nn.Conv2d(1, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(), nn.MaxPool2d(2),
                                      nn.Conv2d(8, 16, 3, padding=1), nn.ReLU(), nn.MaxPool2d((2, 1)))
        self.rnn = nn.LSTM(32, 12, num_layers=2, bidirectional=True)
        self.head = nn.Linear(24, 11)

    def forward(self, images):
        f = self.features(images)
        b, c, h, w = f.shape
        out, _ = self.rnn(f.view(b, c * h, w).permute(2, 0, 1))
        return self.head(out)


class _Projected(nn.Module):
    """A projected, bias-free, batch-first, bidirectional 2-layer LSTM; h_n and c_n are read too."""

    def __init__(self):
        super().__init__()
        self.inp = nn.Linear(5, 6)
        self.rnn = nn.LSTM(6, 10, num_layers=2, bidirectional=True, proj_size=4, batch_first=True, bias=False)
        self.head, self.state_head, self.cell_head = nn.Linear(8, 3), nn.Linear(4, 3), nn.Linear(10, 3)

    def forward(self, x):
        out, (h, c) = self.rnn(self.inp(x))
        return self.head(out[:, -1]) + self.state_head(h[-1]) + self.cell_head(c[0])


class _Seeded(nn.Module):
    """h0 and c0 given: computed from a context vector, one per layer."""

    def __init__(self, cell: str = "LSTM"):
        super().__init__()
        self.inp, self.init_h, self.init_c = nn.Linear(5, 6), nn.Linear(4, 8), nn.Linear(4, 8)
        self.rnn = getattr(nn, cell)(6, 8, num_layers=2)
        self.head = nn.Linear(8, 3)

    def forward(self, x, context):
        h0 = torch.tanh(self.init_h(context)).unsqueeze(0).repeat(2, 1, 1)
        if isinstance(self.rnn, nn.LSTM):
            out, _ = self.rnn(self.inp(x), (h0, self.init_c(context).unsqueeze(0).repeat(2, 1, 1)))
        else:
            out, _ = self.rnn(self.inp(x), h0)
        return self.head(out)


class _Elman(nn.Module):
    """nn.RNN (tanh or relu), on an unbatched sequence or a batch."""

    def __init__(self, nonlinearity: str = "tanh"):
        super().__init__()
        self.inp, self.rnn, self.head = nn.Linear(5, 6), nn.RNN(6, 8, 2, nonlinearity=nonlinearity), nn.Linear(8, 3)

    def forward(self, x):
        return self.head(self.rnn(self.inp(x))[0])


def _tokens(*shape):
    return torch.randint(0, 30, shape, generator=torch.Generator().manual_seed(0))


def _floats(*shape):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(0))


CASES = {
    "lstm_lm": (_LanguageModel, lambda: _tokens(6, 2)),
    "bigru_classifier": (_GRUClassifier, lambda: _tokens(2, 6)),
    "crnn": (_CRNN, lambda: _floats(2, 1, 8, 12)),
    "lstm_proj": (_Projected, lambda: _floats(2, 6, 5)),
    "lstm_h0_c0": (_Seeded, lambda: (_floats(6, 2, 5), _floats(2, 4))),
    "gru_h0": (lambda: _Seeded("GRU"), lambda: (_floats(6, 2, 5), _floats(2, 4))),
    "rnn_tanh": (_Elman, lambda: _floats(6, 2, 5)),
    "rnn_relu_unbatched": (lambda: _Elman("relu"), lambda: _floats(6, 5)),
}


@pytest.mark.parametrize("capture", ["fx", "export"])
@pytest.mark.parametrize("name", CASES)
def test_recurrent_layers_prune_exactly(name, capture):
    build, inputs = CASES[name]
    torch.manual_seed(0)
    report = graphprune.analyze(build().eval(), inputs(), capture=capture)
    hidden = group_of(report, "rnn.weight_hh_l0", 0)
    assert hidden.prunable and hidden.exact, hidden.blocked
    layers = 2 * (2 if build().rnn.bidirectional else 1)
    assert {m.name for m in hidden.members} >= {f"rnn.weight_ih_l{k}" for k in range(2)}
    assert sum(m.name.startswith("rnn.weight_hh") and m.dim == 0 for m in hidden.members) == layers
    summary = dead_channel_oracle(build(), inputs(), capture=capture, fraction=0.4)
    assert summary["groups_tested"] >= 2 and summary["params_after"] < summary["params_before"]
    if capture == "fx":  # stricter: only consumers zeroed (every channel here is read by weights)
        dead_channel_oracle(build(), inputs(), capture=capture, zero_producers=False, seed=1)


@pytest.mark.parametrize("ratio, capture", [(0.3, "fx"), (0.5, "export")])
@pytest.mark.parametrize("name", CASES)
def test_pruned_recurrent_models_run_train_and_round_trip(name, ratio, capture, tmp_path):
    build, inputs = CASES[name]
    torch.manual_seed(0)
    model, x = build().eval(), inputs()
    before, hidden, shape = count_params(model), model.rnn.hidden_size, call_model(model, x).shape
    graphprune.prune(model, ratio, x, capture=capture)
    rnn = model.rnn
    assert count_params(model) < before and rnn.hidden_size == hidden - int(ratio * hidden)
    assert rnn.weight_hh_l0.shape[1] == (rnn.proj_size or rnn.hidden_size)
    assert rnn.input_size == rnn.weight_ih_l0.shape[1]
    assert call_model(model, x).shape == shape
    fresh = trained_and_reloaded(model, build, x, rnn, tmp_path / f"{name}.safetensors")
    assert (fresh.rnn.hidden_size, fresh.rnn.proj_size, fresh.rnn.input_size) == (rnn.hidden_size, rnn.proj_size,
                                                                                   rnn.input_size)


def test_a_module_built_with_the_pruned_sizes_loads_the_state_dict(tmp_path):
    model, x = _LanguageModel().eval(), _tokens(6, 2)
    graphprune.prune(model, 0.5, x)
    assert model.rnn.hidden_size == 8 and model.emb.embedding_dim == 6
    torch.save(model.state_dict(), tmp_path / "lm.pt")
    rebuilt = _LanguageModel(embed=model.emb.embedding_dim, hidden=model.rnn.hidden_size).eval()
    rebuilt.load_state_dict(torch.load(tmp_path / "lm.pt"))
    torch.save(model, tmp_path / "whole.pt")  # pickled whole: the layer's weight list is rebuilt on load
    unpickled = torch.load(tmp_path / "whole.pt", weights_only=False)
    with torch.no_grad():
        assert torch.equal(rebuilt(x), model(x)) and torch.equal(unpickled(x), model(x))


def test_hidden_size_keeps_one_count_in_every_layer_and_direction():
    report = graphprune.analyze(_Projected().eval(), _floats(2, 6, 5), capture="fx")
    hidden, proj = group_of(report, "rnn.weight_hr_l0", 1), group_of(report, "rnn.weight_hr_l0", 0)
    assert hidden.size == 10 and proj.size == 4 and hidden is not proj
    readers = {f"rnn.weight_hr_l{k}{s}" for k in "01" for s in ("", "_reverse")}
    assert {m.name for m in hidden.members if m.dim == 1} >= readers
    # the four gates of a unit are four rows, the proj unit is read by both directions of layer 1
    rows = [m for m in hidden.members if m.name == "rnn.weight_ih_l1_reverse"][0]
    assert list(rows.index_map[::10]) == [rows.index_map[0]] * 4
    assert [m for m in proj.members if m.name == "rnn.weight_ih_l1"][0].index_map.size == 8


def test_an_initial_state_from_a_model_input_blocks_the_hidden_units():
    class _GivenState(nn.Module):
        def __init__(self):
            super().__init__()
            self.rnn, self.head = nn.GRU(4, 6), nn.Linear(6, 2)

        def forward(self, x, h0):
            return self.head(self.rnn(x, h0)[0])

    report = graphprune.analyze(_GivenState().eval(), (_floats(5, 2, 4), _floats(1, 2, 6)), capture="fx")
    hidden = group_of(report, "rnn.weight_hh_l0", 0)
    assert not hidden.prunable and hidden.blocked[0].kind is BlockKind.MODEL_INPUT


def test_a_packed_sequence_blocks_with_its_reason():
    class _Packed(nn.Module):
        def __init__(self):
            super().__init__()
            self.rnn = nn.LSTM(6, 8)

        def forward(self, packed):
            return self.rnn(packed)[1][0]

    packed = nn.utils.rnn.pack_padded_sequence(_floats(5, 2, 6), torch.tensor([5, 3]))
    report = graphprune.analyze(_Packed().eval(), (packed,), capture="fx")
    hidden = group_of(report, "rnn.weight_hh_l0", 0)
    assert not hidden.prunable and any("PackedSequence" in r for r in hidden.blocked)


def test_recurrent_layers_are_repacked_after_the_surgery_and_after_load(monkeypatch, tmp_path):
    repacked = []
    monkeypatch.setitem(sizes.RESIZED_HOOKS, nn.RNNBase, repacked.append)
    model, x = _LanguageModel().eval(), _tokens(6, 2)
    graphprune.prune(model, 0.5, x, capture="export")
    assert repacked == [model.rnn] and model.rnn.hidden_size == 8
    graphprune.save(model, tmp_path / "lm.safetensors")
    fresh = graphprune.load(_LanguageModel().eval(), tmp_path / "lm.safetensors")
    assert repacked == [model.rnn, fresh.rnn]
    with torch.no_grad():
        assert torch.equal(fresh(x), model(x))


def test_a_recurrent_call_outside_its_module_blocks():
    class _RawCall(nn.Module):
        def __init__(self):
            super().__init__()
            self.lstm = nn.LSTM(4, 6)

        def forward(self, x):
            h = x.new_zeros(1, x.shape[1], 6)
            return torch.lstm(x, (h, h), self.lstm._flat_weights, True, 1, 0.0, False, False, False)[0]

    report = graphprune.analyze(_RawCall().eval(), _floats(5, 2, 4), capture="fx")
    hidden = group_of(report, "lstm.weight_hh_l0", 0)
    assert not hidden.prunable and any("outside the nn.LSTM" in r for r in hidden.blocked)
