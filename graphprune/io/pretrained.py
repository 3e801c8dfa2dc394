"""A pruned Hugging Face model saved and reloaded in one call, whatever was pruned.

:func:`save_pretrained` writes a directory. Where ``model.config`` describes the pruned
model (``prune(..., uniform=True)`` of what the config can say, or ``fit_config=True``), it is
``model.save_pretrained``'s own: ``transformers`` loads it. Where no config can (layers pruned
unequally, a head width the config ties to others), it holds the config of the model as built,
a ``"graphprune"`` entry in it naming the weights file, and that file, written by
:func:`graphprune.save` (the pruned sizes and the weights). :func:`from_pretrained` loads
either kind: a plain Hugging Face directory through its class's ``from_pretrained``, the other
by building the model from its config and :func:`graphprune.load`-ing the file into it.
"""
from __future__ import annotations

import json
import os
from typing import Any, Union

from torch import nn

from graphprune.validation import check_model

from .sharded import staged_directory

WEIGHTS = "graphprune.safetensors"
_KEY = "graphprune"
_CARRIED = ("generation_config.json",)


def save_pretrained(model: nn.Module, directory: Union[str, os.PathLike]) -> str:
    """Write the Hugging Face ``model`` (pruned or not) so that :func:`from_pretrained` rebuilds it.

    Where ``model.config`` describes the model, this is ``model.save_pretrained``; else the
    config of the model as built and a :func:`graphprune.save` file (see the module
    docstring). The directory is written beside its place and moved there complete.

    Parameters
    ----------
    model : nn.Module
        A Hugging Face model (with ``save_pretrained`` and ``config``).
    directory : str or os.PathLike
        The output directory, which must not exist or be empty.

    Returns
    -------
    str
        ``"transformers"`` when transformers' ``from_pretrained`` loads the directory too,
        else ``"graphprune"``.

    Raises
    ------
    TypeError
        ``model`` is not a Hugging Face model.
    ValueError
        ``directory`` exists and is not an empty directory.
    """
    from graphprune.pruning.model_config import describe_pruned

    check_model(model)
    if not callable(getattr(model, "save_pretrained", None)) or not callable(getattr(model.config, "to_dict", None)):
        raise TypeError(f"{type(model).__name__} is not a Hugging Face model (it has no save_pretrained and config); "
                        "save it with graphprune.save")
    update = describe_pruned(model)
    described = update.problem is None and not update.fields
    with staged_directory(directory) as staging:
        if described:
            model.save_pretrained(staging)
        else:
            _save_with_spec(model, staging)
    return "transformers" if described else "graphprune"


def _save_with_spec(model: nn.Module, directory: str) -> None:
    from .persist import save

    save(model, os.path.join(directory, WEIGHTS))
    config = model.config.to_dict()
    config["architectures"] = [type(model).__name__]  # as save_pretrained records it
    config[_KEY] = {"weights": WEIGHTS, "load_with": "graphprune.from_pretrained"}
    with open(os.path.join(directory, "config.json"), "w", encoding="utf-8") as handle:
        json.dump(config, handle, indent=2, sort_keys=True)
    generation = getattr(model, "generation_config", None)
    if generation is not None and callable(getattr(generation, "save_pretrained", None)):
        generation.save_pretrained(directory)


def from_pretrained(directory: Union[str, os.PathLike], **kwargs: Any) -> nn.Module:
    """Load the model saved in ``directory`` by :func:`save_pretrained`, or any Hugging Face one.

    The model is built as the class its config names (``architectures``, else ``AutoModel``).

    Parameters
    ----------
    directory : str or os.PathLike
        A directory with a ``config.json``.
    **kwargs
        Passed to the class's ``from_pretrained`` for a plain Hugging Face directory; refused
        for one holding a graphprune weights file, which has no use for them.

    Returns
    -------
    nn.Module
        The model, in eval mode.

    Raises
    ------
    ValueError
        transformers is not installed, ``directory`` has no ``config.json``, the weights
        file does not fit (as :func:`graphprune.load`), or keyword arguments are given for a
        graphprune weights file.
    """
    try:
        import transformers
    except ImportError:
        raise ValueError("from_pretrained loads Hugging Face models, which needs transformers (pip install transformers)") from None
    directory = os.fspath(directory)
    path = os.path.join(directory, "config.json")
    if not os.path.isfile(path):
        raise ValueError(f"{directory}: no config.json; save_pretrained writes one")
    with open(path, encoding="utf-8") as handle:
        entry = json.load(handle).get(_KEY)
    config = transformers.AutoConfig.from_pretrained(directory)
    model_class = config_model_class(transformers, config)
    if entry is None:
        return model_class.from_pretrained(directory, **kwargs).eval()
    if kwargs:
        raise ValueError(f"{directory} holds a graphprune weights file, which loads as saved: "
                         f"{', '.join(sorted(kwargs))} would be ignored (move or cast the model after loading)")
    from .persist import load

    if hasattr(config, _KEY):
        delattr(config, _KEY)
    return load(build_from_config(transformers, config), os.path.join(directory, entry.get("weights", WEIGHTS))).eval()


def config_model_class(transformers: Any, config: Any) -> type:
    """The transformers class a config names first (``architectures``) that ``transformers``
    has, else ``AutoModel``."""
    names = [n for n in (getattr(config, "architectures", None) or []) if hasattr(transformers, n)]
    return getattr(transformers, names[0]) if names else transformers.AutoModel


def build_from_config(transformers: Any, config: Any, **options: Any) -> nn.Module:
    """A model of :func:`config_model_class` built from ``config`` (random weights); ``options``
    (``dtype``) go to its constructor."""
    model_class = config_model_class(transformers, config)
    if model_class is transformers.AutoModel:
        return model_class.from_config(config, **options)
    return model_class._from_config(config, **options)
