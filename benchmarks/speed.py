"""Wall time of graphprune's analyze + prune (and optionally Torch-Pruning's) per torchvision model.

    python benchmarks/speed.py                              # every torchvision classification model
    python benchmarks/speed.py --models resnet50,densenet201 --threads 1
    python benchmarks/speed.py --no-peer                    # graphprune only
    python benchmarks/speed.py --device cpu                 # CPU only, even where CUDA is present

graphprune's time is ``analyze()`` plus ``prune(..., report=report)`` (the pruning reuses the
analysis the user looked at); Torch-Pruning's is its DependencyGraph build plus the pruner's
step. Each tool runs in its own long-lived worker process (same thread count, same device,
same input, same freshly built model with seed 0). A worker warms itself up once (imports, first trace)
before it is timed; a model that runs past ``--timeout`` gets its worker killed and
restarted, so a hang cannot stall the sweep. See benchmarks/README.md.
"""
from __future__ import annotations

import argparse
import gc
import importlib.metadata
import importlib.util
import json
import os
import queue
import signal
import subprocess
import sys
import threading
import time
import warnings
from typing import Any, Optional

# When a script here runs, benchmarks/ is sys.path[0]: drop it, so that a module in benchmarks/ can never
# shadow one of the project's top-level packages (benchmarks/criteria.py would hide the criteria package).
_HERE = os.path.dirname(os.path.abspath(__file__))
sys.path[:] = [p for p in sys.path if os.path.abspath(p or os.curdir) != _HERE]

GP, TP = "graphprune", "torch_pruning"
NUM_CLASSES = 1000  # torchvision classifiers; the peer leaves layers producing this many outputs alone
WARMUP_MODEL, WARMUP_SHAPE = "resnet18", (1, 3, 32, 32)


# ---------------------------------------------------------------------------- worker side


def _input_shape(name: str, override: Optional[list]) -> tuple:
    if override:
        return tuple(override)
    return (1, 3, 299, 299) if name == "inception_v3" else (1, 3, 224, 224)


