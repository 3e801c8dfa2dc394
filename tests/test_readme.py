"""Every Python example in README.md and docs/*.md runs on its own, and every link in them resolves.

Each example runs alone, in a fresh namespace and in a temporary working directory, so that
a reader can copy any one of them: each carries its own imports and setup. A relative link
must name a file or folder of the repository, and a ``#fragment`` a heading of the page it
points at (GitHub's anchors).
"""
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
FENCE = re.compile(r"^```.*?^```", flags=re.S | re.M)


def _python_blocks(page: Path) -> list:
    return re.findall(r"^```python\n(.*?)^```", page.read_text(encoding="utf-8"), flags=re.S | re.M)


EXAMPLES = [(page, number, code) for page in PAGES for number, code in enumerate(_python_blocks(page), 1)]


def test_readme_has_examples():
    assert len(_python_blocks(ROOT / "README.md")) >= 3


@pytest.mark.parametrize("page, number, code", EXAMPLES,
                         ids=[f"{page.relative_to(ROOT)}:{number}" for page, number, _ in EXAMPLES])
def test_example_runs_alone(page, number, code, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    name = f"{page.relative_to(ROOT)} example {number}"
    exec(compile(code, name, "exec"), {"__name__": "__main__"})


def _anchors(page: Path) -> set:
    """The anchors GitHub gives the headings of ``page``."""
    anchors, seen = set(), {}
    for heading in re.findall(r"^#{1,6} +(.+?) *$", FENCE.sub("", page.read_text(encoding="utf-8")), flags=re.M):
        slug = re.sub(r"[^\w\- ]", "", heading.lower()).replace(" ", "-")
        count = seen.get(slug, 0)
        seen[slug] = count + 1
        anchors.add(slug if count == 0 else f"{slug}-{count}")
    return anchors


@pytest.mark.parametrize("page", PAGES, ids=[str(page.relative_to(ROOT)) for page in PAGES])
def test_links_resolve(page):
    broken = []
    for target in re.findall(r"\]\(([^)\s]+)\)", FENCE.sub("", page.read_text(encoding="utf-8"))):
        if re.match(r"[a-z]+:", target):
            continue
        path, _, fragment = target.partition("#")
        linked = (page.parent / path).resolve() if path else page
        if not linked.exists():
            broken.append(f"{target}: no such file")
        elif fragment and linked.suffix == ".md" and fragment not in _anchors(linked):
            broken.append(f"{target}: no heading #{fragment}")
    assert not broken, broken
