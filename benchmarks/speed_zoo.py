"""Is graphprune's analyze + prune under 10 s, on one core, for every model of the four sweeps?

    python benchmarks/speed_zoo.py --sweeps torchvision,yolo,hf --json tv.json
    python benchmarks/speed_zoo.py --sweeps timm --json timm.json --timeout 300
    python benchmarks/speed_zoo.py --models resnet50,yolov8n.yaml,llama
    python benchmarks/speed_zoo.py --from-json tv.json,timm.json --write

The models are those of the coverage sweeps, read from their scripts: torchvision (``zoo.py``:
classification, segmentation, detection, video), timm (``timm_zoo.py``: the smallest model of every
family), Hugging Face (``hf_zoo.py``'s families and ``hf_families.py``'s long-tail ones) and YOLO
(``yolo.py``'s configs), each built as its sweep builds it (random weights, eval mode, the
sweep's example input; YOLO analysed on 64x64 as ``yolo.py`` does). Each model runs in its own
fresh subprocess on one thread: build, one forward pass, then ``analyze(model, x)`` and
``prune(model, ratio, x, report=report)`` timed apart with ``time.perf_counter`` (the ratio
of the sweep: 0.3 for Hugging Face as ``hf_zoo.py``, else 0.5; L1). The process is fresh, so
the times include graphprune's one-time lazy imports, as a user's first call does.

Beside every time: ``os.getloadavg()[0]`` at the start and end of the timed part (a time taken
while other work shares the cores is an upper bound), the process CPU time, and the extra peak
resident memory of analyze + prune over the built model (``memory.py``'s method: gc and
``malloc_trim(0)``, the peak counter reset through ``/proc/self/clear_refs``, then ``VmHWM``
after minus ``VmRSS`` before) as a multiple of the parameters' bytes. Linux only.
"""
from __future__ import annotations

import argparse
import importlib
import json
import os
import sys
import tempfile
import time
import warnings
from typing import Optional

# benchmarks/ must never shadow a top-level package: dropped, then appended (last) so that the
# sweep scripts are found; zoo.py puts tests/ first.
_HERE = os.path.dirname(os.path.abspath(__file__))
sys.path[:] = [p for p in sys.path if os.path.abspath(p or os.curdir) != _HERE]
sys.path.append(_HERE)

SWEEPS = ("torchvision", "timm", "hf", "yolo")
RATIOS = {"torchvision": 0.5, "timm": 0.5, "hf": 0.3, "yolo": 0.5}
SLOW_S = 10.0  # the goal: analyze + prune under this
MEMORY_X = 1.5  # extra peak RSS over this many times the parameter bytes is counted
SMALL_MB = 64.0  # below this many MiB of parameters, fixed overheads dominate the memory ratio
RESULTS = os.path.join(_HERE, "results", "speed_zoo.md")
SPEED = os.path.join(_HERE, "results", "speed.md")  # speed.py's table; --write puts the slowest 10 under it
SLOWEST = "## Slowest 10 across the sweeps"


def bench(name: str):
    """The sweep script ``name`` of benchmarks/ (several drop benchmarks/ from sys.path when imported)."""
    if _HERE not in sys.path:
        sys.path.append(_HERE)
    return importlib.import_module(name)


# ---------------------------------------------------------------------------- model lists


def sweep_models(sweep: str, args: argparse.Namespace) -> list:
    """The model names of ``sweep``, as its own script lists them (``--models`` and ``--limit`` applied)."""
    wanted = args.models.split(",") if args.models else None
    if sweep == "torchvision":
        import torchvision

        zoo = bench("zoo")
        names = torchvision.models.list_models(module=torchvision.models) + zoo.SEGMENTATION + zoo.DETECTION + zoo.VIDEO
    elif sweep == "timm":
        names = _timm_models(wanted, args.limit)
    elif sweep == "hf":
        names = list(bench("hf_zoo").FAMILIES) + list(bench("hf_families").HF_FAMILIES)
    else:
        names = bench("yolo").DEFAULT_CONFIGS.split(",")
    names = [n for n in names if wanted is None or n in wanted]
    return names[: args.limit] if args.limit else names


