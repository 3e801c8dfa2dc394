"""Peak memory of graphprune's analyze + prune on the largest model of every sweep, against the parameters.

    python benchmarks/memory.py --threads 1 --python --warm --write   # every sweep's largest model, ~8 min
    python benchmarks/memory.py --sweeps torchvision,llama
    python benchmarks/memory.py --models resnet50,timm:resnet50 --separate   # also analyze, prune alone
    python benchmarks/memory.py --models vit_h_14 --size 518       # vit_h_14 at its native (SWAG) size

Models are ``sweep:name`` (benchmarks/memory_models.py builds them with the sweep scripts' own
builders; a bare name is a torchvision model). Every number comes from its own fresh
subprocess, so that nothing one measurement allocated (or left in the allocator) is counted in
another. A worker imports torch and graphprune, builds the model (random weights, eval mode)
and its inputs, runs the garbage collector and ``malloc_trim(0)``, resets the kernel's peak-RSS
counter (writes ``5`` to ``/proc/self/clear_refs``), and then measures one step:

* ``analyze+prune``: first one forward pass under ``torch.no_grad()`` (its peak is the
  *forward peak*), then, after a new reset, ``report = graphprune.analyze(model, x)`` and
  ``graphprune.prune(model, ratio, x, report=report)``: the memory pruning needs in a
  process that has built the model and run it once (issue 28's goal: at most 1.5x the
  parameter bytes);
* ``analyze+prune-py`` (``--python``): the same under ``tracemalloc``, which sees the
  Python-level allocations (networkx graph, numpy arrays, Python objects) but not torch's
  tensor storage (allocated in C++);
* ``analyze+prune-warm`` (``--warm``): the same after a warm-up, analyze + prune of a deep
  copy of the model (deleted before the forward pass), so that what one process pays once
  (graphprune's modules and torch's, torch.export's lazy set-up) is not counted;
* with ``--separate``, on the model as built: ``analyze`` alone, ``analyze-py`` (the same under
  ``tracemalloc``) and ``prune`` alone (it analyses itself).

The peak is ``VmHWM`` (peak resident set) after the step minus ``VmRSS`` before it, read
from ``/proc/self/status``. Linux only. See benchmarks/README.md.
"""
from __future__ import annotations

import argparse
import ctypes
import dataclasses
import gc
import json
import os
import subprocess
import sys
import time
import tracemalloc
import warnings
from typing import Optional

# When a script here runs, benchmarks/ is sys.path[0]: drop it, so that a module in benchmarks/ can never
# shadow one of the project's top-level packages (a benchmarks/criteria.py would hide the criteria package).
_HERE = os.path.dirname(os.path.abspath(__file__))
sys.path[:] = [p for p in sys.path if os.path.abspath(p or os.curdir) != _HERE]
sys.path.append(_HERE)

import memory_models  # noqa: E402

MODES = ("analyze+prune", "analyze+prune-py", "analyze+prune-warm", "analyze", "analyze-py", "prune")
GOAL = 1.5  # issue 28: extra peak of analyze + prune <= GOAL x parameter bytes
MB = 1024 * 1024
RESULT_PATH = os.path.join(_HERE, "results", "memory.md")


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


def _forward_peak(built) -> float:
    """Run one forward pass (no grad) and return its peak above the model (MiB)."""
    import torch

    before = _release_and_reset_peak()
    with torch.no_grad():
        out = built.forward()
    del out
    return _status_mb()["VmHWM"] - before["VmRSS"]


def _warm_up(built) -> None:
    """Analyze and prune a deep copy of the model, then drop it: every import and lazy set-up done."""
    import copy

    import graphprune

    copy_ = dataclasses.replace(built, model=copy.deepcopy(built.model))
    report = graphprune.analyze(copy_.model, copy_.inputs, **copy_.analyze_kwargs)
    graphprune.prune(copy_.model, copy_.ratio, copy_.inputs, report=report, **copy_.prune_kwargs)


def _step(mode: str, built, result: dict) -> None:
    """Run the measured step of ``mode`` on ``built``, recording what it returns in ``result``."""
    import graphprune

    traced = mode.endswith("-py")
    if traced:
        tracemalloc.start()
    if mode.startswith("analyze"):
        report = graphprune.analyze(built.model, built.inputs, **built.analyze_kwargs)
        result["groups"] = len(report.groups)
        if mode.startswith("analyze+prune"):
            graphprune.prune(built.model, built.ratio, built.inputs, report=report, **built.prune_kwargs)
        del report
    else:
        graphprune.prune(built.model, built.ratio, built.inputs, **built.analyze_kwargs, **built.prune_kwargs)
    if traced:
        result["python_peak_mb"] = tracemalloc.get_traced_memory()[1] / MB
        tracemalloc.stop()


