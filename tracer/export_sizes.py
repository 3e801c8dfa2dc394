"""Sizes torch.export cannot know: a dim that depends on the values (``nonzero``, a boolean
mask, ``torch.unique``) is an unbacked symbol with no example value. They are read off one
real run of the exported program on the example inputs, made only when such a size is met."""
from __future__ import annotations

from typing import Any, Callable

import torch
import torch.fx as fx

from .fx_capture import TraceError
from .graph import call_args
from .record import describe


class DataDependentSize(TraceError):
    """torch.export recorded a size that depends on the values, with no example value."""

    def __init__(self) -> None:
        super().__init__("torch.export found a size that depends on the values (no example size to record)",
                         location="torch.export, a data-dependent size")


class _Recorder(fx.Interpreter):
    """Runs a graph and keeps every node's output described (shapes, not tensors)."""

    def __init__(self, module: fx.GraphModule):
        super().__init__(module)
        self.values: dict[str, Any] = {}

    def run_node(self, node: fx.Node) -> Any:
        result = super().run_node(node)
        self.values[node.name] = describe(result)
        return result


def real_values(program: "torch.export.ExportedProgram", example_inputs: Any) -> dict[str, Any]:
    """Every node's output (described) from one run of ``program`` on the example inputs."""
    args, kwargs = call_args(example_inputs)
    recorder = _Recorder(program.graph_module)
    with torch.no_grad():
        recorder.run(*program._graph_module_flat_inputs(args, kwargs))
    return recorder.values


class ValueReader:
    """A node's value from its fake tensor (``read``), falling back, for a value with a size
    that depends on the values, to a real run of the program (made once, at the first need);
    ``read_values`` says whether that run was made."""

    def __init__(self, program: "torch.export.ExportedProgram", example_inputs: Any, read: Callable[[fx.Node], Any]):
        self._program, self._inputs, self._read = program, example_inputs, read
        self._real: dict = {}
        self.read_values = False

    def __call__(self, node: fx.Node) -> Any:
        try:
            return self._read(node)
        except DataDependentSize:
            if not self.read_values:
                self._real, self.read_values = real_values(self._program, self._inputs), True
            if node.name not in self._real:
                raise
            return self._real[node.name]