def _timm_models(wanted: Optional[list], limit: Optional[int]) -> list:
    """timm_zoo.py's smallest model of every family (or the wanted names that are timm models)."""
    import timm

    timm_zoo = bench("timm_zoo")
    if wanted is not None:
        known = set(timm.list_models())
        wanted = [n for n in wanted if n in known]
        if not wanted:
            return []
    spec = argparse.Namespace(models=",".join(wanted) if wanted else None, families=None, limit=limit)
    return [name for _, name, _ in timm_zoo.families_and_models(spec)]


# ---------------------------------------------------------------------------- worker side


def build(sweep: str, name: str) -> tuple:
    """``(model in eval mode, example input)`` of ``name`` as its sweep builds it."""
    if sweep == "torchvision":
        return bench("zoo").build(name)
    if sweep == "timm":
        timm_zoo = bench("timm_zoo")
        model = timm_zoo.make_model(name)
        return model, timm_zoo.make_input(timm_zoo.input_shape(model))
    if sweep == "hf":
        hf_zoo = bench("hf_zoo")
        return hf_zoo.build(name) if name in hf_zoo.FAMILIES else bench("hf_families").hf_case(name).build()
    import torch

    return bench("yolo")._build(name).model, torch.randn(1, 3, 64, 64)


def measure(sweep: str, name: str, rec) -> None:
    """Build, one forward pass, then time analyze and prune; every result goes to ``rec`` as it comes."""
    import torch

    import graphprune
    from graphprune.tracer import call_model

    rec.stage("build")
    model, x = build(sweep, name)
    with torch.no_grad():
        call_model(model, x)
    params = list(model.parameters())
    rec.put(params=sum(p.numel() for p in params), param_mb=sum(p.numel() * p.element_size() for p in params) / 2**20)
    del params
    memory = bench("memory")
    before = memory._release_and_reset_peak()
    rec.put(rss_before_mb=before["VmRSS"], load_start=os.getloadavg()[0])
    rec.stage("analyze")
    cpu, start = time.process_time(), time.perf_counter()
    report = graphprune.analyze(model, x)
    analyze_s = time.perf_counter() - start
    rec.put(analyze_s=analyze_s, groups=len(report.groups), prunable=len(report.prunable_groups))
    rec.stage("prune")
    start = time.perf_counter()
    graphprune.prune(model, RATIOS[sweep], x, report=report)
    prune_s, cpu_s = time.perf_counter() - start, time.process_time() - cpu
    after = memory._status_mb()
    rec.put(prune_s=prune_s, cpu_s=cpu_s, load_end=os.getloadavg()[0], peak_mb=after["VmHWM"] - before["VmRSS"])


def worker_main(args: argparse.Namespace) -> int:
    """One model; its records go to ``--record`` as JSON lines (timm_zoo.py's Recorder)."""
    os.dup2(2, 1)  # whatever the libraries print goes to stderr
    warnings.filterwarnings("ignore")
    import torch

    torch.set_num_threads(1)
    rec = bench("timm_zoo").Recorder(args.record)
    try:
        measure(args.worker, args.models, rec)
    except Exception as exc:
        rec.failure(rec.current, exc)
    rec.put(done=True)
    return 0


# ---------------------------------------------------------------------------- driver side


def run_worker(sweep: str, name: str, timeout: float) -> dict:
    """``name`` measured in a fresh subprocess under ``timeout``: its records merged into one dict."""
    with tempfile.TemporaryDirectory() as directory:
        record, log = os.path.join(directory, "record.jsonl"), os.path.join(directory, "stderr.txt")
        command = [sys.executable, os.path.abspath(__file__), "--worker", sweep, "--models", name, "--record", record]
        env = dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", PYTHONWARNINGS="ignore")
        found, code = bench("timm_zoo").run_recorded(command, env, timeout, record, log)
        result = {"sweep": sweep, "model": name, **found}
        with open(log) as fh:
            tail = (fh.read().strip().splitlines() or [""])[-1]
    stage = result.get("stage", "start")
    if code is None:
        result["failures"].append({"stage": stage, "type": "timeout", "message": f"timeout (> {timeout:g} s) in {stage}"})
    elif not result.get("done"):
        why = f"signal {-code}" if code < 0 else f"exit status {code}"
        result["failures"].append({"stage": stage, "type": "crash", "message": f"crashed in {stage} ({why}) {tail[:200]}"})
    return result


