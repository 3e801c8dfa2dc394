"""graphprune: structured channel pruning that finds coupled layers automatically.

>>> import torch, torchvision, graphprune
>>> model = torchvision.models.resnet18()
>>> report = graphprune.analyze(model, torch.randn(1, 3, 224, 224))
>>> graphprune.prune(model, 0.5, torch.randn(1, 3, 224, 224))  # doctest: +SKIP

The package reads as the pipeline (see ARCHITECTURE.md): :mod:`graphprune.tracer` captures
the model, :mod:`graphprune.analysis` finds the coupled groups, :mod:`graphprune.criteria`
scores channels, :mod:`graphprune.pruning` plans and performs the surgery, :mod:`graphprune.recovery` refits
what stays on calibration data, then come
:mod:`graphprune.io` (save / load), :mod:`graphprune.reporting`, :mod:`graphprune.workflow`
(fine-tuning, schedules, sensitivity, sparse training, distributed), :mod:`graphprune.cli` and
:mod:`graphprune.compat` (the layer-by-layer engine). The names below are the public API;
everything else is reachable from its subpackage.
"""
from __future__ import annotations

import importlib
import importlib.abc
import importlib.util
import sys
import warnings

#: The public API: name -> the module that defines it. Imported on first use (PEP 562), so
#: that ``import graphprune`` and ``graphprune --help`` load no torch until a name is used.
_PUBLIC = {
    **dict.fromkeys(("analyze", "prune"), "graphprune.api"),
    **dict.fromkeys(("prune_checkpoint", "CheckpointResult"), "graphprune.checkpoint"),
    "AnalysisError": "graphprune.analysis.analyzer",
    **dict.fromkeys(("Group", "Member"), "graphprune.analysis.groups"),
    "InferredInputWarning": "graphprune.analysis.inputs",
    **dict.fromkeys(("load", "save"), "graphprune.io.persist"),
    **dict.fromkeys(("save_pretrained", "from_pretrained"), "graphprune.io.pretrained"),
    "BudgetWarning": "graphprune.pruning.budget",
    "ConfigWarning": "graphprune.pruning.model_config",
    "PruneResult": "graphprune.pruning.run",
    "PruningError": "graphprune.pruning.surgery",
    "Recovery": "graphprune.recovery",
    **dict.fromkeys(("Comparison", "report"), "graphprune.workflow.compare"),
    **dict.fromkeys(("count_flops", "count_parameters", "measure_latency"), "graphprune.reporting.measure"),
    "Report": "graphprune.analysis.report",
    "PruningSession": "graphprune.session",
    **dict.fromkeys(("InputError", "TraceError"), "graphprune.tracer"),
    "evaluate": "graphprune.workflow.evaluation",
    "finetune": "graphprune.workflow.finetune",
    "prune_schedule": "graphprune.workflow.schedule",
    **dict.fromkeys(("SensitivityResult", "sensitivity"), "graphprune.workflow.sensitivity"),
    "GroupRegularizer": "graphprune.workflow.sparse",
    "PruningHooks": "graphprune.workflow.callbacks",
    "prune_optimizer_state": "graphprune.workflow.optimizer_state",
}
_SUBPACKAGES = ("criteria", "models", "data")

__version__ = "0.1.0"

__all__ = [
    # analyse and prune
    "analyze", "prune", "prune_checkpoint", "CheckpointResult", "PruningSession", "Report", "Group", "Member", "PruneResult", "Recovery",
    # save, load, measure, compare
    "save", "load", "save_pretrained", "from_pretrained", "count_parameters", "count_flops", "measure_latency", "report", "Comparison",
    # around pruning
    "finetune", "evaluate", "prune_schedule", "sensitivity", "SensitivityResult", "GroupRegularizer",
    "PruningHooks", "prune_optimizer_state",
    # errors and warnings
    "PruningError", "TraceError", "InputError", "AnalysisError", "InferredInputWarning", "BudgetWarning", "ConfigWarning",
    # subpackages and example assets
    "criteria", "models", "data", "__version__",
]

#: Names that moved in 0.1 (old name -> module, attribute; None: the module itself). They
#: still work, with a DeprecationWarning, until the next release.
_MOVED = {
    "StepResult": ("graphprune.pruning.run", "StepResult"),
    "plan_removal": ("graphprune.pruning.planner", "plan_removal"),
    "infer_example_inputs": ("graphprune.analysis.inputs", "infer_example_inputs"),
    "PruningEngine": ("graphprune.compat", "PruningEngine"),
    "sync_criterion": ("graphprune.workflow.distributed", "sync_criterion"),
    "SyncedCriterion": ("graphprune.workflow.distributed", "SyncedCriterion"),
    "all_reduce_scores": ("graphprune.workflow.distributed", "all_reduce_scores"),
    "distributed": ("graphprune.workflow.distributed", None),
    "visualize": ("graphprune.reporting.visualize", None),
    "measure": ("graphprune.reporting.measure", None),
    "persist": ("graphprune.io.persist", None),
}


def _moved(name: str):
    module, attribute = _MOVED[name]
    where = f"{module}.{attribute}" if attribute else module
    warnings.warn(f"graphprune.{name} moved to {where}; the old name goes in the next release",
                  DeprecationWarning, stacklevel=3)
    value = importlib.import_module(module)
    return getattr(value, attribute) if attribute else value


def __getattr__(name: str):
    if name in _PUBLIC:
        value = getattr(importlib.import_module(_PUBLIC[name]), name)
    elif name in _MOVED:
        return _moved(name)
    elif name in _SUBPACKAGES or importlib.util.find_spec(f"{__name__}.{name}") is not None:
        value = importlib.import_module(f"{__name__}.{name}")  # a subpackage not imported yet
    else:
        raise AttributeError(f"module 'graphprune' has no attribute {name!r}")
    globals()[name] = value
    return value


def __dir__() -> list:
    return sorted({*globals(), *__all__})


class _MovedModules(importlib.abc.MetaPathFinder, importlib.abc.Loader):
    """``import graphprune.measure`` and the like: the module's new home, with a warning."""

    def find_spec(self, fullname, path=None, target=None):
        package, _, name = fullname.rpartition(".")
        if package == __name__ and _MOVED.get(name, (None, ""))[1] is None:
            return importlib.util.spec_from_loader(fullname, self)
        return None

    def create_module(self, spec):
        return _moved(spec.name.rpartition(".")[2])

    def exec_module(self, module):
        pass


sys.meta_path.append(_MovedModules())
