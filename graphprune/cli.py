"""Command line interface: ``graphprune analyze | prune | finetune | sensitivity | report | export``.

MODEL arguments are resolved by :mod:`graphprune.cli_models` (torchvision names, ``cifar:``,
``torchvision:`` and ``timm:`` names, or files written by ``--output``).

Exit status: 0 on success, 2 for a bad command line (unknown model, bad ratio, an input
shape the model does not accept, a file that cannot be loaded, ...), 1 when the work itself
fails. Errors are one line on stderr; ``--traceback`` shows the full traceback instead.
"""
from __future__ import annotations

import argparse
import contextlib
import importlib.util
import inspect
import json
import logging
import math
import os
import sys
import textwrap
import time
import warnings
from typing import Any, Callable, Optional, Sequence, TextIO

from .cli_models import (
    MODEL_HELP, ModelSpec, UsageError, build_model, check_output_path, digits_for, example_inputs, parse_model,
    python_builder, save_model,
)

EXIT_OK, EXIT_FAILURE, EXIT_USAGE = 0, 1, 2

_EPILOG = (
    "exit status: 0 on success, 2 for a bad command line (unknown model, bad ratio, an input the "
    "model rejects, a file that cannot be loaded), 1 when the work fails. Progress goes to stderr; results to stdout."
)

_MODELS_TEXT = """\
MODEL is one of:
  NAME              a torchvision model such as resnet18, random weights
                    (weights=None); a name only graphprune.models has, such
                    as resnet20, is that CIFAR model
  cifar:NAME        a graphprune.models CIFAR model (32x32 input, 10 classes);
                    the prefix is needed for the names torchvision also has
                    (resnet18/34/50/101/152, vgg11_bn..vgg19_bn, mobilenet_v2),
                    which mean torchvision's without it
  torchvision:NAME  a torchvision model, explicitly
  timm:NAME         timm.create_model(NAME, pretrained=False) (needs timm)
  FILE              a model written by --output (graphprune.save safetensors);
                    FILE.json beside it names the model to load it into
  SOURCE=FILE       a graphprune.save file without FILE.json, such as
                    cifar:resnet20=pruned.safetensors

Models are built after torch.manual_seed(0): the same name always gives the same random weights.
"""

_SAVE_HELP = (
    "write the model with graphprune.save (safetensors weights + pruning spec, no pickle) and FILE.json naming "
    "the model it was built from, so that FILE can be given as MODEL to the other commands; from Python: "
    "graphprune.load(<the fresh model>, FILE). Suggested suffix: .safetensors"
)


class _Formatter(argparse.HelpFormatter):
    """Wraps each paragraph of a description or epilog; keeps indented blocks (the MODEL list) as written."""

    def _fill_text(self, text: str, width: int, indent: str) -> str:
        paragraphs = []
        for paragraph in text.strip("\n").split("\n\n"):
            if "\n " in paragraph:
                paragraphs.append(textwrap.indent(paragraph, indent))
            else:
                paragraphs.append(textwrap.fill(" ".join(paragraph.split()), width, initial_indent=indent,
                                                subsequent_indent=indent))
        return "\n\n".join(paragraphs)


class _Parser(argparse.ArgumentParser):
    """An argparse parser whose errors are a single line on stderr (exit status 2)."""

    def error(self, message: str):  # type: ignore[override]
        self.exit(EXIT_USAGE, f"{self.prog}: error: {message} (see '{self.prog} --help')\n")


class _Status:
    """Short progress messages on stderr: one self-overwriting line on a terminal, plain lines otherwise."""

    def __init__(self, enabled: bool, stream: Optional[TextIO] = None):
        self.enabled = enabled
        self.stream = stream if stream is not None else sys.stderr
        self.tty = bool(getattr(self.stream, "isatty", lambda: False)())
        self._pending = False

    def __call__(self, message: str) -> None:
        if not self.enabled:
            return
        if self.tty:
            self.stream.write("\r\x1b[K" + message)
            self._pending = True
        else:
            self.stream.write(message + "\n")
        self.stream.flush()

    def clear(self) -> None:
        if self._pending:
            self.stream.write("\r\x1b[K")
            self.stream.flush()
            self._pending = False

    def note(self, message: str) -> None:
        """A line that stays (a warning, a notice): shown even with --quiet."""
        self.clear()
        self.stream.write(message + "\n")
        self.stream.flush()


