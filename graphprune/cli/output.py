"""Output helpers of the command line: progress on stderr, warnings as one-line notes, numbers, tables and JSON.

Results go to stdout, everything else (progress, warnings, library chatter) to stderr.
"""
from __future__ import annotations

import contextlib
import json
import sys
import warnings
from typing import Any, Iterator, Optional, TextIO


class Status:
    """Short progress messages on stderr: one self-overwriting line on a terminal, plain lines otherwise."""

    def __init__(self, enabled: bool, stream: Optional[TextIO] = None):
        self.enabled = enabled
        self.stream = stream if stream is not None else sys.stderr
        self.tty = bool(getattr(self.stream, "isatty", lambda: False)())
        self._pending = False

    def __call__(self, message: str) -> None:
        if not self.enabled:
            return
        if self.tty:
            self.stream.write("\r\x1b[K" + message)
            self._pending = True
        else:
            self.stream.write(message + "\n")
        self.stream.flush()

    def clear(self) -> None:
        """Erase a pending self-overwriting progress line (terminals only)."""
        if self._pending:
            self.stream.write("\r\x1b[K")
            self.stream.flush()
            self._pending = False

    def note(self, message: str) -> None:
        """A line that stays (a warning, a notice): shown even with --quiet."""
        self.clear()
        self.stream.write(message + "\n")
        self.stream.flush()


def one_line(exc: BaseException) -> str:
    """The message of ``exc`` with white space folded into one line of at most 500 characters."""
    text = " ".join(str(exc).split()) or type(exc).__name__
    return text if len(text) <= 500 else text[:499] + "…"


def human_number(n: float) -> str:
    """``n`` with a k, M or G suffix and two decimals, e.g. ``11.69M``."""
    for unit, scale in (("G", 1e9), ("M", 1e6), ("k", 1e3)):
        if abs(n) >= scale:
            return f"{n / scale:.2f}{unit}"
    return f"{n:g}"


def ratio_of(after: int, before: int) -> Optional[float]:
    """``after / before``, or None when ``before`` is 0."""
    return after / before if before else None


def _jsonable(value: Any) -> Any:
    if getattr(value, "ndim", 0) and hasattr(value, "tolist"):  # numpy / torch arrays
        return value.tolist()
    if hasattr(value, "item"):  # numpy / torch scalars
        return value.item()
    return str(value)


def print_json(payload: dict) -> None:
    """Print ``payload`` as indented JSON on stdout; arrays and scalars of numpy / torch become plain values."""
    print(json.dumps(payload, indent=2, default=_jsonable))


@contextlib.contextmanager
def warnings_as_notes(status: Status) -> Iterator[None]:
    """Collect warnings during the block and show each as one line on stderr afterwards."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        yield
    status.clear()
    seen = set()
    for w in caught:
        text = one_line(w.message)
        if text not in seen:
            seen.add(text)
            status.note(f"graphprune: warning: {text}")


def stdout_to_stderr() -> contextlib.redirect_stdout:
    """Libraries that print progress on stdout (tqdm.write, torch.onnx) must not mix it with results."""
    return contextlib.redirect_stdout(sys.stderr)


def format_table(rows: list) -> str:
    """``rows[0]`` as the header over the other rows, as the reports print tables
    (:func:`graphprune.reporting.tables.text_table`): the first column left-aligned, the others right-aligned."""
    from graphprune.reporting.tables import text_table

    return text_table(rows[0], rows[1:], right=range(1, len(rows[0])))