def status(row: dict) -> str:
    if not row.get("failures"):
        return "ok"
    first = row["failures"][0]
    text = first["message"] if first["type"] in ("timeout", "crash") else \
        f"{first['stage']}: {first['type']}: {first['message']}"
    text = " ".join(text.split()).replace("|", "/")
    return text if len(text) <= 90 else text[:89] + "…"


def total(row: dict) -> Optional[float]:
    if row.get("analyze_s") is None or row.get("prune_s") is None:
        return None
    return row["analyze_s"] + row["prune_s"]


def memory_x(row: dict) -> Optional[float]:
    return row["peak_mb"] / row["param_mb"] if row.get("peak_mb") is not None and row.get("param_mb") else None


def _fmt(value: Optional[float], spec: str = ".2f") -> str:
    return format(value, spec) if value is not None else "–"


def _load(row: dict) -> str:
    if row.get("load_start") is None:
        return "–"
    return f"{row['load_start']:.1f} → {_fmt(row.get('load_end'), '.1f')}"


def table(sweep: str, rows: list) -> list:
    header = ["model", "params (M)", "analyze s", "prune s", "total s", "CPU s", "extra peak MiB",
              "extra peak RSS / param bytes",
              "load (start → end)", "status"]
    lines = [f"### {sweep} (ratio {RATIOS[sweep]:g})", "", "| " + " | ".join(header) + " |",
             "|---|" + "---:|" * (len(header) - 2) + "---|"]
    for row in rows:
        slow = total(row) is not None and total(row) > SLOW_S
        cells = [row["model"], _fmt(row["params"] / 1e6 if row.get("params") else None), _fmt(row.get("analyze_s")),
                 _fmt(row.get("prune_s")), (f"**{total(row):.2f}**" if slow else _fmt(total(row))),
                 _fmt(row.get("cpu_s")), _fmt(row.get("peak_mb"), ".0f"), _fmt(memory_x(row), ".2f") + ("×" if memory_x(row) is not None else ""),
                 _load(row), status(row)]
        lines.append("| " + " | ".join(cells) + " |")
    ok = [row for row in rows if total(row) is not None]
    lines.append(f"\n{len(ok)}/{len(rows)} timed; summed analyze + prune {sum(total(r) for r in ok):.1f} s")
    return lines


def summary(rows: list) -> list:
    timed = sorted((r for r in rows if total(r) is not None), key=lambda r: -total(r))
    lines = ["## Slowest 10 (analyze + prune)", ""]
    lines += [f"{i}. {r['model']} ({r['sweep']}): {total(r):.2f} s (analyze {r['analyze_s']:.2f}, prune "
              f"{r['prune_s']:.2f}; CPU {_fmt(r.get('cpu_s'))} s; load {_load(r)})" for i, r in enumerate(timed[:10], 1)]
    slow = [r for r in timed if total(r) > SLOW_S]
    heavy = [r for r in rows if (memory_x(r) or 0) > MEMORY_X]
    big = [r for r in heavy if r["param_mb"] >= SMALL_MB]
    failed = [r for r in rows if r.get("failures")]
    lines += ["", f"**{len(slow)}/{len(timed)} timed models over {SLOW_S:g} s** (analyze + prune)"
              + (f": {', '.join(r['model'] for r in slow)}" if slow else "")
              + f"; **{len(heavy)} over {MEMORY_X:g}× their parameter bytes** in extra peak RSS, {len(big)} of them "
              f"with at least {SMALL_MB:g} MiB of parameters (below that fixed overheads dominate)"
              + (f": {', '.join(r['model'] for r in big)}" if big else "")
              + f"; {len(failed)} failed or timed out" + (f": {', '.join(r['model'] for r in failed)}" if failed else "")
              + "."]
    return lines


def render(rows: list, title: str) -> str:
    lines = [title, ""]
    for sweep in SWEEPS:
        chosen = [r for r in rows if r["sweep"] == sweep]
        if chosen:
            lines += table(sweep, chosen) + [""]
    return "\n".join(lines + summary(rows)) + "\n"


def _title(runs: list) -> str:
    import torch

    loads = [v for run in runs for r in run["rows"] for v in (r.get("load_start"), r.get("load_end")) if v is not None]
    spread = f"; 1-minute load average {min(loads):.1f}–{max(loads):.1f} during the timed parts" if loads else ""
    return ("# graphprune analyze + prune time per model of the four sweeps\n\n"
            f"torch {torch.__version__}, one thread, a fresh process per model (one-time lazy imports included), "
            f"random weights; L1. Times are wall clock (`perf_counter`) on a 2-core machine shared with other work"
            f"{spread}: read every figure as an upper bound, the CPU s column (process CPU time) as the nearer "
            f"one. **bold**: over {SLOW_S:g} s.")


