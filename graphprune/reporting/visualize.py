"""Pictures of the channel graph: :func:`to_dot` (Graphviz DOT text) and :func:`to_png` (matplotlib).

Both draw :attr:`Report.graph` without its ``get_attr`` nodes (parameters read directly),
one node per traced operation, labelled with its module name (or the function / method
and the module that called it) and coloured by the channel group its output carries:
a colour per prunable group, grey for blocked groups, white when the output carries no
group (e.g. the logits of a classifier or a shape value).

>>> report = graphprune.analyze(model, x)            # doctest: +SKIP
>>> graphprune.reporting.visualize.to_dot(report, "groups.dot")  # then: dot -Tsvg groups.dot > groups.svg
>>> graphprune.reporting.visualize.to_png(report, "groups.png")
"""
from __future__ import annotations

from typing import Any, Optional

import networkx as nx
import numpy as np

from graphprune.analysis.report import Report

__all__ = ["to_dot", "to_png", "channel_graph", "node_group"]

# matplotlib's tab20, as hex strings (no matplotlib needed for DOT)
_PALETTE = [
    "#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd", "#8c564b", "#e377c2", "#bcbd22", "#17becf", "#aec7e8",
    "#ffbb78", "#98df8a", "#ff9896", "#c5b0d5", "#c49c94", "#f7b6d2", "#dbdb8d", "#9edae5", "#7f7f7f", "#c7c7c7",
]
_BLOCKED = "#d9d9d9"
_NONE = "#ffffff"


def _is_entry(value: Any) -> bool:
    return isinstance(value, tuple) and len(value) == 2 and isinstance(value[1], np.ndarray)


def node_group(channels: Any) -> Optional[int]:
    """The group carried by a node's output: the first dim after the batch dim with a group
    (for several outputs, the first output that has one); None when there is none."""
    if not isinstance(channels, tuple):
        return None
    if all(c is None or _is_entry(c) for c in channels):
        for entry in channels[1:]:
            if entry is not None:
                return int(entry[0])
        return None
    for item in channels:
        found = node_group(item)
        if found is not None:
            return found
    return None


def _label(attrs: dict) -> str:
    op = attrs.get("op")
    if op == "call_module":
        kind = attrs.get("module_type")
        return f"{attrs['target']}" + (f"\n{kind}" if kind else "")
    if op in ("call_function", "call_method"):
        name = (attrs.get("target_name") or str(attrs.get("target"))).rsplit(".", 1)[-1]
        scope = attrs.get("module")
        return f"{name}" + (f"\n({scope})" if scope else "")
    if op == "placeholder":
        return f"input: {attrs.get('target')}"
    if op == "output":
        return "output"
    return str(attrs.get("target"))


def _colour_of(report: Report) -> dict:
    colours, index = {}, 0
    for group in report.groups:
        if group.prunable:
            colours[group.id] = _PALETTE[index % len(_PALETTE)]
            index += 1
        else:
            colours[group.id] = _BLOCKED
    return colours


def channel_graph(report: Report) -> nx.DiGraph:
    """A clean copy of ``report.graph`` for drawing: no ``get_attr`` nodes, and per node only
    ``label``, ``group`` (or None), ``fillcolor``, ``op`` and ``index`` (graph order). Edges
    through dropped nodes are not kept (they only carried parameters)."""
    if not isinstance(report, Report):
        raise TypeError(f"report must be a graphprune Report (from graphprune.analyze), got {type(report).__name__}")
    colours = _colour_of(report)
    clean = nx.DiGraph()
    for name, attrs in report.graph.nodes(data=True):
        if attrs.get("op") == "get_attr":
            continue
        group = node_group(attrs.get("channels"))
        clean.add_node(
            name, label=_label(attrs), group=group, op=attrs.get("op"), index=attrs.get("index", 0),
            fillcolor=colours.get(group, _NONE) if group is not None else _NONE,
        )
    clean.add_edges_from((u, v) for u, v in report.graph.edges() if u in clean and v in clean)
    return clean


def _dot_id(text: str) -> str:
    return '"' + str(text).replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n") + '"'


def _write_dot(graph: nx.DiGraph) -> str:
    lines = ["strict digraph {"]
    for key, attrs in graph.graph.items():
        lines.append(f"{key} [" + ", ".join(f"{k}={_dot_id(v)}" for k, v in attrs.items()) + "];")
    for node, attrs in graph.nodes(data=True):
        lines.append(f"{_dot_id(node)} [" + ", ".join(f"{k}={_dot_id(v)}" for k, v in attrs.items()) + "];")
    for u, v in graph.edges():
        lines.append(f"{_dot_id(u)} -> {_dot_id(v)};")
    lines.append("}")
    return "\n".join(lines) + "\n"


def to_dot(report: Report, path: Optional[str] = None) -> str:
    """The channel graph as Graphviz DOT text (top to bottom, filled boxes coloured by
    group, a tooltip with the group and its status); also written to ``path`` when given.

    Uses ``networkx.drawing.nx_pydot`` when ``pydot`` is installed, else a built-in writer
    (same content)."""
    graph = channel_graph(report)
    groups = {g.id: g for g in report.groups}
    dot = nx.DiGraph()
    dot.graph["graph"] = {"rankdir": "TB", "label": f"graphprune channel groups: {report.model_name}", "labelloc": "t"}
    dot.graph["node"] = {"shape": "box", "style": "rounded,filled", "fontname": "Helvetica", "fontsize": "10"}
    for node, attrs in graph.nodes(data=True):
        group = attrs["group"]
        label = attrs["label"] + (f"\ng{group}" if group is not None else "")
        tooltip = f"group {group}: {groups[group].status}" if group in groups else "no channel group"
        dot.add_node(node, label=label, fillcolor=attrs["fillcolor"], tooltip=tooltip)
    dot.add_edges_from(graph.edges())
    try:
        from networkx.drawing import nx_pydot

        text = nx_pydot.to_pydot(_quoted(dot)).to_string()
    except ImportError:
        text = _write_dot(dot)
    if path is not None:
        with open(path, "w", encoding="utf-8") as handle:
            handle.write(text)
    return text