# ---------------------------------------------------------------- argument types


def _ratio(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"ratio must be a number in [0, 1), got {text!r}") from None
    if math.isnan(value) or not 0.0 <= value < 1.0:
        raise argparse.ArgumentTypeError(f"ratio must lie in [0, 1), got {text}")
    return value


def _ratio_list(text: str) -> tuple:
    values = []
    for part in text.split(","):
        try:
            value = float(part)
        except ValueError:
            raise argparse.ArgumentTypeError(f"ratios must be comma-separated numbers such as 0.1,0.3,0.5, got {text!r}") from None
        if math.isnan(value) or not 0.0 < value < 1.0:
            raise argparse.ArgumentTypeError(f"every ratio must lie in (0, 1), got {part.strip()}")
        values.append(value)
    return tuple(sorted(set(values)))


def _number(kind: type, low: float, open_low: bool = False) -> Callable[[str], Any]:
    def parse(text: str):
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected {'an integer' if kind is int else 'a number'}, got {text!r}") from None
        if (isinstance(value, float) and not math.isfinite(value)) or value < low or (open_low and value == low):
            raise argparse.ArgumentTypeError(f"must be {'>' if open_low else '>='} {low:g}, got {text}")
        return value

    return parse


def _shape(text: str) -> tuple:
    parts = [p.strip() for p in text.replace("x", ",").split(",")]
    try:
        dims = tuple(int(p) for p in parts)
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"input shape must be comma-separated positive integers such as 1,3,224,224, got {text!r}"
        ) from None
    if not dims or any(d < 1 for d in dims):
        raise argparse.ArgumentTypeError(f"input shape must be positive integers such as 1,3,224,224, got {text!r}")
    return dims


def _criteria() -> list:
    """Criteria that can be built from a name alone (those that need training data cannot)."""
    from criteria import CRITERIA

    return sorted(name for name, cls in CRITERIA.items() if not getattr(cls, "requires_data", False))


def _data_criteria_note() -> str:
    from criteria import CRITERIA

    needing = sorted(set(CRITERIA) - set(_criteria()))
    return f"{', '.join(needing)} need training data and are only available from Python" if needing else ""


def _criterion(text: str) -> str:
    from criteria import CRITERIA

    name = text.lower()
    if name in CRITERIA and name not in _criteria():
        raise argparse.ArgumentTypeError(
            f"criterion {text!r} needs training data, which the command line cannot supply; "
            f"choose one of {', '.join(_criteria())}"
        )
    if name not in CRITERIA:
        raise argparse.ArgumentTypeError(f"unknown criterion {text!r}; choose one of {', '.join(_criteria())}")
    return name


# ---------------------------------------------------------------- parser


