"""Models larger than memory: ``graphprune.prune_checkpoint`` on synthetic LLaMA checkpoints of 1B, 3B and 7B.

    python benchmarks/scale.py --quick                     # a 2-layer, hidden-256 LLaMA, in about a minute
    python benchmarks/scale.py --sizes 1b,3b               # equality with in-memory pruning on both
    python benchmarks/scale.py --sizes 7b --write          # the headline, to benchmarks/results/scale.md
    python benchmarks/scale.py --write                     # 1b, 3b and 7b, one after another

Per size, random bf16 weights for a LLaMA config are written as a checkpoint of ``--shard-gb``
safetensors shards with an index (the model only ever built on meta), then, each step in its own
child process (so that a peak resident set is that step's alone):

* **prune**: ``prune_checkpoint(src, dst, 0.25, uniform=True)``, the checkpoint's files first dropped from
  the page cache (``posix_fadvise``; ``--warm`` leaves them), so that it reads the disk; the seconds of each stage
  (analysis, scoring, planning, writing) and the peak RSS of each stage (``VmRSS`` sampled every
  20 ms in a thread, attributed to stages by their cumulative seconds) and of the whole call
  (``ru_maxrss``), against the goal: peak RSS <= 2 x largest shard + 2 GB;
* **analysis**: the config analysed on meta alone (no weights, goal <= 30 s), and its groups against
  those of a 2-layer copy of the config materialised in float32: a group's signature is its size,
  its members (name with every numeric component replaced by ``#``, param, dim, role, as a set)
  and whether it is blocked; the two sets of signatures must be equal;
* **equal** (``--equal``, default quick, 1b, 3b): ``from_pretrained(src)`` in bf16, pruned in memory
  by ``graphprune.prune(model, 0.25, {"input_ids": ids}, uniform=True, fit_config=True)``, and
  ``from_pretrained(dst)``: logits on fixed token ids must be ``torch.equal`` (every tensor too);
* **generate** (``--generate``, default quick, 7b): ``from_pretrained(dst)`` and 8 greedy tokens.

GB is 10^9 bytes throughout. The checkpoints live in ``--workdir`` and are deleted after each size
(``--keep`` keeps them). The CLI equivalent of the prune step is
``python -m graphprune prune hf:SRC --ratio 0.25 --uniform --stream --output DST``.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import resource
import shlex
import shutil
import subprocess
import sys
import threading
import time
from typing import Optional

_HERE = os.path.dirname(os.path.abspath(__file__))
sys.path[:] = [p for p in sys.path if os.path.abspath(p or os.curdir) != _HERE]

GB = 1e9
RATIO = 0.25
STAGES = ("analysis", "scoring", "planning", "writing")
FIELDS = ("hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads", "num_key_value_heads",
          "vocab_size", "max_position_embeddings", "rms_norm_eps")  # of LlamaConfig, in the order of SIZES' tuples
SIZES = {
    "quick": (256, 688, 2, 8, 4, 1000, 512, 1e-6),
    "1b": (2048, 5632, 22, 32, 4, 32000, 2048, 1e-5),  # TinyLlama-1.1B
    "3b": (3200, 8640, 26, 32, 32, 32000, 2048, 1e-6),  # open_llama_3b
    "7b": (4096, 11008, 32, 32, 32, 32000, 4096, 1e-5),  # LLaMA-2-7B
}
QUICK_SHARD_GB = 0.002  # --quick: several shards of a 2 MB budget, so that the index path runs
MACHINE_NOTE = "shared 2-core machine; seconds are upper bounds"


def say(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


# ---------------------------------------------------------------------------- synthetic checkpoints
def llama_config(size: str, layers: Optional[int] = None):
    import torch
    from transformers import LlamaConfig

    config = LlamaConfig(**dict(zip(FIELDS, SIZES[size])), tie_word_embeddings=False)
    if layers is not None:
        config.num_hidden_layers = layers
    config.architectures = ["LlamaForCausalLM"]
    config.dtype = torch.bfloat16  # from_pretrained loads bf16, as the weights are
    return config


def shard_plan(shapes: dict, shard_bytes: float) -> list:
    """Tensor names packed in order into shards of at most ``shard_bytes`` (bf16), a tensor never split."""
    shards, current, used = [], [], 0
    for name, shape in shapes.items():
        nbytes = 2 * math.prod(shape)
        if current and used + nbytes > shard_bytes:
            shards.append(current)
            current, used = [], 0
        current.append(name)
        used += nbytes
    return shards + [current] if current else shards


def write_checkpoint(size: str, directory: str, shard_gb: float, seed: int = 0) -> dict:
    """A checkpoint of random bf16 weights for the ``size`` config in ``directory``, the model only
    ever built on meta: one shard of tensors in memory at a time."""
    import torch
    from safetensors.torch import save_file
    from transformers import LlamaForCausalLM

    config = llama_config(size)
    with torch.device("meta"):
        model = LlamaForCausalLM(config)
    seen, shapes = set(), {}
    for name, tensor in model.state_dict(keep_vars=True).items():
        if id(tensor) not in seen:  # tied duplicates are saved once
            seen.add(id(tensor))
            shapes[name] = tuple(tensor.shape)
    del model
    os.makedirs(directory, exist_ok=True)
    torch.manual_seed(seed)
    plan = shard_plan(shapes, shard_gb * GB)
    weight_map, total = {}, 0
    for number, names in enumerate(plan, 1):
        file = f"model-{number:05d}-of-{len(plan):05d}.safetensors"
        tensors = {n: torch.ones(shapes[n], dtype=torch.bfloat16) if n.endswith("norm.weight")  # norms: ones
                   else torch.randn(shapes[n], dtype=torch.bfloat16).mul_(0.02) for n in names}
        save_file(tensors, os.path.join(directory, file), metadata={"format": "pt"})
        total += sum(t.numel() * t.element_size() for t in tensors.values())
        weight_map.update(dict.fromkeys(names, file))
        del tensors
    with open(os.path.join(directory, "model.safetensors.index.json"), "w", encoding="utf-8") as handle:
        json.dump({"metadata": {"total_size": total}, "weight_map": weight_map}, handle, indent=2)
    config.save_pretrained(directory)
    sizes = [os.path.getsize(os.path.join(directory, f)) for f in dict.fromkeys(weight_map.values())]
    return {"shards": len(sizes), "largest_shard": max(sizes), "bytes": sum(sizes),
            "params": sum(map(math.prod, shapes.values()))}


# ---------------------------------------------------------------------------- child: prune, with RSS per stage
def _rss() -> tuple:
    """(VmRSS, RssAnon) of this process, bytes."""
    with open("/proc/self/status") as handle:
        values = dict(line.split(":", 1) for line in handle if line.startswith(("VmRSS:", "RssAnon:")))
    return tuple(int(values[key].split()[0]) * 1024 for key in ("VmRSS", "RssAnon"))


def _sample(samples: list, stop: threading.Event, interval: float = 0.02) -> None:
    while not stop.is_set():
        samples.append((time.perf_counter(), *_rss()))
        stop.wait(interval)


def child_prune(src: str, dst: str, progress: str) -> dict:
    import graphprune

    baseline, samples, stop = _rss()[0], [], threading.Event()
    sampler = threading.Thread(target=_sample, args=(samples, stop), daemon=True)
    sampler.start()
    start = time.perf_counter()
    done = graphprune.prune_checkpoint(src, dst, RATIO, uniform=True, progress=progress == "1")
    stop.set()
    sampler.join()
    peaks, anon, edge = {}, {}, start
    for stage in STAGES:
        end = edge + done.seconds[stage]
        inside = [s for s in samples if edge <= s[0] <= end] or [min(samples, key=lambda s: abs(s[0] - end))]
        peaks[stage], anon[stage] = max(s[1] for s in inside), max(s[2] for s in inside)
        edge = end
    return {"seconds": done.seconds, "rss_stage": peaks, "anon_stage": anon, "rss_baseline": baseline,
            "rss_peak": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
            "anon_peak": max(s[2] for s in samples), "params_before": done.result.before["params"],
            "params_after": done.result.after["params"], "total_s": time.perf_counter() - start,
            "config": {k: getattr(done.model.config, k) for k in ("intermediate_size", "num_attention_heads", "head_dim",
                                                                     "num_key_value_heads", "hidden_size")}}


# ---------------------------------------------------------------------------- child: analysis on meta
def signatures(report, strict: bool = False) -> set:
    """Each group's (size, members with layer numbers as '#', blocked): what does not depend on depth."""
    found = set()
    for group in report.groups:
        members = frozenset((".".join("#" if part.isdigit() else part for part in m.name.split(".")), m.param, m.dim, m.role)
                            for m in group.members)
        blocked = tuple(sorted({r.kind.value for r in group.blocked})) if strict else bool(group.blocked)
        found.add((group.size, members, blocked))
    return found


