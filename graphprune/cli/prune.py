"""``graphprune prune`` (every option of :func:`graphprune.prune`, ``--bench`` for latency before
and after, ``--stream`` for a checkpoint larger than memory) and ``graphprune bench``."""
from __future__ import annotations

import argparse
import copy
import os
import time
from typing import Any, Optional

from .commands import EXIT_OK, count_model, load_model, load_with_inputs, saved_note
from .models import UsageError, check_output_path, parse_model, save_model
from .options import prune_options, streamed_options
from .output import Status, format_table, human_number, one_line, print_json, ratio_of, warnings_as_notes


def cmd_prune(args: argparse.Namespace, status: Status) -> int:
    try:
        options = prune_options(args)
    except ValueError as exc:
        raise UsageError(str(exc)) from None
    if args.stream:
        return _prune_stream(args, options, status)
    hf_output = parse_model(args.model).source == "hf"
    _check_directory(args.output) if hf_output else check_output_path(args.output)
    spec, model, inputs, description = load_with_inputs(args, status)
    params_before, flops_before = count_model(model, inputs, args.model, description, status)
    original = copy.deepcopy(model) if args.bench else None
    status(f"analyzing and pruning {args.model} ({_amount(options)})...")
    start = time.perf_counter()
    with warnings_as_notes(status):
        result = _pruned(model, inputs, options)
        seconds = time.perf_counter() - start
        params_after, flops_after = count_model(model, inputs, args.model, description, status)
        timing = _timed([original, model], inputs, args, status) if args.bench else None
        paths = saved = None
        if args.output:
            status(f"saving to {args.output}...")
            if hf_output:
                saved = _save_pretrained(model, args.output)
            else:
                paths = save_model(model, args.output, spec, inputs, "prune")
    params, flops = (params_before, params_after), (flops_before, flops_after)
    if args.json:
        print_json({"model": args.model, "source": spec.canonical, "input": description, **_jsonable(options),
                    "achieved": result.achieved, "params_before": params[0], "params_after": params[1],
                    "params_ratio": ratio_of(*params[::-1]), "flops_before": flops[0], "flops_after": flops[1],
                    "flops_ratio": ratio_of(*flops[::-1]), "seconds": seconds, **_timing_json(timing),
                    "output": args.output, "sidecar": paths[1] if paths else None})
        return EXIT_OK
    print(f"graphprune: pruned {args.model}, {_amount(options)} (criterion {args.criterion}, input {description})")
    rows = [["", "before", "after", "after/before"], _row("parameters", *params), _row("FLOPs", *flops)]
    print(format_table(rows + (_timing_rows(timing) if timing else [])))
    print(f"time (analysis + pruning): {seconds:.2f} s")
    if timing:
        _say_spread(timing)
    if paths:
        print(saved_note(paths, spec))
    if saved:
        print(saved)
    return EXIT_OK


def _check_directory(path: Optional[str]) -> None:
    if path is not None and os.path.exists(path) and not (os.path.isdir(path) and not os.listdir(path)):
        raise UsageError(f"--output {path!r} exists; an hf: model is saved as a new directory (graphprune.save_pretrained)")


def _save_pretrained(model, path: str) -> str:
    from graphprune.io.pretrained import save_pretrained

    if save_pretrained(model, path) == "transformers":
        return (f"saved to {path}/ (save_pretrained: its config describes the pruned model): "
                f"transformers.{type(model).__name__}.from_pretrained({path!r}) or graphprune.from_pretrained loads it")
    return (f"saved to {path}/ (its config cannot describe the pruned sizes, so graphprune's weights file holds them): "
            f"graphprune.from_pretrained({path!r}) loads it; --fit-config --uniform keep to what the config can say")


def cmd_bench(args: argparse.Namespace, status: Status) -> int:
    """``graphprune bench MODEL [OTHER]``: latency of one model, or of two side by side."""
    spec, model, inputs, description = load_with_inputs(args, status)
    models, names = [model], [args.model]
    if args.other:
        models.append(load_model(args.other, status, "OTHER ")[1])
        names.append(args.other)
    timing = _timed(models, inputs, args, status)
    if args.json:
        print_json({"models": names, "input": description, **_timing_json(timing)})
        return EXIT_OK
    print(f"graphprune: latency of {' and '.join(names)} on {description}, {timing.rounds} interleaved rounds")
    rows = [["model", "median (ms)", "spread"]]
    rows += [[name, f"{1e3 * m:.3f}", f"±{50 * s:.1f}%"] for name, m, s in zip(names, timing.medians, timing.spreads)]
    print(format_table(rows))
    if timing.speedup is not None:
        print(f"speed-up: {timing.speedup:.2f}x")
    _say_spread(timing)
    return EXIT_OK


