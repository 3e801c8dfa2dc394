"""Command line interface: ``graphprune analyze | prune | bench | finetune | sensitivity | report | export``.

MODEL arguments are resolved by :mod:`graphprune.cli.models` (torchvision names, ``cifar:``,
``torchvision:`` and ``timm:`` names, or files written by ``--output``).

Exit status: 0 on success, 2 for a bad command line (unknown model, bad ratio, an input
shape the model does not accept, a file that cannot be loaded, ...), 1 when the work itself
fails. Errors are one line on stderr; ``--traceback`` shows the full traceback instead.
"""
from __future__ import annotations

import argparse
import ast
import math
import sys
import textwrap
from typing import Any, Callable, Optional, Sequence


from . import commands, prune
from .commands import EXIT_FAILURE, EXIT_OK, EXIT_USAGE
from .models import MODEL_HELP, UsageError
from .options import add_prune_options, fraction
from .output import Status, one_line

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
  hf:DIR            a Hugging Face checkpoint saved in DIR (save_pretrained),
                    with its weights (needs transformers); example input:
                    token ids 1x16 (--input-shape N,L) or the config's images
  yolo:CFG.yaml     an ultralytics YOLO model built from its config, random
                    weights (needs ultralytics); example input 1x3x640x640
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


# ---------------------------------------------------------------- argument types


def _ratio_list(text: str) -> tuple:
    expected = "comma-separated numbers such as 0.1,0.3,0.5"
    try:
        [float(part) for part in text.split(",")]
    except ValueError:
        raise argparse.ArgumentTypeError(f"ratios must be {expected}, got {text!r}") from None
    return tuple(sorted({fraction("every ratio", low_open=True)(part) for part in text.split(",")}))


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
    from graphprune.criteria import CRITERIA

    return sorted(name for name, cls in CRITERIA.items() if not getattr(cls, "requires_data", False))


def _data_criteria_note() -> str:
    from graphprune.criteria import CRITERIA

    needing = sorted(set(CRITERIA) - set(_criteria()))
    return f"{', '.join(needing)} need training data and are only available from Python" if needing else ""


def _model_arg(text: str) -> tuple:
    key, sep, value = text.partition("=")
    if not sep or not key.isidentifier():
        raise argparse.ArgumentTypeError(f"expected KEY=VALUE such as num_classes=10, got {text!r}")
    try:
        return key, ast.literal_eval(value)
    except (ValueError, SyntaxError):
        return key, value


class _CriterionNames:
    """The criteria the command line can build, as ``--criterion``'s help shows them: imported
    (with torch) only when that help is printed, so that the command line starts fast."""

    def __str__(self) -> str:
        note = _data_criteria_note()
        return ", ".join(_criteria()) + (f" ({note})" if note else "")


def _criterion(text: str) -> str:
    from graphprune.criteria import CRITERIA

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

_HANDLERS: dict = {
    "analyze": commands.cmd_analyze, "prune": prune.cmd_prune, "bench": prune.cmd_bench,
    "finetune": commands.cmd_finetune, "sensitivity": commands.cmd_sensitivity, "report": commands.cmd_report,
    "export": commands.cmd_export,
}


class _Parents:
    """The option groups that several subcommands share."""

    def __init__(self):
        self.options = argparse.ArgumentParser(add_help=False)
        self.options.add_argument(
            "--input-shape", type=_shape, metavar="N,C,H,W",
            help="shape of the random example input, e.g. 1,3,224,224 (default: the shape a saved model was used with, "
            "1,3,32,32 for cifar: models, else inferred from the model)",
        )
        self.options.add_argument("--json", action="store_true", help="print the result as JSON on stdout")
        self.options.add_argument("-q", "--quiet", action="store_true", help="no progress messages on stderr")
        self.options.add_argument("--traceback", action="store_true", help="on failure, show the full traceback")
        self.one = argparse.ArgumentParser(add_help=False, parents=[self.options])
        self.one.add_argument("model", metavar="MODEL", help=MODEL_HELP)
        self.one.add_argument(
            "--model-arg", action="append", type=_model_arg, metavar="KEY=VALUE", dest="model_args",
            help="a keyword argument of MODEL's builder (torchvision.models.get_model, timm.create_model, "
                 "graphprune.models.get_model), e.g. num_classes=10; repeat it for more. VALUE is a Python literal "
                 "(10, 0.5, True, 'text'), else a string. Recorded with --output",
        )
        self.one.add_argument(
            "--weights", metavar="FILE",
            help="trained weights to load into MODEL first: a state_dict saved with torch.save (.pt, .pth, .bin, "
                 ".ckpt; read with weights_only=True) or a .safetensors file, as torchvision, timm, Hugging Face, "
                 "Lightning or DDP write them (graphprune.io.weights.load_weights)",
        )
        self.criterion = argparse.ArgumentParser(add_help=False)
        criterion = self.criterion.add_argument(
            "--criterion", type=_criterion, default="l1", metavar="NAME",
            help="channel importance criterion (default: l1): %(criteria)s",
        )
        criterion.criteria = _CriterionNames()  # read from the registry only when the help is printed
        self.digits = argparse.ArgumentParser(add_help=False)
        self.digits.add_argument("--batch-size", type=_number(int, 1), default=64, metavar="B", help="batch size (default: 64)")
        self.digits.add_argument(
            "--limit-batches", type=_number(int, 1), metavar="K",
            help="use only the first K batches of the training and of the test set (quick checks)",
        )


