"""graphprune: structured channel pruning that finds coupled layers automatically.

>>> import torch, torchvision, graphprune
>>> model = torchvision.models.resnet18()
>>> report = graphprune.analyze(model, torch.randn(1, 3, 224, 224))
>>> graphprune.prune(model, 0.5, torch.randn(1, 3, 224, 224))  # doctest: +SKIP
"""
from tracer import InputError, TraceError

from . import data, distributed, models, visualize
from .api import analyze, prune
from .budget import BudgetWarning, PruneResult, StepResult
from .distributed import SyncedCriterion, all_reduce_scores, sync_criterion
from .engine import PruningEngine
from .finetune import evaluate, finetune
from .schedule import prune_schedule
from .groups import Group, Member
from .inputs import InferredInputWarning, infer_example_inputs
from .measure import count_flops, count_parameters, measure_latency
from .persist import load, save
from .planner import plan_removal
from .report import Report
from .sensitivity import SensitivityResult, sensitivity
from .surgery import PruningError
from .compare import Comparison, report  # noqa: E402  (last: the name ``report`` means the function)

__version__ = "0.1.0"

__all__ = [
    "analyze", "prune", "plan_removal", "Report", "Group", "Member", "PruningError", "TraceError", "InputError",
    "InferredInputWarning", "infer_example_inputs", "PruneResult", "StepResult", "BudgetWarning",
    "count_parameters", "count_flops", "measure_latency", "PruningEngine", "save", "load", "models",
    "finetune", "evaluate", "prune_schedule", "sync_criterion", "SyncedCriterion", "all_reduce_scores",
    "sensitivity", "SensitivityResult", "report", "Comparison", "data", "distributed", "visualize", "__version__",
]
