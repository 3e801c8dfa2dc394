"""Coverage sweep over timm: analyze + prune the smallest model of every timm family and prove each result.

A family is a module of ``timm.models`` (``timm.list_modules()``: resnet, vision_transformer, ...);
its model is its smallest variant by parameter count (counted on the meta device). Each family
runs in its own subprocess under ``--timeout``: build (random weights, eval mode), analyze +
prune 50% (L1, timed), then the checks of zoo.py and more: output shape kept, parameters
dropped, output finite, a train-mode forward + backward on a batch of 2, save -> load
bit-identical, parameters and FLOPs before/after, and the dead-channel oracle on a fresh copy.
Torch-Pruning, when installed, prunes the same model in a second subprocess for comparison.
Prints one markdown row per family, then a summary (stdout); progress goes to stderr. Usage:

    python benchmarks/timm_zoo.py > benchmarks/results/timm.md        # every family
    python benchmarks/timm_zoo.py --limit 8 --no-peer
    python benchmarks/timm_zoo.py --families resnet,vision_transformer --timeout 300
    python benchmarks/timm_zoo.py --models resnet50,vit_small_patch16_224 --json timm.json
"""
from __future__ import annotations

import argparse
import importlib.metadata
import importlib.util
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
import traceback
import warnings
from typing import Optional

# The same sys.path handling as zoo.py: benchmarks/ must never shadow a top-level package. It is
# appended (last) only so that zoo.py itself is found; zoo.py then drops it and puts tests/ first.
_HERE = os.path.dirname(os.path.abspath(__file__))
sys.path[:] = [p for p in sys.path if os.path.abspath(p or os.curdir) != _HERE]
sys.path.append(_HERE)

import torch  # noqa: E402
from torch import nn  # noqa: E402

from timm_report import GP, TP, line, print_saved, status, summary, table  # noqa: E402
from zoo import flops_or_none, round_trip  # noqa: E402
from oracle import dead_channel_oracle, flat_outputs  # noqa: E402  (tests/, put on sys.path by zoo)
import graphprune  # noqa: E402
from graphprune.reporting.measure import count_parameters  # noqa: E402

INPUT_CAP = 224  # largest spatial side used, unless the model declares a fixed input size


# ---------------------------------------------------------------------------- both sides


def _quiet_timm():
    warnings.filterwarnings("ignore")
    import timm

    return timm


# ---------------------------------------------------------------------------- worker side


class Recorder:
    """Writes the worker's results as JSON lines, flushed one by one, so that a worker killed
    at the timeout still leaves everything it finished (and the stage it was in)."""

    def __init__(self, path: str):
        self.fh = open(path, "a", buffering=1)
        self.current = "start"

    def put(self, **fields) -> None:
        self.fh.write(json.dumps(fields) + "\n")
        self.fh.flush()

    def stage(self, name: str) -> None:
        self.current = name
        self.put(stage=name)

    def failure(self, stage: str, exc: BaseException) -> None:
        message = " ".join(str(exc).split())
        self.put(failure={"stage": stage, "type": type(exc).__name__, "message": message[:600]})


class CheckFailed(Exception):
    """A check that ran but did not hold (as opposed to one that raised)."""


def make_model(name: str) -> nn.Module:
    timm = _quiet_timm()
    torch.manual_seed(0)
    return timm.create_model(name, pretrained=False).eval()


def input_shape(model: nn.Module, override: Optional[list] = None) -> tuple:
    """(1, C, H, W): the model's ``pretrained_cfg["input_size"]``, each side capped at INPUT_CAP
    unless the config says ``fixed_input_size``; if the model rejects the capped size, its own."""
    if override:
        return tuple(override)
    cfg = getattr(model, "pretrained_cfg", None) or {}
    native = (1, *cfg.get("input_size", (3, INPUT_CAP, INPUT_CAP)))
    capped = native if cfg.get("fixed_input_size") else (*native[:2], *(min(s, INPUT_CAP) for s in native[2:]))
    if capped != native:
        try:
            with torch.no_grad():
                model(torch.zeros(capped))
        except Exception:
            return native
    return capped


