"""The subcommands of the command line: ``analyze``, ``finetune``, ``sensitivity``, ``report``, ``export``
(``prune`` is in :mod:`.prune`), and the helpers they share.

Each takes the parsed arguments and a :class:`~graphprune.cli.output.Status`, prints its result on stdout and
returns the exit status; a bad command line raises :class:`~graphprune.cli.models.UsageError`. The parser and
``main()`` are in :mod:`graphprune.cli`.
"""
from __future__ import annotations

import argparse
import contextlib
import importlib.util
import inspect
import logging
import os
import sys
import time
from typing import Any, Optional

from .models import (
    ModelSpec,
    UsageError,
    build_model,
    check_output_path,
    digits_for,
    example_inputs,
    load_trained_weights,
    parse_model,
    python_builder,
    save_model,
)
from .output import (
    Status,
    format_table,
    human_number,
    one_line,
    print_json,
    stdout_to_stderr,
    warnings_as_notes,
)

EXIT_OK, EXIT_FAILURE, EXIT_USAGE = 0, 1, 2


# ---------------------------------------------------------------- helpers


def load_model(text: str, status: Status, role: str = "", options: Optional[dict] = None) -> tuple[ModelSpec, Any]:
    spec = parse_model(text)
    if options and spec.path is not None:
        raise UsageError(f"--model-arg: {text} is a saved model, built as its sidecar records")
    spec.options.update(options or {})
    try:
        return spec, build_model(spec, status)
    except UsageError:
        raise
    except Exception as exc:
        given = "".join(f" {k}={v!r}" for k, v in spec.options.items())
        given = f" with --model-arg{given}" if given else ""
        raise UsageError(f"cannot build {role}{spec.canonical}{given}: {type(exc).__name__}: {one_line(exc)}") from exc


def load_with_inputs(args: argparse.Namespace, status: Status) -> tuple[ModelSpec, Any, Any, str]:
    """(spec, model, example inputs, their description) for ``args.model`` (with ``args.weights``
    loaded) and ``args.input_shape``."""
    spec, model = load_model(args.model, status, options=dict(getattr(args, "model_args", None) or []))
    if getattr(args, "weights", None):
        load_trained_weights(model, spec, args.weights, status)
    inputs, description = example_inputs(model, spec, args.input_shape)
    return spec, model, inputs, description


def _rejects(name: str, description: str, exc: Exception) -> UsageError:
    """The usage error for a model that rejects the example input, with the remedy."""
    return UsageError(f"{name} does not accept {description}: {one_line(exc).rstrip('.')}; "
                      "give an --input-shape that it accepts (N,C,H,W for images, N,L for token ids)")


def _check_accepts(model, inputs, name: str, description: str):
    """Run one forward pass; a model that rejects the input is a bad command line. Returns the output."""
    import torch

    from graphprune.tracer import call_model

    try:
        with torch.no_grad():
            return call_model(model, inputs)
    except Exception as exc:
        raise _rejects(name, description, exc) from exc


def _classifier_width(output, name: str) -> int:
    from graphprune.data import DIGITS_CLASSES

    if not hasattr(output, "dim") or output.dim() != 2 or output.shape[1] < DIGITS_CLASSES:
        shape = tuple(output.shape) if hasattr(output, "shape") else type(output).__name__
        raise UsageError(f"{name} must output (N, classes) logits with at least {DIGITS_CLASSES} classes for the "
                         f"digits data set, got {shape}")
    return int(output.shape[1])


def count_model(model, inputs, name: str, description: str, status: Status) -> tuple[int, int]:
    """Parameters and FLOPs; the FLOP count's forward pass doubles as a check that the input fits."""
    from graphprune.reporting.measure import count_flops, count_parameters

    status("counting parameters and FLOPs...")
    params = count_parameters(model)
    try:
        flops = count_flops(model, inputs)
    except Exception as exc:  # any failure here means the model rejects the input
        raise _rejects(name, description, exc) from exc
    return params, flops


def saved_note(paths: list, spec: ModelSpec) -> str:
    return (f"saved to {paths[0]} (graphprune.save; {os.path.basename(paths[1])} names {spec.canonical}; "
            f"give {paths[0]} as MODEL, or graphprune.load({python_builder(spec)}, {paths[0]!r}))")


# ---------------------------------------------------------------- commands


def cmd_analyze(args: argparse.Namespace, status: Status) -> int:
    from graphprune.api import analyze

    spec, model, inputs, description = load_with_inputs(args, status)
    params, flops = count_model(model, inputs, args.model, description, status)
    status(f"tracing {args.model}...")
    start = time.perf_counter()
    with warnings_as_notes(status):
        report = analyze(model, inputs)
    seconds = time.perf_counter() - start
    if args.json:
        print_json({
            "model": args.model, "source": spec.canonical, "model_class": report.model_name,
            "input": report.input_description, "parameters": params, "flops": flops,
            "groups": len(report.groups), "prunable_groups": len(report.prunable_groups),
            "blocked_groups": len(report.blocked_groups), "seconds": seconds, "rows": report.rows(),
        })
    else:
        print(report)
        print()
        print(f"parameters: {params:,} ({human_number(params)})   FLOPs: {flops:,} ({human_number(flops)})   "
              f"analysis: {seconds:.2f} s")
    return EXIT_OK