def _pruned(model, inputs, options: dict):
    from graphprune.api import prune

    options = dict(options)
    try:
        return prune(model, options.pop("ratio"), inputs, return_result=True, **options)
    except (ValueError, TypeError) as exc:  # arguments the model refuses (a layer name it lacks)
        raise UsageError(one_line(exc)) from exc


def _amount(options: dict) -> str:
    for key in ("target_flops", "target_params", "target_latency"):
        if options.get(key) is not None:
            return f"{key.replace('_', ' ')} {options[key]:g}"
    ratio = options["ratio"]
    return f"ratio {ratio:g}" if isinstance(ratio, float) else "ratios " + ", ".join(f"{k}={v:g}" for k, v in ratio.items())


def _jsonable(options: dict) -> dict:
    return {k: v for k, v in options.items() if isinstance(v, (int, float, str, bool, list, dict)) or v is None}


def _row(label: str, before: int, after: int) -> list:
    ratio = ratio_of(after, before)
    kept = f"{ratio:.3f} ({100 * (ratio - 1):+.1f}%)" if ratio is not None else "n/a"
    return [label, f"{before:,} ({human_number(before)})", f"{after:,} ({human_number(after)})", kept]


def _timed(models: list, inputs: Any, args: argparse.Namespace, status: Status):
    from graphprune.reporting.measure import compare_latency

    status(f"timing {len(models)} model{'s' * (len(models) > 1)} in {args.rounds} interleaved rounds...")
    return compare_latency(models, inputs, rounds=args.rounds, progress=not args.quiet)


def _timing_rows(timing) -> list:
    before, after = (f"{1e3 * m:.3f} ±{50 * s:.0f}%" for m, s in zip(timing.medians, timing.spreads))
    return [["latency (ms)", before, after, f"{1 / timing.speedup:.3f} ({timing.speedup:.2f}x faster)"]]


def _timing_json(timing: Optional[Any]) -> dict:
    if timing is None:
        return {}
    return {"latency_medians_s": list(timing.medians), "latency_spreads": list(timing.spreads),
            "speedup": timing.speedup, "rounds": timing.rounds, "latency_trustworthy": timing.trustworthy}


def _say_spread(timing) -> None:
    if not timing.trustworthy:
        print(f"WARNING: the times spread by up to ±{50 * max(timing.spreads):.0f}% (interquartile range): the machine "
              "is too busy to trust these latencies; close other programs, or give more --rounds")


def _prune_stream(args: argparse.Namespace, options: dict, status: Status) -> int:
    """``prune hf:DIR --stream --output DST``: :func:`graphprune.prune_checkpoint`."""
    from graphprune.analysis.reasons import BlockKind
    from graphprune.checkpoint import prune_checkpoint

    spec = parse_model(args.model)
    if spec.source != "hf" or spec.path is not None:
        raise UsageError(f"--stream prunes a Hugging Face checkpoint directory (hf:DIR), not {args.model}")
    for flag, given in (("--output DIR", not args.output), ("no --input-shape", args.input_shape is not None),
                        ("no --weights", args.weights), ("no --bench", args.bench)):
        if given:
            raise UsageError(f"--stream needs {flag}: it reads the checkpoint's own weights, builds its own inputs on "
                             "the meta device, and writes a directory")
    try:
        kwargs = streamed_options(options)
    except ValueError as exc:
        raise UsageError(str(exc)) from None
    status(f"pruning the checkpoint {spec.name} shard by shard, {_amount(options)}...")
    with warnings_as_notes(status):
        try:
            done = prune_checkpoint(spec.name, args.output, kwargs.pop("ratio"), progress=not args.quiet, **kwargs)
        except ValueError as exc:
            raise UsageError(one_line(exc)) from exc
    params = done.result.before["params"], done.result.after["params"]
    left_whole = [g.id for g in done.report.groups if any(getattr(r, "kind", None) is BlockKind.CONFIG for r in g.blocked)]
    if args.json:
        print_json({"model": args.model, **_jsonable(options), "output": done.path, "params_before": params[0],
                    "params_after": params[1], "params_ratio": ratio_of(params[1], params[0]),
                    "groups_left_whole_for_the_config": left_whole, "seconds": done.seconds})
        return EXIT_OK
    print(f"graphprune: pruned the checkpoint {spec.name}, {_amount(options)} (criterion {args.criterion}), shard by shard")
    print(format_table([["", "before", "after", "after/before"], _row("parameters", *params)]))
    if left_whole:
        print(f"left whole, as its config cannot describe them: groups {', '.join(map(str, left_whole))}")
    print("time: " + ", ".join(f"{stage} {seconds:.1f} s" for stage, seconds in done.seconds.items()))
    print(f"written to {done.path}: transformers.{type(done.model).__name__}.from_pretrained({done.path!r}) loads it")
    return EXIT_OK