def worker_main(mode: str, spec: str, size: int, threads: int) -> dict:
    """Build ``spec``, measure ``mode`` on it, and return the record."""
    import torch

    torch.set_num_threads(threads)
    warnings.simplefilter("ignore")
    rss_imports = _status_mb()["VmRSS"]
    start = time.perf_counter()
    built = memory_models.build(spec, size)
    params = list(built.model.parameters())
    result = {
        "model": spec, "sweep": memory_models.parse(spec)[0], "mode": mode, "size": size,
        "params": sum(p.numel() for p in params),
        "param_mb": sum(p.numel() * p.element_size() for p in params) / MB,
        "buffer_mb": sum(b.numel() * b.element_size() for b in built.model.buffers()) / MB,
        "rss_imports_mb": rss_imports, "build_s": time.perf_counter() - start,
    }
    del params
    if mode.endswith("-warm"):
        _warm_up(built)
    if mode.startswith("analyze+prune"):
        result["forward_peak_mb"] = _forward_peak(built)
    before = _release_and_reset_peak()
    result["rss_before_mb"] = before["VmRSS"]
    start = time.perf_counter()
    _step(mode, built, result)
    result["seconds"] = time.perf_counter() - start
    after = _status_mb()
    result["peak_mb"] = after["VmHWM"] - before["VmRSS"]
    result["peak_rss_mb"] = after["VmHWM"]
    result["params_after"] = sum(p.numel() for p in built.model.parameters())
    result["load"] = os.getloadavg()[0]
    return result


# ---------------------------------------------------------------------------- driver side


def _measure(mode: str, spec: str, args) -> dict:
    env = dict(os.environ, OMP_NUM_THREADS=str(args.threads), PYTHONWARNINGS="ignore")
    command = [sys.executable, os.path.abspath(__file__), "--worker", mode, "--models", spec,
               "--size", str(args.size), "--threads", str(args.threads)]
    print(f"  {spec}: {mode}...", file=sys.stderr, flush=True)
    load = os.getloadavg()[0]
    try:
        proc = subprocess.run(command, capture_output=True, text=True, env=env, timeout=args.timeout)
    except subprocess.TimeoutExpired:
        return {"model": spec, "mode": mode, "status": f"timeout (> {args.timeout:g} s)"}
    lines = [line for line in proc.stdout.splitlines() if line.startswith("{")]
    if proc.returncode != 0 or not lines:
        reason = f"signal {-proc.returncode}, out of memory?" if proc.returncode < 0 else proc.stderr.strip()[-300:]
        return {"model": spec, "mode": mode, "status": f"worker failed ({reason})"}
    return {**json.loads(lines[-1]), "load_before": load, "status": "ok"}


def _mb(value: Optional[float]) -> str:
    return f"{value:,.0f}" if value is not None else "–"


def _ratio(value: Optional[float], base: Optional[float], goal: Optional[float] = None) -> str:
    if value is None or not base:
        return "–"
    text = f"{value / base:.2f}×"
    return f"**{text} over**" if goal is not None and value / base > goal else text


def _seconds(record: dict) -> str:
    return f"{record['seconds']:.1f}" if "seconds" in record else "–"


def _row(spec: str, row: dict, modes: list) -> list:
    """The cells of one model's row; ``row`` maps mode -> record."""
    first = next((r for r in row.values() if r.get("status") == "ok"), {})
    both, param_mb = row["analyze+prune"], first.get("param_mb")
    cells = [memory_models.parse(spec)[1], first.get("sweep", "–"), f"{first['params'] / 1e6:,.1f}M" if first else "–",
             _mb(param_mb), _mb(both.get("forward_peak_mb")), _mb(both.get("peak_mb")),
             _ratio(both.get("peak_mb"), param_mb, GOAL), _seconds(both)]
    if "analyze+prune-py" in modes:
        cells.append(_mb(row["analyze+prune-py"].get("python_peak_mb")))
    if "analyze+prune-warm" in modes:
        warm = row["analyze+prune-warm"].get("peak_mb")
        cells += [_mb(warm), _ratio(warm, param_mb, GOAL)]
    if "analyze" in modes:
        cells += [_mb(row["analyze"].get("peak_mb")), _mb(row["analyze-py"].get("python_peak_mb")), _seconds(row["analyze"]),
                  _mb(row["prune"].get("peak_mb")), _ratio(row["prune"].get("peak_mb"), param_mb), _seconds(row["prune"])]
    loads = [r["load"] for r in row.values() if "load" in r]
    return cells + [f"{max(loads):.1f}" if loads else "–"]


