"""Why channels are blocked: a kind that code switches on, and a message for people.

A :class:`Reason` is the message itself (a ``str``, so it prints, compares and joins as
one) with a :class:`BlockKind` attached. The rules create them; the audit, the reports and
the per-group isolation read ``reason.kind``, never the wording.
"""
from __future__ import annotations

import enum


class BlockKind(enum.Enum):
    """What kind of obstacle blocks a channel set."""

    MODEL_INPUT = "model input"  # the channels of the model's inputs
    MODEL_OUTPUT = "model output"  # they reach an output, or a value the forward stores on a module
    UNTRACED_INPUT = "untraced input"  # sizes fed to a traced part by untraced code (they may change)
    UNTRACED_OUTPUT = "untraced output"  # they flow into code that was not traced
    NO_RULE = "no rule"  # an op, a module or a hook that no rule understands
    FIXED_SIZE = "fixed size"  # a size written as a literal, which cannot follow the pruning
    RESHAPE = "reshape"  # a reshape that merges, splits or regroups channel dimensions
    COLLAPSED = "collapsed"  # reduced, normalised over, unbound or indexed at a fixed position
    NOT_A_CHANNEL = "not a channel"  # a dimension that never carried channels (spatial, broadcast, new)
    NOT_A_PARAMETER = "not a parameter"  # a computed weight, an integer tensor, a tracer constant
    IGNORED = "ignored"  # named in ignored_layers
    AUDIT = "audit"  # the pruned model failed the shape audit
    CONFIG = "config"  # model.config cannot describe its pruning (fit_config=True)


class Reason(str):
    """A blocking reason: the message, with its :class:`BlockKind` as ``.kind``."""

    kind: BlockKind

    def __new__(cls, kind: BlockKind, message: str) -> "Reason":
        reason = super().__new__(cls, message)
        reason.kind = kind
        return reason

    def __reduce__(self):
        return Reason, (self.kind, str(self))


class Assumption(str):
    """A size that only the shape audit can confirm follows the pruning (a number torch.export
    recorded): the message, with ``.site``, the source line that used the size ("" if
    unknown), and ``.module``, the module whose forward used it. Groups whose assumptions share
    a site run the same code, so where one fails the audit the session blocks the others with
    it rather than finding them one audit at a time; a pruned model that fails inside a module
    blames first the groups that rely on a size read there."""

    site: str
    module: str

    def __new__(cls, message: str, site: str, module: str = "") -> "Assumption":
        assumption = super().__new__(cls, message)
        assumption.site = site
        assumption.module = module
        return assumption

    def __reduce__(self):
        return Assumption, (str(self), self.site, self.module)
