"""Command line interface: ``graphprune analyze`` and ``graphprune prune`` on torchvision models.

Exit status: 0 on success, 2 for a bad command line (unknown model, bad ratio, an input
shape the model does not accept, ...), 1 when analysis or pruning fails. Errors are
one line on stderr; ``--traceback`` shows the full traceback instead.
"""
from __future__ import annotations

import argparse
import difflib
import json
import math
import os
import sys
import time
import warnings
from typing import Any, Callable, Optional, Sequence, TextIO

EXIT_OK, EXIT_FAILURE, EXIT_USAGE = 0, 1, 2

_EPILOG = (
    "exit status: 0 on success, 2 for a bad command line (unknown model, bad ratio, an input the "
    "model rejects), 1 when analysis or pruning fails. Progress goes to stderr; results to stdout."
)


class UsageError(Exception):
    """A bad command line: reported as one line, exit status 2."""


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


def _build_parser() -> argparse.ArgumentParser:
    from . import __version__

    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("model", metavar="MODEL", help="a torchvision model name, e.g. resnet18 (built with weights=None)")
    common.add_argument(
        "--input-shape", type=_shape, metavar="N,C,H,W",
        help="shape of the random example input, e.g. 1,3,224,224 (default: inferred from the model)",
    )
    common.add_argument("--json", action="store_true", help="print the result as JSON on stdout")
    common.add_argument("-q", "--quiet", action="store_true", help="no progress messages on stderr")
    common.add_argument("--traceback", action="store_true", help="on failure, show the full traceback")

    parser = _Parser(
        prog="graphprune",
        description="Structured channel pruning for PyTorch: analyze or prune a torchvision model.",
        epilog=_EPILOG,
    )
    parser.add_argument("--version", action="version", version=f"graphprune {__version__}")
    commands = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)

    analyze = commands.add_parser(
        "analyze", parents=[common], epilog=_EPILOG,
        help="report the coupled channel groups of a model",
        description="Trace a torchvision model and print every coupled channel group, with the "
        "model's parameter and FLOP counts.",
    )
    analyze.set_defaults(handler=_cmd_analyze)

    prune = commands.add_parser(
        "prune", parents=[common], epilog=_EPILOG,
        help="prune a model and report parameters and FLOPs before and after",
        description="Prune floor(RATIO * n) channels from every prunable group of n channels of a "
        "torchvision model, and print parameters and FLOPs before and after and the time taken.",
    )
    prune.add_argument("--ratio", type=_ratio, required=True, help="fraction of each group's channels to remove, in [0, 1)")
    prune.add_argument(
        "--criterion", type=_criterion, default="l1", metavar="{" + ",".join(_criteria()) + "}",
        help="channel importance criterion (default: l1); " + _data_criteria_note(),
    )
    prune.add_argument(
        "--output", "-o", metavar="FILE",
        help="write the pruned model with torch.save(model), a whole-module pickle; load it with "
        "torch.load(FILE, weights_only=False), and only from a source you trust. "
        "(A safetensors-based save/load is planned separately.)",
    )
    prune.set_defaults(handler=_cmd_prune)
    return parser


# ---------------------------------------------------------------- helpers


