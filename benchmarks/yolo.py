"""ultralytics YOLO before and after pruning: parameters, FLOPs, CPU latency, analysis + prune time.

    python benchmarks/yolo.py                                   # v8n, 11n, v8n-seg, v8n-pose x ratios 0.3, 0.5
    python benchmarks/yolo.py --configs yolov8n.yaml --ratios 0.5 --imgsz 320 --rounds 5

Each model is built from its yaml (random weights: no downloads), pruned by
``graphprune.prune(model, ratio, x)`` (L1) on a deep copy, checked to keep every output's
shape and to predict through the ``YOLO`` object, and timed against the unpruned model in
the same process with interleaved rounds (``latency.time_interleaved``): the speed-up is
the median over rounds of baseline time / pruned time within a round. FLOPs are counted by
``graphprune.reporting.measure.count_flops`` (multiply-adds x 2) at ``--imgsz``.
"""
from __future__ import annotations

import argparse
import copy
import os
import statistics
import sys
import time
import warnings
from typing import Optional

# benchmarks/ must never shadow a top-level package; it is appended (last) so that latency.py is found.
_HERE = os.path.dirname(os.path.abspath(__file__))
sys.path[:] = [p for p in sys.path if os.path.abspath(p or os.curdir) != _HERE]
sys.path.append(_HERE)

import numpy as np  # noqa: E402
import torch  # noqa: E402
from latency import time_interleaved  # noqa: E402

import graphprune  # noqa: E402
from graphprune.reporting.measure import count_flops, count_parameters  # noqa: E402

DEFAULT_CONFIGS = "yolov8n.yaml,yolo11n.yaml,yolov8n-seg.yaml,yolov8n-pose.yaml"


def _build(config: str):
    from ultralytics import YOLO

    torch.manual_seed(0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        yolo = YOLO(config, verbose=False)
    yolo.model.eval()
    return yolo


def _shapes(model, x) -> list:
    from oracle import flat_outputs  # tests/oracle.py

    with torch.no_grad():
        return [tuple(t.shape) for t in flat_outputs(model(x))]


def bench_config(config: str, args) -> list:
    """One row per ratio for ``config``."""
    yolo = _build(config)
    base = yolo.model
    x = torch.randn(1, 3, args.imgsz, args.imgsz)
    analysis_input = torch.randn(1, 3, 64, 64)  # shapes only: a small image analyses the same graph
    variants, rows = {"base": base}, []
    for ratio in args.ratios:
        pruned = copy.deepcopy(yolo)
        start = time.perf_counter()
        graphprune.prune(pruned.model, ratio, analysis_input)
        seconds = time.perf_counter() - start
        assert _shapes(pruned.model, x) == _shapes(base, x), "an output changed shape"
        image = (np.random.default_rng(0).random((args.imgsz, args.imgsz, 3)) * 255).astype(np.uint8)
        assert len(pruned.predict(image, imgsz=args.imgsz, verbose=False)) == 1
        variants[ratio] = pruned.model.eval()
        rows.append({"config": config, "ratio": ratio, "seconds": seconds,
                     "params": count_parameters(pruned.model) / count_parameters(base),
                     "flops": count_flops(pruned.model, x) / count_flops(base, x)})
    times = time_interleaved(variants, {key: x for key in variants}, rounds=args.rounds, inner=args.inner,
                             warmup=1, threads=args.threads)
    for row in rows:
        ratios = [b / p for b, p in zip(times["base"], times[row["ratio"]])]
        row.update(base_ms=1e3 * statistics.median(times["base"]), pruned_ms=1e3 * statistics.median(times[row["ratio"]]),
                   speedup=statistics.median(ratios))
    print(f"  {config}: params {count_parameters(base) / 1e6:.2f}M, FLOPs {count_flops(base, x) / 1e9:.2f}G", file=sys.stderr)
    return rows


def table(rows: list, args) -> str:
    lines = [f"CPU, {args.threads} thread(s), batch 1, {args.imgsz}x{args.imgsz}; FLOPs and latency as fractions / "
             "ratios of the unpruned model's in the same run.", "",
             "| model | ratio | params left | FLOPs left | latency before → after (ms) | speed-up | analyze+prune s |",
             "|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['config'].removesuffix('.yaml')} | {r['ratio']:.1f} | {r['params']:.2f} | {r['flops']:.2f} | "
                     f"{r['base_ms']:.1f} → {r['pruned_ms']:.1f} | {r['speedup']:.2f}× | {r['seconds']:.1f} |")
    return "\n".join(lines)


def main(argv: Optional[list] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--configs", default=DEFAULT_CONFIGS, help=f"comma-separated yaml names (default {DEFAULT_CONFIGS})")
    parser.add_argument("--ratios", default="0.3,0.5", help="comma-separated pruning ratios (default 0.3,0.5)")
    parser.add_argument("--imgsz", type=int, default=640, help="image side for FLOPs and latency (default 640)")
    parser.add_argument("--threads", type=int, default=2, help="torch threads for timing (default 2)")
    parser.add_argument("--rounds", type=int, default=7, help="interleaved timing rounds (default 7)")
    parser.add_argument("--inner", type=int, default=3, help="forward passes per model per round (default 3)")
    args = parser.parse_args(argv)
    args.ratios = [float(r) for r in args.ratios.split(",")]
    sys.path.insert(0, os.path.join(os.path.dirname(_HERE), "tests"))
    rows = [row for config in args.configs.split(",") for row in bench_config(config.strip(), args)]
    print(table(rows, args))
    return 0


if __name__ == "__main__":
    sys.exit(main())