def _build_parser() -> argparse.ArgumentParser:
    from . import __version__

    options = argparse.ArgumentParser(add_help=False)
    options.add_argument(
        "--input-shape", type=_shape, metavar="N,C,H,W",
        help="shape of the random example input, e.g. 1,3,224,224 (default: the shape a saved model was used with, "
        "1,3,32,32 for cifar: models, else inferred from the model)",
    )
    options.add_argument("--json", action="store_true", help="print the result as JSON on stdout")
    options.add_argument("-q", "--quiet", action="store_true", help="no progress messages on stderr")
    options.add_argument("--traceback", action="store_true", help="on failure, show the full traceback")
    one = argparse.ArgumentParser(add_help=False, parents=[options])
    one.add_argument("model", metavar="MODEL", help=MODEL_HELP)
    criterion = argparse.ArgumentParser(add_help=False)
    criterion.add_argument(
        "--criterion", type=_criterion, default="l1", metavar="{" + ",".join(_criteria()) + "}",
        help="channel importance criterion (default: l1); " + _data_criteria_note(),
    )
    digits = argparse.ArgumentParser(add_help=False)
    digits.add_argument("--batch-size", type=_number(int, 1), default=64, metavar="B", help="batch size (default: 64)")
    digits.add_argument(
        "--limit-batches", type=_number(int, 1), metavar="K",
        help="use only the first K batches of the training and of the test set (quick checks)",
    )

    def command(name: str, parents: list, help: str, description: str) -> argparse.ArgumentParser:
        sub = commands.add_parser(name, parents=parents, help=help, description=description, epilog=_EPILOG,
                                  formatter_class=_Formatter)
        sub.set_defaults(handler=_HANDLERS[name])
        return sub

    parser = _Parser(
        prog="graphprune",
        description="Structured channel pruning for PyTorch: analyze, prune, fine-tune, measure and export a model.\n\n"
        + _MODELS_TEXT,
        epilog="Run 'graphprune COMMAND --help' for a command's options.\n\n" + _EPILOG, formatter_class=_Formatter,
    )
    parser.add_argument("--version", action="version", version=f"graphprune {__version__}")
    commands = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)

    command("analyze", [one], "report the coupled channel groups of a model",
            "Trace a model and print every coupled channel group, with the model's parameter and FLOP counts.")

    prune = command("prune", [one, criterion], "prune a model and report parameters and FLOPs before and after",
                    "Prune floor(RATIO * n) channels from every prunable group of n channels of a model, and print "
                    "parameters and FLOPs before and after and the time taken.")
    prune.add_argument("--ratio", type=_ratio, required=True, help="fraction of each group's channels to remove, in [0, 1)")
    prune.add_argument("--output", "-o", metavar="FILE", help=_SAVE_HELP)

    finetune = command("finetune", [one, digits], "fine-tune a model on the built-in digits data set",
                       "Fine-tune a model (typically a pruned FILE) on scikit-learn's digits, shaped like the model's "
                       "input (e.g. 3x32x32 for cifar: models; 1,437 training and 360 test images, 10 classes), "
                       "printing the test accuracy before and after every epoch. SGD with momentum, warm-up then "
                       "cosine decay (graphprune.finetune).")
    finetune.add_argument("--epochs", type=_number(int, 1), required=True, metavar="N", help="number of epochs")
    finetune.add_argument("--lr", type=_number(float, 0.0, open_low=True), default=0.01, help="peak learning rate (default: 0.01)")
    finetune.add_argument("--warmup-epochs", type=_number(float, 0.0), metavar="W",
                          help="linear warm-up length in epochs, less than --epochs (default: min(1, epochs / 10))")
    finetune.add_argument("--teacher", metavar="MODEL", help="distil from this model (e.g. the unpruned, trained one)")
    finetune.add_argument("--alpha", type=_number(float, 0.0), default=0.5, metavar="A",
                          help="weight of the distillation loss, in [0, 1] (default: 0.5)")
    finetune.add_argument("--temperature", type=_number(float, 0.0, open_low=True), default=4.0, metavar="T",
                          help="distillation temperature (default: 4)")
    finetune.add_argument("--output", "-o", metavar="FILE", help=_SAVE_HELP)

    sens = command("sensitivity", [one, digits, criterion], "measure how much pruning each group alone costs",
                   "Prune every prunable group alone at each ratio (graphprune.sensitivity) and measure the test "
                   "accuracy on the digits data set (shaped like the model's input); print the accuracy drop per "
                   "group and ratio, and the largest ratio per group whose drop stays within --max-drop.")
    sens.add_argument("--ratios", type=_ratio_list, default=(0.1, 0.3, 0.5), metavar="R1,R2,...",
                      help="ratios to try, each in (0, 1) (default: 0.1,0.3,0.5)")
    sens.add_argument("--max-drop", type=_number(float, 0.0), default=0.02, metavar="D",
                      help="accuracy drop allowed per group when deriving ratios, as a fraction (default: 0.02)")
    sens.add_argument("--conservative", action="store_true",
                      help="derive each group's ratio from the ratios below the first one that drops too much")
    sens.add_argument("--plot", metavar="FILE.png", help="write a PNG of accuracy against ratio, one curve per group")

    rep = command("report", [options], "compare a model before and after pruning",
                  "Parameters, FLOPs and median latency of BEFORE and AFTER with after/before ratios, and the "
                  "channels of every group before and after (graphprune.report).")
    rep.add_argument("before", metavar="BEFORE", help="the unpruned MODEL, e.g. cifar:resnet20")
    rep.add_argument("after", metavar="AFTER", help="the pruned MODEL, e.g. a FILE written by prune --output")
    rep.add_argument("--repeats", type=_number(int, 1), default=20, metavar="N", help="timed forward passes per model (default: 20)")
    rep.add_argument("--no-latency", action="store_true", help="skip the latency measurement")

    export = command("export", [one], "export a model to ONNX, torch.export, DOT or PNG",
                     "Export a model: onnx (torch.onnx.export), torch.export (torch.export.export, then "
                     "torch.export.save; load with torch.export.load), or a picture of its channel graph coloured "
                     "by group: dot (Graphviz text) or png (graphprune.visualize).")
    export.add_argument("--format", "-f", required=True, choices=("onnx", "torch.export", "dot", "png"),
                        help="what to write")
    export.add_argument("--output", "-o", metavar="FILE", required=True,
                        help="the file to write (suggested suffixes: .onnx, .pt2, .dot, .png)")
    return parser


