"""``benchmarks/speed_zoo.py``'s worker on one small torchvision model (no timing thresholds): the record
has every field, positive times, and renders into the tables; a model that cannot be built is a failure."""
from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import pytest

_PATH = Path(__file__).resolve().parent.parent / "benchmarks" / "speed_zoo.py"

pytestmark = pytest.mark.skipif(not Path("/proc/self/clear_refs").exists(), reason="needs Linux /proc")


def _load():
    saved = list(sys.path)  # the script appends benchmarks/ to sys.path for itself; the suite keeps its own
    try:
        spec = importlib.util.spec_from_file_location("speed_zoo", _PATH)
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        return module
    finally:
        sys.path[:] = saved


speed_zoo = _load()


def test_worker_records_times_memory_and_load():
    row = speed_zoo.run_worker("torchvision", "squeezenet1_1", timeout=120)
    assert row["failures"] == [] and row["done"]
    assert row["sweep"] == "torchvision" and row["model"] == "squeezenet1_1"
    assert row["params"] > 0 and row["param_mb"] > 0 and row["prunable"] > 0
    assert row["analyze_s"] > 0 and row["prune_s"] > 0 and row["cpu_s"] > 0
    assert row["peak_mb"] >= 0 and row["rss_before_mb"] > 0
    assert row["load_start"] >= 0 and row["load_end"] >= 0
    assert speed_zoo.total(row) == row["analyze_s"] + row["prune_s"]
    text = speed_zoo.render([row], "title")
    assert "| squeezenet1_1 |" in text and "Slowest 10" in text and "1. squeezenet1_1 (torchvision)" in text


def test_a_model_that_fails_is_a_row_not_a_crash():
    row = speed_zoo.run_worker("torchvision", "no_such_model", timeout=120)
    assert row["failures"] and row["failures"][0]["stage"] == "build"
    assert speed_zoo.total(row) is None and speed_zoo.status(row).startswith("build: ")
    assert "0/1 timed" in speed_zoo.render([row], "title")