def child_analysis(size: str) -> dict:
    import torch
    from transformers import LlamaForCausalLM

    import graphprune

    start = time.perf_counter()
    with torch.device("meta"):
        model = LlamaForCausalLM(llama_config(size)).eval()
    build = time.perf_counter() - start
    start = time.perf_counter()
    meta = graphprune.analyze(model, {"input_ids": torch.zeros((1, 16), dtype=torch.long, device="meta")})
    meta_s = time.perf_counter() - start
    config = llama_config(size, layers=2)
    config.dtype = torch.float32
    torch.manual_seed(0)
    small = LlamaForCausalLM(config).eval()
    ids = torch.randint(0, config.vocab_size, (1, 16), generator=torch.Generator().manual_seed(0))
    start = time.perf_counter()
    real = graphprune.analyze(small, {"input_ids": ids})
    real_s, ours, theirs = time.perf_counter() - start, signatures(meta), signatures(real)
    return {"layers": model.config.num_hidden_layers, "build_s": build, "meta_s": meta_s, "groups": len(meta.groups),
            "prunable": len(meta.prunable_groups), "real_s": real_s, "real_groups": len(real.groups),
            "signatures": len(ours), "same": ours == theirs, "same_strict": signatures(meta, True) == signatures(real, True),
            "only_meta": len(ours - theirs), "only_real": len(theirs - ours)}