def _table(results: dict, specs: list, modes: list) -> str:
    header = ["model", "sweep", "params", "param MiB", "forward peak MiB", "analyze+prune extra peak MiB",
              f"÷ param MiB (goal ≤ {GOAL:g}×)", "analyze+prune s"]
    if "analyze+prune-py" in modes:
        header.append("analyze+prune Python peak MiB")
    if "analyze+prune-warm" in modes:
        header += ["warm extra peak MiB", "warm ÷ param MiB"]
    if "analyze" in modes:
        header += ["analyze alone peak MiB", "analyze Python peak MiB", "analyze s",
                   "prune alone peak MiB", "prune ÷ param MiB", "prune s"]
    header.append("load")
    lines = ["| " + " | ".join(header) + " |", "|---|---|" + "---:|" * (len(header) - 2)]
    notes = []
    for spec in specs:
        row = {mode: results.get((spec, mode), {}) for mode in modes}
        notes += [f"- {spec} {mode}: {r['status']}" for mode, r in row.items() if r.get("status", "ok") != "ok"]
        lines.append("| " + " | ".join(_row(spec, row, modes)) + " |")
    return "\n".join(lines) + ("\n\n" + "\n".join(notes) if notes else "")


def _parse_args(argv: Optional[list]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sweeps = ",".join(memory_models.SWEEPS)
    parser.add_argument("--sweeps", default=sweeps, help=f"measure the largest model of these sweeps (default {sweeps})")
    parser.add_argument("--models", help="comma-separated sweep:name models instead (a bare name is torchvision's)")
    parser.add_argument("--size", type=int, default=224, help="torchvision input height and width (default 224)")
    parser.add_argument("--threads", type=int, default=len(os.sched_getaffinity(0)), help="torch threads in the workers (default: all cores)")
    parser.add_argument("--python", action="store_true", help="also measure analyze+prune under tracemalloc (own worker)")
    parser.add_argument("--warm", action="store_true", help="also measure analyze+prune after a warm-up on a copy (own worker)")
    parser.add_argument("--separate", action="store_true", help="also measure analyze and prune alone (own workers)")
    parser.add_argument("--timeout", type=float, default=1800, help="seconds per measurement (default 1800)")
    parser.add_argument("--json", metavar="FILE", help="also write the raw measurements as JSON")
    parser.add_argument("--write", action="store_true", help=f"also write the table to {os.path.relpath(RESULT_PATH)}")
    parser.add_argument("--worker", choices=MODES, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.threads < 1 or args.size < 1:
        parser.error("--threads and --size must be positive")
    try:
        args.specs = ([m.strip() for m in args.models.split(",") if m.strip()] if args.models
                      else memory_models.default_specs([s.strip() for s in args.sweeps.split(",") if s.strip()]))
        for spec in args.specs:
            memory_models.parse(spec)
    except ValueError as exc:
        parser.error(str(exc))
    return args


def main(argv: Optional[list] = None) -> int:
    args = _parse_args(argv)
    if args.worker:
        print(json.dumps(worker_main(args.worker, args.specs[0], args.size, args.threads)))
        return 0
    if not os.path.exists("/proc/self/clear_refs"):
        print("memory.py: error: needs Linux (/proc/self/status and /proc/self/clear_refs)", file=sys.stderr)
        return 2
    modes = (["analyze+prune"] + (["analyze+prune-py"] if args.python else []) + (["analyze+prune-warm"] if args.warm else [])
             + (["analyze", "analyze-py", "prune"] if args.separate else []))
    results: dict = {}
    started = time.perf_counter()
    try:
        for spec in args.specs:  # one measurement at a time: the biggest models need several GiB each
            for mode in modes:
                results[(spec, mode)] = _measure(mode, spec, args)
    except KeyboardInterrupt:
        print("interrupted; partial results follow", file=sys.stderr)
    text = (f"extra peak memory over the built model (MiB; fresh process per number; torchvision input "
            f"1x3x{args.size}x{args.size}; {args.threads} thread(s); load = 1-min load average after the step)\n\n"
            f"{_table(results, args.specs, modes)}\n\nwall time: {time.perf_counter() - started:.0f} s")
    print(text)
    if args.write:
        with open(RESULT_PATH, "w") as fh:
            fh.write(f"`python benchmarks/memory.py {' '.join(argv if argv is not None else sys.argv[1:])}`\n\n{text}\n")
    if args.json:
        with open(args.json, "w") as fh:
            json.dump(list(results.values()), fh, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
