"""The public API's docstrings follow numpydoc, as scikit-learn writes them.

Every function in ``graphprune.__all__`` and every public method of its classes has a
docstring; one that takes arguments (besides ``self``) has a ``Parameters`` section naming
each of them and nothing else, and one whose return annotation is not ``None`` a
``Returns`` (or ``Yields``) section. Public properties have a docstring. A class with a
constructor of its own (criteria included) documents the constructor's arguments under
``Parameters`` in the class docstring, as numpydoc places them.
"""
from __future__ import annotations

import dataclasses
import inspect
import re

import pytest

import graphprune
import graphprune.criteria



def _public_classes() -> dict:
    found = {name: getattr(graphprune, name) for name in graphprune.__all__}
    found.update({f"criteria.{name}": getattr(graphprune.criteria, name) for name in graphprune.criteria.__all__})
    return {name: value for name, value in found.items()
            if inspect.isclass(value) and not issubclass(value, (BaseException, Warning))}


def _callables() -> dict:
    """``{qualified name: (function, whether its first argument is self or cls)}``: the public
    functions and the public methods of the public classes (the criteria's constructors only)."""
    found = {name: getattr(graphprune, name) for name in graphprune.__all__}
    found.update({f"criteria.{name}": getattr(graphprune.criteria, name) for name in graphprune.criteria.__all__})
    functions = {name: (value, False) for name, value in found.items() if inspect.isfunction(value)}
    for name, cls in _public_classes().items():
        if name.startswith("criteria."):
            continue
        for attribute, value in vars(cls).items():
            bound = not isinstance(value, staticmethod)
            value = value.__func__ if isinstance(value, (staticmethod, classmethod)) else value
            if not attribute.startswith("_") and inspect.isfunction(value):
                functions[f"{name}.{attribute}"] = (value, bound)
    return functions


def _sections(doc: str) -> dict:
    """``{section title: its lines}`` of a cleaned numpydoc docstring."""
    sections, current = {}, None
    lines = doc.splitlines()
    for i, line in enumerate(lines):
        if i + 1 < len(lines) and re.fullmatch(r"-{3,}", lines[i + 1].strip()) and line.strip() and not line.startswith(" "):
            current = line.strip()
            sections[current] = []
        elif current is not None and not re.fullmatch(r"-{3,}", line.strip()):
            sections[current].append(line)
    return sections


def _documented_names(lines: list) -> set:
    """The names of a Parameters section's entries: its unindented lines, ``a, b : type``."""
    names = set()
    for line in lines:
        if line and not line.startswith(" "):
            names.update(part.strip().lstrip("*") for part in line.split(" : ")[0].split(","))
    return names


def _arguments(function, skip_first: bool) -> set:
    parameters = list(inspect.signature(function).parameters)
    return set(parameters[1:] if skip_first else parameters)


CALLABLES = _callables()


def test_the_api_is_found():
    assert {"prune", "analyze", "PruningSession.apply", "Group.prune", "GroupRegularizer.step"} <= set(CALLABLES)


@pytest.mark.parametrize("name", sorted(CALLABLES))
def test_function_docstring_has_its_sections(name):
    function, bound = CALLABLES[name]
    doc = inspect.getdoc(function)
    assert doc, f"{name} has no docstring"
    sections = _sections(doc)
    arguments = _arguments(function, skip_first=bound)
    if arguments:
        assert "Parameters" in sections, f"{name} takes {sorted(arguments)} but has no Parameters section"
        documented = _documented_names(sections["Parameters"])
        assert documented == arguments, f"{name}: undocumented {sorted(arguments - documented)}, " \
                                        f"not arguments {sorted(documented - arguments)}"
    annotation = inspect.signature(function).return_annotation
    if annotation not in (None, "None"):
        assert {"Returns", "Yields"} & set(sections), f"{name} returns {annotation} but has no Returns section"


@pytest.mark.parametrize("name", sorted(_public_classes()))
def test_class_docstring_documents_its_constructor(name):
    cls = _public_classes()[name]
    assert inspect.getdoc(cls), f"{name} has no docstring"
    properties = [a for a, v in vars(cls).items() if isinstance(v, property) and not a.startswith("_")]
    assert not [a for a in properties if not getattr(cls, a).__doc__], f"{name}: properties without a docstring"
    if dataclasses.is_dataclass(cls) or cls.__init__ is object.__init__:
        return  # a dataclass's fields are its documentation
    arguments = _arguments(cls.__init__, skip_first=True)
    if arguments:
        sections = _sections(inspect.getdoc(cls))
        assert "Parameters" in sections, f"{name}'s constructor takes {sorted(arguments)}; no Parameters section"
        documented = _documented_names(sections["Parameters"])
        assert documented == arguments, f"{name}: undocumented {sorted(arguments - documented)}, " \
                                        f"not arguments {sorted(documented - arguments)}"
