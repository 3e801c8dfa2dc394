"""Peak memory of graphprune.analyze on large torchvision models, against the parameters and one forward pass.

    python benchmarks/memory.py                                   # vit_h_14 and regnet_y_128gf at 224x224
    python benchmarks/memory.py --models resnet50,vit_b_16
    python benchmarks/memory.py --models vit_h_14 --size 518       # vit_h_14 at its native (SWAG) size
    python benchmarks/memory.py --models resnet50 --prune           # also the peak of prune(ratio 0.5)

Every number comes from its own fresh subprocess, so that nothing one measurement allocated
(or left in the allocator) is counted in another. A worker imports torch, torchvision and
graphprune, builds the model (``weights=None``, eval mode) and the input, runs the
garbage collector and ``malloc_trim(0)``, resets the kernel's peak-RSS counter (writes
``5`` to ``/proc/self/clear_refs``), and then does exactly one thing:

* ``forward``: ``model(x)`` under ``torch.no_grad()``;
* ``analyze``: ``graphprune.analyze(model, x)``;
* ``analyze-py``: ``graphprune.analyze(model, x)`` under ``tracemalloc``, which sees the
  Python-level allocations (networkx graph, numpy label arrays, Python objects) but not
  torch's tensor storage (that is allocated in C++);
* ``prune`` (with ``--prune``): ``graphprune.prune(model, --ratio, x)``.

The peak is ``VmHWM`` (peak resident set) after the step minus ``VmRSS`` before it, read
from ``/proc/self/status``. Linux only. See benchmarks/README.md.
"""
from __future__ import annotations

import argparse
import ctypes
import gc
import json
import os
import subprocess
import sys
import time
import warnings
from typing import Optional

# When a script here runs, benchmarks/ is sys.path[0]: drop it, so that a module in benchmarks/ can never
# shadow one of the project's top-level packages (a benchmarks/criteria.py would hide the criteria package).
_HERE = os.path.dirname(os.path.abspath(__file__))
sys.path[:] = [p for p in sys.path if os.path.abspath(p or os.curdir) != _HERE]

DEFAULT_MODELS = "vit_h_14,regnet_y_128gf"
MODES = ("forward", "analyze", "analyze-py", "prune")
MB = 1024 * 1024


# ---------------------------------------------------------------------------- worker side


def _status_mb() -> dict:
    values = {}
    with open("/proc/self/status") as fh:
        for line in fh:
            if line.startswith(("VmHWM:", "VmRSS:")):
                key, value = line.split(":")
                values[key] = int(value.split()[0]) * 1024 / MB  # kB -> MiB
    return values


def _release_and_reset_peak() -> dict:
    gc.collect()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)  # give freed heap back, so it cannot hide new allocations
    except OSError:
        pass
    with open("/proc/self/clear_refs", "w") as fh:  # resets VmHWM to the current VmRSS (Linux >= 4.0)
        fh.write("5")
    return _status_mb()


def worker_main(mode: str, name: str, size: int, threads: int, ratio: float) -> dict:
    import torch
    import torchvision

    import graphprune

    torch.set_num_threads(threads)
    warnings.simplefilter("ignore")
    rss_imports = _status_mb()["VmRSS"]
    torch.manual_seed(0)
    kwargs = {"image_size": size} if name.startswith("vit_") else {}
    start = time.perf_counter()
    model = torchvision.models.get_model(name, weights=None, **kwargs).eval()
    build_s = time.perf_counter() - start
    x = torch.randn(1, 3, size, size, generator=torch.Generator().manual_seed(0))
    result = {
        "model": name, "mode": mode, "size": size,
        "params": sum(p.numel() for p in model.parameters()),
        "param_mb": sum(p.numel() * p.element_size() for p in model.parameters()) / MB,
        "buffer_mb": sum(b.numel() * b.element_size() for b in model.buffers()) / MB,
        "rss_imports_mb": rss_imports, "build_s": build_s,
    }
    before = _release_and_reset_peak()
    result["rss_before_mb"] = before["VmRSS"]
    start = time.perf_counter()
    if mode == "forward":
        with torch.no_grad():
            out = model(x)
        del out
    elif mode == "analyze":
        report = graphprune.analyze(model, x)
        result["groups"] = len(report.groups)
        del report
    elif mode == "analyze-py":
        import tracemalloc

        tracemalloc.start()
        report = graphprune.analyze(model, x)
        result["python_peak_mb"] = tracemalloc.get_traced_memory()[1] / MB
        tracemalloc.stop()
        del report
    elif mode == "prune":
        graphprune.prune(model, ratio, x)
    result["seconds"] = time.perf_counter() - start
    after = _status_mb()
    result["peak_mb"] = after["VmHWM"] - before["VmRSS"]
    result["peak_rss_mb"] = after["VmHWM"]
    return result


# ---------------------------------------------------------------------------- driver side


