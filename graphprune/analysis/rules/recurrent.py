"""Rules for the recurrent layers of torch.nn (``nn.LSTM``, ``nn.GRU``, ``nn.RNN``: the layout of
``nn.RNNBase``): as modules under torch.fx, and as the calls torch.export records inside them
(``torch.lstm``, ``torch.gru``, ``torch.rnn_tanh``, ``torch.rnn_relu``, with a flat list of weights).

Layer ``k`` of direction ``d`` has ``hidden_size`` units. Its gate rows (``weight_ih``,
``weight_hh``, ``bias_ih``, ``bias_hh``) are the units tiled once per gate, gate-major (LSTM
i, f, g, o; GRU r, z, n; RNN one), so a unit owns one row of every gate. Its output is the
units, or with ``proj_size`` the rows of ``weight_hr``; ``weight_hh`` reads that output back,
and the next layer reads both directions' outputs concatenated ([forward | backward]). A unit
whose gate rows are zero stays zero from a zero initial state (every gate reads 0; the cell,
or the GRU's candidate, gets tanh(0)), so its channel is dead and prunes exactly.

``hidden_size`` and ``proj_size`` are one attribute for every layer and direction: their dims
keep one count (see ``share_attributes``); the final states ``h_n`` and ``c_n`` stack every
layer and direction along dim 0, which ties them position by position as well. Under
torch.export the zero initial state that the layer's forward makes for itself is sized by those
attributes, so it takes the final state's labels. A PackedSequence input blocks.

A cell (``nn.LSTMCell``, ``nn.GRUCell``, ``nn.RNNCell``: one time step, called in a Python loop)
is one such layer and direction, with ``weight_ih`` / ``weight_hh`` / ``bias_ih`` / ``bias_hh``
unsuffixed: its input ``(N, input_size)`` or ``(input_size,)``, its states and its output
``h'`` (LSTM: ``(h', c')``) carry the units on their last dim. Under torch.export it is the
call ``torch.lstm_cell`` / ``gru_cell`` / ``rnn_tanh_cell`` / ``rnn_relu_cell``, and the zero
state its forward makes when none is given takes the output's labels, as above.
"""
from __future__ import annotations

import re
from typing import Any, Optional

import numpy as np
import torch
import torch.fx as fx
from torch import nn

from graphprune.tracer import TensorSpec

from ..channels import NO_ID
from ..propagation import Propagation
from ..reasons import BlockKind, Reason

_GATES = {"LSTM": 4, "GRU": 3, "RNN_TANH": 1, "RNN_RELU": 1}
_WEIGHT_NAME = re.compile(r"(weight_ih|weight_hh|bias_ih|bias_hh|weight_hr)_l(\d+)(_reverse)?")
_ROWS = ("weight_hh", "bias_ih", "bias_hh")  # gate rows besides weight_ih's
_TORCH_FORWARDS = (nn.LSTM.forward, nn.GRU.forward, nn.RNN.forward, nn.LSTMCell.forward, nn.GRUCell.forward,
                   nn.RNNCell.forward)
_CELL_WEIGHTS = ("weight_ih", "weight_hh", "bias_ih", "bias_hh")  # a cell's, in the order its op reads them
_CELL_GATES = {nn.LSTMCell: 4, nn.GRUCell: 3, nn.RNNCell: 1}
STACKED = Reason(BlockKind.NOT_A_CHANNEL, "the layers and directions a recurrent layer's states are stacked along")


def _kept(_: Any, kept: int) -> int:
    return kept


def recurrent_module(state: Propagation, node: fx.Node):
    """``nn.LSTM`` / ``nn.GRU`` / ``nn.RNN`` called as a module: ``(input, hx)``."""
    owner = state.qualname(node)
    module: nn.RNNBase = state.module(owner)
    x = node.args[0] if node.args else node.kwargs.get("input")
    hx = node.args[1] if len(node.args) > 1 else node.kwargs.get("hx")
    weights = [getattr(module, name) for name in module._flat_weights_names]
    return _recurrence(state, node, module, owner, x, _initial_states(state, hx), weights, module.batch_first)