def _quoted(graph: nx.DiGraph) -> nx.DiGraph:
    """pydot leaves ids such as ``layer1.0.conv1`` or labels with newlines to the caller to quote."""
    out = nx.DiGraph()
    out.graph.update({k: {a: _dot_id(v) for a, v in attrs.items()} for k, attrs in graph.graph.items()})
    for node, attrs in graph.nodes(data=True):
        out.add_node(_dot_id(node), **{k: _dot_id(v) for k, v in attrs.items()})
    out.add_edges_from((_dot_id(u), _dot_id(v)) for u, v in graph.edges())
    return out


def _text_colour(fill: str) -> str:
    red, green, blue = (int(fill[i:i + 2], 16) / 255 for i in (1, 3, 5))
    return "black" if 0.299 * red + 0.587 * green + 0.114 * blue > 0.5 else "white"


def _layers(graph: nx.DiGraph) -> dict:
    """Longest-path depth of every node from the inputs (a layered, top-to-bottom layout)."""
    depth = {}
    for node in nx.topological_sort(graph):
        preds = list(graph.predecessors(node))
        depth[node] = 1 + max(depth[p] for p in preds) if preds else 0
    return depth


def _positions(graph: nx.DiGraph) -> dict:
    depth = _layers(graph)
    by_layer: dict = {}
    for node in sorted(graph.nodes, key=lambda n: graph.nodes[n]["index"]):
        by_layer.setdefault(depth[node], []).append(node)
    positions = {}
    for layer, nodes in by_layer.items():
        for i, node in enumerate(nodes):
            positions[node] = (i - (len(nodes) - 1) / 2.0, -float(layer))
    return positions


def to_png(report: Report, path: str, *, dpi: int = 100, title: Optional[str] = None) -> str:
    """Draw the channel graph with matplotlib (Agg canvas; the global backend is left alone)
    and write it to ``path`` as PNG. Nodes are laid out top to bottom by depth (longest
    path from the inputs), drawn as boxes holding their label, filled with their group's
    colour; a legend lists every group with its root layer, size and status. Returns
    ``path``."""
    try:
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure
        from matplotlib.patches import Patch
    except ImportError as exc:  # pragma: no cover - depends on the environment
        raise ImportError("to_png needs matplotlib: pip install matplotlib") from exc
    graph = channel_graph(report)
    positions = _positions(graph)
    depth = 1 + max((-y for _, y in positions.values()), default=0)
    width = 1 + max((abs(x) for x, _ in positions.values()), default=0) * 2
    figure = Figure(figsize=(max(7.0, 2.6 * width + 4.5), max(4.0, 0.42 * depth + 1.0)))
    FigureCanvasAgg(figure)
    axes = figure.add_subplot(1, 1, 1)
    axes.set_axis_off()
    # an edge that skips layers (a residual connection) is drawn as an arc so that it does not hide
    # behind the nodes it passes
    short = [(u, v) for u, v in graph.edges() if positions[u][1] - positions[v][1] <= 1 or positions[u][0] != positions[v][0]]
    long = [(u, v) for u, v in graph.edges() if (u, v) not in set(short)]
    for edges, style in ((short, "arc3"), (long, "arc3,rad=-0.35")):
        if edges:
            nx.draw_networkx_edges(graph, positions, edgelist=edges, ax=axes, arrows=True, arrowsize=8,
                                   edge_color="#555555", width=0.8, node_size=900, node_shape="s", connectionstyle=style)
    for node, (x, y) in positions.items():
        attrs = graph.nodes[node]
        text = attrs["label"].replace("\n", " ") + (f"  [g{attrs['group']}]" if attrs["group"] is not None else "")
        axes.text(x, y, text, ha="center", va="center", fontsize=7, zorder=3, color=_text_colour(attrs["fillcolor"]),
                  bbox=dict(boxstyle="round,pad=0.3", facecolor=attrs["fillcolor"], edgecolor="#333333", linewidth=0.6))
    xs = [x for x, _ in positions.values()] or [0.0]
    axes.set_xlim(min(xs) - 1.2, max(xs) + 1.2)
    axes.set_ylim(-depth + 0.4, 0.6)
    colours = _colour_of(report)
    handles = [
        Patch(facecolor=colours[g.id], edgecolor="#333333",
              label=f"g{g.id}: {g.root} ({g.size} ch, {'prunable' if g.prunable else 'blocked'})")
        for g in report.groups
    ]
    handles.append(Patch(facecolor=_NONE, edgecolor="#333333", label="no channel group"))
    axes.legend(handles=handles, loc="upper left", bbox_to_anchor=(1.0, 1.0), fontsize=7, frameon=False,
                title="channel groups", title_fontsize=8)
    axes.set_title(title or f"graphprune channel groups: {report.model_name}", fontsize=10)
    figure.tight_layout()
    figure.savefig(path, dpi=dpi)
    return path
