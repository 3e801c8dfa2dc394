"""The Python source behind a graph node, read off the stack trace torch.export records
with it: the ``file:line`` of its innermost frame, and the names the statement there reads.

A size that torch.export wrote down as a number may have come from a module attribute, but
only from one the statement names: a Llama layer's ``layer_idx`` of 4 is not the size 4 of
its key/value heads in ``x.expand(batch, num_key_value_heads, n_rep, slen, head_dim)``.
"""
from __future__ import annotations

import ast
import functools
import re
from typing import Optional

import torch.fx as fx

_FRAME = re.compile(r'File "([^"]+)", line (\d+)')


def _innermost_frame(node: fx.Node) -> Optional[tuple]:
    frames = _FRAME.findall(node.meta.get("stack_trace") or "")
    return (frames[-1][0], int(frames[-1][1])) if frames else None


def source_line(node: fx.Node) -> str:
    """``file:line`` of the innermost frame of the node's recorded stack trace, or ""."""
    frame = _innermost_frame(node)
    return f"{frame[0]}:{frame[1]}" if frame else ""


def names_in_statement(node: fx.Node) -> Optional[frozenset]:
    """Every variable and attribute name in the innermost statement at the node's recorded
    source line; None where that is unknown (torch.fx records no stack trace, or the file
    cannot be read or parsed)."""
    frame = _innermost_frame(node)
    return None if frame is None else _statement_names(*frame)


@functools.lru_cache(maxsize=4096)
def _statement_names(path: str, line: int) -> Optional[frozenset]:
    tree = _parsed(path)
    if tree is None:
        return None
    around = [s for s in ast.walk(tree) if isinstance(s, ast.stmt) and s.lineno <= line <= (s.end_lineno or s.lineno)]
    if not around:
        return None
    statement = min(around, key=lambda s: (s.end_lineno or s.lineno) - s.lineno)
    return frozenset(n.id if isinstance(n, ast.Name) else n.attr
                     for n in ast.walk(statement) if isinstance(n, (ast.Name, ast.Attribute)))


@functools.lru_cache(maxsize=256)
def _parsed(path: str) -> Optional[ast.AST]:
    try:
        with open(path, encoding="utf-8") as file:
            return ast.parse(file.read(), path)
    except (OSError, SyntaxError, ValueError):
        return None