def recurrent_function(state: Propagation, node: fx.Node):
    """``torch.lstm(input, hx, params, has_biases, num_layers, dropout, train, bidirectional,
    batch_first)`` and its GRU / RNN forms, as torch.export records ``nn.RNNBase.forward``:
    the module whose weights ``params`` are gives the layout and holds the sizes."""
    args = node.args
    if len(args) < 9 or not isinstance(args[3], bool):  # (data, batch_sizes, hx, params, …)
        return _blocked(state, node, "a recurrent layer reading a PackedSequence (not supported)")
    owner = state.qualname(node)
    module = state.module(owner)
    if not _reads_weights_of(state, module, args[2]):
        return _blocked(state, node, "a recurrent op outside the nn.LSTM / GRU / RNN whose weights it reads")
    given = list(args[1]) if isinstance(args[1], (list, tuple)) else [args[1]]
    own = [_zero_state(state, module, owner, h) for h in given]
    hx = [None if zeros else state.labels_of(h) for h, zeros in zip(given, own)]
    labels = _recurrence(state, node, module, owner, args[0], hx, list(args[2]), args[8])
    for h, zeros, final in zip(given, own, labels[1:]):
        if zeros:  # its sizes are the final state's: they follow the pruning as the final state does
            state.labels[state.part + h.name] = final
    return labels


def _reads_weights_of(state: Propagation, module: nn.Module, params: Any) -> bool:
    if not isinstance(module, nn.RNNBase) or not isinstance(params, (list, tuple)):
        return False
    weights = [getattr(module, name) for name in module._flat_weights_names]
    return len(params) == len(weights) and all(_tensor_of(state, p) is w for p, w in zip(params, weights))


def _zero_state(state: Propagation, module: nn.Module, owner: str, ref: Any) -> bool:
    """Whether ``ref`` is the zero initial state that torch's own forward of the recurrent layer
    makes when none is given (a tensor made inside it from no tensor), sized by the module's
    attributes, which follow the pruning."""
    if type(module).forward not in _TORCH_FORWARDS or not isinstance(ref, fx.Node) or ref.op != "call_function":
        return False
    return state.qualname(ref) == owner and not any(isinstance(state.value(n), TensorSpec) for n in ref.all_input_nodes)


def _initial_states(state: Propagation, hx: Any) -> list:
    """The labels of each initial state given to a module (``h0``, or ``(h0, c0)``)."""
    if hx is None:
        return []
    if isinstance(hx, (tuple, list)):
        return [state.labels_of(h) for h in hx]
    labels = state.labels_of(hx)
    return [labels] if isinstance(state.value(hx), TensorSpec) else list(labels or ())


def _blocked(state: Propagation, node: fx.Node, why: str, weights: list = ()) -> Any:
    """Fresh blocked labels; every input and every dim of ``weights`` blocked with ``why``."""
    reason = Reason(BlockKind.NO_RULE, f"{node.name}: {why}")
    for source in node.all_input_nodes:
        state.block(state.labels_of(source), reason)
    for weight in weights:
        state.block(tuple(state.tensor_ids(weight, d, "param") for d in range(weight.dim())), reason)
    return state.fresh(state.value(node), node.name, reason)


def _cells(module: nn.RNNBase, weights: list) -> list:
    """``weights`` (one per name of ``_flat_weights_names``) as ``cells[layer][direction][kind]``."""
    cells = [[{} for _ in range(2 if module.bidirectional else 1)] for _ in range(module.num_layers)]
    for name, ref in zip(module._flat_weights_names, weights):
        kind, layer, reverse = _WEIGHT_NAME.fullmatch(name).groups()
        cells[int(layer)][1 if reverse else 0][kind] = ref
    return cells