def make_input(shape: tuple, batch: int = 1) -> torch.Tensor:
    return torch.randn((batch, *shape[1:]), generator=torch.Generator().manual_seed(0))


def _shapes(outputs) -> list:
    return [list(t.shape) for t in flat_outputs(outputs)]


def _finite(outputs) -> bool:
    return all(torch.isfinite(t).all().item() for t in flat_outputs(outputs) if t.is_floating_point())


def _blocked_summary(report) -> dict:
    """The blocked groups by BlockKind (how many, the largest one's parameter share) and the
    biggest blocked groups (shares overlap: a parameter belongs to one group per dimension)."""
    kinds = {}
    for kind, groups in report.blocked_by_kind().items():
        name = kind.value if kind is not None else "unknown"
        kinds[name] = [len(groups), max(g.param_share for g in groups)]
    biggest = sorted(report.blocked_groups, key=lambda g: -g.param_share)[:4]
    return {
        "blocked_kinds": kinds,
        "blocked_top": [
            {"root": g.root, "share": g.param_share, "size": g.size,
             "kinds": list(dict.fromkeys(getattr(getattr(r, "kind", None), "value", "unknown") for r in g.blocked)),
             "reason": "; ".join(g.blocked)[:300]}
            for g in biggest if g.param_share > 0
        ],
    }


def _train_step(model: nn.Module, shape: tuple) -> None:
    """Forward + backward in train mode on a batch of 2; every floating output enters the loss."""
    model.train()
    try:
        with torch.enable_grad():
            outputs = [t for t in flat_outputs(model(make_input(shape, batch=2))) if t.is_floating_point()]
            loss = sum(t.float().square().mean() for t in outputs)
            loss.backward()
        if not any(p.grad is not None for p in model.parameters()):
            raise CheckFailed("no parameter received a gradient")
    finally:
        model.zero_grad(set_to_none=True)
        model.eval()


def _run_checks(name: str, model: nn.Module, x: torch.Tensor, shape: tuple, reference: dict, rec: Recorder) -> None:
    """The checks on the pruned ``model``; each failure is recorded, and the next check still runs."""
    rec.put(params_after=count_parameters(model))
    if count_parameters(model) >= reference["params_before"]:
        rec.failure("params", CheckFailed(f"nothing pruned ({reference['prunable']} prunable groups)"))
    rec.stage("forward")
    try:
        with torch.no_grad():
            outputs = model(x)
        if _shapes(outputs) != reference["shapes"]:
            raise CheckFailed(f"output shapes {_shapes(outputs)} != {reference['shapes']}")
        if reference["finite"] and not _finite(outputs):
            raise CheckFailed("pruned output is not finite")
        rec.put(flops_after=flops_or_none(model, x))
    except Exception as exc:
        rec.failure("forward", exc)
    rec.stage("save/load")
    try:
        result = round_trip(name, model, x, make=lambda: make_model(name))
        rec.put(save_load=result)
        if result != "equal":
            raise CheckFailed("loaded model's outputs differ")
    except Exception as exc:
        rec.put(save_load="error")
        rec.failure("save/load", exc)
    rec.stage("train")
    try:
        _train_step(model, shape)
        rec.put(train="ok")
    except Exception as exc:
        try:  # not graphprune's doing if the unpruned model fails the same way
            _train_step(make_model(name), shape)
        except Exception:
            rec.put(train="fails unpruned too")
            return
        rec.put(train="FAIL")
        rec.failure("train", exc)


