"""The tables of ``timm_zoo.py``: one markdown row per family, the summary under it, and the
same from the raw results that earlier runs saved with ``--json`` (several runs merged)."""
from __future__ import annotations

import json
import re
import statistics
from typing import Optional

SLOW_S = 10.0  # analyze + prune above this is listed as slow
SHALLOW = 0.6  # params left above this is listed as shallow
BUCKETS = [(0.0, 0.3), (0.3, 0.4), (0.4, 0.5), (0.5, 0.6), (0.6, 0.8), (0.8, 1.0), (1.0, float("inf"))]
GP, TP = "graphprune", "torch_pruning"


def line(text: str, width: int = 120) -> str:
    """First line of ``text``, without markdown table separators, at most ``width`` characters."""
    first = (text.strip().splitlines() or [""])[0].replace("|", "/")
    return first if len(first) <= width else first[: width - 1] + "…"


def status(result: dict) -> str:
    """``ok``, or the first failure: ``stage: Type: message``."""
    if not result.get("failures"):
        return "ok"
    first = result["failures"][0]
    if first["type"] in ("timeout", "crash"):
        return first["message"]
    return f"{first['stage']}: {first['type']}: {first['message']}"


def _ratio(result: dict, before: str, after: str) -> Optional[float]:
    if result.get(before) and result.get(after) is not None:
        return result[after] / result[before]
    return None


def _fmt(value: Optional[float], spec: str = ".2f") -> str:
    return format(value, spec) if value is not None else "–"


def table(rows: list, peer: Optional[str]) -> list:
    header = ["family", "model (params)", "input", "status", "params left", "FLOPs left", "analyze+prune s", "oracle",
              "save/load"]
    if peer:
        header += ["TP status", "TP params left", "TP s"]
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    for row in rows:
        gp = row[GP]
        params = gp.get("params_before") or row.get("meta_params")
        cells = [
            row["family"], f"{row['model']} ({params / 1e6:.2f}M)" if params else row["model"],
            "×".join(map(str, gp["input"][2:])) if gp.get("input") else "–", line(status(gp)),
            _fmt(_ratio(gp, "params_before", "params_after")), _fmt(_ratio(gp, "flops_before", "flops_after")),
            _fmt(gp.get("total_s")), gp.get("oracle", "–"), gp.get("save_load", "–"),
        ]
        if peer:
            tp = row.get(TP, {})
            cells += [line(status(tp), 60) if tp else "–", _fmt(_ratio(tp, "params_before", "params_after")),
                      _fmt(tp.get("prune_s"))]
        lines.append("| " + " | ".join(cells) + " |")
    return lines


def failure_class(failure: dict) -> str:
    """A coarse class for grouping failures: the stage, the exception type and the message's
    first clause with numbers and quoted names blanked."""
    if failure["type"] in ("timeout", "crash"):
        return f"{failure['type']} in {failure['stage']}"
    text = re.sub(r"'[^']*'|\"[^\"]*\"|`[^`]*`", "'…'", failure["message"])
    text = re.sub(r"\d+", "N", text)
    text = re.split(r"[:;(]", text, maxsplit=1)[0].strip()
    return f"{failure['stage']}: {failure['type']}: {text[:90]}"


def summary(rows: list, peer: Optional[str], wall_s: float) -> list:
    gp_ok = [r for r in rows if status(r[GP]) == "ok"]
    out = [f"\n**{len(gp_ok)}/{len(rows)} families pass** every graphprune check (analyze, prune, params dropped, "
           "output shape kept and finite, train step, save/load bit-identical, oracle)."]
    left = {r["family"]: _ratio(r[GP], "params_before", "params_after") for r in rows}
    if gp_ok:
        out.append(f"Median params left over the passing families: {statistics.median(left[r['family']] for r in gp_ok):.2f}.")
    if peer:
        tp_ok = [r for r in rows if r.get(TP) and status(r[TP]) == "ok"]
        both = [r for r in gp_ok if r in tp_ok]
        out.append(f"Torch-Pruning {peer}: {len(tp_ok)}/{len(rows)} families pruned and still running with the same "
                   f"output shape.")
        if both:
            gp_median = statistics.median(left[r["family"]] for r in both)
            tp_median = statistics.median(_ratio(r[TP], "params_before", "params_after") for r in both)
            out.append(f"Median params left on the {len(both)} families both pass: graphprune {gp_median:.2f}, "
                       f"Torch-Pruning {tp_median:.2f}.")
    mismatches = [r["family"] for r in rows if r[GP].get("oracle") == "MISMATCH"]
    out.append(f"Oracle mismatches: {len(mismatches)}" + (f" ({', '.join(mismatches)})" if mismatches else "") + ".")
    timed = sorted((r for r in rows if r[GP].get("total_s") is not None), key=lambda r: -r[GP]["total_s"])
    slow = [f"{r['family']} {r[GP]['total_s']:.1f} s" for r in timed if r[GP]["total_s"] > SLOW_S]
    out.append(f"Models over {SLOW_S:g} s (analyze + prune): {len(slow)}" + (f" ({', '.join(slow)})" if slow else "") + ".")
    out.append("Slowest 15 (analyze + prune s; worker wall s incl. build, checks and oracle): "
               + ", ".join(f"{r['family']} {r[GP]['total_s']:.1f} ({r[GP]['wall_s']:.0f})" for r in timed[:15]) + ".")
    out.append(f"Sweep wall time: {wall_s:.0f} s.")
    out += ["", "Depth (params left, families where prune returned):", "", "| params left | families |", "|---|---|"]
    for low, high in BUCKETS:
        names = [f for f, v in left.items() if v is not None and low <= v < high]
        label = "1.00 (nothing pruned)" if low == 1.0 else f"{low:.1f}–{high:.1f}"
        out.append(f"| {label} | {len(names)}" + (f": {', '.join(names)}" if names else "") + " |")
    out += _failure_lists(rows, peer)
    return out


