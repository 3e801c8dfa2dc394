"""The checks, the table and the driver shared by the long-tail sweeps (user_models.py, libraries.py).

One case is one model at one ratio. It PASSES when: ``graphprune.analyze`` is pure (every
state_dict value and every module's ``__dict__``, the contents of the containers and plain
objects it holds included, are unchanged after it) and raises nothing but graphprune's own
errors; ``graphprune.prune(model, ratio, inputs)`` succeeds; the output keeps its shapes and
stays finite; at most 90% of the parameters are left; one train step (train mode, forward,
backward, SGD step) runs; and ``graphprune.save`` -> ``graphprune.load`` into a freshly built
model gives bit-identical outputs. Torch-Pruning (``--peer``) is held to the same checks, with
its own dependency-graph construction in place of ``analyze`` and ``torch.save`` of the whole
module in place of graphprune's files. Every case runs in this process under a time guard
(SIGALRM); an exception never stops the sweep.
"""
from __future__ import annotations

import argparse
import functools
import hashlib
import importlib.metadata
import io
import os
import signal
import sys
import tempfile
import time
import traceback
import types
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Optional, Sequence

_HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, str(Path(_HERE).parent / "tests"))

import torch  # noqa: E402
from torch import nn  # noqa: E402

import graphprune  # noqa: E402
from graphprune.tracer import call_model  # noqa: E402
from oracle import flat_outputs  # noqa: E402

GP, TP = "graphprune", "Torch-Pruning"
RESULTS = Path(_HERE) / "results"


@dataclass
class Case:
    """A model to sweep: ``build()`` gives a fresh ``(model, example inputs)`` with the same
    weights every time; ``head`` names the final classifier(s) Torch-Pruning must ignore
    (default: the last module with a weight)."""
    name: str
    build: Callable[[], tuple]
    head: Sequence[str] = ()
    note: str = ""


@dataclass
class Outcome:
    case: str
    ratio: float
    tool: str
    passed: bool = False
    params_left: Optional[float] = None
    seconds: Optional[float] = None
    reason: str = ""
    impure: list = field(default_factory=list)
    internal: Optional[str] = None
    note: str = ""


class CaseTimeout(Exception):
    """The per-case time guard fired."""


class CheckFailed(Exception):
    """A check that ran and did not hold."""


# ---------------------------------------------------------------------------- purity


_ROUTINES = (types.FunctionType, types.MethodType, types.BuiltinFunctionType, functools.partial)


def _tensor_print(t: torch.Tensor) -> tuple:
    if t.device.type == "meta" or t.is_sparse:
        return ("tensor", id(t), str(t.dtype), tuple(t.shape))
    data = t.detach().cpu().contiguous().reshape(-1)
    digest = hashlib.sha1(data.view(torch.uint8).numpy().tobytes()).hexdigest() if data.numel() else ""
    return ("tensor", id(t), str(t.dtype), tuple(t.shape), t.requires_grad, digest)


def fingerprint(value: Any, depth: int = 4, seen: frozenset = frozenset()) -> Any:
    """A comparable picture of ``value``: tensors by identity and content, containers and plain
    objects by identity and (down to ``depth``) their contents, modules by identity."""
    if isinstance(value, torch.Tensor):
        return _tensor_print(value)
    if value is None or isinstance(value, (bool, int, float, complex, str, bytes)):
        return (type(value).__name__, repr(value))
    if isinstance(value, (nn.Module, type, *_ROUTINES)):
        return ("ref", type(value).__name__, id(value))
    if depth == 0 or id(value) in seen:
        return ("ref", type(value).__name__, id(value))
    seen = seen | {id(value)}
    inner = lambda v: fingerprint(v, depth - 1, seen)  # noqa: E731
    if isinstance(value, dict):
        return ("dict", type(value).__name__, id(value), tuple((repr(k), inner(v)) for k, v in value.items()))
    if isinstance(value, (list, tuple)):
        return ("seq", type(value).__name__, id(value), tuple(inner(v) for v in value))
    if isinstance(value, (set, frozenset)):
        return ("set", type(value).__name__, id(value), tuple(sorted(repr(v) for v in value)))
    attributes = getattr(value, "__dict__", None)
    if isinstance(attributes, dict):
        return ("obj", type(value).__name__, id(value), tuple((k, inner(v)) for k, v in attributes.items()))
    return ("ref", type(value).__name__, id(value))