def run_graphprune(name: str, ratio: float, oracle_groups: int, rec: Recorder, override: Optional[list]) -> None:
    rec.stage("build")
    model = make_model(name)
    shape = input_shape(model, override)
    x = make_input(shape)
    with torch.no_grad():
        outputs = model(x)
    reference = {"params_before": count_parameters(model), "shapes": _shapes(outputs), "finite": _finite(outputs)}
    rec.put(input=list(shape), params_before=reference["params_before"], flops_before=flops_or_none(model, x))
    rec.stage("analyze")
    start = time.perf_counter()
    report = graphprune.analyze(model, x)
    rec.put(analyze_s=time.perf_counter() - start, groups=len(report.groups), prunable=len(report.prunable_groups),
            **_blocked_summary(report))
    reference["prunable"] = len(report.prunable_groups)
    rec.stage("prune")
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            start = time.perf_counter()
            graphprune.prune(model, ratio, x, report=report)
            rec.put(prune_s=time.perf_counter() - start)
        rec.put(warnings=[line(str(w.message), 200) for w in caught][:5], **_blocked_summary(report))
        _run_checks(name, model, x, shape, reference, rec)
    except Exception as exc:
        rec.failure("prune", exc)
    del model
    rec.stage("oracle")
    try:
        result = dead_channel_oracle(make_model(name), x, max_groups=oracle_groups)
        rec.put(oracle=f"pass ({result['groups_tested']}/{result['exact_groups']})")
    except AssertionError as exc:
        rec.put(oracle="MISMATCH" if "oracle failed" in str(exc) else "FAIL")
        rec.failure("oracle", exc)
    except Exception as exc:
        rec.put(oracle="error")
        rec.failure("oracle", exc)


def classifier_layers(model: nn.Module) -> list:
    """The classifier head: ``get_classifier()`` (both heads of a distilled model) and every
    Linear or Conv2d producing ``num_classes`` outputs, as in Torch-Pruning's timm example."""
    head = model.get_classifier() if hasattr(model, "get_classifier") else None
    found = [m for m in (head if isinstance(head, (tuple, list)) else [head])
             if isinstance(m, nn.Module) and any(True for _ in m.parameters())]
    classes = getattr(model, "num_classes", None)
    found += [m for m in model.modules() if (isinstance(m, nn.Linear) and m.out_features == classes)
              or (isinstance(m, nn.Conv2d) and m.out_channels == classes)]
    return list({id(m): m for m in found}.values())


def run_torch_pruning(name: str, ratio: float, rec: Recorder, override: Optional[list]) -> None:
    import torch_pruning as tp

    rec.stage("build")
    model = make_model(name)
    x = make_input(input_shape(model, override))
    with torch.no_grad():
        shapes = _shapes(model(x))
    rec.put(params_before=count_parameters(model))
    # Torch-Pruning's timm recipe: each attention's qkv is pruned head by head, head_dim (and the
    # attn_dim of timm 1.0) follow.
    attention = [m for m in model.modules() if hasattr(m, "num_heads") and isinstance(getattr(m, "qkv", None), nn.Linear)]
    rec.stage("prune")
    start = time.perf_counter()
    pruner = tp.pruner.MagnitudePruner(
        model, x, importance=tp.importance.MagnitudeImportance(p=1), pruning_ratio=ratio,
        ignored_layers=classifier_layers(model), num_heads={m.qkv: m.num_heads for m in attention},
    )
    pruner.step()
    rec.put(prune_s=time.perf_counter() - start, params_after=count_parameters(model))
    for m in attention:
        if hasattr(m, "head_dim"):
            m.head_dim = m.qkv.out_features // (3 * m.num_heads)
        if hasattr(m, "attn_dim"):
            m.attn_dim = m.qkv.out_features // 3
    rec.stage("forward")
    with torch.no_grad():
        produced = model(x)
    if _shapes(produced) != shapes:
        raise CheckFailed(f"output shapes {_shapes(produced)} != {shapes}")


def worker_main(args: argparse.Namespace) -> int:
    """One model, one tool; results go to ``--record`` as JSON lines."""
    os.dup2(2, 1)  # whatever the libraries print goes to stderr
    warnings.filterwarnings("ignore")
    torch.set_num_threads(args.threads)
    rec = Recorder(args.record)
    try:
        if args.worker == GP:
            run_graphprune(args.models, args.ratio, args.oracle_groups, rec, args.input_shape)
        else:
            run_torch_pruning(args.models, args.ratio, rec, args.input_shape)
    except Exception as exc:
        traceback.print_exc()
        rec.failure(rec.current, exc)
    rec.put(done=True)
    return 0


