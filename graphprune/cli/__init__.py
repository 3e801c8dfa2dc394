"""The ``graphprune`` command line: the parser and ``main`` (:mod:`.app`), the subcommands
(:mod:`.commands`), the MODEL arguments (:mod:`.models`) and output helpers (:mod:`.output`)."""
from .app import main

__all__ = ["main"]