def snapshot(model: nn.Module) -> dict:
    """``{where: fingerprint}`` for every state_dict entry and every module attribute."""
    found = {f"state_dict[{k}]": _tensor_print(v) for k, v in model.state_dict(keep_vars=True).items()}
    for name, module in model.named_modules(remove_duplicate=False):
        for key, value in vars(module).items():
            found[f"{name or '<model>'}.{key}"] = fingerprint(value)
    return found


def impurities(before: dict, after: dict) -> list:
    """Where ``after`` differs from ``before`` (added, removed or changed entries)."""
    return sorted(k for k in before.keys() | after.keys() if before.get(k) != after.get(k))


# ---------------------------------------------------------------------------- checks


def _float_outputs(outputs) -> list:
    return [t for t in flat_outputs(outputs) if t.is_floating_point() or t.is_complex()]


def reference(model: nn.Module, inputs) -> dict:
    with torch.no_grad():
        outputs = flat_outputs(call_model(model, inputs))
    return {"shapes": [tuple(t.shape) for t in outputs], "params": graphprune.count_parameters(model),
            "finite": all(bool(t.isfinite().all()) for t in _float_outputs(outputs))}


def check_forward(model: nn.Module, inputs, ref: dict) -> None:
    with torch.no_grad():
        outputs = flat_outputs(call_model(model, inputs))
    shapes = [tuple(t.shape) for t in outputs]
    if shapes != ref["shapes"]:
        raise CheckFailed(f"output shapes {shapes} != {ref['shapes']}")
    if ref["finite"] and not all(bool(t.isfinite().all()) for t in _float_outputs(outputs)):
        raise CheckFailed("output not finite")
    left = graphprune.count_parameters(model) / ref["params"]
    if left > 0.9:
        raise CheckFailed(f"params left {left:.3f} > 0.9")


def train_step(model: nn.Module, inputs) -> None:
    """Forward in train mode, backward of a loss over every floating output, one SGD step."""
    model.train()
    try:
        optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=1e-3)
        with torch.enable_grad():
            outputs = [t for t in _float_outputs(call_model(model, inputs)) if t.requires_grad]
            if not outputs:
                raise CheckFailed("no output requires grad")
            sum(t.abs().square().float().mean() for t in outputs).backward()
        optimizer.step()
    finally:
        model.zero_grad(set_to_none=True)
        model.eval()


def same_outputs(a: nn.Module, b: nn.Module, inputs) -> bool:
    with torch.no_grad():
        x, y = flat_outputs(call_model(a, inputs)), flat_outputs(call_model(b, inputs))
    return len(x) == len(y) and all(torch.equal(p, q) for p, q in zip(x, y))


def graphprune_round_trip(model: nn.Module, inputs, fresh: Callable[[], nn.Module]) -> None:
    with tempfile.TemporaryDirectory() as directory:
        path = os.path.join(directory, "model.safetensors")
        graphprune.save(model, path)
        loaded = graphprune.load(fresh(), path)
    if not same_outputs(model, loaded, inputs):
        raise CheckFailed("save/load outputs differ")


def pickle_round_trip(model: nn.Module, inputs, fresh: Callable[[], nn.Module]) -> None:
    buffer = io.BytesIO()
    torch.save(model, buffer)
    buffer.seek(0)
    if not same_outputs(model, torch.load(buffer, weights_only=False), inputs):
        raise CheckFailed("torch.save/load outputs differ")


def is_internal(exc: BaseException) -> bool:
    """An exception of a class that is not graphprune's own."""
    return not type(exc).__module__.startswith("graphprune")


def describe(exc: BaseException) -> str:
    cause = exc.__cause__ or exc.__context__
    text = f"{type(exc).__name__}: {' '.join(str(exc).split())}"
    if cause is not None and is_internal(cause) and not isinstance(exc, CheckFailed):
        text += f" [from {type(cause).__name__}: {' '.join(str(cause).split())[:80]}]"
    located = exc.__traceback__ is not None and not isinstance(exc, CheckFailed)
    frame = traceback.extract_tb(exc.__traceback__)[-1:] if located else []
    where = f" @ {Path(frame[0].filename).name}:{frame[0].lineno}" if frame else ""
    return text[:200] + where


# ---------------------------------------------------------------------------- one case


def _analyze_graphprune(model, inputs, ratio, case):
    report = graphprune.analyze(model, inputs)
    return lambda: graphprune.prune(model, ratio, inputs), lambda: biggest_blocked(report)


