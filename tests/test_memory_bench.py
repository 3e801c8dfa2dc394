"""The analyze+prune step of ``benchmarks/memory.py`` on a tiny model (no thresholds on memory or time):
its worker runs in a fresh process and returns a complete record, and the table reads it."""
from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

_PATH = Path(__file__).resolve().parent.parent / "benchmarks" / "memory.py"

pytestmark = pytest.mark.skipif(not os.path.exists("/proc/self/clear_refs"), reason="memory.py reads Linux's /proc")


def _load():
    saved = list(sys.path)  # the script appends benchmarks/ to sys.path for itself; the suite keeps its own
    try:
        spec = importlib.util.spec_from_file_location("memory_bench", _PATH)
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        return module
    finally:
        sys.path[:] = saved


def _worker(spec: str) -> dict:
    command = [sys.executable, str(_PATH), "--worker", "analyze+prune", "--models", spec, "--size", "64", "--threads", "1"]
    done = subprocess.run(command, capture_output=True, text=True, timeout=120, env=dict(os.environ, OMP_NUM_THREADS="1"))
    assert done.returncode == 0, done.stderr[-2000:]
    return json.loads([line for line in done.stdout.splitlines() if line.startswith("{")][-1])


def test_analyze_prune_record_of_resnet18():
    record = _worker("resnet18")
    assert record["model"] == "resnet18" and record["sweep"] == "torchvision" and record["mode"] == "analyze+prune"
    assert record["params"] == 11_689_512 and record["param_mb"] == pytest.approx(11_689_512 * 4 / 2**20)
    assert 0 < record["params_after"] < record["params"]  # prune(0.5) ran on the model measured
    assert record["groups"] > 0
    for key in ("forward_peak_mb", "peak_mb", "seconds", "build_s", "rss_before_mb", "peak_rss_mb", "load"):
        assert isinstance(record[key], float), key
    assert record["peak_rss_mb"] >= record["rss_before_mb"] > 0 and record["seconds"] > 0

    memory = _load()
    table = memory._table({("resnet18", "analyze+prune"): {**record, "status": "ok"}}, ["resnet18"], ["analyze+prune"])
    row = table.splitlines()[2].split(" | ")
    assert row[:3] == ["| resnet18", "torchvision", "11.7M"]
    assert f"{record['peak_mb'] / record['param_mb']:.2f}×" in row[6]


def test_analyze_prune_record_of_a_bf16_llama_pruned_by_heads():
    pytest.importorskip("transformers")
    record = _worker("llama:tiny")  # the 1.1B's builder and options (prune_heads, uniform, 0.25) at hidden 64
    assert record["sweep"] == "llama" and record["param_mb"] == pytest.approx(record["params"] * 2 / 2**20)
    assert 0 < record["params_after"] < record["params"]
