"""Every Python example in README.md runs, in order, in one namespace."""
import re
from pathlib import Path

import pytest

README = Path(__file__).resolve().parent.parent / "README.md"
BLOCKS = re.findall(r"```python\n(.*?)```", README.read_text(), flags=re.S)


def test_readme_has_examples():
    assert len(BLOCKS) >= 3


class Examples:
    """The names the examples define, and how many of them have run, in order, into it."""

    def __init__(self):
        self.names: dict = {}
        self.started = 0

    def run_through(self, index: int) -> None:
        """Run every example up to ``index`` not yet started (each at most once: a failed one
        fails its own test, not every later one). Under pytest-xdist a worker may get example
        ``index`` without the ones before it."""
        while self.started <= index:
            number = self.started
            self.started += 1
            exec(compile(BLOCKS[number], f"README.md example {number + 1}", "exec"), self.names)


@pytest.fixture(scope="module")
def examples():
    return Examples()


@pytest.mark.parametrize("index", range(len(BLOCKS)))
def test_readme_example(index, examples, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    examples.run_through(index)
