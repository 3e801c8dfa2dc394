"""graphprune.visualize: DOT export (pydot and built-in writer) and PNG rendering of the channel graph."""
from __future__ import annotations

import sys

import numpy as np
import pytest
import torch
from torch import nn

import graphprune
from graphprune.reporting.visualize import channel_graph, node_group, to_dot, to_png

pydot = pytest.importorskip("pydot")
# pydot's DOT parser (used here to check the output) trips pyparsing's deprecation warnings
pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning:pydot")


class Scaled(nn.Module):
    """A raw parameter read in forward gives the traced graph a get_attr node."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 6, 3, padding=1)
        self.scale = nn.Parameter(torch.ones(1, 6, 1, 1))
        self.head = nn.Conv2d(6, 4, 1)

    def forward(self, x):
        return self.head(torch.relu(self.conv(x) * self.scale))


@pytest.fixture(scope="module")
def resnet_report():
    return graphprune.analyze(graphprune.models.get_model("resnet20"), torch.randn(1, 3, 32, 32))


def parse(text: str):
    (graph,) = pydot.graph_from_dot_data(text)
    nodes = {n.get_name().strip('"'): n for n in graph.get_nodes() if n.get_name() not in ("node", "graph", "edge")}
    edges = {(e.get_source().strip('"'), e.get_destination().strip('"')) for e in graph.get_edges()}
    return nodes, edges


def test_channel_graph_drops_get_attr_and_labels_modules():
    report = graphprune.analyze(Scaled(), torch.randn(1, 3, 8, 8))
    assert any(a["op"] == "get_attr" for _, a in report.graph.nodes(data=True))
    graph = channel_graph(report)
    assert all(a["op"] != "get_attr" for _, a in graph.nodes(data=True))
    labels = {a["label"] for _, a in graph.nodes(data=True)}
    assert "conv\nConv2d" in labels and "head\nConv2d" in labels and "output" in labels
    assert any(label.startswith("mul") for label in labels)
    conv = next(n for n, a in graph.nodes(data=True) if a["label"].startswith("conv\n"))
    assert graph.nodes[conv]["group"] == report.group_of("conv")[-1].id


def test_node_group_reads_the_channel_dim():
    entry = (3, np.arange(4))
    assert node_group((None, entry, None, None)) == 3
    assert node_group((entry, None)) is None  # dim 0 is the batch
    assert node_group(((None, None), (None, (5, np.arange(2))))) == 5
    assert node_group(None) is None


def test_to_dot_colours_groups_and_is_valid_dot(resnet_report, tmp_path):
    path = tmp_path / "groups.dot"
    text = to_dot(resnet_report, str(path))
    assert path.read_text() == text
    nodes, edges = parse(text)
    clean = channel_graph(resnet_report)
    assert set(nodes) == set(clean.nodes)
    assert edges == set(clean.edges)
    colours = {}
    for name, node in nodes.items():
        group = clean.nodes[name]["group"]
        colour = node.get("fillcolor").strip('"')
        if group is not None:
            colours.setdefault(group, set()).add(colour)
            assert f"g{group}" in node.get("label")
    assert all(len(c) == 1 for c in colours.values())  # one colour per group
    prunable = {g.id for g in resnet_report.prunable_groups}
    distinct = {next(iter(colours[g])) for g in prunable if g in colours}
    assert len(distinct) == len(prunable & set(colours))  # prunable groups get distinct colours
    assert "layer2.0.shortcut.0" in nodes["layer2_0_shortcut_0"].get("label")
    assert ("layer1_0_relu_1", "layer1_1_conv1") in edges and ("layer1_0_relu_1", "add_1") in edges  # a residual


def test_builtin_dot_writer_matches_pydot(resnet_report, monkeypatch):
    with_pydot = parse(to_dot(resnet_report))
    monkeypatch.setitem(sys.modules, "pydot", None)  # "import pydot" now raises ImportError
    text = to_dot(resnet_report)
    monkeypatch.undo()
    assert text.startswith("strict digraph {")
    nodes, edges = parse(text)
    assert set(nodes) == set(with_pydot[0]) and edges == with_pydot[1]
    for name, node in nodes.items():
        assert node.get("label") == with_pydot[0][name].get("label")
        assert node.get("fillcolor") == with_pydot[0][name].get("fillcolor")


def test_to_png_renders(resnet_report, tmp_path):
    import matplotlib.image

    path = to_png(resnet_report, str(tmp_path / "groups.png"))
    image = matplotlib.image.imread(path)
    assert image.shape[0] > 2 * image.shape[1] > 800  # tall: one row per layer
    assert image[..., :3].std() > 0.05
    with pytest.raises(TypeError, match="must be a graphprune Report"):
        to_png(resnet_report.graph, str(tmp_path / "x.png"))