def _build_model(name: str, status: _Status):
    import torch
    import torchvision

    names = torchvision.models.list_models()
    if name not in names:
        close = difflib.get_close_matches(name, names, n=3)
        hint = f"did you mean {', '.join(close)}? " if close else ""
        raise UsageError(f"unknown model {name!r}; {hint}(torchvision.models.list_models() gives the {len(names)} names)")
    status(f"building {name}...")
    torch.manual_seed(0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # builder notices (init schemes, deprecations) are noise here
        model = torchvision.models.get_model(name, weights=None)
    return model.eval()


def _example_inputs(model, shape: Optional[tuple]) -> tuple[Any, str]:
    import torch

    from .inputs import infer_example_inputs

    if shape is None:
        try:
            return infer_example_inputs(model)
        except ValueError as exc:
            raise UsageError(f"{exc.args[0] if exc.args else exc}; give --input-shape") from None
    generator = torch.Generator().manual_seed(0)
    return torch.randn(shape, generator=generator), f"a random tensor of shape {shape}"


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


def _record_warnings(status: _Status, caught: list) -> None:
    for w in caught:
        status.note(f"graphprune: warning: {_one_line(w.message)}")


# ---------------------------------------------------------------- commands


def _cmd_analyze(args: argparse.Namespace, status: _Status) -> int:
    from .api import analyze

    model = _build_model(args.model, status)
    inputs, description = _example_inputs(model, args.input_shape)
    params, flops = _count(model, inputs, args.model, description, status)
    status(f"tracing {args.model}...")
    start = time.perf_counter()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        report = analyze(model, inputs)
    seconds = time.perf_counter() - start
    status.clear()
    _record_warnings(status, caught)
    if args.json:
        _print_json({
            "model": args.model,
            "model_class": report.model_name,
            "input": report.input_description,
            "parameters": params,
            "flops": flops,
            "groups": len(report.groups),
            "prunable_groups": len(report.prunable_groups),
            "blocked_groups": len(report.blocked_groups),
            "seconds": seconds,
            "rows": report.rows(),
        })
    else:
        print(report)
        print()
        print(f"parameters: {params:,} ({_human(params)})   FLOPs: {flops:,} ({_human(flops)})   "
              f"analysis: {seconds:.2f} s")
    return EXIT_OK


def _check_output_path(path: Optional[str]) -> None:
    if path is None:
        return
    if os.path.isdir(path):
        raise UsageError(f"--output {path!r} is a directory; give a file name")
    parent = os.path.dirname(os.path.abspath(path))
    if not os.path.isdir(parent):
        raise UsageError(f"--output {path!r}: directory {parent!r} does not exist")
    if not os.access(parent, os.W_OK):
        raise UsageError(f"--output {path!r}: directory {parent!r} is not writable")


def _cmd_prune(args: argparse.Namespace, status: _Status) -> int:
    import torch

    from .api import prune
    from .measure import count_flops, count_parameters

    _check_output_path(args.output)
    model = _build_model(args.model, status)
    inputs, description = _example_inputs(model, args.input_shape)
    params_before, flops_before = _count(model, inputs, args.model, description, status)
    status(f"analyzing and pruning {args.model} at ratio {args.ratio:g}...")
    start = time.perf_counter()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        model = prune(model, args.ratio, inputs, criterion=args.criterion)
    seconds = time.perf_counter() - start
    status("counting parameters and FLOPs of the pruned model...")
    params_after = count_parameters(model)
    flops_after = count_flops(model, inputs)
    if args.output:
        status(f"saving to {args.output}...")
        torch.save(model, args.output)
    status.clear()
    _record_warnings(status, caught)

    params_ratio, flops_ratio = _ratio_of(params_after, params_before), _ratio_of(flops_after, flops_before)
    if args.json:
        _print_json({
            "model": args.model,
            "ratio": args.ratio,
            "criterion": args.criterion,
            "input": description,
            "params_before": params_before,
            "params_after": params_after,
            "params_ratio": params_ratio,
            "flops_before": flops_before,
            "flops_after": flops_after,
            "flops_ratio": flops_ratio,
            "seconds": seconds,
            "output": args.output,
        })
        return EXIT_OK

    def row(label: str, before: int, after: int, ratio: Optional[float]) -> list:
        kept = f"{ratio:.3f} ({100 * (ratio - 1):+.1f}%)" if ratio is not None else "n/a"
        return [label, f"{before:,} ({_human(before)})", f"{after:,} ({_human(after)})", kept]

    rows = [["", "before", "after", "after/before"],
            row("parameters", params_before, params_after, params_ratio),
            row("FLOPs", flops_before, flops_after, flops_ratio)]
    widths = [max(len(r[i]) for r in rows) for i in range(4)]
    print(f"graphprune: pruned {args.model} at ratio {args.ratio:g} (criterion {args.criterion}, input {description})")
    for r in rows:
        print("  ".join(cell.ljust(w) if i == 0 else cell.rjust(w) for i, (cell, w) in enumerate(zip(r, widths))).rstrip())
    print(f"time (analysis + pruning): {seconds:.2f} s")
    if args.output:
        print(f"saved pruned model to {args.output} (torch.save; load with torch.load(path, weights_only=False))")
    return EXIT_OK


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
