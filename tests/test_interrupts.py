"""A KeyboardInterrupt (or any exception) anywhere in graphprune leaves the model as it was.

The interrupt is injected by a trace function (``sys.settrace``) at the n-th line that
graphprune's packages execute, for n spread over the whole run of each public call: plain
prune, a data criterion's pass over its loader, a budget search, a multi-step prune,
analyze and load. Lines inside the block where graphprune holds Ctrl-C (the final copy of
the kept weights) are skipped, as a real SIGINT could not land there; a real SIGINT in
that block is delivered after it, with the model completely pruned.
"""
from __future__ import annotations

import linecache
import os
import signal
import sys

import pytest
import torch
import torch.nn.functional as F

from graphprune import criteria
import graphprune
import graphprune.pruning.surgery
from small_net import assert_consistent, small_net, widths
from conftest import assert_model_unchanged, model_state

X = torch.randn(2, 3, 16, 16, generator=torch.Generator().manual_seed(0))
_PACKAGES = tuple(os.path.dirname(m.__file__) + os.sep for m in (graphprune, graphprune.tracer, graphprune.criteria))
POINTS = 20  # injection points per call, spread evenly over its lines


class InterruptAt:
    """Trace function raising KeyboardInterrupt at the ``n``-th line run in graphprune's
    packages while Ctrl-C is not held; with ``n=None`` it only counts the lines.
    ``committed`` tells whether the surgery's final copy (which holds Ctrl-C) has run by then.

    The second visit of a ``with`` line is passed over: it announces the context manager's
    ``__exit__``, and an interrupt there skips that exit in any Python code (torch's
    FlopCounterMode would keep its global module hooks), which no library can undo."""

    def __init__(self, n=None):
        self.n, self.lines, self.fired, self.committed = n, 0, None, False
        self._seen: dict = {}  # frame -> lines run in it

    def __call__(self, frame, event, arg):
        return self._line if frame.f_code.co_filename.startswith(_PACKAGES) else None

    def _line(self, frame, event, arg):
        if event != "line":
            return self._line
        seen = self._seen.setdefault(frame, set())
        exiting = frame.f_lineno in seen and linecache.getline(frame.f_code.co_filename, frame.f_lineno).lstrip().startswith("with ")
        seen.add(frame.f_lineno)
        if exiting:
            return self._line
        if signal.getsignal(signal.SIGINT) is not signal.default_int_handler:  # Ctrl-C is held here
            self.committed = self.committed or frame.f_code.co_filename.endswith("surgery.py")
            return self._line
        self.lines += 1
        if self.lines == self.n:
            self.fired = f"{frame.f_code.co_filename}:{frame.f_lineno}"
            raise KeyboardInterrupt(f"injected at {self.fired}")
        return self._line


@pytest.fixture(autouse=True)
def _python_ctrl_c():
    """Python's own Ctrl-C handler, whatever this process started with: a process started in
    the background (``cmd &`` in a script, nohup) ignores SIGINT, and Python then installs none."""
    previous = signal.signal(signal.SIGINT, signal.default_int_handler)
    yield
    signal.signal(signal.SIGINT, previous)


def _traced(call, trace: InterruptAt):
    sys.settrace(trace)
    try:
        return call()
    finally:
        sys.settrace(None)


def _seeded_net():
    torch.manual_seed(0)
    return small_net()


def _with_grads():
    model = _seeded_net()
    F.cross_entropy(model(X), torch.tensor([1, 2])).backward()  # gradients must come back too
    model.conva.register_forward_hook(lambda module, args, output: None)  # and hooks (blocks conva's groups)
    model.conv3.weight.requires_grad_(False)
    return model


def _saved(tmp_path_factory):
    pruned = small_net()
    graphprune.prune(pruned, 0.5, X)
    path = tmp_path_factory.mktemp("interrupts") / "small.safetensors"
    graphprune.save(pruned, path)
    return path