# ---------------------------------------------------------------------------- child: equality, generate
def _token_ids(vocab: int, rows: int = 2, length: int = 16):
    import torch

    return torch.randint(0, vocab, (rows, length), generator=torch.Generator().manual_seed(1))


def child_equal(src: str, dst: str) -> dict:
    import torch
    from transformers import LlamaForCausalLM

    import graphprune

    model = LlamaForCausalLM.from_pretrained(src, dtype=torch.bfloat16).eval()
    ids = _token_ids(model.config.vocab_size)
    graphprune.prune(model, RATIO, {"input_ids": ids}, uniform=True, fit_config=True)
    streamed = LlamaForCausalLM.from_pretrained(dst, dtype=torch.bfloat16).eval()
    with torch.no_grad():
        ours, theirs = model(ids).logits, streamed(ids).logits
    mine, other = model.state_dict(), streamed.state_dict()
    differing = sorted(n for n in mine if n not in other or mine[n].shape != other[n].shape or not torch.equal(mine[n], other[n]))
    return {"equal": bool(torch.equal(ours, theirs)), "dtypes": [str(ours.dtype), str(theirs.dtype)],
            "max_abs_diff": float((ours.float() - theirs.float()).abs().max()) if ours.shape == theirs.shape else None,
            "shapes": [list(ours.shape), list(theirs.shape)], "tensors_differing": differing[:5],
            "tensors_differing_count": len(differing) + len(set(other) - set(mine)),
            "params_memory": sum(p.numel() for p in model.parameters())}


