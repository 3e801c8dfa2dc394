"""``graphprune prune``'s options: each of :func:`graphprune.prune`'s options under its own name
(``--global-ranking`` for ``global_ranking``), and the keyword arguments they make.

The options that need Python objects (a criterion instance, ``calibration`` batches,
``recover``, a schedule function, ``report``) stay with the Python API.
"""
from __future__ import annotations

import argparse
from typing import Any, Callable

from graphprune.validation import check_fraction


def fraction(name: str, low_open: bool = False, high_open: bool = True) -> Callable[[str], float]:
    """An argparse type: a number in the interval from 0 to 1 (``check_fraction``'s), named ``name`` in its errors."""
    def parse(text: str) -> float:
        try:
            value = float(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{name} must be a number, got {text!r}") from None
        try:
            return check_fraction(value, name, low_open=low_open, high_open=high_open)
        except ValueError as exc:
            raise argparse.ArgumentTypeError(str(exc).replace(f"got {value}", f"got {text.strip()}")) from None
    return parse


def ratio(text: str):
    """``0.3``, or per layer ``GLOB=R,GLOB=R`` (``"layer4*=0.5,*=0.2"``)."""
    if "=" not in text:
        return fraction("ratio")(text)
    mapping = {}
    for part in text.split(","):
        key, sep, value = part.partition("=")
        if not sep or not key.strip():
            raise argparse.ArgumentTypeError(f"per-layer ratios must be GLOB=R,GLOB=R such as 'layer4*=0.5,*=0.2', got {text!r}")
        mapping[key.strip()] = fraction(f"ratio of {key.strip()!r}")(value)
    return mapping


def _positive_int(name: str) -> Callable[[str], int]:
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{name} must be an integer, got {text!r}") from None
        if value < 1:
            raise argparse.ArgumentTypeError(f"{name} must be at least 1, got {value}")
        return value
    return parse


def _names(text: str) -> list:
    return [name.strip() for name in text.split(",") if name.strip()]


def add_prune_options(prune: argparse.ArgumentParser) -> None:
    """Add every option of :func:`graphprune.prune` that a command line can say."""
    how_much = prune.add_argument_group("how much (a ratio, or a budget to search the ratio for)")
    how_much.add_argument("--ratio", type=ratio, help="fraction of each group's channels to remove, in [0, 1); or per "
                          "layer, GLOB=R,GLOB=R (module names or globs; groups no key names stay whole)")
    for metric, what in (("flops", "FLOPs"), ("params", "parameters"), ("latency", "latency on this machine")):
        how_much.add_argument(f"--target-{metric}", type=fraction(f"target_{metric}", low_open=True, high_open=False),
                              metavar="F", help=f"instead of --ratio: keep this fraction of the {what}")
    how_much.add_argument("--tolerance", type=fraction("tolerance", low_open=True), default=0.02, metavar="T",
                          help="a budget is met within this relative tolerance (default: 0.02)")
    plan = prune.add_argument_group("how (graphprune.prune's planning options)")
    plan.add_argument("--uniform", action="store_true",
                      help="prune a group repeated layer after layer (a transformer block's MLP) alike in every layer, "
                           "so that a Hugging Face config can describe the result")
    plan.add_argument("--global-ranking", action="store_true",
                      help="rank channels across groups (scores normalised per group) instead of the same ratio in each")
    plan.add_argument("--max-ratio", type=fraction("max_ratio", low_open=True), metavar="R",
                      help="the largest fraction any group may lose (default: 0.9 with --global-ranking, else no limit)")
    plan.add_argument("--round-to", type=_positive_int("round_to"), metavar="N",
                      help="every pruned group keeps a multiple of N channels (8 suits GPUs)")
    plan.add_argument("--steps", type=_positive_int("steps"), default=1, metavar="N",
                      help="prune in N steps, analysing and scoring the model again before each (default: 1)")
    plan.add_argument("--schedule", choices=("linear", "geometric"), default="linear",
                      help="how --steps share the pruning (default: linear)")
    plan.add_argument("--prune-heads", action="store_true",
                      help="remove whole attention heads (num_heads shrinks) instead of narrowing every head")
    plan.add_argument("--fit-config", action="store_true",
                      help="prune only what model.config can describe (groups it cannot are left whole), so that "
                           "save_pretrained / from_pretrained round-trip the result")
    what = prune.add_argument_group("what (analysis options)")
    what.add_argument("--ignored-layers", type=_names, action="extend", default=[], metavar="NAME[,NAME]",
                      help="modules whose channels must not change (names of submodules; repeat or comma-separate)")
    what.add_argument("--leaf-modules", type=_names, action="extend", default=[], metavar="NAME[,NAME]",
                      help="modules not to trace into (their channels are blocked unless a rule knows them)")
    what.add_argument("--capture", choices=("auto", "fx", "export"), default="auto",
                      help="how the model is captured: torch.fx, torch.export, or auto (default)")
    what.add_argument("--no-verify", action="store_true",
                      help="skip the shape audit of the pruned model (faster; groups only the audit can confirm are "
                           "then left whole)")


def prune_options(args: argparse.Namespace) -> dict:
    """The keyword arguments of :func:`graphprune.prune` (beyond the model and its inputs) that
    ``args`` gives; ValueError for a command line that gives no amount, or two."""
    targets = {f"target_{m}": getattr(args, f"target_{m}") for m in ("flops", "params", "latency")}
    given = [f"--{k.replace('_', '-')}" for k, v in targets.items() if v is not None]
    if args.ratio is None and not given:
        raise ValueError("give --ratio, or a budget: --target-flops, --target-params or --target-latency")
    if len(given) + (args.ratio is not None) > 1:
        raise ValueError(f"give one of --ratio and the budgets, not {' and '.join(([] if args.ratio is None else ['--ratio']) + given)}")
    options: dict[str, Any] = {
        "ratio": args.ratio, **{k: v for k, v in targets.items() if v is not None}, "tolerance": args.tolerance,
        "criterion": args.criterion, "uniform": args.uniform, "global_ranking": args.global_ranking,
        "max_ratio": args.max_ratio, "round_to": args.round_to, "steps": args.steps, "schedule": args.schedule,
        "prune_heads": args.prune_heads, "fit_config": args.fit_config, "ignored_layers": args.ignored_layers,
        "leaf_modules": args.leaf_modules, "capture": args.capture, "verify": not args.no_verify,
    }
    return options


#: prune_checkpoint takes these of them (it always fits the config, in one step, audited)
STREAMED = ("ratio", "target_flops", "target_params", "tolerance", "criterion", "uniform", "global_ranking",
            "max_ratio", "round_to", "prune_heads", "ignored_layers")
_NOT_STREAMED = {"steps": 1, "schedule": "linear", "leaf_modules": [], "capture": "auto", "verify": True,
                 "target_latency": None}


def streamed_options(options: dict) -> dict:
    """``options`` for :func:`graphprune.prune_checkpoint`; ValueError naming one it cannot take."""
    for key, default in _NOT_STREAMED.items():
        if options.get(key, default) != default:
            flag = "no-verify" if key == "verify" else key.replace("_", "-")
            raise ValueError(f"--stream cannot take --{flag}")
    return {k: v for k, v in options.items() if k in STREAMED}
