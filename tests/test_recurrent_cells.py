"""Recurrent cells (nn.LSTMCell, nn.GRUCell, nn.RNNCell) called in a Python loop prune: a hidden
unit owns one row of every gate, and the states carried from step to step and the output carry
the units. Under torch.fx the cell is a module, under torch.export the aten.lstm_cell /
gru_cell / rnn_*_cell op inside it (with the zero state its forward makes); both are checked
with the dead-channel oracle."""
from __future__ import annotations

import pytest
import torch
from conftest import count_params, group_of, trained_and_reloaded
from oracle import dead_channel_oracle
from torch import nn

import graphprune
from graphprune.tracer import call_model
from graphprune.analysis.reasons import BlockKind


class _GRUCellLM(nn.Module):
    """Embedding -> GRUCell over a context of ``steps`` tokens (zero initial state) -> linear over the
    vocabulary (a loop of fixed length: torch.fx cannot trace one over a size read off the input)."""

    def __init__(self, steps: int = 4):
        super().__init__()
        self.emb, self.cell, self.head = nn.Embedding(30, 10), nn.GRUCell(10, 12), nn.Linear(12, 30)
        self.steps = steps

    def forward(self, tokens):  # (N, steps)
        h, logits = None, []
        x = self.emb(tokens)
        for t in range(self.steps):
            h = self.cell(x[:, t], h)
            logits.append(self.head(h))
        return torch.stack(logits, dim=1)


class _LSTMCellDecoder(nn.Module):
    """A seq2seq decoder: (h0, c0) from an encoder summary, an LSTMCell fed its own projected output."""

    def __init__(self):
        super().__init__()
        self.init_h, self.init_c = nn.Linear(6, 10), nn.Linear(6, 10)
        self.inp, self.cell, self.out = nn.Linear(5, 8), nn.LSTMCell(8, 10), nn.Linear(10, 5)

    def forward(self, summary, start):  # (N, 6), (N, 5)
        state, y, ys = (torch.tanh(self.init_h(summary)), self.init_c(summary)), start, []
        for _ in range(3):
            state = self.cell(self.inp(y), state)
            y = self.out(state[0])
            ys.append(y)
        return torch.stack(ys, dim=1)


class _Elman(nn.Module):
    """An RNNCell (input_size == hidden_size; tanh or relu, with or without biases), on a batch or an unbatched sequence,
    looped over its length (torch.export only: torch.fx cannot trace such a loop)."""

    def __init__(self, nonlinearity: str = "tanh", bias: bool = True):
        super().__init__()
        self.inp, self.head = nn.Linear(5, 8), nn.Linear(8, 3)
        self.cell = nn.RNNCell(8, 8, bias=bias, nonlinearity=nonlinearity)

    def forward(self, x):  # (T, N, 5) or (T, 5)
        h = None
        for t in range(x.shape[0]):
            h = self.cell(self.inp(x[t]), h)
        return self.head(h)


def _floats(*shape):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(0))


CASES = {
    "gru_cell_lm": (_GRUCellLM, lambda: torch.randint(0, 30, (2, 4), generator=torch.Generator().manual_seed(0)), 3),
    "lstm_cell_decoder": (_LSTMCellDecoder, lambda: (_floats(2, 6), _floats(2, 5)), 4),
    "rnn_cell_tanh": (_Elman, lambda: _floats(4, 2, 5), 1),
    "rnn_cell_relu_unbatched_no_bias": (lambda: _Elman("relu", bias=False), lambda: _floats(4, 5), 1),
}


FX_CASES = ("gru_cell_lm", "lstm_cell_decoder")
RUNS = [(name, capture) for name in CASES for capture in ("fx", "export") if capture == "export" or name in FX_CASES]


@pytest.mark.parametrize("name, capture", RUNS)
def test_recurrent_cells_prune_exactly(name, capture):
    build, inputs, gates = CASES[name]
    torch.manual_seed(0)
    report = graphprune.analyze(build().eval(), inputs(), capture=capture)
    hidden = group_of(report, "cell.weight_hh", 1)
    assert hidden.prunable and hidden.exact and not hidden.assumptions, hidden.blocked
    rows = [m for m in hidden.members if m.name == "cell.weight_ih"][0]
    assert rows.dim == 0 and list(rows.index_map) == list(range(hidden.size)) * gates
    assert any(m.name == "cell.weight_hh" and m.dim == 0 for m in hidden.members)
    assert any(m.name.endswith(("head.weight", "out.weight")) and m.dim == 1 for m in hidden.members)
    if isinstance(build(), _LSTMCellDecoder):  # the decoder's initial states come from two linears
        assert {"init_h.weight", "init_c.weight"} <= {m.name for m in hidden.members}
    torch.manual_seed(0)
    summary = dead_channel_oracle(build(), inputs(), capture=capture, fraction=0.4)
    assert summary["groups_tested"] >= 2 and summary["params_after"] < summary["params_before"]
    if capture == "fx":  # stricter: only consumers zeroed (every channel here is read by weights)
        dead_channel_oracle(build(), inputs(), capture=capture, zero_producers=False, seed=1)


@pytest.mark.parametrize("ratio", [0.3, 0.5])
@pytest.mark.parametrize("name, capture", RUNS)
def test_pruned_cell_models_run_train_and_round_trip(name, capture, ratio, tmp_path):
    build, inputs, _ = CASES[name]
    torch.manual_seed(0)
    model, x = build().eval(), inputs()
    before, hidden, shape = count_params(model), model.cell.hidden_size, call_model(model, x).shape
    graphprune.prune(model, ratio, x, capture=capture)
    cell = model.cell
    assert count_params(model) < before and cell.hidden_size == hidden - int(ratio * hidden)
    assert cell.weight_hh.shape == (cell.weight_ih.shape[0], cell.hidden_size)
    assert cell.input_size == cell.weight_ih.shape[1]
    assert call_model(model, x).shape == shape
    fresh = trained_and_reloaded(model, build, x, cell, tmp_path / f"{name}.safetensors")
    assert (fresh.cell.hidden_size, fresh.cell.input_size) == (cell.hidden_size, cell.input_size)


def test_a_state_from_a_model_input_blocks_the_hidden_units():
    class _GivenState(nn.Module):
        def __init__(self):
            super().__init__()
            self.cell, self.head = nn.GRUCell(4, 6), nn.Linear(6, 2)

        def forward(self, x, h):
            return self.head(self.cell(x, h))

    for capture in ("fx", "export"):
        report = graphprune.analyze(_GivenState().eval(), (_floats(2, 4), _floats(2, 6)), capture=capture)
        hidden = group_of(report, "cell.weight_hh", 1)
        assert not hidden.prunable and hidden.blocked[0].kind is BlockKind.MODEL_INPUT


def test_a_cell_op_outside_its_module_blocks():
    class _RawCall(nn.Module):
        def __init__(self):
            super().__init__()
            self.cell, self.head = nn.GRUCell(4, 6), nn.Linear(6, 2)

        def forward(self, x):
            c = self.cell
            return self.head(torch.gru_cell(x, x.new_zeros(x.shape[0], 6), c.weight_ih, c.weight_hh, c.bias_ih,
                                            c.bias_hh))

    report = graphprune.analyze(_RawCall().eval(), _floats(2, 4), capture="fx")
    hidden = group_of(report, "cell.weight_hh", 1)
    assert not hidden.prunable and any("outside the nn.LSTMCell" in r for r in hidden.blocked)