def _loader():
    return [(X, torch.tensor([1, 2])), (X.flip(0), torch.tensor([3, 4]))]


# name -> (call, whether it commits in its surgery: from there on an interrupt leaves the finished model;
# any call may end with the finished model when interrupted in its last lines, after its transaction)
CALLS = {
    "prune": (lambda m, path: graphprune.prune(m, 0.5, X), True),
    "prune_taylor": (lambda m, path: graphprune.prune(m, 0.5, X, criterion=criteria.Taylor(_loader(), progress=False)), True),
    "prune_budget": (lambda m, path: graphprune.prune(m, target_flops=0.9, example_inputs=X), False),
    "prune_steps": (lambda m, path: graphprune.prune(m, 0.5, X, steps=2), False),
    "analyze": (lambda m, path: graphprune.analyze(m, X), False),
    "load": (lambda m, path: graphprune.load(m, path), False),
}


@pytest.fixture(scope="module")
def saved_path(tmp_path_factory):
    return _saved(tmp_path_factory)


@pytest.mark.parametrize("name", list(CALLS))
def test_an_interrupt_anywhere_leaves_the_model_as_it_was(name, saved_path):
    call, commits = CALLS[name]
    call(_with_grads(), saved_path)  # first-call work (lazy imports) must not shift the lines counted below
    finished, counter = _with_grads(), InterruptAt()
    _traced(lambda: call(finished, saved_path), counter)
    total = counter.lines
    assert total > 200, total
    for n in sorted({1 + (total - 1) * k // (POINTS - 1) for k in range(POINTS)}):
        model = _with_grads()
        before = model_state(model)
        trace = InterruptAt(n)
        with pytest.raises(KeyboardInterrupt):
            _traced(lambda: call(model, saved_path), trace)
        assert trace.fired, n
        if commits and trace.committed:  # after the point of no return: the finished model
            _assert_same_model(model, finished)
        elif not _finished(model, finished):  # the last lines of a call, after its transaction
            assert_model_unchanged(model, before)


def _finished(model, expected) -> bool:
    try:
        _assert_same_model(model, expected)
    except AssertionError:
        return False
    return True


def _assert_same_model(model, expected):
    assert_consistent(model)
    assert widths(model) == widths(expected)
    for (key, a), b in zip(model.state_dict().items(), expected.state_dict().values()):
        assert torch.equal(a, b), key


def test_ctrl_c_during_the_final_copy_is_delivered_after_it(monkeypatch):
    """A real SIGINT in the one block that cannot be undone: held, then raised, with the
    model the complete pruned model."""
    reference = _seeded_net()
    graphprune.prune(reference, 0.5, X)
    copy_into = graphprune.pruning.surgery._select_into
    signals = []

    def interrupted_copy(out, data, index):
        if not signals:
            signals.append(os.kill(os.getpid(), signal.SIGINT))
        copy_into(out, data, index)

    monkeypatch.setattr(graphprune.pruning.surgery, "_select_into", interrupted_copy)
    model = _seeded_net()
    with pytest.raises(KeyboardInterrupt):
        graphprune.prune(model, 0.5, X)
    assert signals and signal.getsignal(signal.SIGINT) is signal.default_int_handler
    _assert_same_model(model, reference)


@pytest.mark.parametrize("error", [KeyboardInterrupt, SystemExit, MemoryError, RuntimeError])
def test_any_exception_inside_the_surgery_restores_and_is_raised_as_it_is(monkeypatch, error):
    def failing_audit(*args, **kwargs):
        raise error("injected")

    monkeypatch.setattr(graphprune.session, "audit", failing_audit)
    model = _with_grads()
    before = model_state(model)
    expected = graphprune.PruningError if issubclass(error, Exception) else error
    with pytest.raises(expected, match="injected"):
        graphprune.prune(model, 0.5, X)
    assert_model_unchanged(model, before)
