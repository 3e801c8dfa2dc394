"""Inference latency before and after pruning, against the theoretical speed-up (the FLOPs ratio).

    python benchmarks/latency.py                                  # 4 models x ratios 0.3, 0.5 x round_to none, 8
    python benchmarks/latency.py --models resnet50 --batch 1,8 --no-channels-last
    python benchmarks/latency.py --threads 1 --repeats 15 --json latency.json

For every model the unpruned model and each pruned variant (ratio x round_to, pruned by
``graphprune.prune(..., criterion="l1")`` on a deep copy) live in the same process and are
timed with ``torch.utils.benchmark.Timer`` in *interleaved rounds*: each round times every
variant once (``--inner`` forward passes), in an order that alternates between rounds, so
that load from other processes hits before and after alike. The speed-up of a variant is
the median over rounds of (baseline time / variant time) *within the same round*. CPU runs
always; CUDA runs too when ``torch.cuda.is_available()``. See benchmarks/README.md.
"""
from __future__ import annotations

import argparse
import copy
import json
import os
import statistics
import sys
import time
import warnings
from typing import Optional

# When a script here runs, benchmarks/ is sys.path[0]: drop it, so that a module in benchmarks/ can never
# shadow one of the project's top-level packages (a benchmarks/criteria.py would hide the criteria package).
_HERE = os.path.dirname(os.path.abspath(__file__))
sys.path[:] = [p for p in sys.path if os.path.abspath(p or os.curdir) != _HERE]

DEFAULT_MODELS = "resnet50,mobilenet_v2,vit_b_16,efficientnet_b0"
CONTIGUOUS, CHANNELS_LAST = "contiguous", "channels_last"


def _parse_list(text: str, kind):
    return [kind(t.strip()) for t in text.split(",") if t.strip()]


def _round_to(text: str) -> Optional[int]:
    return None if text.lower() in ("none", "0", "-") else int(text)


