"""Capture a PyTorch model as an annotated networkx graph (torch.fx front-end)."""
from .fallback import trace
from .fx_capture import LeafSpec, TraceError, capture
from .graph import InputError, build_graph, call_model
from .record import TensorSpec, describe

__all__ = ["LeafSpec", "TraceError", "InputError", "TensorSpec", "capture", "build_graph", "call_model", "describe", "trace"]