def _failure_lists(rows: list, peer: Optional[str]) -> list:
    out = []
    failed = [r for r in rows if r[GP].get("failures")]
    if failed:
        classes: dict = {}
        for r in failed:
            classes.setdefault(failure_class(r[GP]["failures"][0]), []).append(r["family"])
        out += ["", f"Failure classes (first failure of each of the {len(failed)} failing families):", ""]
        for key, families in sorted(classes.items(), key=lambda kv: -len(kv[1])):
            out.append(f"- {len(families)} × `{key.replace('`', '')}`: {', '.join(families)}")
        out += ["", "Failures (every failed check):", ""]
        for r in failed:
            for f in r[GP]["failures"]:
                out.append(f"- {r['family']} ({r['model']}) {f['stage']}: {f['type']}: {f['message']}")
    shallow = [r for r in rows if (_ratio(r[GP], "params_before", "params_after") or 0) > SHALLOW]
    if shallow:
        out += ["", f"Shallow families (params left > {SHALLOW}): blocked groups by kind (how many, the largest one's "
                "share of the parameters); then the biggest blocked groups (root, channels, share [kinds]: reasons):", ""]
        for r in shallow:
            gp = r[GP]
            kinds = ", ".join(f"{k} {n} (largest {share:.0%})" for k, (n, share) in
                              sorted(gp.get("blocked_kinds", {}).items(), key=lambda kv: -kv[1][1]))
            out.append(f"- {r['family']} ({r['model']}, {_ratio(gp, 'params_before', 'params_after'):.2f} left): {kinds}")
            for g in gp.get("blocked_top", []):
                out.append(f"  - {g['root']} ({g['size']} ch, {g['share']:.0%}) [{', '.join(g['kinds'])}]: "
                           f"{line(g['reason'], 200)}")
    if peer:
        tp_failed = [r for r in rows if r.get(TP, {}).get("failures")]
        if tp_failed:
            out += ["", "Torch-Pruning failures:", ""]
            out += [f"- {r['family']} ({r['model']}): {line(status(r[TP]), 300)}" for r in tp_failed]
    return out


def print_saved(paths: list) -> int:
    """The table and summary of the rows saved by earlier runs' ``--json``, in family order; a
    family run again in a later file (a rerun after a fix) takes that run's row."""
    runs = []
    for path in paths:
        with open(path) as fh:
            runs.append(json.load(fh))
    by_family = {row["family"]: row for run in runs for row in run["rows"]}  # a later run's row replaces an earlier one
    rows = [by_family[family] for family in sorted(by_family)]
    first = runs[0]
    peer = first["torch_pruning"]
    wall = sum(run.get("wall_s", 0.0) for run in runs)
    print(f"graphprune on the smallest model of each timm family (timm {first['timm']}, {len(runs)} run(s) merged): "
          f"prune ratio {first['args']['ratio']:g} (L1), random weights, {first['args']['threads']} thread(s), timeout "
          f"{first['args']['timeout']:g} s" + (f"; Torch-Pruning {peer} (MagnitudePruner, L1, classifier ignored)" if peer
                                               else "; Torch-Pruning not run") + "\n")
    print("\n".join(table(rows, peer) + summary(rows, peer, wall)))
    return 0 if rows and all(status(r[GP]) == "ok" for r in rows) else 1