def _cell(state: Propagation, owner: str, cell: dict, inputs: np.ndarray, gates: int) -> tuple:
    """Bind one layer's one direction; return its units and its output ids (the projection's)."""
    rows = state.tensor_ids(cell["weight_ih"], 0, "out")
    units = rows[: rows.size // gates]
    tiled = np.tile(units, gates)
    state.unify(rows, tiled)
    state.bind(inputs, cell["weight_ih"], 1, "in")
    for kind in _ROWS:
        if kind in cell:
            state.bind(tiled, cell[kind], 0, "out")
    state.attr(owner, "hidden_size", units, _kept)
    out = units
    if "weight_hr" in cell:
        state.bind(units, cell["weight_hr"], 1, "in")
        out = state.tensor_ids(cell["weight_hr"], 0, "out")
        state.attr(owner, "proj_size", out, _kept)
    state.bind(out, cell["weight_hh"], 1, "in")
    return units, out


def _recurrence(state: Propagation, node: fx.Node, module: nn.RNNBase, owner: str, x_ref: Any, hx: list,
                weights: list, batch_first: bool) -> Any:
    """The output labels ``(output, h_n[, c_n])``, nested as the node's value is."""
    value, x = state.value(node), state.labels_of(x_ref)
    if not isinstance(state.value(x_ref), TensorSpec):
        return _blocked(state, node, "a recurrent layer reading a PackedSequence (not supported)",
                        [w for w in weights if isinstance(w, torch.Tensor)])
    gates = _GATES[module.mode]
    inputs, cells = x[-1], []
    for layer in _cells(module, weights):
        cells += [_cell(state, owner, cell, inputs, gates) for cell in layer]
        inputs = np.concatenate([out for _, out in cells[-len(layer):]])
    units, outs = (units for units, _ in cells), (out for _, out in cells)
    unit_ids, out_ids = next(units), next(outs)
    for ids in units:  # c_n stacks every cell's units, h_n every cell's outputs
        state.unify(unit_ids, ids)
    for ids in outs:
        state.unify(out_ids, ids)
    batch = x[0 if batch_first else 1] if len(x) == 3 else None
    stack = len(cells)
    layers = state.space.new_set(stack, f"{node.name} layers", STACKED) if stack > 1 else np.array([NO_ID])
    finals = [_state_labels(layers, batch, out_ids)]
    if module.mode == "LSTM":
        finals.append(_state_labels(layers, batch, unit_ids))
    for given, final in zip(hx, finals):
        if given is not None:
            state.block(given[0], STACKED)
            for a, b in zip(given[1:], final[1:]):
                state.unify(a, b)
    output = tuple(x[:-1]) + (inputs,)
    return (output, *finals) if isinstance(value[1], TensorSpec) else (output, tuple(finals))


def _state_labels(layers: np.ndarray, batch: Optional[np.ndarray], channels: np.ndarray) -> tuple:
    return (layers,) + ((batch,) if batch is not None else ()) + (channels,)


def cell_module(state: Propagation, node: fx.Node):
    """``nn.LSTMCell`` / ``nn.GRUCell`` / ``nn.RNNCell`` called as a module: ``(input, hx)``."""
    owner = state.qualname(node)
    module: nn.RNNCellBase = state.module(owner)
    x = node.args[0] if node.args else node.kwargs.get("input")
    hx = node.args[1] if len(node.args) > 1 else node.kwargs.get("hx")
    weights = {name: getattr(module, name) for name in _CELL_WEIGHTS}
    gates = next(g for cls, g in _CELL_GATES.items() if isinstance(module, cls))
    return _step(state, owner, x, _initial_states(state, hx), weights, gates)


def cell_function(state: Propagation, node: fx.Node):
    """``torch.lstm_cell(input, hx, w_ih, w_hh, b_ih, b_hh)`` and its GRU / RNN forms
    (``torch._VF``), as torch.export records a cell's forward: the cell whose weights they are
    holds ``hidden_size``; the zero state its forward made takes the output's labels."""
    owner = state.qualname(node)
    module = state.module(owner)
    args = list(node.args) + [node.kwargs.get(name) for name in _CELL_WEIGHTS[len(node.args) - 2:]]
    weights = dict(zip(_CELL_WEIGHTS, args[2:]))
    if not isinstance(module, nn.RNNCellBase) or not all(_tensor_of(state, ref) is getattr(module, name)
                                                        for name, ref in weights.items()):
        return _blocked(state, node, "a recurrent cell op outside the nn.LSTMCell / GRUCell / RNNCell whose weights "
                                     "it reads")
    given = list(args[1]) if isinstance(args[1], (list, tuple)) else [args[1]]
    own = [h for h in given if _zero_state(state, module, owner, h)]
    hx = [labels for h in given if h not in own for labels in _initial_states(state, h)]
    gates = 4 if node.target is torch.lstm_cell else 3 if node.target is torch.gru_cell else 1
    labels = _step(state, owner, args[0], hx, weights, gates)
    for h in own:  # its sizes are the output's: they follow the pruning as the output does
        state.labels[state.part + h.name] = labels[0] if gates == 4 else labels
    return labels


def _tensor_of(state: Propagation, ref: Any) -> Any:
    """The parameter or buffer an argument reads (itself if a tensor), or None."""
    return state.node_attrs(ref).get("tensor") if isinstance(ref, fx.Node) else ref


def _step(state: Propagation, owner: str, x_ref: Any, hx: list, weights: dict, gates: int) -> Any:
    """One cell step: the output labels ``h'`` (an LSTM cell's ``(h', c')``); ``hx`` the labels
    of the states given."""
    x = state.labels_of(x_ref)
    cell = {name: ref for name, ref in weights.items() if ref is not None}
    units, _ = _cell(state, owner, cell, x[-1], gates)
    out = tuple(x[:-1]) + (units,)
    for given in hx:  # (N, H) or (H,), as the output
        for a, b in zip(reversed(given), reversed(out)):
            state.unify(a, b)
    return (out, out) if gates == 4 else out