def _build(name: str, shape: tuple, device: str):
    import torch
    import torchvision

    torch.manual_seed(0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = torchvision.models.get_model(name, weights=None).eval().to(device)
    inputs = torch.randn(shape, generator=torch.Generator().manual_seed(0)).to(device)
    with torch.no_grad():
        reference = model(inputs)  # untimed: the first forward pass at this shape, and the output to keep
    _synchronize(device)
    return model, inputs, tuple(reference.shape)


def _synchronize(device: str) -> None:
    import torch

    if device.startswith("cuda"):
        torch.cuda.synchronize(device)


def _params(model) -> int:
    return sum(p.numel() for p in model.parameters())


def _error(stage: str, exc: BaseException) -> str:
    text = " ".join(str(exc).split())
    return f"{stage}: {type(exc).__name__}: {text}"[:400]


def _run_graphprune(name: str, shape: tuple, ratio: float, device: str) -> dict:
    import graphprune

    model, inputs, _ = _build(name, shape, device)
    result: dict[str, Any] = {"params_before": _params(model)}
    try:
        start = time.perf_counter()
        report = graphprune.analyze(model, inputs)
        result["analyze_s"] = time.perf_counter() - start
        result["prunable_groups"] = len(report.prunable_groups)
    except Exception as exc:  # a per-model failure is a result, not a crash
        return {**result, "status": _error("analyze", exc)}
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            start = time.perf_counter()
            graphprune.prune(model, ratio, inputs, criterion="l1", report=report)
            _synchronize(device)
            result["prune_s"] = time.perf_counter() - start
    except Exception as exc:
        return {**result, "status": _error("prune", exc)}
    result["params_after"] = _params(model)
    unchanged = [str(w.message) for w in caught if "unchanged" in str(w.message)]
    result["status"] = "ok (no prunable group)" if unchanged else "ok"
    return result


def _run_torch_pruning(name: str, shape: tuple, ratio: float, device: str) -> dict:
    import torch
    import torch_pruning as tp
    from torch import nn
    from torchvision.models.vision_transformer import VisionTransformer

    model, inputs, out_shape = _build(name, shape, device)
    result: dict[str, Any] = {"params_before": _params(model)}
    # The final classifier: as in Torch-Pruning's own torchvision example, plus squeezenet's 1x1 conv head.
    ignored = [
        m for m in model.modules()
        if (isinstance(m, nn.Linear) and m.out_features == NUM_CLASSES)
        or (isinstance(m, nn.Conv2d) and m.out_channels == NUM_CLASSES)
    ]
    # Torch-Pruning's recipe for torchvision ViTs: keep the width a multiple of the head count.
    round_to = model.encoder.layers[0].num_heads if isinstance(model, VisionTransformer) else None
    try:
        start = time.perf_counter()
        pruner = tp.pruner.BasePruner(  # == tp.pruner.MagnitudePruner in 1.6
            model, inputs, importance=tp.importance.MagnitudeImportance(p=1),
            pruning_ratio=ratio, ignored_layers=ignored, round_to=round_to,
        )
        result["build_s"] = time.perf_counter() - start
        start = time.perf_counter()
        pruner.step()
        _synchronize(device)
        result["step_s"] = time.perf_counter() - start
    except Exception as exc:
        return {**result, "status": _error("build" if "build_s" not in result else "step", exc)}
    result["total_s"] = result["build_s"] + result["step_s"]
    result["params_after"] = _params(model)
    # Untimed check that the pruned model still runs (Torch-Pruning does not check this itself).
    if isinstance(model, VisionTransformer):
        model.hidden_dim = model.conv_proj.out_channels  # Torch-Pruning's documented fix-up
    try:
        with torch.no_grad():
            produced = tuple(model(inputs).shape)
        result["status"] = "ok" if produced == out_shape else f"ok, but the output shape changed to {produced}"
    except Exception as exc:
        result["status"] = "ok, but " + _error("the pruned model fails", exc)
    return result


RUNNERS = {GP: _run_graphprune, TP: _run_torch_pruning}


def worker_main(tool: str, threads: int, ratio: float, device: str) -> int:
    """Serve requests (one JSON line each on stdin) with one JSON line each on the original stdout."""
    channel = os.fdopen(os.dup(1), "w", buffering=1)
    os.dup2(2, 1)  # whatever the libraries print goes to stderr, never into the answers
    sys.stdout = sys.stderr
    warnings.simplefilter("ignore")
    import torch

    torch.set_num_threads(threads)
    run = RUNNERS[tool]
    try:
        run(WARMUP_MODEL, WARMUP_SHAPE, ratio, device)  # imports, lazy initialisation, first trace: not timed
    except Exception as exc:
        channel.write(json.dumps({"ready": False, "status": _error("warm-up", exc)}) + "\n")
        return 1
    channel.write(json.dumps({"ready": True, "threads": torch.get_num_threads()}) + "\n")
    for line in sys.stdin:
        request = json.loads(line)
        try:
            answer = run(request["model"], tuple(request["shape"]), ratio, device)
        except Exception as exc:  # building the model failed
            answer = {"status": _error("build model", exc)}
        gc.collect()
        channel.write(json.dumps(answer) + "\n")
    return 0


# ---------------------------------------------------------------------------- driver side


class Worker:
    """One tool's worker process; killed and restarted after a timeout or a crash."""

    def __init__(self, tool: str, threads: int, ratio: float, device: str, verbose: bool):
        self.tool, self.threads, self.ratio, self.device, self.verbose = tool, threads, ratio, device, verbose
        self.proc: Optional[subprocess.Popen] = None
        self.answers: queue.Queue = queue.Queue()

    def _start(self) -> Optional[str]:
        n = str(self.threads)
        env = dict(os.environ, OMP_NUM_THREADS=n, MKL_NUM_THREADS=n, PYTHONWARNINGS="ignore")
        self.proc = subprocess.Popen(
            [sys.executable, os.path.abspath(__file__), "--worker", self.tool, "--threads", n, "--ratio", str(self.ratio),
             "--device", self.device],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=None if self.verbose else subprocess.DEVNULL,
            text=True, bufsize=1, env=env, start_new_session=True,
        )
        self.answers = queue.Queue()
        threading.Thread(target=self._read, args=(self.proc, self.answers), daemon=True).start()
        try:
            ready = self.answers.get(timeout=600)
        except queue.Empty:
            self.stop()
            return "worker did not start within 600 s"
        if not ready or not ready.get("ready"):
            self.stop()
            return (ready or {}).get("status", "worker failed to start")
        return None

    @staticmethod
    def _read(proc: subprocess.Popen, answers: queue.Queue) -> None:
        for line in proc.stdout:
            answers.put(json.loads(line))
        answers.put(None)

    def run(self, model: str, shape: tuple, timeout: float) -> dict:
        if self.proc is None or self.proc.poll() is not None:
            problem = self._start()
            if problem:
                return {"status": problem}
        self.proc.stdin.write(json.dumps({"model": model, "shape": list(shape)}) + "\n")
        self.proc.stdin.flush()
        try:
            answer = self.answers.get(timeout=timeout)
        except queue.Empty:
            self.stop()
            return {"status": f"timeout (> {timeout:g} s)"}
        if answer is None:
            code = self.proc.wait()
            self.proc = None
            reason = f"signal {-code}" if code < 0 else f"exit status {code}"
            return {"status": f"worker crashed ({reason}; out of memory?)"}
        return answer

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait()
        self.proc = None


def _seconds(value: Optional[float]) -> str:
    return f"{value:.2f}" if value is not None else "–"


def _left(result: dict) -> str:
    if "params_after" not in result or not result.get("params_before"):
        return "–"
    return f"{100 * result['params_after'] / result['params_before']:.1f}%"


def _short(status: str, width: int = 70) -> str:
    status = status.replace("|", "/")
    return status if len(status) <= width else status[: width - 1] + "…"


SLOW_S = 2.0  # the per-model goal


def _table(rows: list, peer: Optional[str]) -> str:
    header = ["model", "graphprune analyze s", "graphprune prune s", "graphprune total s", "params left"]
    if peer:
        header += [f"Torch-Pruning {peer} s", "TP params left", "TP s / graphprune s"]
    header.append("status")
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" if i == 0 or i == len(header) - 1 else "---:"
                                                             for i in range(len(header))) + "|"]
    sums = {"analyze": 0.0, "prune": 0.0, "total": 0.0, "tp": 0.0, "tp_pair": 0.0, "gp_pair": 0.0}
    counts = {"gp": 0, "tp": 0, "pair": 0}
    for row in rows:
        gp, tp = row[GP], row.get(TP, {})
        analyze_s, prune_s = gp.get("analyze_s"), gp.get("prune_s")
        total_s = analyze_s + prune_s if analyze_s is not None and prune_s is not None else None
        cells = [row["model"], _seconds(analyze_s), _seconds(prune_s), _seconds(total_s), _left(gp)]
        if total_s is not None:
            counts["gp"] += 1
            sums["analyze"] += analyze_s
            sums["prune"] += prune_s
            sums["total"] += total_s
        statuses = [] if gp.get("status") == "ok" else [f"graphprune: {gp.get('status')}"]
        if peer:
            tp_s = tp.get("total_s")
            ratio = tp_s / total_s if tp_s is not None and total_s else None
            cells += [_seconds(tp_s), _left(tp), f"{ratio:.2f}×" if ratio is not None else "–"]
            if tp_s is not None:
                counts["tp"] += 1
                sums["tp"] += tp_s
            if ratio is not None:
                counts["pair"] += 1
                sums["tp_pair"] += tp_s
                sums["gp_pair"] += total_s
            if tp.get("status") != "ok":
                statuses.append(f"TP: {tp.get('status')}")
        cells.append(_short("; ".join(statuses)) if statuses else "ok")
        lines.append("| " + " | ".join(cells) + " |")
    total = [f"**total** ({counts['gp']}/{len(rows)} ok)", _seconds(sums["analyze"]), _seconds(sums["prune"]),
             _seconds(sums["total"]), ""]
    if peer:
        pair = f"{sums['tp_pair'] / sums['gp_pair']:.2f}× (over {counts['pair']} models)" if sums["gp_pair"] else "–"
        total += [f"{_seconds(sums['tp'])} ({counts['tp']} ok)", "", pair]
    total.append("")
    lines.append("| " + " | ".join(total) + " |")
    slow = [f"{row['model']} {row[GP]['analyze_s'] + row[GP]['prune_s']:.2f} s" for row in rows
            if row[GP].get("prune_s") is not None and row[GP]["analyze_s"] + row[GP]["prune_s"] > SLOW_S]
    lines.append(f"\ngraphprune models over {SLOW_S:g} s (analyze + prune): {len(slow)}" + (f" ({', '.join(slow)})" if slow else ""))
    return "\n".join(lines)