def child_generate(dst: str) -> dict:
    import torch
    from transformers import LlamaForCausalLM

    start = time.perf_counter()
    model = LlamaForCausalLM.from_pretrained(dst, dtype=torch.bfloat16).eval()
    load_s, start = time.perf_counter() - start, time.perf_counter()
    ids = _token_ids(model.config.vocab_size, rows=1, length=8)
    out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=8, do_sample=False, pad_token_id=0)
    return {"ran": True, "new_tokens": int(out.shape[1] - ids.shape[1]), "params": sum(p.numel() for p in model.parameters()),
            "dtype": str(next(model.parameters()).dtype), "load_s": load_s, "generate_s": time.perf_counter() - start}


def child_main(kind: str, arguments: list, threads: int) -> None:
    import warnings

    import torch

    torch.set_num_threads(threads)
    warnings.simplefilter("ignore")
    run = {"prune": child_prune, "analysis": child_analysis, "equal": child_equal, "generate": child_generate}[kind]
    print("RESULT " + json.dumps(run(*arguments)), flush=True)


# ---------------------------------------------------------------------------- driver
def run_child(kind: str, arguments: list, args) -> dict:
    command = [sys.executable, os.path.abspath(__file__), "--child", kind, *arguments, "--threads", str(args.threads)]
    env = dict(os.environ, OMP_NUM_THREADS=str(args.threads), PYTHONWARNINGS="ignore", TOKENIZERS_PARALLELISM="false")
    say(f"  {kind}: {shlex.join(command[1:])}")
    start = time.perf_counter()
    try:
        proc = subprocess.run(command, check=False, stdout=subprocess.PIPE, stderr=None if args.progress else subprocess.PIPE,
                              text=True, env=env, timeout=args.timeout)
    except subprocess.TimeoutExpired:
        return {"error": f"timeout (> {args.timeout:g} s)"}
    lines = [line[7:] for line in proc.stdout.splitlines() if line.startswith("RESULT ")]
    if proc.returncode != 0 or not lines:
        reason = f"signal {-proc.returncode}, out of memory?" if proc.returncode < 0 else (proc.stderr or "").strip()[-3000:]
        say(f"  {kind} failed:\n{reason}")
        return {"error": reason}
    say(f"  {kind}: done in {time.perf_counter() - start:.0f} s")
    return json.loads(lines[-1])


