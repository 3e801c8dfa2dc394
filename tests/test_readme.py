"""Every Python example in README.md runs, in order, in one namespace."""
import re
from pathlib import Path

import pytest

README = Path(__file__).resolve().parent.parent / "README.md"
BLOCKS = re.findall(r"```python\n(.*?)```", README.read_text(), flags=re.S)


def test_readme_has_examples():
    assert len(BLOCKS) >= 3


@pytest.fixture(scope="module")
def namespace():
    return {}


@pytest.mark.parametrize("index", range(len(BLOCKS)))
def test_readme_example(index, namespace, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    code = compile(BLOCKS[index], f"README.md example {index + 1}", "exec")
    exec(code, namespace)