def _build(name: str, size: int):
    import torch
    import torchvision

    torch.manual_seed(0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        kwargs = {"image_size": size} if name.startswith("vit_") else {}
        return torchvision.models.get_model(name, weights=None, **kwargs).eval()


def _is_conv_net(model) -> bool:
    """More than one Conv2d: channels_last is only tried where convolutions carry the work (not ViT's patch embedding)."""
    import torch

    return sum(isinstance(m, torch.nn.Conv2d) for m in model.modules()) > 1


def _quartiles(values: list) -> tuple:
    if len(values) < 2:
        return values[0], values[0], values[0]
    q = statistics.quantiles(values, n=4, method="inclusive")
    return q[0], statistics.median(values), q[2]


def time_interleaved(variants: dict, inputs: dict, *, rounds: int, inner: int, warmup: int, threads: int) -> dict:
    """``{key: [seconds per forward pass, one per round]}`` for every model in ``variants``.

    ``inputs[key]`` is the input of ``variants[key]``. Each round times every model once
    (``inner`` passes); even rounds go through the models in order, odd rounds in reverse.
    """
    import torch
    from torch.utils import benchmark

    timers = {
        key: benchmark.Timer(stmt="model(x)", globals={"model": model, "x": inputs[key]}, num_threads=threads)
        for key, model in variants.items()
    }
    keys = list(timers)
    times: dict = {key: [] for key in keys}
    with torch.no_grad():
        for key in keys:
            if warmup:
                timers[key].timeit(warmup)
        for r in range(rounds):
            for key in keys if r % 2 == 0 else reversed(keys):
                times[key].append(timers[key].timeit(inner).mean)
    return times


def bench_model(name: str, args, device: str, batch: int) -> list:
    """All rows of one model on one device at one batch size."""
    import torch

    import graphprune

    rows: list = []
    base = _build(name, args.size).to(device)
    x1 = torch.randn(1, 3, args.size, args.size, generator=torch.Generator().manual_seed(0)).to(device)
    x = torch.randn(batch, 3, args.size, args.size, generator=torch.Generator().manual_seed(1)).to(device)
    flops_before = graphprune.count_flops(base, x)
    params_before = graphprune.count_parameters(base)
    variants = {("base", None, CONTIGUOUS): base}
    meta: dict = {}
    for ratio in args.ratios:
        for round_to in args.round_to:
            key = (ratio, round_to, CONTIGUOUS)
            start = time.perf_counter()
            try:
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore")
                    pruned = graphprune.prune(base, ratio, x1, criterion=args.criterion, round_to=round_to, inplace=False)
            except Exception as exc:  # a failure is a row, not a crash
                meta[key] = {"status": f"prune failed: {type(exc).__name__}: {exc}"[:200]}
                continue
            prune_s = time.perf_counter() - start
            variants[key] = pruned
            meta[key] = {
                "status": "ok", "prune_s": prune_s,
                "flops": graphprune.count_flops(pruned, x), "params": graphprune.count_parameters(pruned),
            }
    inputs = {key: x for key in variants}
    channels_last = args.channels_last and _is_conv_net(base)
    if channels_last:
        x_cl = x.contiguous(memory_format=torch.channels_last)
        for key, model in list(variants.items()):
            cl_key = key[:2] + (CHANNELS_LAST,)
            variants[cl_key] = copy.deepcopy(model).to(memory_format=torch.channels_last)
            inputs[cl_key] = x_cl
            if key in meta:
                meta[cl_key] = meta[key]
    print(f"  {name} on {device}, batch {batch}: timing {len(variants)} models x {args.repeats} rounds...",
          file=sys.stderr, flush=True)
    times = time_interleaved(variants, inputs, rounds=args.repeats, inner=args.inner, warmup=args.warmup,
                             threads=args.threads)
    formats = [CONTIGUOUS] + ([CHANNELS_LAST] if channels_last else [])
    for fmt in formats:
        base_times = times[("base", None, fmt)]
        for ratio in args.ratios:
            for round_to in args.round_to:
                key = (ratio, round_to, fmt)
                info = meta.get(key, {"status": "not run"})
                row = {"model": name, "device": device, "batch": batch, "ratio": ratio, "round_to": round_to,
                       "format": fmt, "status": info["status"], "flops_before": flops_before,
                       "params_before": params_before}
                if key in times:
                    per_round = [b / a for b, a in zip(base_times, times[key])]
                    row.update(
                        flops_after=info["flops"], params_after=info["params"], prune_s=info["prune_s"],
                        flops_ratio=flops_before / info["flops"],
                        latency_before_ms=1e3 * statistics.median(base_times),
                        latency_after_ms=1e3 * statistics.median(times[key]),
                        speedup_quartiles=_quartiles(per_round),
                    )
                    row["speedup"] = row["speedup_quartiles"][1]
                    row["speedup_min"] = min(base_times) / min(times[key])
                    row["efficiency"] = row["speedup"] / row["flops_ratio"]
                    if fmt == CHANNELS_LAST:  # this model in channels_last vs the same model contiguous, same rounds
                        cont = times[(ratio, round_to, CONTIGUOUS)]
                        row["vs_contiguous"] = statistics.median([c / a for c, a in zip(cont, times[key])])
                        row["base_vs_contiguous"] = statistics.median(
                            [c / a for c, a in zip(times[("base", None, CONTIGUOUS)], base_times)])
                rows.append(row)
    return rows


def _table(rows: list, channels_last: bool) -> str:
    header = ["model", "device", "batch", "ratio", "round_to"]
    if channels_last:
        header.append("format")
    header += ["params left", "FLOPs ratio", "before ms", "after ms", "measured speed-up (IQR)", "measured / FLOPs",
               "min/min speed-up"]
    if channels_last:
        header.append("CL vs contiguous")
    lines = ["| " + " | ".join(header) + " |",
             "|" + "|".join("---" if h in ("model", "device", "format") else "---:" for h in header) + "|"]
    for row in rows:
        cells = [row["model"], row["device"], str(row["batch"]), f"{row['ratio']:g}",
                 str(row["round_to"]) if row["round_to"] else "–"]
        if channels_last:
            cells.append(row["format"])
        if "speedup" not in row:
            cells += ["–"] * (len(header) - len(cells) - 1) + [row["status"]]
        else:
            low, mid, high = row["speedup_quartiles"]
            cells += [f"{100 * row['params_after'] / row['params_before']:.1f}%", f"{row['flops_ratio']:.2f}×",
                      f"{row['latency_before_ms']:.1f}", f"{row['latency_after_ms']:.1f}",
                      f"{mid:.2f}× ({low:.2f}–{high:.2f})", f"{row['efficiency']:.2f}", f"{row['speedup_min']:.2f}×"]
            if channels_last:
                cells.append(f"{row['vs_contiguous']:.2f}× (base {row['base_vs_contiguous']:.2f}×)"
                             if "vs_contiguous" in row else "–")
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def _parse_args(argv: Optional[list]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", default=DEFAULT_MODELS, help=f"comma-separated torchvision models (default {DEFAULT_MODELS})")
    parser.add_argument("--ratios", default="0.3,0.5", help="comma-separated pruning ratios (default 0.3,0.5)")
    parser.add_argument("--round-to", default="none,8",
                        help="comma-separated round_to values, 'none' for no rounding (default none,8)")
    parser.add_argument("--batch", default="1", help="batch size(s) for timing, comma-separated (default 1)")
    parser.add_argument("--size", type=int, default=224, help="input height and width (default 224)")
    parser.add_argument("--threads", type=int, default=len(os.sched_getaffinity(0)),
                        help=f"CPU threads for timing (default: all cores, here {len(os.sched_getaffinity(0))})")
    parser.add_argument("--repeats", type=int, default=10, help="interleaved timing rounds (default 10)")
    parser.add_argument("--inner", type=int, default=3, help="forward passes per model per round (default 3)")
    parser.add_argument("--warmup", type=int, default=3, help="untimed forward passes per model first (default 3)")
    parser.add_argument("--criterion", default="l1", help="graphprune criterion (default l1)")
    parser.add_argument("--channels-last", action=argparse.BooleanOptionalAction, default=True,
                        help="also time every conv net in torch.channels_last, models and inputs (default on)")
    parser.add_argument("--device", default=None,
                        help="comma-separated devices (default: cpu, plus cuda when torch.cuda.is_available())")
    parser.add_argument("--json", metavar="FILE", help="also write the raw rows as JSON")
    args = parser.parse_args(argv)
    try:
        args.ratios = _parse_list(args.ratios, float)
        args.round_to = _parse_list(args.round_to, _round_to)
        args.batch = _parse_list(args.batch, int)
    except ValueError as exc:
        parser.error(str(exc))
    if not args.ratios or any(not 0 < r < 1 for r in args.ratios):
        parser.error("--ratios must lie in (0, 1)")
    if any(r is not None and r < 1 for r in args.round_to) or not args.round_to:
        parser.error("--round-to values must be positive integers or 'none'")
    if not args.batch or any(b < 1 for b in args.batch):
        parser.error("--batch must be positive")
    for flag in ("threads", "repeats", "inner"):
        if getattr(args, flag) < 1:
            parser.error(f"--{flag} must be at least 1")
    return args


def main(argv: Optional[list] = None) -> int:
    args = _parse_args(argv)
    os.environ.setdefault("OMP_NUM_THREADS", str(args.threads))
    import torch
    import torchvision

    torch.set_num_threads(args.threads)
    models = _parse_list(args.models, str)
    unknown = [m for m in models if m not in torchvision.models.list_models()]
    if unknown:
        print(f"latency.py: error: unknown torchvision models: {', '.join(unknown)}", file=sys.stderr)
        return 2
    devices = _parse_list(args.device, str) if args.device else ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
    rows: list = []
    started = time.perf_counter()
    try:
        for device in devices:
            for name in models:
                for batch in args.batch:
                    rows += bench_model(name, args, device, batch)
    except KeyboardInterrupt:
        print("interrupted; partial results follow", file=sys.stderr)
    print(f"latency before / after graphprune.prune ({args.criterion}); torch {torch.__version__}, "
          f"{args.threads} CPU thread(s), input {args.size}x{args.size}, {args.repeats} interleaved rounds x "
          f"{args.inner} passes; speed-up = median over rounds of before/after in the same round\n")
    print(_table(rows, args.channels_last))
    print(f"\nwall time: {time.perf_counter() - started:.0f} s")
    if args.json:
        with open(args.json, "w") as fh:
            json.dump({"args": {k: v for k, v in vars(args).items()}, "rows": rows}, fh, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