def load_runs(paths: list) -> list:
    runs = []
    for path in paths:
        with open(path) as fh:
            runs.append(json.load(fh))
    return runs


def merged_rows(runs: list) -> list:
    """Rows of several runs, one per (sweep, model): a later run's row replaces an earlier one's."""
    rows: dict = {}
    for run in runs:
        for row in run["rows"]:
            rows[(row["sweep"], row["model"])] = row
    return list(rows.values())


def sweep(args: argparse.Namespace) -> dict:
    run = {"args": {k: v for k, v in vars(args).items() if k != "worker"}, "rows": []}
    started = time.perf_counter()
    try:
        for name_of_sweep in args.sweeps.split(","):
            names = sweep_models(name_of_sweep, args)
            for i, name in enumerate(names, 1):
                print(f"[{name_of_sweep} {i}/{len(names)}] {name}...", file=sys.stderr, flush=True)
                row = run_worker(name_of_sweep, name, args.timeout)
                run["rows"].append(row)
                print(f"    {_fmt(total(row))} s, {status(row)} (wall {row['wall_s']:.0f} s)", file=sys.stderr, flush=True)
                if args.json:
                    _save(run, args.json, time.perf_counter() - started)
    except KeyboardInterrupt:
        print(f"interrupted after {len(run['rows'])} models; partial results follow", file=sys.stderr)
    _save(run, args.json, time.perf_counter() - started)
    return run


def _save(run: dict, path: Optional[str], wall_s: float) -> None:
    run["wall_s"] = wall_s
    if path:
        with open(path, "w") as fh:
            json.dump(run, fh, indent=1)


def parse_args(argv: Optional[list]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sweeps", default=",".join(SWEEPS), help=f"comma-separated sweeps (default {','.join(SWEEPS)})")
    parser.add_argument("--models", help="comma-separated model names: only these (timm names, HF model types, yaml names)")
    parser.add_argument("--limit", type=int, help="only the first N models of each sweep")
    parser.add_argument("--timeout", type=float, default=180.0, help="seconds per model, build included (default 180)")
    parser.add_argument("--json", help="write the raw results here (rewritten after every model)")
    parser.add_argument("--from-json", help="comma-separated --json files: print their rows as one run (a later "
                                            "file's row replaces an earlier one's)")
    parser.add_argument("--write", action="store_true", help=f"also write {os.path.relpath(RESULTS)}")
    parser.add_argument("--worker", choices=SWEEPS, help=argparse.SUPPRESS)
    parser.add_argument("--record", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    unknown = set(args.sweeps.split(",")) - set(SWEEPS)
    if unknown:
        parser.error(f"unknown sweeps: {', '.join(sorted(unknown))}")
    return args


def main(argv: Optional[list] = None) -> int:
    args = parse_args(argv)
    if args.worker:
        return worker_main(args)
    if not os.path.exists("/proc/self/clear_refs"):
        print("speed_zoo.py: error: needs Linux (/proc/self/status and /proc/self/clear_refs)", file=sys.stderr)
        return 2
    runs = load_runs(args.from_json.split(",")) if args.from_json else [sweep(args)]
    text = render(merged_rows(runs), _title(runs))
    print(text)
    if args.write:
        with open(RESULTS, "w") as fh:
            fh.write(text)
        slowest_into_speed_md(merged_rows(runs))
    return 0


def slowest_into_speed_md(rows: list) -> None:
    """Put the summary (the slowest 10 and the counts over the goals) at the end of
    results/speed.md, in place of the one an earlier run put there."""
    with open(SPEED) as fh:
        text = fh.read().split(SLOWEST)[0].rstrip("\n")
    section = [SLOWEST, "", "From [speed_zoo.md](speed_zoo.md) (`benchmarks/speed_zoo.py`: every model of the four "
               "sweeps, one thread, a fresh process each):", ""] + summary(rows)[2:]
    with open(SPEED, "w") as fh:
        fh.write(text + "\n\n" + "\n".join(section) + "\n")


if __name__ == "__main__":
    sys.exit(main())