BOUNDARY = ("model input", "model output")  # BlockKind values every model has


def biggest_blocked(report) -> str:
    """Why the biggest group blocked by more than the model's inputs and outputs is blocked."""
    inner = [(g, [r for r in g.blocked if getattr(getattr(r, "kind", None), "value", None) not in BOUNDARY])
             for g in report.blocked_groups]
    inner = sorted(((g, reasons) for g, reasons in inner if reasons), key=lambda pair: -pair[0].param_share)
    if not report.groups:
        return " (the analysis found no channel group at all)"
    if not inner:
        return f" ({len(report.prunable_groups)} prunable groups; the rest reach the model's inputs or outputs)"
    group, reasons = inner[0]
    return (f" ({len(inner)} groups blocked inside; biggest, {group.param_share:.0%} of params: "
            f"{'; '.join(reasons)[:140]})")


def _analyze_torch_pruning(model, inputs, ratio, case):
    import torch_pruning as tp

    ignored = [model.get_submodule(n) for n in case.head] or [classifier_of(model)]
    pruner = tp.pruner.MagnitudePruner(model, inputs, importance=tp.importance.MagnitudeImportance(p=1),
                                       pruning_ratio=ratio, ignored_layers=ignored)
    return pruner.step, lambda: ""


def classifier_of(model: nn.Module) -> nn.Module:
    """The model's output embedding (a language model's head), else :func:`last_weighted`."""
    output = getattr(model, "get_output_embeddings", None)
    head = output() if callable(output) else None
    return head if isinstance(head, nn.Module) else last_weighted(model)


def last_weighted(model: nn.Module) -> nn.Module:
    """The last module (in registration order) that holds a weight: the usual classifier."""
    return [m for m in model.modules() if isinstance(getattr(m, "weight", None), torch.Tensor)][-1]


def _trains(case: Case) -> bool:
    """Whether the unpruned model's train step runs (else a failing one is not the pruning's doing)."""
    try:
        train_step(*case.build())
        return True
    except Exception:
        return False


def run_case(case: Case, ratio: float, tool: str, timeout: float) -> Outcome:
    """One model, one ratio, one tool; every check in order, the first failure is the reason.
    ``seconds`` is the time of the analysis and the pruning (the tool's whole run)."""
    outcome = Outcome(case.name, ratio, tool)
    analyze = _analyze_graphprune if tool == GP else _analyze_torch_pruning
    round_trip = graphprune_round_trip if tool == GP else pickle_round_trip
    stage = "build"

    def expired(signum, frame):
        raise CaseTimeout(f"over {timeout:g} s")

    previous = signal.signal(signal.SIGALRM, expired)
    signal.alarm(int(timeout))
    start = time.perf_counter()
    try:
        torch.manual_seed(0)
        model, inputs = case.build()
        ref = reference(model, inputs)
        stage, before = "analyze", snapshot(model)
        start = time.perf_counter()
        try:
            prune, explain = analyze(model, inputs, ratio, case)
        finally:
            spent = time.perf_counter() - start
            outcome.impure = impurities(before, snapshot(model))
        stage, start = "prune", time.perf_counter()
        prune()
        outcome.seconds = spent + time.perf_counter() - start
        outcome.params_left = graphprune.count_parameters(model) / ref["params"]
        stage = "forward"
        try:
            check_forward(model, inputs, ref)
        except CheckFailed as exc:
            raise CheckFailed(f"{exc}{explain() if 'params left' in str(exc) else ''}") from None
        stage = "save/load"
        round_trip(model, inputs, lambda: case.build()[0])
        stage = "train"
        try:
            train_step(model, inputs)
        except Exception:
            if _trains(case):
                raise
            outcome.note = "train step fails unpruned too"
        if outcome.impure:
            raise CheckFailed(f"analysis changed {len(outcome.impure)} attribute(s): {', '.join(outcome.impure[:3])}")
        outcome.passed = True
    except Exception as exc:  # one failure never stops the sweep
        if stage in ("analyze", "prune") and (is_internal(exc) or tool == TP) and not isinstance(exc, CaseTimeout):
            outcome.internal = f"{type(exc).__name__} in {stage}"
        outcome.reason = f"{stage}: {describe(exc)}"
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, previous)
    if outcome.seconds is None:
        outcome.seconds = time.perf_counter() - start
    return outcome