# ---------------------------------------------------------------------------- driver side


def families_and_models(args: argparse.Namespace) -> list:
    """[(family, model, params or None)]: the chosen model of every family to run."""
    timm = _quiet_timm()
    modules = timm.list_modules()
    if args.models:
        names = args.models.split(",")
        unknown = [n for n in names if n not in timm.list_models()]
        if unknown:
            raise SystemExit(f"timm_zoo.py: error: unknown timm models: {', '.join(unknown)}")
        return [(next(m for m in modules if timm.models.is_model_in_modules(n, [m])), n, None) for n in names]
    if args.families:
        wanted = args.families.split(",")
        unknown = [f for f in wanted if f not in modules]
        if unknown:
            raise SystemExit(f"timm_zoo.py: error: unknown timm families (modules): {', '.join(unknown)}")
        modules = [m for m in modules if m in wanted]
    modules = modules[: args.limit] if args.limit else modules
    chosen = []
    for i, module in enumerate(modules, 1):
        counts = {name: meta_parameters(name) for name in timm.list_models(module=module)}
        counted = {n: c for n, c in counts.items() if c is not None}
        name = min(counted, key=lambda n: (counted[n], n)) if counted else sorted(counts)[0]
        print(f"[{i}/{len(modules)}] {module}: {len(counts)} models, smallest {name}", file=sys.stderr, flush=True)
        chosen.append((module, name, counted.get(name)))
    return chosen


def meta_parameters(name: str) -> Optional[int]:
    """Parameter count of ``name`` built on the meta device (no memory, no initialisation); None if
    it cannot be built there."""
    timm = _quiet_timm()
    try:
        with torch.device("meta"):
            return count_parameters(timm.create_model(name, pretrained=False))
    except Exception:
        return None


def run_recorded(command: list, env: dict, timeout: float, record: str, log: str) -> tuple:
    """``(its records merged into one dict, exit code or None on timeout)`` of the worker
    ``command``, run in a session of its own under ``timeout`` (killed with its children
    after it), its output to ``log``; ``wall_s`` is the time it took."""
    start = time.perf_counter()
    with open(log, "w") as err:
        proc = subprocess.Popen(command, stdin=subprocess.DEVNULL, stdout=err, stderr=err, env=env,
                                start_new_session=True)
        try:
            code = proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
            code = None
    result = {"failures": [], "wall_s": time.perf_counter() - start}
    if os.path.exists(record):
        with open(record) as fh:
            for text in fh:
                try:
                    fields = json.loads(text)
                except json.JSONDecodeError:
                    continue  # a line cut by the kill
                if "failure" in fields:
                    result["failures"].append(fields.pop("failure"))
                result.update(fields)
    return result, code


def run_worker(tool: str, name: str, args: argparse.Namespace, shape: Optional[list]) -> dict:
    """Run one worker under ``--timeout``; merge its records into one result dict."""
    with tempfile.TemporaryDirectory() as directory:
        record, log = os.path.join(directory, "record.jsonl"), os.path.join(directory, "stderr.txt")
        command = [sys.executable, os.path.abspath(__file__), "--worker", tool, "--models", name, "--record", record,
                   "--threads", str(args.threads), "--ratio", str(args.ratio), "--oracle-groups", str(args.oracle_groups)]
        if shape:
            command += ["--input-shape", ",".join(map(str, shape))]
        n = str(args.threads)
        env = dict(os.environ, OMP_NUM_THREADS=n, MKL_NUM_THREADS=n, PYTHONWARNINGS="ignore")
        if tool == TP:
            env["TIMM_FUSED_ATTN"] = "0"  # as in Torch-Pruning's timm example: attention as explicit matmuls
        result, code = run_recorded(command, env, args.timeout, record, log)
        with open(log) as fh:
            stderr = fh.read()
        if args.verbose:
            sys.stderr.write(stderr)
    if code is None:
        result["failures"].append({"stage": result.get("stage", "start"), "type": "timeout",
                                   "message": f"timeout (> {args.timeout:g} s) in {result.get('stage', 'start')}"})
    elif not result.get("done"):
        tail = line(stderr.strip().splitlines()[-1] if stderr.strip() else "", 300)
        why = f"signal {-code}" if code < 0 else f"exit status {code}"
        result["failures"].append({"stage": result.get("stage", "start"), "type": "crash",
                                   "message": f"worker crashed ({why}; out of memory?) {tail}"})
    return result