# ---------------------------------------------------------------- helpers


def _load(text: str, status: _Status, role: str = "") -> tuple[ModelSpec, Any]:
    spec = parse_model(text)
    try:
        return spec, build_model(spec, status)
    except UsageError:
        raise
    except Exception as exc:
        raise UsageError(f"cannot build {role}{spec.canonical}: {type(exc).__name__}: {_one_line(exc)}") from exc


def _check_accepts(model, inputs, name: str, description: str):
    """Run one forward pass; a model that rejects the input is a bad command line. Returns the output."""
    import torch

    try:
        with torch.no_grad():
            return model(inputs)
    except Exception as exc:
        raise UsageError(f"{name} does not accept {description}: {_one_line(exc)}") from exc


def _classifier_width(output, name: str) -> int:
    from .data import DIGITS_CLASSES

    if not hasattr(output, "dim") or output.dim() != 2 or output.shape[1] < DIGITS_CLASSES:
        shape = tuple(output.shape) if hasattr(output, "shape") else type(output).__name__
        raise UsageError(f"{name} must output (N, classes) logits with at least {DIGITS_CLASSES} classes for the "
                         f"digits data set, got {shape}")
    return int(output.shape[1])


def _count(model, inputs, name: str, description: str, status: _Status) -> tuple[int, int]:
    """Parameters and FLOPs; the FLOP count's forward pass doubles as a check that the input fits."""
    from .measure import count_flops, count_parameters

    status("counting parameters and FLOPs...")
    params = count_parameters(model)
    try:
        flops = count_flops(model, inputs)
    except Exception as exc:  # any failure here means the model rejects the input
        raise UsageError(f"{name} does not accept {description}: {_one_line(exc)}") from exc
    return params, flops


def _one_line(exc: BaseException) -> str:
    text = " ".join(str(exc).split()) or type(exc).__name__
    return text if len(text) <= 500 else text[:499] + "…"


def _human(n: float) -> str:
    for unit, scale in (("G", 1e9), ("M", 1e6), ("k", 1e3)):
        if abs(n) >= scale:
            return f"{n / scale:.2f}{unit}"
    return f"{n:g}"


def _ratio_of(after: int, before: int) -> Optional[float]:
    return after / before if before else None


def _jsonable(value: Any) -> Any:
    if getattr(value, "ndim", 0) and hasattr(value, "tolist"):  # numpy / torch arrays
        return value.tolist()
    if hasattr(value, "item"):  # numpy / torch scalars
        return value.item()
    return str(value)


def _print_json(payload: dict) -> None:
    print(json.dumps(payload, indent=2, default=_jsonable))