def _measure(mode: str, name: str, args) -> dict:
    env = dict(os.environ, OMP_NUM_THREADS=str(args.threads), PYTHONWARNINGS="ignore")
    command = [sys.executable, os.path.abspath(__file__), "--worker", mode, "--models", name,
               "--size", str(args.size), "--threads", str(args.threads), "--ratio", str(args.ratio)]
    print(f"  {name}: {mode}...", file=sys.stderr, flush=True)
    try:
        proc = subprocess.run(command, capture_output=True, text=True, env=env, timeout=args.timeout)
    except subprocess.TimeoutExpired:
        return {"model": name, "mode": mode, "status": f"timeout (> {args.timeout:g} s)"}
    lines = [line for line in proc.stdout.splitlines() if line.startswith("{")]
    if proc.returncode != 0 or not lines:
        reason = f"signal {-proc.returncode}, out of memory?" if proc.returncode < 0 else proc.stderr.strip()[-300:]
        return {"model": name, "mode": mode, "status": f"worker failed ({reason})"}
    return {**json.loads(lines[-1]), "status": "ok"}


def _mb(value: Optional[float]) -> str:
    return f"{value:,.0f}" if value is not None else "–"


def _table(results: dict, models: list, modes: list) -> str:
    header = ["model", "params (M)", "param MiB", "forward peak MiB", "analyze peak MiB", "analyze Python peak MiB",
              "analyze / forward", "analyze / param MiB", "analyze s"]
    if "prune" in modes:
        header += ["prune peak MiB", "prune / param MiB", "prune s"]
    lines = ["| " + " | ".join(header) + " |", "|---|" + "---:|" * (len(header) - 1)]
    notes = []
    for name in models:
        row = {mode: results.get((name, mode), {}) for mode in modes}
        for mode, r in row.items():
            if r.get("status", "ok") != "ok":
                notes.append(f"- {name} {mode}: {r['status']}")
        any_ok = next((r for r in row.values() if r.get("status") == "ok"), {})
        fwd, ana, py = row["forward"].get("peak_mb"), row["analyze"].get("peak_mb"), row["analyze-py"].get("python_peak_mb")
        param_mb = any_ok.get("param_mb")
        cells = [name, f"{any_ok['params'] / 1e6:.1f}" if any_ok else "–", _mb(param_mb), _mb(fwd), _mb(ana), _mb(py),
                 f"{ana / fwd:.1f}×" if ana and fwd else "–", f"{ana / param_mb:.2f}×" if ana and param_mb else "–",
                 f"{row['analyze']['seconds']:.1f}" if "seconds" in row["analyze"] else "–"]
        if "prune" in modes:
            pr = row["prune"].get("peak_mb")
            cells += [_mb(pr), f"{pr / param_mb:.2f}×" if pr and param_mb else "–",
                      f"{row['prune']['seconds']:.1f}" if "seconds" in row["prune"] else "–"]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + ("\n\n" + "\n".join(notes) if notes else "")


def _parse_args(argv: Optional[list]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", default=DEFAULT_MODELS, help=f"comma-separated torchvision models (default {DEFAULT_MODELS})")
    parser.add_argument("--size", type=int, default=224, help="input height and width (default 224)")
    parser.add_argument("--threads", type=int, default=len(os.sched_getaffinity(0)), help="torch threads in the workers (default: all cores)")
    parser.add_argument("--prune", action="store_true", help="also measure graphprune.prune (in its own worker)")
    parser.add_argument("--ratio", type=float, default=0.5, help="ratio for --prune (default 0.5)")
    parser.add_argument("--timeout", type=float, default=1800, help="seconds per measurement (default 1800)")
    parser.add_argument("--json", metavar="FILE", help="also write the raw measurements as JSON")
    parser.add_argument("--worker", choices=MODES, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.threads < 1 or args.size < 1:
        parser.error("--threads and --size must be positive")
    return args


def main(argv: Optional[list] = None) -> int:
    args = _parse_args(argv)
    if args.worker:
        print(json.dumps(worker_main(args.worker, args.models, args.size, args.threads, args.ratio)))
        return 0
    if not os.path.exists("/proc/self/clear_refs"):
        print("memory.py: error: needs Linux (/proc/self/status and /proc/self/clear_refs)", file=sys.stderr)
        return 2
    import torchvision

    models = [m.strip() for m in args.models.split(",") if m.strip()]
    unknown = [m for m in models if m not in torchvision.models.list_models()]
    if unknown:
        print(f"memory.py: error: unknown torchvision models: {', '.join(unknown)}", file=sys.stderr)
        return 2
    modes = ["forward", "analyze", "analyze-py"] + (["prune"] if args.prune else [])
    results: dict = {}
    started = time.perf_counter()
    try:
        for name in models:  # one measurement at a time: the biggest models need several GiB each
            for mode in modes:
                results[(name, mode)] = _measure(mode, name, args)
    except KeyboardInterrupt:
        print("interrupted; partial results follow", file=sys.stderr)
    print(f"peak memory above the built model (MiB; fresh process per number; input 1x3x{args.size}x{args.size}, "
          f"{args.threads} thread(s))\n")
    print(_table(results, models, modes))
    print(f"\nwall time: {time.perf_counter() - started:.0f} s")
    if args.json:
        with open(args.json, "w") as fh:
            json.dump([results[k] for k in results], fh, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