def parse_args(argv: Optional[list]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--families", help="comma-separated timm modules (default: every timm.list_modules())")
    parser.add_argument("--models", help="comma-separated timm model names to run instead of each family's smallest")
    parser.add_argument("--limit", type=int, help="only the first N families (in timm.list_modules() order)")
    parser.add_argument("--timeout", type=float, default=120.0, help="seconds per family and tool (default 120)")
    parser.add_argument("--threads", type=int, default=1, help="torch.set_num_threads in the workers (default 1)")
    parser.add_argument("--ratio", type=float, default=0.5, help="pruning ratio (default 0.5)")
    parser.add_argument("--oracle-groups", type=int, default=8, help="exact groups sampled by the oracle (default 8)")
    parser.add_argument("--json", help="also write the raw results to this file")
    parser.add_argument("--no-peer", action="store_true", help="do not run Torch-Pruning even if it is installed")
    parser.add_argument("--verbose", action="store_true", help="show the workers' stderr")
    parser.add_argument("--from-json", help="comma-separated --json files of earlier runs (e.g. two halves run side by "
                                            "side): print their rows as one table instead of running anything")
    parser.add_argument("--worker", choices=[GP, TP], help=argparse.SUPPRESS)
    parser.add_argument("--record", help=argparse.SUPPRESS)
    parser.add_argument("--input-shape", type=lambda s: [int(d) for d in s.split(",")], help=argparse.SUPPRESS)
    return parser.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.worker:
        return worker_main(args)
    if args.from_json:
        return print_saved(args.from_json.split(","))
    timm = _quiet_timm()
    peer = None
    if not args.no_peer and importlib.util.find_spec("torch_pruning") is not None:
        peer = importlib.metadata.version("torch-pruning")
    started = time.perf_counter()
    chosen = families_and_models(args)
    rows = []
    try:
        for i, (family, name, params) in enumerate(chosen, 1):
            row = {"family": family, "model": name, "meta_params": params}
            print(f"[{i}/{len(chosen)}] {family}: {name} graphprune...", file=sys.stderr, flush=True)
            gp = row[GP] = run_worker(GP, name, args, None)
            if gp.get("analyze_s") is not None and gp.get("prune_s") is not None:
                gp["total_s"] = gp["analyze_s"] + gp["prune_s"]
            print(f"    {line(status(gp))} ({gp['wall_s']:.0f} s)", file=sys.stderr, flush=True)
            if peer:
                row[TP] = run_worker(TP, name, args, gp.get("input"))
                print(f"    Torch-Pruning: {line(status(row[TP]))} ({row[TP]['wall_s']:.0f} s)", file=sys.stderr, flush=True)
            rows.append(row)
    except KeyboardInterrupt:
        print(f"interrupted after {len(rows)} families; partial results follow", file=sys.stderr)
    print(f"graphprune on the smallest model of each timm family (timm {timm.__version__}, torch {torch.__version__}): "
          f"prune ratio {args.ratio:g} (L1), random weights, {args.threads} thread(s), timeout {args.timeout:g} s"
          + (f"; Torch-Pruning {peer} (MagnitudePruner, L1, classifier ignored)" if peer else "; Torch-Pruning not run")
          + "\n")
    print("\n".join(table(rows, peer) + summary(rows, peer, time.perf_counter() - started)))
    if args.json:
        with open(args.json, "w") as fh:
            json.dump({"args": vars(args), "timm": timm.__version__, "torch_pruning": peer, "rows": rows,
                       "wall_s": time.perf_counter() - started}, fh, indent=1)
    return 0 if rows and all(status(r[GP]) == "ok" for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