def evict(directory: str) -> None:
    """Drop ``directory``'s files from the page cache (written back first), so that the next
    read comes from the disk, as a checkpoint larger than memory must."""
    for name in os.listdir(directory):
        handle = os.open(os.path.join(directory, name), os.O_RDONLY)
        try:
            os.fsync(handle)
            os.posix_fadvise(handle, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(handle)


def run_size(size: str, args) -> dict:
    src, dst = os.path.join(args.workdir, f"{size}-src"), os.path.join(args.workdir, f"{size}-dst")
    for path in (src, dst):
        shutil.rmtree(path, ignore_errors=True)
    shard_gb = QUICK_SHARD_GB if size == "quick" else args.shard_gb
    say(f"{size}: analysis on meta")
    row = {"size": size, "analysis": run_child("analysis", [size], args)}
    say(f"{size}: writing a synthetic checkpoint to {src} (shards of {shard_gb:g} GB)")
    start = time.perf_counter()
    row["checkpoint"] = write_checkpoint(size, src, shard_gb)
    row["checkpoint"]["seconds"] = time.perf_counter() - start
    say(f"{size}: {row['checkpoint']}")
    try:
        if not args.warm:
            evict(src)
        say(f"{size}: prune_checkpoint")
        row["prune"] = run_child("prune", [src, dst, "1" if args.progress else "0"], args)
        if "error" not in row["prune"]:
            if size in args.equal:
                row["equal"] = run_child("equal", [src, dst], args)
            if size in args.generate:
                row["generate"] = run_child("generate", [dst], args)
    finally:
        if not args.keep:
            for path in (src, dst):
                shutil.rmtree(path, ignore_errors=True)
    return row


def _gb(value) -> str:
    return "–" if value is None else f"{value / GB:.2f}" if value >= 0.1 * GB else f"{value / GB:.4f}"


def _params(count: int) -> str:
    return f"{count / 1e9:.3f}B" if count >= 1e8 else f"{count / 1e6:.2f}M"


def table(rows: list) -> str:
    lines = [("| size | params before → after | shards | largest shard GB | analysis s | scoring s | planning s | writing s "
              "| peak RSS GB | RSS per pass GB (analysis / scoring / planning / writing) | goal GB (2 × shard + 2) | goal met "
              "| equal to in-memory | generate ran |"), "|" + "---|" * 14]
    for row in rows:
        ckpt, pr = row["checkpoint"], row.get("prune", {})
        if "error" in pr:
            lines.append(f"| {row['size']} | FAILED: {pr['error'].splitlines()[-1][:200]} |" + " |" * 12)
            continue
        goal = 2 * ckpt["largest_shard"] + 2 * GB
        seconds = [f"{pr['seconds'][s]:.1f}" for s in STAGES]
        per_pass = " / ".join(_gb(pr["rss_stage"][s]) for s in STAGES)
        lines.append(f"| {row['size']} | {_params(pr['params_before'])} → {_params(pr['params_after'])} "
                     f"| {ckpt['shards']} | {_gb(ckpt['largest_shard'])} | {' | '.join(seconds)} | {_gb(pr['rss_peak'])} "
                     f"| {per_pass} | {_gb(goal)} | {'yes' if pr['rss_peak'] <= goal else 'NO'} | {_check(row, 'equal')} "
                     f"| {_check(row, 'generate')} |")
    return "\n".join(lines)


def _check(row: dict, key: str) -> str:
    """The equal / generate cell."""
    done = row.get(key)
    if done is None or "error" in done:
        return "not run" if done is None else f"FAILED: {done['error'].splitlines()[-1][:120]}"
    if key == "generate":
        return f"yes ({done['new_tokens']} tokens in {done['generate_s']:.1f} s, {_params(done['params'])} params)"
    differing = f"{done['tensors_differing_count']} tensors differ"
    if done["equal"]:
        return f"yes ({done['dtypes'][0].replace('torch.', '')}; {differing.replace('0 tensors differ', 'every tensor equal')})"
    return f"NO (max abs diff {done['max_abs_diff']}, {differing})"


def analysis_table(rows: list) -> str:
    lines = [("| size | layers | analysis on meta s (goal ≤ 30) | groups (prunable) | 2-layer float32 copy: analysis s, groups "
              "| same group set as the 2-layer copy | same, with block kinds |"), "|" + "---|" * 7]
    for row in rows:
        a = row["analysis"]
        if "error" in a:
            lines.append(f"| {row['size']} | FAILED: {a['error'].splitlines()[-1][:200]} |" + " |" * 5)
            continue
        same = "yes" if a["same"] else f"NO ({a['only_meta']} only on meta, {a['only_real']} only in the copy)"
        lines.append(f"| {row['size']} | {a['layers']} | {a['meta_s']:.1f} | {a['groups']} ({a['prunable']}) "
                     f"| {a['real_s']:.1f}, {a['real_groups']} | {same} ({a['signatures']} signatures) "
                     f"| {'yes' if a['same_strict'] else 'NO'} |")
    return "\n".join(lines)


def notes(rows: list) -> str:
    out = []
    for row in rows:
        pr, ckpt = row.get("prune", {}), row["checkpoint"]
        if "error" in pr:
            continue
        out.append(f"* {row['size']}: checkpoint {_gb(ckpt['bytes'])} GB written in {ckpt['seconds']:.0f} s; RSS after imports "
                   f"{_gb(pr['rss_baseline'])} GB; anonymous RSS peak {_gb(pr['anon_peak'])} GB (per pass "
                   f"{' / '.join(_gb(pr['anon_stage'][s]) for s in STAGES)}; the rest of VmRSS is file-backed: shared "
                   f"libraries and shard pages mapped from the page cache); pruned config {json.dumps(pr['config'])}")
    return "\n".join(out)


def parse_args(argv: Optional[list]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    add = parser.add_argument
    add("--sizes", default="1b,3b,7b", help="comma-separated: quick, 1b, 3b, 7b (default 1b,3b,7b)")
    add("--quick", action="store_true", help="the tiny config alone (--sizes quick), a smoke test")
    add("--shard-gb", type=float, default=2.0, help="shard size of the synthetic checkpoints, GB (default 2)")
    add("--equal", default="quick,1b,3b", help="sizes checked against in-memory pruning (default quick,1b,3b)")
    add("--generate", default="quick,7b", help="sizes whose output generates 8 tokens (default quick,7b)")
    add("--workdir", default="/tmp/scale-bench", help="where the checkpoints are written (default /tmp/scale-bench)")
    add("--keep", action="store_true", help="keep the checkpoints")
    add("--warm", action="store_true", help="leave the checkpoint in the page cache for the prune step (by default "
        "its files are dropped from it first, so that the step reads them from the disk)")
    add("--threads", type=int, default=len(os.sched_getaffinity(0)), help="torch threads (default: every core)")
    add("--timeout", type=float, default=7200, help="seconds allowed to each child process")
    add("--progress", action="store_true", help="show prune_checkpoint's progress bars and the children's stderr")
    add("--write", nargs="?", const=os.path.join(_HERE, "results", "scale.md"), default=None, metavar="FILE",
        help="also write the tables to FILE (default benchmarks/results/scale.md)")
    add("--child", nargs="+", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.quick:
        args.sizes = "quick"
    args.sizes, args.equal, args.generate = (v.split(",") for v in (args.sizes, args.equal, args.generate))
    unknown = [s for s in args.sizes if s not in SIZES]
    if unknown:
        parser.error(f"unknown sizes {unknown}; choose from {', '.join(SIZES)}")
    return args


def library_revision() -> str:
    """The commit of the checkout graphprune is imported from, and a digest of its uncommitted library changes."""
    import hashlib
    import importlib.util

    where = os.path.dirname(os.path.dirname(importlib.util.find_spec("graphprune").origin))
    git = ["git", "--no-optional-locks", "-C", where]
    try:
        commit = subprocess.run([*git, "rev-parse", "--short", "HEAD"], capture_output=True, text=True, check=True).stdout
        diff = subprocess.run([*git, "diff", "HEAD", "--", "graphprune", "criteria", "tracer"], capture_output=True,
                              check=True).stdout
    except (OSError, subprocess.CalledProcessError):
        return f"graphprune from {where} (not a git checkout)"
    dirty = f" with uncommitted changes (diff sha1 {hashlib.sha1(diff).hexdigest()[:8]})" if diff else ""
    return f"graphprune {commit.strip()}{dirty}"


def main(argv: Optional[list] = None) -> int:
    args = parse_args(argv)
    if args.child:
        child_main(args.child[0], args.child[1:], args.threads)
        return 0
    rows, revision = [], library_revision()
    for size in args.sizes:
        rows.append(run_size(size, args))
        say(json.dumps(rows[-1], default=str))
    if library_revision() != revision:  # the children import the library as it is when they start
        revision = f"{revision}, then {library_revision()}: THE LIBRARY CHANGED DURING THE RUN"
    command = "python benchmarks/scale.py " + shlex.join(sys.argv[1:] if argv is None else argv)
    cache = "left in the page cache" if args.warm else "dropped from the page cache before the prune step"
    text = (f"# prune_checkpoint at scale: synthetic LLaMA checkpoints, ratio {RATIO}, uniform, L1\n\n`{command}`\n\n"
            f"{revision}; {MACHINE_NOTE}; {args.threads} torch threads; checkpoint {cache}; GB = 10^9 bytes; peak RSS "
            f"per pass is VmRSS sampled every 20 ms, overall is ru_maxrss\n\n## Streamed pruning\n\n{table(rows)}\n\n"
            f"{notes(rows)}\n\n## Analysis on meta\n\n{analysis_table(rows)}\n")
    print(text)
    if args.write:
        with open(args.write, "w", encoding="utf-8") as handle:
            handle.write(text)
        say(f"written to {args.write}")
    failed = any("error" in row.get(k, {}) for row in rows for k in ("analysis", "prune", "equal", "generate"))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
