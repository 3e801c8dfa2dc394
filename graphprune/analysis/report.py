"""The analysis report: every group, its members, its size and its status."""
from __future__ import annotations

from typing import Any

import networkx as nx

from .groups import Group

from graphprune.reporting.tables import text_table


def _shorten(text: str, width: int) -> str:
    return text if len(text) <= width else text[: width - 1] + "…"


class Report:
    """Result of :func:`graphprune.analyze`: every coupled channel group of a model.

    ``str(report)`` is a table with one row per group. ``session`` is the
    :class:`~graphprune.session.PruningSession` that made it, which prunes the model
    (``prune(..., report=report)`` and :meth:`Group.prune` use it). Reports are made by the
    analysis, not by hand.

    Parameters
    ----------
    model_name : str
        The class name of the model analysed.
    groups : list of Group
        Every coupled channel group, kept as ``groups``.
    graph : networkx.DiGraph
        The traced graph, kept as ``graph``; its nodes carry ``channels``: per tensor dim,
        ``(group id, index map)`` or None.
    input_description : str
        The shapes of the example inputs (``"inferred ..."`` when they were inferred).
    """

    def __init__(self, model_name: str, groups: list[Group], graph: nx.DiGraph, input_description: str):
        self.model_name = model_name
        self.groups = groups
        self.graph = graph
        self.input_description = input_description
        self.session: Any = None

    @property
    def prunable_groups(self) -> list[Group]:
        """The groups that can be pruned, in id order."""
        return [g for g in self.groups if g.prunable]

    @property
    def blocked_groups(self) -> list[Group]:
        """The groups that cannot be pruned (blocked, or a single channel), in id order."""
        return [g for g in self.groups if not g.prunable]

    def blocked_by_kind(self) -> dict:
        """Sort the blocked groups by the kinds of their reasons.

        Returns
        -------
        dict
            ``{BlockKind: [groups]}``; a group blocked for several kinds of reason is listed
            under each (a reason without a kind under None; a single channel is no reason).
        """
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
        """Find the blocking reasons that hold back the largest share of the parameters.

        Parameters
        ----------
        count : int, default 3
            How many reasons to return at most.

        Returns
        -------
        list of (str, float)
            ``(reason, share of the parameters)``, largest first; a group's share counts for
            each of its reasons.
        """
        shares: dict = {}
        for group in self.blocked_groups:
            for reason in dict.fromkeys(group.blocked):
                shares[reason] = shares.get(reason, 0.0) + group.param_share
        return sorted(shares.items(), key=lambda item: -item[1])[:count]

    def capture_failures(self) -> dict:
        """List the modules the capture could not trace into.

        Returns
        -------
        dict
            ``{module name: why}``, with the file and line where tracing failed (``""`` is
            the root: its own forward).
        """
        return dict(self.graph.graph.get("opaque", {}))

    def group_of(self, layer: str) -> list[Group]:
        """Find the groups with a member in one module.

        Parameters
        ----------
        layer : str
            A module name, as ``model.named_modules()`` gives it.

        Returns
        -------
        list of Group
            The groups with a member (or a tied alias) in that module.
        """
        return [g for g in self.groups if layer in g.layers()]

    def rows(self) -> list[dict[str, Any]]:
        """Describe every group as a plain dict, as the table and the command line's JSON show it.

        Returns
        -------
        list of dict
            Per group: ``group``, ``root``, ``channels``, ``members``, ``layers``,
            ``status``, ``blocked_kinds`` and ``param_share``.
        """
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
        """Say why ``prune`` would leave the model unchanged, for a report with no prunable group.

        Returns
        -------
        str
            An error line, the top blocking reasons, where the capture failed and what to try.
        """
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
