"""The analysis report: every group, its members, its size and its status."""
from __future__ import annotations

from typing import Any

import networkx as nx

from .groups import Group

from graphprune.reporting.tables import text_table


def _shorten(text: str, width: int) -> str:
    return text if len(text) <= width else text[: width - 1] + "…"


class Report:
    """Result of :func:`graphprune.analyze`.

    ``groups`` lists every coupled channel group; ``graph`` is the traced networkx graph,
    whose nodes carry ``channels``: per tensor dim, ``(group id, index map)`` or None.
    ``str(report)`` is a table with one row per group. ``session`` is the
    :class:`~graphprune.session.PruningSession` that made it, which prunes the model
    (``prune(..., report=report)`` and :meth:`Group.prune` use it).
    """

    def __init__(self, model_name: str, groups: list[Group], graph: nx.DiGraph, input_description: str):
        self.model_name = model_name
        self.groups = groups
        self.graph = graph
        self.input_description = input_description
        self.session: Any = None

    @property
    def prunable_groups(self) -> list[Group]:
        return [g for g in self.groups if g.prunable]

    @property
    def blocked_groups(self) -> list[Group]:
        return [g for g in self.groups if not g.prunable]

    def blocked_by_kind(self) -> dict:
        """``{BlockKind: [groups]}``: the blocked groups by the kinds of their reasons (a group
        blocked for several kinds of reason is listed under each)."""
        found: dict = {}
        for group in self.blocked_groups:
            for kind in dict.fromkeys(getattr(reason, "kind", None) for reason in group.blocked):
                found.setdefault(kind, []).append(group)
        return found

    @property
    def outcome(self) -> str:
        """``"error"`` when no group is prunable (``prune`` would leave the model unchanged),
        else ``"ok"``."""
        return "ok" if self.prunable_groups else "error"

    def top_reasons(self, count: int = 3) -> list[tuple[str, float]]:
        """The ``count`` blocking reasons that hold back the largest share of the parameters,
        ``(reason, share)``, largest first (a group's share counts for each of its reasons)."""
        shares: dict = {}
        for group in self.blocked_groups:
            for reason in dict.fromkeys(group.blocked):
                shares[reason] = shares.get(reason, 0.0) + group.param_share
        return sorted(shares.items(), key=lambda item: -item[1])[:count]

    def capture_failures(self) -> dict:
        """``{module name: why}`` for every module the capture could not trace into ("" is the
        root: its own forward), with the file and line where tracing failed."""
        return dict(self.graph.graph.get("opaque", {}))

    def group_of(self, layer: str) -> list[Group]:
        """Groups with a member in module ``layer``."""
        return [g for g in self.groups if layer in g.layers()]

    def rows(self) -> list[dict[str, Any]]:
        return [
            {
                "group": g.id,
                "root": g.root,
                "channels": g.size,
                "members": len(g.members),
                "layers": g.layers(),
                "status": g.status,
                "blocked_kinds": [kind.value for kind in dict.fromkeys(r.kind for r in g.blocked if hasattr(r, "kind"))],
                "param_share": g.param_share,
            }
            for g in self.groups
        ]

    def __str__(self) -> str:
        header = ("id", "root layer", "channels", "members", "status", "params")
        lines = [
            (str(r["group"]), _shorten(r["root"], 32), str(r["channels"]),
             _shorten(f"{r['members']}: " + ", ".join(name or "<root>" for name in r["layers"]), 48), _shorten(r["status"], 60), f"{100 * r['param_share']:.1f}%")
            for r in self.rows()
        ]
        title = (
            f"graphprune analysis of {self.model_name}: {len(self.groups)} groups, "
            f"{len(self.prunable_groups)} prunable, {len(self.blocked_groups)} blocked (input: {self.input_description})"
        )
        if not self.groups:
            return title + "\nno channel groups found: nothing in this model can be pruned"
        body = [text_table(header, lines, right=(0, 2, 5))]
        left_out = self.graph.graph.get("left_out")
        if left_out:
            body.append(f"outputs left out (state the model makes for itself; their sizes follow the pruning): "
                        f"{', '.join(left_out)}")
        if not self.prunable_groups:
            body.append(self.unchanged_message())
        return "\n".join([title, *body])

    def unchanged_message(self) -> str:
        """The error-level outcome of a report with no prunable group: what holds the model
        back (its top blocking reasons, and where the capture failed)."""
        lines = [f"ERROR: no prunable channel group: prune() leaves {self.model_name} unchanged"]
        lines += [f"  blocked ({100 * min(share, 1.0):.0f}% of params): {_shorten(reason, 140)}"
                  for reason, share in self.top_reasons()]
        failures = list(self.capture_failures().items())
        lines += [f"  not traced: {name or '<root>'} {why}" for name, why in failures[:3]]
        if failures:
            lines.append("  try: capture='export' or capture='fx' (the other front-end), leaf_modules=[...] naming a "
                         "submodule that cannot be traced (its channels stay, the rest prunes), or example_inputs that "
                         "take the code path the model runs in use")
        return "\n".join(lines)

    def __repr__(self) -> str:
        return f"<Report {self.model_name}: {len(self.groups)} groups, {len(self.prunable_groups)} prunable>"