def build_parser() -> argparse.ArgumentParser:
    """The ``graphprune`` command's parser: every subcommand and its options."""
    from graphprune import __version__

    parser = _Parser(
        prog="graphprune",
        description="Structured channel pruning for PyTorch: analyze, prune, fine-tune, measure and export a model.\n\n"
        + _MODELS_TEXT,
        epilog="Run 'graphprune COMMAND --help' for a command's options.\n\n" + _EPILOG, formatter_class=_Formatter,
    )
    parser.add_argument("--version", action="version", version=f"graphprune {__version__}")
    commands = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)

    def command(name: str, parents: list, help: str, description: str) -> argparse.ArgumentParser:
        sub = commands.add_parser(name, parents=parents, help=help, description=description, epilog=_EPILOG,
                                  formatter_class=_Formatter)
        sub.set_defaults(handler=_HANDLERS[name])
        return sub

    shared = _Parents()
    for define in (_analyze_command, _prune_command, _bench_command, _finetune_command, _sensitivity_command,
                   _report_command, _export_command):
        define(command, shared)
    return parser


def _analyze_command(command: Callable, p: _Parents) -> None:
    command("analyze", [p.one], "report the coupled channel groups of a model",
            "Trace a model and print every coupled channel group, with the model's parameter and FLOP counts.")


def _prune_command(command: Callable, p: _Parents) -> None:
    prune = command("prune", [p.one, p.criterion], "prune a model and report parameters and FLOPs before and after",
                    "Prune floor(RATIO * n) channels from every prunable group of n channels of a model (or as much "
                    "as a budget asks), and print parameters and FLOPs before and after and the time taken. The "
                    "options are graphprune.prune's, under the same names.")
    add_prune_options(prune)
    prune.add_argument("--bench", action="store_true",
                       help="time the model before and after pruning, side by side (see graphprune bench)")
    prune.add_argument("--rounds", type=_number(int, 4), default=30, metavar="N",
                       help="with --bench: interleaved timing rounds (default: 30)")
    prune.add_argument("--stream", action="store_true",
                       help="hf:DIR only: prune the checkpoint shard by shard without loading it (models larger than "
                            "memory; graphprune.prune_checkpoint). --output is then a new directory that "
                            "from_pretrained loads; groups its config cannot describe are left whole")
    prune.add_argument("--output", "-o", metavar="FILE", help=_SAVE_HELP + ". For an hf: model, a new directory instead (graphprune.save_pretrained: "
                                                      "transformers or graphprune.from_pretrained loads it).")


def _bench_command(command: Callable, p: _Parents) -> None:
    bench = command("bench", [p.one], "time a model, or two side by side",
                    "Latency of one forward pass of MODEL (and OTHER, e.g. its pruned FILE): median and spread "
                    "(interquartile range) over interleaved rounds after a warm-up, on this machine's CPU threads. "
                    "A warning says when the spread is too wide to trust.")
    bench.add_argument("other", metavar="OTHER", nargs="?", help="a second MODEL to time beside the first")
    bench.add_argument("--rounds", type=_number(int, 4), default=30, metavar="N",
                       help="timed rounds, each running every model once (default: 30)")


def _finetune_command(command: Callable, p: _Parents) -> None:
    finetune = command("finetune", [p.one, p.digits], "fine-tune a model on the built-in digits data set",
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


def _sensitivity_command(command: Callable, p: _Parents) -> None:
    sens = command("sensitivity", [p.one, p.digits, p.criterion], "measure how much pruning each group alone costs",
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


def _report_command(command: Callable, p: _Parents) -> None:
    rep = command("report", [p.options], "compare a model before and after pruning",
                  "Parameters, FLOPs and median latency of BEFORE and AFTER with after/before ratios, and the "
                  "channels of every group before and after (graphprune.report).")
    rep.add_argument("before", metavar="BEFORE", help="the unpruned MODEL, e.g. cifar:resnet20")
    rep.add_argument("after", metavar="AFTER", help="the pruned MODEL, e.g. a FILE written by prune --output")
    rep.add_argument("--repeats", type=_number(int, 1), default=20, metavar="N", help="timed forward passes per model (default: 20)")
    rep.add_argument("--no-latency", action="store_true", help="skip the latency measurement")


def _export_command(command: Callable, p: _Parents) -> None:
    export = command("export", [p.one], "export a model to ONNX, torch.export, DOT or PNG",
                     "Export a model: onnx (torch.onnx.export), torch.export (torch.export.export, then "
                     "torch.export.save; load with torch.export.load), or a picture of its channel graph coloured "
                     "by group: dot (Graphviz text) or png (graphprune.reporting.visualize).")
    export.add_argument("--format", "-f", required=True, choices=("onnx", "torch.export", "dot", "png"),
                        help="what to write")
    export.add_argument("--output", "-o", metavar="FILE", required=True,
                        help="the file to write (suggested suffixes: .onnx, .pt2, .dot, .png)")


# ---------------------------------------------------------------- entry point


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Run the command line ``argv`` (default: ``sys.argv[1:]``); returns the exit status."""
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as exc:  # --help, --version or a usage error (already printed)
        return exc.code if isinstance(exc.code, int) else (EXIT_OK if exc.code is None else EXIT_USAGE)
    status = Status(enabled=not args.quiet)
    prog = f"graphprune {args.command}"
    handler: Callable[[argparse.Namespace, Status], int] = args.handler
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
        print(f"{prog}: error: {type(exc).__name__}: {one_line(exc)} (--traceback for details)", file=sys.stderr)
        return EXIT_FAILURE


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