@contextlib.contextmanager
def _recording(status: _Status):
    """Collect warnings during the block and show each as one line on stderr afterwards."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        yield
    status.clear()
    seen = set()
    for w in caught:
        text = _one_line(w.message)
        if text not in seen:
            seen.add(text)
            status.note(f"graphprune: warning: {text}")


def _stdout_to_stderr():
    """Libraries that print progress on stdout (tqdm.write, torch.onnx) must not mix it with results."""
    return contextlib.redirect_stdout(sys.stderr)


def _saved_note(paths: list, spec: ModelSpec) -> str:
    return (f"saved to {paths[0]} (graphprune.save; {os.path.basename(paths[1])} names {spec.canonical}; "
            f"give {paths[0]} as MODEL, or graphprune.load({python_builder(spec)}, {paths[0]!r}))")


def _table(rows: list) -> str:
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    return "\n".join("  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(r, widths))).rstrip()
                     for r in rows)


# ---------------------------------------------------------------- commands


def _cmd_analyze(args: argparse.Namespace, status: _Status) -> int:
    from .api import analyze

    spec, model = _load(args.model, status)
    inputs, description = example_inputs(model, spec, args.input_shape)
    params, flops = _count(model, inputs, args.model, description, status)
    status(f"tracing {args.model}...")
    start = time.perf_counter()
    with _recording(status):
        report = analyze(model, inputs)
    seconds = time.perf_counter() - start
    if args.json:
        _print_json({
            "model": args.model, "source": spec.canonical, "model_class": report.model_name,
            "input": report.input_description, "parameters": params, "flops": flops,
            "groups": len(report.groups), "prunable_groups": len(report.prunable_groups),
            "blocked_groups": len(report.blocked_groups), "seconds": seconds, "rows": report.rows(),
        })
    else:
        print(report)
        print()
        print(f"parameters: {params:,} ({_human(params)})   FLOPs: {flops:,} ({_human(flops)})   "
              f"analysis: {seconds:.2f} s")
    return EXIT_OK


def _cmd_prune(args: argparse.Namespace, status: _Status) -> int:
    from .api import prune
    from .measure import count_flops, count_parameters

    check_output_path(args.output)
    spec, model = _load(args.model, status)
    inputs, description = example_inputs(model, spec, args.input_shape)
    params_before, flops_before = _count(model, inputs, args.model, description, status)
    status(f"analyzing and pruning {args.model} at ratio {args.ratio:g}...")
    start = time.perf_counter()
    with _recording(status):
        model = prune(model, args.ratio, inputs, criterion=args.criterion)
        seconds = time.perf_counter() - start
        status("counting parameters and FLOPs of the pruned model...")
        params_after = count_parameters(model)
        flops_after = count_flops(model, inputs)
        paths = None
        if args.output:
            status(f"saving to {args.output}...")
            paths = save_model(model, args.output, spec, inputs, "prune")

    params_ratio, flops_ratio = _ratio_of(params_after, params_before), _ratio_of(flops_after, flops_before)
    if args.json:
        _print_json({
            "model": args.model, "source": spec.canonical, "ratio": args.ratio, "criterion": args.criterion,
            "input": description, "params_before": params_before, "params_after": params_after,
            "params_ratio": params_ratio, "flops_before": flops_before, "flops_after": flops_after,
            "flops_ratio": flops_ratio, "seconds": seconds, "output": args.output,
            "sidecar": paths[1] if paths else None,
        })
        return EXIT_OK

    def row(label: str, before: int, after: int, ratio: Optional[float]) -> list:
        kept = f"{ratio:.3f} ({100 * (ratio - 1):+.1f}%)" if ratio is not None else "n/a"
        return [label, f"{before:,} ({_human(before)})", f"{after:,} ({_human(after)})", kept]

    print(f"graphprune: pruned {args.model} at ratio {args.ratio:g} (criterion {args.criterion}, input {description})")
    print(_table([["", "before", "after", "after/before"],
                  row("parameters", params_before, params_after, params_ratio),
                  row("FLOPs", flops_before, flops_after, flops_ratio)]))
    print(f"time (analysis + pruning): {seconds:.2f} s")
    if paths:
        print(_saved_note(paths, spec))
    return EXIT_OK


def _digits_setup(args: argparse.Namespace, status: _Status):
    """(spec, model, inputs, description, train, test) for the commands that use the digits."""
    spec, model = _load(args.model, status)
    inputs, description = example_inputs(model, spec, args.input_shape)
    width = _classifier_width(_check_accepts(model, inputs, args.model, description), args.model)
    train, test = digits_for(inputs, args.batch_size, args.limit_batches)
    return spec, model, inputs, description, width, train, test


def _cmd_finetune(args: argparse.Namespace, status: _Status) -> int:
    from .finetune import evaluate, finetune

    check_output_path(args.output)
    if args.alpha > 1:
        raise UsageError(f"--alpha must lie in [0, 1], got {args.alpha:g}")
    warmup = args.warmup_epochs if args.warmup_epochs is not None else min(1.0, args.epochs / 10)
    if warmup >= args.epochs and warmup > 0:
        raise UsageError(f"--warmup-epochs ({warmup:g}) must be less than --epochs ({args.epochs})")
    spec, model, inputs, description, width, train, test = _digits_setup(args, status)
    teacher = None
    if args.teacher is not None:
        _, teacher = _load(args.teacher, status, "teacher ")
        out = _check_accepts(teacher, inputs, f"teacher {args.teacher}", description)
        if tuple(getattr(out, "shape", ())) != (inputs.shape[0], width):
            raise UsageError(f"teacher {args.teacher} outputs {tuple(getattr(out, 'shape', ()))}, "
                             f"the model {(inputs.shape[0], width)}: they must match for distillation")
    status(f"evaluating {args.model} before fine-tuning...")
    before = evaluate(model, test)
    status.clear()
    start = time.perf_counter()
    with _recording(status), _stdout_to_stderr():  # finetune's per-epoch lines are progress here
        history = finetune(model, train, epochs=args.epochs, lr=args.lr, warmup_epochs=warmup, teacher=teacher,
                           alpha=args.alpha, temperature=args.temperature, eval_loader=test, progress=not args.quiet)
    seconds = time.perf_counter() - start
    paths = None
    if args.output:
        status(f"saving to {args.output}...")
        paths = save_model(model, args.output, spec, inputs, "finetune")
        status.clear()
    data = (f"digits at {'x'.join(map(str, inputs.shape[1:]))}: {len(train)} training and {len(test)} test batches "
            f"of up to {args.batch_size}")
    if args.json:
        _print_json({
            "model": args.model, "source": spec.canonical, "teacher": args.teacher, "epochs": args.epochs,
            "lr": args.lr, "warmup_epochs": warmup, "batch_size": args.batch_size, "limit_batches": args.limit_batches,
            "data": data, "accuracy_before": before, "accuracy": history[-1]["accuracy"], "history": history,
            "seconds": seconds, "output": args.output, "sidecar": paths[1] if paths else None,
        })
        return EXIT_OK
    print(f"graphprune: fine-tuned {args.model} for {args.epochs} epoch(s) at lr {args.lr:g} on {data}"
          + (f", distilling from {args.teacher}" if args.teacher else ""))
    rows = [["epoch", "loss", "lr", "accuracy"], ["before", "-", "-", f"{100 * before:.2f}%"]]
    rows += [[str(h["epoch"]), f"{h['loss']:.4f}", f"{h['lr']:.3g}", f"{100 * h['accuracy']:.2f}%"] for h in history]
    print(_table(rows))
    print(f"time: {seconds:.2f} s")
    if paths:
        print(_saved_note(paths, spec))
    return EXIT_OK


def _cmd_sensitivity(args: argparse.Namespace, status: _Status) -> int:
    from .finetune import evaluate
    from .sensitivity import sensitivity

    if args.plot is not None:
        check_output_path(args.plot, "--plot")
    spec, model, inputs, description, _, _, test = _digits_setup(args, status)
    status(f"measuring the sensitivity of {args.model} (accuracy on {len(test)} test batches)...")
    start = time.perf_counter()
    with _recording(status):
        result = sensitivity(model, inputs, lambda m: evaluate(m, test), args.ratios, criterion=args.criterion,
                             progress=not args.quiet)
    seconds = time.perf_counter() - start
    derived = result.ratios_for(args.max_drop, conservative=args.conservative)
    if args.plot:
        status(f"plotting to {args.plot}...")
        result.plot(args.plot, title=f"Sensitivity of {args.model} on digits ({args.criterion})")
        status.clear()
    if args.json:
        _print_json({**result.to_dict(), "model": args.model, "source": spec.canonical, "input": description,
                     "metric": "accuracy", "max_drop": args.max_drop, "conservative": args.conservative,
                     "ratios_for": derived, "plot": args.plot, "seconds": seconds})
        return EXIT_OK
    print(result)
    print()
    print(f"per-group ratios keeping the accuracy drop within {args.max_drop:g} (module: ratio):")
    for key, value in derived.items():
        print(f"  {key}: {value:g}")
    print(f"time: {seconds:.2f} s")
    if args.plot:
        print(f"plot written to {args.plot}")
    return EXIT_OK


def _cmd_report(args: argparse.Namespace, status: _Status) -> int:
    from .compare import report

    before_spec, before = _load(args.before, status)
    after_spec, after = _load(args.after, status)
    shape = args.input_shape or after_spec.input_shape
    inputs, description = example_inputs(before, before_spec, shape)
    _check_accepts(before, inputs, args.before, description)
    _check_accepts(after, inputs, args.after, description)
    status("measuring parameters, FLOPs" + ("" if args.no_latency else " and latency") + "...")
    # torch.utils.benchmark imports cpp_extension, which logs a misleading "No CUDA runtime is found" on CPU machines
    logging.getLogger("torch.utils.cpp_extension").setLevel(logging.ERROR)
    with _recording(status):
        comparison = report(before, after, inputs, latency=not args.no_latency, repeats=args.repeats)
    if args.json:
        _print_json({"before": args.before, "after": args.after, **comparison.to_dict()})
    else:
        print(f"graphprune: {args.before} (before) vs {args.after} (after)")
        print(comparison)
    return EXIT_OK


def _export_onnx(model, inputs, path: str, quiet: bool) -> list:
    import torch

    missing = [m for m in ("onnx", "onnxscript") if importlib.util.find_spec(m) is None]
    if missing:
        raise UsageError(f"ONNX export needs {' and '.join(missing)}: pip install {' '.join(missing)}")
    kwargs = {}
    size = sum(t.numel() * t.element_size() for t in model.state_dict().values())
    external = size > 1 << 30  # protobuf files stop at 2 GiB: larger weights go to FILE.data
    if "external_data" in inspect.signature(torch.onnx.export).parameters:
        kwargs["external_data"] = external
    sink = open(os.devnull, "w") if quiet else sys.stderr
    try:
        with contextlib.redirect_stdout(sink):
            torch.onnx.export(model, (inputs,), path, input_names=["input"], output_names=["output"], **kwargs)
    finally:
        if quiet:
            sink.close()
    return [path] + ([path + ".data"] if external and os.path.exists(path + ".data") else [])


def _cmd_export(args: argparse.Namespace, status: _Status) -> int:
    import torch

    check_output_path(args.output)
    spec, model = _load(args.model, status)
    inputs, description = example_inputs(model, spec, args.input_shape)
    _check_accepts(model, inputs, args.model, description)
    status(f"exporting {args.model} as {args.format}...")
    start = time.perf_counter()
    with _recording(status):
        if args.format == "onnx":
            files = _export_onnx(model, inputs, args.output, args.quiet)
        elif args.format == "torch.export":
            program = torch.export.export(model, (inputs,))
            torch.export.save(program, args.output)
            files = [args.output]
        else:
            from . import visualize
            from .api import analyze

            report = analyze(model, inputs)
            (visualize.to_dot if args.format == "dot" else visualize.to_png)(report, args.output)
            files = [args.output]
    seconds = time.perf_counter() - start
    sizes = {f: os.path.getsize(f) for f in files}
    if args.json:
        _print_json({"model": args.model, "source": spec.canonical, "format": args.format, "input": description,
                     "output": args.output, "files": files, "bytes": sum(sizes.values()), "seconds": seconds})
    else:
        written = ", ".join(f"{f} ({_human(n)}B)" for f, n in sizes.items())
        print(f"graphprune: exported {args.model} ({description}) as {args.format} to {written} in {seconds:.2f} s")
    return EXIT_OK


_HANDLERS: dict = {
    "analyze": _cmd_analyze, "prune": _cmd_prune, "finetune": _cmd_finetune, "sensitivity": _cmd_sensitivity,
    "report": _cmd_report, "export": _cmd_export,
}


# ---------------------------------------------------------------- entry point


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Run the command line ``argv`` (default: ``sys.argv[1:]``); returns the exit status."""
    parser = _build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as exc:  # --help, --version or a usage error (already printed)
        return exc.code if isinstance(exc.code, int) else (EXIT_OK if exc.code is None else EXIT_USAGE)
    status = _Status(enabled=not args.quiet)
    prog = f"graphprune {args.command}"
    handler: Callable[[argparse.Namespace, _Status], int] = args.handler
    try:
        return handler(args, status)
    except UsageError as exc:
        status.clear()
        if args.traceback:
            raise
        print(f"{prog}: error: {exc}", file=sys.stderr)
        return EXIT_USAGE
    except KeyboardInterrupt:
        status.clear()
        print(f"{prog}: interrupted", file=sys.stderr)
        return 130
    except Exception as exc:  # a CLI reports failures as one line, not a traceback
        status.clear()
        if args.traceback:
            raise
        print(f"{prog}: error: {type(exc).__name__}: {_one_line(exc)} (--traceback for details)", file=sys.stderr)
        return EXIT_FAILURE


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
