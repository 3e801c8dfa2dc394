"""Coverage sweep: analyze + prune every torchvision model family and prove each result.

For every model: build it with random weights, analyze, prune 50% (L1), run forward, save the
pruned model and load it into a freshly built one (graphprune.save / graphprune.load: the
outputs must be bit-identical), and run the dead-channel oracle on a sample of exact groups
of a fresh copy. Prints one markdown row per model: groups, blocked groups, parameters and
FLOPs before/after, save/load, oracle result and time. Usage:

    python benchmarks/zoo.py                       # classification + segmentation + detection + video
    python benchmarks/zoo.py --family classification --ratio 0.3
    python benchmarks/zoo.py --models resnet50,vit_b_16
"""
from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
import warnings
from pathlib import Path

import torch
import torchvision
from torchvision.models import detection, segmentation, video

# When a script here runs, benchmarks/ is sys.path[0]: drop it, so that a module in benchmarks/ can never
# shadow one of the project's top-level packages (benchmarks/criteria.py would hide the criteria package).
_HERE = os.path.dirname(os.path.abspath(__file__))
sys.path[:] = [p for p in sys.path if os.path.abspath(p or os.curdir) != _HERE]
sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))

import graphprune  # noqa: E402
from graphprune.reporting.measure import count_flops, count_parameters  # noqa: E402
from oracle import dead_channel_oracle, flat_outputs  # noqa: E402
from graphprune.tracer import call_model  # noqa: E402

SEGMENTATION = ["fcn_resnet50", "deeplabv3_mobilenet_v3_large", "lraspp_mobilenet_v3_large"]
DETECTION = [
    "fasterrcnn_mobilenet_v3_large_fpn", "fasterrcnn_resnet50_fpn", "retinanet_resnet50_fpn", "fcos_resnet50_fpn",
    "ssd300_vgg16", "ssdlite320_mobilenet_v3_large", "maskrcnn_resnet50_fpn", "keypointrcnn_resnet50_fpn",
]
VIDEO = ["r3d_18", "mc3_18", "r2plus1d_18", "s3d", "mvit_v2_s", "swin3d_t"]
VIDEO_INPUTS = {"s3d": (1, 3, 16, 224, 224), "mvit_v2_s": (1, 3, 16, 224, 224), "swin3d_t": (1, 3, 8, 112, 112)}


def family_of(name: str) -> str:
    if name in SEGMENTATION:
        return "segmentation"
    if name in DETECTION:
        return "detection"
    if name in VIDEO:
        return "video"
    return "classification"


def build(name: str):
    """(model, example_inputs) with random weights and a fixed seed."""
    torch.manual_seed(0)
    family = family_of(name)
    if family == "segmentation":
        return getattr(segmentation, name)(weights=None, weights_backbone=None).eval(), torch.randn(1, 3, 128, 128)
    if family == "detection":
        return getattr(detection, name)(weights=None, weights_backbone=None).eval(), [torch.rand(3, 160, 160)]
    if family == "video":
        return getattr(video, name)(weights=None).eval(), torch.randn(VIDEO_INPUTS.get(name, (1, 3, 8, 56, 56)))
    extra = {"aux_logits": False, "init_weights": False} if name in ("googlenet", "inception_v3") else {}
    size = 299 if name == "inception_v3" else 224
    return torchvision.models.get_model(name, weights=None, **extra).eval(), torch.randn(1, 3, size, size)


def flops_or_none(model, inputs):
    try:
        return count_flops(model, inputs)
    except Exception:  # some detection post-processing is not countable; report n/a
        return None


def run_one(name: str, ratio: float, oracle_groups: int) -> dict:
    model, inputs = build(name)
    row = {"model": name, "family": family_of(name)}
    params0, flops0 = count_parameters(model), flops_or_none(model, inputs)
    start = time.perf_counter()
    report = graphprune.analyze(model, inputs)
    graphprune.prune(model, ratio, inputs)
    row["time"] = time.perf_counter() - start
    with torch.no_grad():
        call_model(model, inputs)  # the pruned model runs
    flops1 = flops_or_none(model, inputs)
    row.update(
        groups=len(report.groups), blocked=len(report.blocked_groups), params=(params0, count_parameters(model)),
        flops=(flops0, flops1), round_trip=round_trip(name, model, inputs),
    )
    fresh, inputs = build(name)
    result = dead_channel_oracle(fresh, inputs, max_groups=oracle_groups)
    row["oracle"] = f"pass ({result['groups_tested']}/{result['exact_groups']} sampled exact groups)"
    return row


def round_trip(name: str, pruned, inputs, make=None) -> str:
    """graphprune.save the pruned model, graphprune.load it into a freshly built one (``make()``,
    by default this script's ``build(name)``) and compare their outputs: "equal" when bit-identical."""
    with tempfile.TemporaryDirectory() as directory:
        path = os.path.join(directory, f"{name}.safetensors")
        graphprune.save(pruned, path)
        fresh = graphprune.load(make() if make else build(name)[0], path)
    with torch.no_grad():
        expected, got = flat_outputs(call_model(pruned, inputs)), flat_outputs(call_model(fresh, inputs))
    same = len(expected) == len(got) and all(torch.equal(a, b) for a, b in zip(expected, got))
    return "equal" if same else "DIFFERENT"


def fmt_pair(pair, unit: float, suffix: str) -> str:
    before, after = pair
    if before is None or after is None:
        return "n/a"
    return f"{before / unit:.1f}{suffix} → {after / unit:.1f}{suffix} ({after / before:.2f})"


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", help="comma-separated model names (default: every model of --family)")
    parser.add_argument("--family", choices=["all", "classification", "segmentation", "detection", "video"], default="all")
    parser.add_argument("--ratio", type=float, default=0.5)
    parser.add_argument("--oracle-groups", type=int, default=8, help="exact groups sampled by the oracle per model")
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    warnings.filterwarnings("ignore")
    if args.models:
        names = args.models.split(",")
    else:
        classification = torchvision.models.list_models(module=torchvision.models)
        everything = classification + SEGMENTATION + DETECTION + VIDEO
        names = [n for n in everything if args.family in ("all", family_of(n))]
    print("| model | family | groups (blocked) | params | GFLOPs | save/load | oracle | analyze+prune s |")
    print("|---|---|---|---|---|---|---|---|")
    passed, round_trips, total_time = 0, 0, 0.0
    for name in names:
        try:
            row = run_one(name, args.ratio, args.oracle_groups)
        except Exception as exc:
            print(f"| {name} | {family_of(name)} | | | | | FAIL: {type(exc).__name__}: {str(exc)[:120]} | |", flush=True)
            continue
        passed += 1
        round_trips += row["round_trip"] == "equal"
        total_time += row["time"]
        print(
            f"| {name} | {row['family']} | {row['groups']} ({row['blocked']}) | {fmt_pair(row['params'], 1e6, 'M')} | "
            f"{fmt_pair(row['flops'], 1e9, '')} | {row['round_trip']} | {row['oracle']} | {row['time']:.2f} |",
            flush=True,
        )
    print(f"\n{passed}/{len(names)} models pruned at ratio {args.ratio} with the oracle passing; "
          f"{round_trips}/{len(names)} saved and loaded with bit-identical outputs; "
          f"analyze+prune total {total_time:.1f} s on {args.threads} thread(s)")
    return 0 if passed == round_trips == len(names) else 1


if __name__ == "__main__":
    sys.exit(main())