def _failures(rows: list) -> list:
    out = []
    for row in rows:
        for tool in (GP, TP):
            status = row.get(tool, {}).get("status")
            if status and not status.startswith("ok"):
                out.append(f"- {row['model']} ({tool}): {status}")
    return out


def _parse_args(argv: Optional[list]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", help="comma-separated torchvision model names (default: every classification model)")
    parser.add_argument("--threads", type=int, default=1, help="torch.set_num_threads for both tools (default 1)")
    parser.add_argument("--timeout", type=float, default=120.0,
                        help="seconds per model and tool, building the model included (default 120)")
    parser.add_argument("--ratio", type=float, default=0.5, help="pruning ratio (default 0.5)")
    parser.add_argument("--input-shape", type=lambda s: [int(d) for d in s.split(",")],
                        help="input shape for every model (default 1,3,224,224; 1,3,299,299 for inception_v3)")
    parser.add_argument("--no-peer", action="store_true", help="do not time Torch-Pruning even if it is installed")
    parser.add_argument("--device", help="comma-separated devices (default: cpu, plus cuda when torch.cuda.is_available())")
    parser.add_argument("--json", metavar="FILE", help="also write the raw per-model results as JSON")
    parser.add_argument("--verbose", action="store_true", help="show the workers' stderr")
    parser.add_argument("--worker", choices=sorted(RUNNERS), help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.threads < 1:
        parser.error("--threads must be at least 1")
    if args.timeout <= 0:
        parser.error("--timeout must be positive")
    if not 0 <= args.ratio < 1:
        parser.error("--ratio must lie in [0, 1)")
    return args


def main(argv: Optional[list] = None) -> int:
    args = _parse_args(argv)
    if args.worker:
        return worker_main(args.worker, args.threads, args.ratio, args.device)

    import torchvision

    known = set(torchvision.models.list_models())
    if args.models:
        models = [m.strip() for m in args.models.split(",") if m.strip()]
        unknown = [m for m in models if m not in known]
        if unknown:
            print(f"speed.py: error: unknown torchvision models: {', '.join(unknown)}", file=sys.stderr)
            return 2
    else:
        models = torchvision.models.list_models(module=torchvision.models)

    import torch

    devices = [d.strip() for d in args.device.split(",") if d.strip()] if args.device else (
        ["cpu"] + (["cuda"] if torch.cuda.is_available() else []))
    peer = None
    if not args.no_peer and importlib.util.find_spec("torch_pruning") is not None:
        peer = importlib.metadata.version("torch-pruning")
    results = {}
    for device in devices:
        started = time.perf_counter()
        rows = _sweep(models, args, device, peer)
        results[device] = rows
        print(f"graphprune analyze + prune (ratio {args.ratio:g}, L1) per model on {device}; torch {torch.__version__}, "
              f"torchvision {torchvision.__version__}, {args.threads} thread(s)"
              + (f"; Torch-Pruning {peer} (DependencyGraph build + BasePruner step)" if peer else "; Torch-Pruning not timed")
              + "\n")
        print(_table(rows, peer))
        failures = _failures(rows)
        if failures:
            print("\nfailures:")
            print("\n".join(failures))
        print(f"\nsweep wall time on {device}: {time.perf_counter() - started:.0f} s\n")
    if args.json:
        with open(args.json, "w") as fh:
            json.dump({"threads": args.threads, "ratio": args.ratio, "torch_pruning": peer, "rows": results}, fh, indent=2)
    return 0


def _sweep(models: list, args: argparse.Namespace, device: str, peer: Optional[str]) -> list:
    workers = {GP: Worker(GP, args.threads, args.ratio, device, args.verbose)}
    if peer:
        workers[TP] = Worker(TP, args.threads, args.ratio, device, args.verbose)
    rows: list = []
    try:
        for i, name in enumerate(models, 1):
            shape = _input_shape(name, args.input_shape)
            row = {"model": name, "input_shape": list(shape)}
            for tool, worker in workers.items():
                print(f"[{i}/{len(models)}] {name} on {device}: {tool}...", file=sys.stderr, flush=True)
                row[tool] = worker.run(name, shape, args.timeout)
            rows.append(row)
    except KeyboardInterrupt:
        print(f"interrupted after {len(rows)} models; partial results follow", file=sys.stderr)
    finally:
        for worker in workers.values():
            worker.stop()
    return rows


if __name__ == "__main__":
    sys.exit(main())