def _digits_setup(args: argparse.Namespace, status: Status) -> tuple:
    """(spec, model, inputs, description, width, train, test) for the commands that use the digits; width is
    the number of classes the model outputs."""
    spec, model, inputs, description = load_with_inputs(args, status)
    width = _classifier_width(_check_accepts(model, inputs, args.model, description), args.model)
    train, test = digits_for(inputs, args.batch_size, args.limit_batches)
    return spec, model, inputs, description, width, train, test


def cmd_finetune(args: argparse.Namespace, status: Status) -> int:
    from graphprune.workflow.evaluation import evaluate
    from graphprune.workflow.finetune import finetune

    check_output_path(args.output)
    if args.alpha > 1:
        raise UsageError(f"--alpha must lie in [0, 1], got {args.alpha:g}")
    warmup = args.warmup_epochs if args.warmup_epochs is not None else min(1.0, args.epochs / 10)
    if warmup >= args.epochs and warmup > 0:
        raise UsageError(f"--warmup-epochs ({warmup:g}) must be less than --epochs ({args.epochs})")
    spec, model, inputs, description, width, train, test = _digits_setup(args, status)
    teacher = None
    if args.teacher is not None:
        _, teacher = load_model(args.teacher, status, "teacher ")
        out = _check_accepts(teacher, inputs, f"teacher {args.teacher}", description)
        if tuple(getattr(out, "shape", ())) != (inputs.shape[0], width):
            raise UsageError(f"teacher {args.teacher} outputs {tuple(getattr(out, 'shape', ()))}, "
                             f"the model {(inputs.shape[0], width)}: they must match for distillation")
    status(f"evaluating {args.model} before fine-tuning...")
    before = evaluate(model, test)
    status.clear()
    start = time.perf_counter()
    with warnings_as_notes(status), stdout_to_stderr():  # finetune's per-epoch lines are progress here
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
        print_json({
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
    print(format_table(rows))
    print(f"time: {seconds:.2f} s")
    if paths:
        print(saved_note(paths, spec))
    return EXIT_OK


def cmd_sensitivity(args: argparse.Namespace, status: Status) -> int:
    from graphprune.workflow.evaluation import evaluate
    from graphprune.workflow.sensitivity import sensitivity

    if args.plot is not None:
        check_output_path(args.plot, "--plot")
    spec, model, inputs, description, _, _, test = _digits_setup(args, status)
    status(f"measuring the sensitivity of {args.model} (accuracy on {len(test)} test batches)...")
    start = time.perf_counter()
    with warnings_as_notes(status):
        result = sensitivity(model, inputs, lambda m: evaluate(m, test), args.ratios, criterion=args.criterion,
                             progress=not args.quiet)
    seconds = time.perf_counter() - start
    derived = result.ratios_for(args.max_drop, conservative=args.conservative)
    if args.plot:
        status(f"plotting to {args.plot}...")
        result.plot(args.plot, title=f"Sensitivity of {args.model} on digits ({args.criterion})")
        status.clear()
    if args.json:
        print_json({**result.to_dict(), "model": args.model, "source": spec.canonical, "input": description,
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


def cmd_report(args: argparse.Namespace, status: Status) -> int:
    from graphprune.workflow.compare import report

    before_spec, before = load_model(args.before, status)
    after_spec, after = load_model(args.after, status)
    shape = args.input_shape or after_spec.input_shape
    inputs, description = example_inputs(before, before_spec, shape)
    _check_accepts(before, inputs, args.before, description)
    _check_accepts(after, inputs, args.after, description)
    status("measuring parameters, FLOPs" + ("" if args.no_latency else " and latency") + "...")
    # torch.utils.benchmark imports cpp_extension, which logs a misleading "No CUDA runtime is found" on CPU machines
    logging.getLogger("torch.utils.cpp_extension").setLevel(logging.ERROR)
    with warnings_as_notes(status):
        comparison = report(before, after, inputs, latency=not args.no_latency, repeats=args.repeats,
                            progress=not args.quiet)
    if args.json:
        print_json({"before": args.before, "after": args.after, **comparison.to_dict()})
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


def cmd_export(args: argparse.Namespace, status: Status) -> int:
    import torch

    check_output_path(args.output)
    spec, model, inputs, description = load_with_inputs(args, status)
    _check_accepts(model, inputs, args.model, description)
    status(f"exporting {args.model} as {args.format}...")
    start = time.perf_counter()
    with warnings_as_notes(status):
        if args.format == "onnx":
            files = _export_onnx(model, inputs, args.output, args.quiet)
        elif args.format == "torch.export":
            program = torch.export.export(model, (inputs,))
            torch.export.save(program, args.output)
            files = [args.output]
        else:
            from graphprune.api import analyze
            from graphprune.reporting import visualize

            report = analyze(model, inputs)
            (visualize.to_dot if args.format == "dot" else visualize.to_png)(report, args.output)
            files = [args.output]
    seconds = time.perf_counter() - start
    sizes = {f: os.path.getsize(f) for f in files}
    if args.json:
        print_json({"model": args.model, "source": spec.canonical, "format": args.format, "input": description,
                     "output": args.output, "files": files, "bytes": sum(sizes.values()), "seconds": seconds})
    else:
        written = ", ".join(f"{f} ({human_number(n)}B)" for f, n in sizes.items())
        print(f"graphprune: exported {args.model} ({description}) as {args.format} to {written} in {seconds:.2f} s")
    return EXIT_OK


# the function that runs each command, by name; graphprune.cli sets it as the subparser's default "handler"