# ---------------------------------------------------------------------------- report


def _cell(text: str, limit: int = 160) -> str:
    text = text.replace("|", "\\|").replace("\n", " ")
    return text if len(text) <= limit else text[: limit - 1] + "…"


def table(outcomes: list, peer: bool) -> list:
    by_key = {(o.case, o.ratio, o.tool): o for o in outcomes}
    head = "| model | ratio | pass | params left | s | failure |"
    head += " TP pass | TP params | TP failure |" if peer else ""
    lines = [head, "|" + "---|" * head.count(" |")]
    for o in (o for o in outcomes if o.tool == GP):
        left = f"{o.params_left:.3f}" if o.params_left is not None else "–"
        row = (f"| {o.case} | {o.ratio:g} | {'PASS' if o.passed else 'FAIL'} | {left} | {o.seconds:.2f} | "
               f"{_cell(o.reason or o.note, 240)} |")
        p = by_key.get((o.case, o.ratio, TP))
        if peer and p:
            p_left = f"{p.params_left:.3f}" if p.params_left is not None else "–"
            row += f" {'PASS' if p.passed else 'FAIL'} | {p_left} | {_cell(p.reason or p.note, 100)} |"
        lines.append(row)
    return lines


def summary(outcomes: list, peer: bool) -> list:
    lines = []
    for tool in (GP, TP) if peer else (GP,):
        mine = [o for o in outcomes if o.tool == tool]
        if not mine:
            continue
        impure = [o for o in mine if o.impure]
        internal = [o for o in mine if o.internal]
        raised = ("internal exceptions (a class not graphprune's own, raised by analyze/prune)" if tool == GP
                  else "exceptions raised by the pruner's construction or step")
        lines += [f"**{tool}: {sum(o.passed for o in mine)} of {len(mine)} pass**; purity violations: {len(impure)} "
                  f"case(s); {raised}: {len(internal)}"]
        lines += [f"- impure: {o.case}@{o.ratio:g}: {', '.join(o.impure[:4])}" for o in impure[:20]]
        lines += [f"- internal: {o.case}@{o.ratio:g}: {o.internal}: {_cell(o.reason, 200)}" for o in internal[:40]]
    return lines


def versions(names: Sequence[str]) -> str:
    found = []
    for name in ("torch", *names):
        try:
            found.append(f"{name} {importlib.metadata.version(name)}")
        except importlib.metadata.PackageNotFoundError:
            found.append(f"{name} not installed")
    return ", ".join(found)


def parse_args(description: str, argv: Optional[list], default_out: str) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--only", help="comma-separated case names (default: all)")
    parser.add_argument("--ratios", default="0.3,0.5", help="comma-separated ratios (default 0.3,0.5)")
    parser.add_argument("--timeout", type=float, default=120.0, help="seconds per case (default 120)")
    parser.add_argument("--peer", action="store_true", help="also run Torch-Pruning (MagnitudePruner, L1)")
    parser.add_argument("--out", nargs="?", const=str(RESULTS / default_out),
                        help=f"also write the markdown here (default results/{default_out})")
    args = parser.parse_args(argv)
    args.ratios = [float(r) for r in args.ratios.split(",")]
    return args


def sweep(cases: list, args: argparse.Namespace, title: str, skipped: Sequence[str] = ()) -> int:
    """Run every case at every ratio (and Torch-Pruning with ``--peer``); print the markdown."""
    torch.set_num_threads(1)
    warnings.filterwarnings("ignore")
    wanted = set(args.only.split(",")) if args.only else None
    outcomes = []
    for case in (c for c in cases if wanted is None or c.name in wanted):
        for ratio in args.ratios:
            for tool in (GP, TP) if args.peer else (GP,):
                outcome = run_case(case, ratio, tool, args.timeout)
                outcomes.append(outcome)
                status = "pass" if outcome.passed else outcome.reason[:150]
                print(f"  {case.name} {ratio:g} {tool}: {status} ({outcome.seconds:.2f} s)", file=sys.stderr,
                      flush=True)
    text = "\n".join([title, "", *table(outcomes, args.peer), "", *summary(outcomes, args.peer),
                      *(["", "Skipped:"] + [f"- {s}" for s in skipped] if skipped else [])])
    print(text)
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(text + "\n")
    return 0 if all(o.passed for o in outcomes if o.tool == GP) else 1
