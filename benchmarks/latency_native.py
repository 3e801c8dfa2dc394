"""Latency at the limit: a pruned model against the same architecture built natively at its pruned widths.

    python benchmarks/latency_native.py                          # resnet50, mobilenet_v2, efficientnet_b0, vit_b_16, llama
    python benchmarks/latency_native.py --quick                  # mobilenet_v2, 5 rounds: a smoke test
    python benchmarks/latency_native.py --rounds 31 --write      # results/latency_native.md, ~3 min on one core
    python benchmarks/latency_native.py --models mobilenet_v2,llama --size 160 --vocab 8192

Each model (random weights, eval, batch 1) is pruned by ``graphprune.prune(model, --ratio, x, inplace=False)``
(L1; the LLaMA model with ``uniform=True``) and then *rebuilt natively* (:func:`rebuild_native`): a deep copy of
the pruned model in which every Conv, Linear, BatchNorm, LayerNorm, GroupNorm, RMSNorm, Embedding and
MultiheadAttention is a freshly constructed module of the same class, built from the constructor arguments read
off the pruned module, with its values copied in; every other parameter and buffer becomes a fresh contiguous
copy. The rebuilt model must give the pruned model's outputs (``torch.allclose``, atol 1e-5). The unpruned,
pruned and rebuilt models are then timed on one thread in interleaved rounds (:func:`time_alternating`: each
round times every model once, the unpruned first, then pruned and native, swapping places every other round),
contiguous and, for conv nets, channels_last. ``pruned vs native`` is the median over rounds of native time /
pruned time within a round: 1.00 means pruned as fast as native, and the goal is >= 0.98. Any gap there is
graphprune's (non-contiguous weights, leftover index ops, stale attributes), not the architecture's; the layout
columns say whether every pruned parameter is dense and has the rebuilt model's strides. See benchmarks/README.md.
"""
from __future__ import annotations

import argparse
import copy
import os
import platform
import statistics
import sys
import time
import warnings
from typing import Optional

# benchmarks/ must never shadow a top-level package; it is appended (last) so that latency.py is found.
_HERE = os.path.dirname(os.path.abspath(__file__))
sys.path[:] = [p for p in sys.path if os.path.abspath(p or os.curdir) != _HERE]
sys.path.append(_HERE)

import torch  # noqa: E402
from torch import nn  # noqa: E402

DEFAULT_MODELS = "resnet50,mobilenet_v2,efficientnet_b0,vit_b_16,llama"
GOAL = 0.98
CONTIGUOUS, CHANNELS_LAST = "contiguous", "channels_last"
# A 2-layer LlamaForCausalLM of real proportions (hidden 1024, MLP 2816, 16 heads of 64, LLaMA's vocabulary).
LLAMA_CONFIG = dict(hidden_size=1024, intermediate_size=2816, num_attention_heads=16, num_key_value_heads=16,
                    num_hidden_layers=2, max_position_embeddings=2048, use_cache=False)
LLAMA_TOKENS = 128


def _conv_args(m) -> dict:
    args = dict(in_channels=m.in_channels, out_channels=m.out_channels, kernel_size=m.kernel_size, stride=m.stride,
                padding=m.padding, dilation=m.dilation, groups=m.groups, bias=m.bias is not None,
                padding_mode=m.padding_mode)
    return {**args, "output_padding": m.output_padding} if m.transposed else args


def _mha_args(m) -> dict:
    return dict(embed_dim=m.embed_dim, num_heads=m.num_heads, dropout=m.dropout, bias=m.in_proj_bias is not None,
                add_bias_kv=m.bias_k is not None, add_zero_attn=m.add_zero_attn, kdim=m.kdim, vdim=m.vdim,
                batch_first=m.batch_first)


# (base class, constructor keyword arguments read off a module); the first match wins.
_CONSTRUCTORS = (
    (nn.modules.conv._ConvNd, _conv_args),
    (nn.Linear, lambda m: dict(in_features=m.in_features, out_features=m.out_features, bias=m.bias is not None)),
    (nn.modules.batchnorm._BatchNorm, lambda m: dict(num_features=m.num_features, eps=m.eps, momentum=m.momentum,
                                                     affine=m.affine, track_running_stats=m.track_running_stats)),
    (nn.LayerNorm, lambda m: dict(normalized_shape=m.normalized_shape, eps=m.eps,
                                  elementwise_affine=m.elementwise_affine, bias=getattr(m, "bias", None) is not None)),
    (nn.GroupNorm, lambda m: dict(num_groups=m.num_groups, num_channels=m.num_channels, eps=m.eps, affine=m.affine)),
    (nn.RMSNorm, lambda m: dict(normalized_shape=m.normalized_shape, eps=m.eps,
                                elementwise_affine=m.elementwise_affine)),
    (nn.Embedding, lambda m: dict(num_embeddings=m.num_embeddings, embedding_dim=m.embedding_dim,
                                  padding_idx=m.padding_idx, max_norm=m.max_norm, norm_type=m.norm_type,
                                  scale_grad_by_freq=m.scale_grad_by_freq, sparse=m.sparse)),
    (nn.MultiheadAttention, _mha_args),
)


def constructor_args(module: nn.Module) -> Optional[dict]:
    """The keyword arguments that build ``module``'s class at its current widths, or None for another kind
    (Hugging Face's RMSNorms, a 1-D ``weight`` and a ``variance_epsilon``, as ``cls(hidden_size, eps=...)``)."""
    for base, read in _CONSTRUCTORS:
        if isinstance(module, base):
            return read(module)
    weight = getattr(module, "weight", None)
    if hasattr(module, "variance_epsilon") and isinstance(weight, nn.Parameter) and weight.dim() == 1:
        return dict(hidden_size=weight.shape[0], eps=module.variance_epsilon)
    return None


def fresh_module(module: nn.Module) -> Optional[nn.Module]:
    """A new ``module.__class__`` built at ``module``'s widths holding its values, or None for another kind."""
    kwargs = constructor_args(module)
    if kwargs is None:
        return None
    reference = next(iter(module.parameters()), None)
    factory = {} if reference is None else {"device": reference.device, "dtype": reference.dtype}
    try:
        fresh = module.__class__(**kwargs, **factory)
    except TypeError:  # a class that takes no factory arguments (e.g. a Hugging Face RMSNorm)
        fresh = module.__class__(**kwargs).to(**factory)
    with torch.no_grad():
        fresh.load_state_dict(module.state_dict())  # raises where an attribute disagrees with a weight's shape
    return fresh.train(module.training)


def _once(memo: dict, obj, make):
    """``make()`` the first time ``obj`` is seen, the same result after; ``obj`` is held so that its id stays its."""
    if id(obj) not in memo:
        memo[id(obj)] = (obj, make())
    return memo[id(obj)][1]


def _refresh_tensors(module: nn.Module, memo: dict) -> None:
    """Every parameter and buffer held directly by ``module`` becomes a fresh contiguous copy (ties kept)."""
    for tensors, make in ((module._parameters, lambda t: nn.Parameter(t.detach().clone(), t.requires_grad)),
                          (module._buffers, lambda t: t.detach().clone())):
        for name, t in list(tensors.items()):
            if t is not None:
                tensors[name] = _once(memo, t, lambda t=t, make=make: make(t.contiguous()))


def _rebuild_children(module: nn.Module, memo: dict) -> None:
    for name, child in list(module._modules.items()):  # named_children() would skip a second occurrence
        if child is not None:
            setattr(module, name, _once(memo, child, lambda child=child: _rebuilt(child, memo)))


def _rebuilt(module: nn.Module, memo: dict) -> nn.Module:
    fresh = fresh_module(module)
    if fresh is None:  # a container: rebuild what it holds
        _refresh_tensors(module, memo)
        _rebuild_children(module, memo)
    return module if fresh is None else fresh


def rebuild_native(model: nn.Module) -> nn.Module:
    """A deep copy of ``model`` in which every Conv / Linear / norm / Embedding / MultiheadAttention is built
    afresh at its current widths (:func:`fresh_module`) and every other tensor is a fresh contiguous copy.

    A module shared by several parents stays shared; parameters tied *across* rebuilt modules are not re-tied."""
    return _rebuilt(copy.deepcopy(model), {})


def flat_tensors(output) -> list:
    """The tensors of a model output (a tensor, a tuple / list / dict of them, or a ModelOutput), in order."""
    if isinstance(output, torch.Tensor):
        return [output]
    if isinstance(output, dict):
        output = list(output.values())
    if isinstance(output, (list, tuple)):
        return [t for item in output for t in flat_tensors(item)]
    return []


def output_gap(a: nn.Module, b: nn.Module, x: torch.Tensor) -> tuple:
    """(max absolute difference, all close at atol 1e-5) between the outputs of ``a`` and ``b`` on ``x``."""
    with torch.no_grad():
        out_a, out_b = flat_tensors(a(x)), flat_tensors(b(x))
    if len(out_a) != len(out_b) or any(s.shape != t.shape for s, t in zip(out_a, out_b)):
        return float("inf"), False
    gap = max((float((s - t).abs().max()) for s, t in zip(out_a, out_b)), default=0.0)
    return gap, all(torch.allclose(s, t, atol=1e-5) for s, t in zip(out_a, out_b))


def layout_report(pruned: nn.Module, native: nn.Module) -> dict:
    """Per parameter: dense (contiguous in its own memory format, offset 0, storage exactly its size) and
    with the rebuilt model's strides. ``odd`` names those that are not, with their strides."""
    ours, theirs = dict(pruned.named_parameters()), dict(native.named_parameters())
    dense = same = 0
    odd = []
    for name, p in ours.items():
        fmt = torch.channels_last if p.dim() == 4 and p.is_contiguous(memory_format=torch.channels_last) \
            else torch.contiguous_format
        is_dense = (p.is_contiguous(memory_format=fmt) and p.storage_offset() == 0
                    and p.untyped_storage().nbytes() == p.numel() * p.element_size())
        is_same = name in theirs and p.stride() == theirs[name].stride() and p.shape == theirs[name].shape
        dense, same = dense + is_dense, same + is_same
        if not (is_dense and is_same):
            odd.append(f"{name} {tuple(p.shape)} stride {p.stride()} vs {theirs[name].stride() if name in theirs else '-'}")
    return {"params": len(ours), "dense": dense, "same_strides": same, "odd": odd,
            "hooks": sum(len(m._forward_hooks) + len(m._forward_pre_hooks) for m in pruned.modules())}


def build(name: str, size: int, vocab: int) -> tuple:
    """(model in eval mode with random weights, its batch-1 input, extra ``prune`` arguments)."""
    torch.manual_seed(0)
    if name == "llama":
        from transformers import LlamaConfig, LlamaForCausalLM

        model = LlamaForCausalLM(LlamaConfig(vocab_size=vocab, **LLAMA_CONFIG)).eval()
        x = torch.randint(0, vocab, (1, LLAMA_TOKENS), generator=torch.Generator().manual_seed(0))
        return model, x, {"uniform": True}
    import torchvision

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        kwargs = {"image_size": size} if name.startswith("vit_") else {}
        model = torchvision.models.get_model(name, weights=None, **kwargs).eval()
    return model, torch.randn(1, 3, size, size, generator=torch.Generator().manual_seed(0)), {}


def _variants(base: nn.Module, pruned: nn.Module, native: nn.Module, x: torch.Tensor, formats: list) -> tuple:
    """``{(role, format): model}`` and their inputs; the channels_last ones are converted deep copies."""
    variants, inputs = {}, {}
    for fmt in formats:
        cl = fmt == CHANNELS_LAST
        for role, model in (("unpruned", base), ("pruned", pruned), ("native", native)):
            variants[(role, fmt)] = copy.deepcopy(model).to(memory_format=torch.channels_last) if cl else model
            inputs[(role, fmt)] = x.contiguous(memory_format=torch.channels_last) if cl else x
    return variants, inputs


def time_alternating(variants: dict, inputs: dict, *, rounds: int, inner: int, warmup: int, threads: int) -> dict:
    """``{(role, format): [seconds per forward pass, one per round]}``, as ``latency.time_interleaved`` but, per
    format, unpruned first, then pruned and native, swapping places every other round: no model runs twice in a
    row (reversing the list, as latency.py does, runs the last one twice at every other round boundary)."""
    from torch.utils import benchmark

    timers = {key: benchmark.Timer(stmt="model(x)", globals={"model": model, "x": inputs[key]}, num_threads=threads)
              for key, model in variants.items()}
    formats = list(dict.fromkeys(fmt for _, fmt in variants))
    times: dict = {key: [] for key in variants}
    with torch.no_grad():
        for key in timers if warmup else ():
            timers[key].timeit(warmup)
        for r in range(rounds):
            pair = ("pruned", "native") if r % 2 == 0 else ("native", "pruned")
            for key in [(role, fmt) for fmt in formats for role in ("unpruned", *pair) if (role, fmt) in timers]:
                times[key].append(timers[key].timeit(inner).mean)
    return times


def _row(name: str, fmt: str, times: dict, check: dict) -> dict:
    from latency import _quartiles

    base, pruned, native = (times[(role, fmt)] for role in ("unpruned", "pruned", "native"))
    row = {"model": name, "format": fmt, **check}
    row.update(unpruned_ms=1e3 * statistics.median(base), pruned_ms=1e3 * statistics.median(pruned),
               native_ms=1e3 * statistics.median(native),
               vs_native=_quartiles([n / p for n, p in zip(native, pruned)]), vs_native_min=min(native) / min(pruned),
               speedup=_quartiles([b / p for b, p in zip(base, pruned)]),
               native_speedup=statistics.median([b / n for b, n in zip(base, native)]))
    row["efficiency"] = row["speedup"][1] * row["flops_left"]
    return row


def bench_model(name: str, args) -> list:
    """The rows of one model: one per memory format, or one failure row."""
    from latency import _is_conv_net

    import graphprune

    load = [os.getloadavg()[0]]
    try:
        base, x, extra = build(name, args.size, args.vocab)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            pruned = graphprune.prune(base, args.ratio, x, inplace=False, **extra)
        native = rebuild_native(pruned)
    except Exception as exc:  # a failure is a row, not a crash
        return [{"model": name, "format": "-", "status": f"{type(exc).__name__}: {exc}"[:300]}]
    flops_left = graphprune.count_flops(pruned, x) / graphprune.count_flops(base, x)
    formats = [CONTIGUOUS] + ([CHANNELS_LAST] if args.channels_last and _is_conv_net(base) else [])
    variants, inputs = _variants(base, pruned, native, x, formats)
    checks = {}
    for fmt in formats:
        gap, close = output_gap(variants[("pruned", fmt)], variants[("native", fmt)], inputs[("pruned", fmt)])
        checks[fmt] = {"flops_left": flops_left, "gap": gap, "close": close,
                       "layout": layout_report(variants[("pruned", fmt)], variants[("native", fmt)])}
    print(f"  {name}: timing {len(variants)} models x {args.rounds} rounds...", file=sys.stderr, flush=True)
    times = time_alternating(variants, inputs, rounds=args.rounds, inner=args.inner, warmup=args.warmup,
                             threads=args.threads)
    load.append(os.getloadavg()[0])
    rows = [_row(name, fmt, times, checks[fmt]) for fmt in formats]
    for row in rows:
        row["status"] = "ok" if row["close"] else "outputs differ"
        row["load"] = tuple(load)
    return rows


HEADER = ["model", "format", "FLOPs left", "unpruned ms", "pruned ms", "native ms", "speed-up (IQR)", "measured / FLOPs",
          "native speed-up", "pruned vs native (IQR)", "min/min", "dense · native strides", "max abs diff", "load 1-min"]


def _cells(row: dict) -> list:
    if "vs_native" not in row:
        return [row["model"], row["format"]] + ["–"] * (len(HEADER) - 3) + [f"failed: {row['status']}"]
    (s_lo, s_mid, s_hi), (v_lo, v_mid, v_hi) = row["speedup"], row["vs_native"]
    layout, mark = row["layout"], "" if v_mid >= GOAL else " **below**"
    return [row["model"], row["format"], f"{row['flops_left']:.2f}", f"{row['unpruned_ms']:.1f}",
            f"{row['pruned_ms']:.2f}", f"{row['native_ms']:.2f}", f"{s_mid:.2f}× ({s_lo:.2f}–{s_hi:.2f})",
            f"{row['efficiency']:.2f}", f"{row['native_speedup']:.2f}×", f"{v_mid:.3f} ({v_lo:.3f}–{v_hi:.3f}){mark}",
            f"{row['vs_native_min']:.3f}", f"{layout['dense']}/{layout['params']} · {layout['same_strides']}/"
            f"{layout['params']}",
            f"{row['gap']:.1e}" + ("" if row["close"] else " (differ)"), "{:.2f} → {:.2f}".format(*row["load"])]


def _cpu_name() -> str:
    with open("/proc/cpuinfo") if os.path.exists("/proc/cpuinfo") else open(os.devnull) as fh:
        return next((line.split(":", 1)[1].strip() for line in fh if line.startswith("model name")), platform.machine())


def render(rows: list, args, started_load: tuple, wall: float) -> str:
    timed = [r for r in rows if "vs_native" in r]
    below = [f"{r['model']} {r['format']}" for r in timed if r["vs_native"][1] < GOAL]
    lines = [
        (f"latency at the limit: graphprune.prune (l1, ratio {args.ratio}; llama with uniform=True) against the same "
         f"architecture rebuilt natively at the pruned widths; torch {torch.__version__}, {_cpu_name()}, "
         f"{args.threads} thread(s), batch 1, input {args.size}x{args.size} (llama: {LLAMA_TOKENS} tokens, vocabulary "
         f"{args.vocab}), {args.rounds} interleaved rounds x {args.inner} passes"),
        "",
        "command: `" + " ".join(["python benchmarks/latency_native.py", *args.argv]) + "`",
        "",
        "The machine is shared (1-minute load average before → after each model in the last column; "
        f"{started_load[0]:.2f} / {started_load[1]:.2f} / {started_load[2]:.2f} at the start, "
        "{:.2f} / {:.2f} / {:.2f} at the end): where load was present the times are upper bounds, and the ratios, "
        "taken within a round, are what to read.".format(*os.getloadavg()),
        "",
        "Each round times every model once (per format: unpruned, then pruned and native, which swap places every "
        "other round). pruned vs native = native time / pruned time, median over rounds (quartiles), goal >= "
        f"{GOAL}; speed-up = unpruned / pruned; measured / FLOPs = speed-up x FLOPs left; native speed-up = "
        "unpruned / native; min/min = fastest native round / fastest pruned round; dense = parameters contiguous, "
        "at offset 0 of a storage of their own size; native strides = the rebuilt model's; max abs diff = pruned "
        "vs rebuilt outputs (torch.allclose at atol 1e-5, else 'differ').",
        "",
        "| " + " | ".join(HEADER) + " |",
        "|" + "|".join("---" if h in ("model", "format") else "---:" for h in HEADER) + "|",
    ]
    lines += ["| " + " | ".join(_cells(r)) + " |" for r in rows]
    lines += ["", f"pruned vs native at or above {GOAL}: {len(timed) - len(below)} of {len(timed)} rows"
              + (f"; below: {', '.join(below)}" if below else "")]
    odd = [(r, p) for r in timed for p in r["layout"]["odd"]]
    odd += [(r, f"{r['layout']['hooks']} forward hooks") for r in timed if r["layout"]["hooks"]]
    if odd:
        lines += ["", "Parameters of the pruned model that are not dense or not laid out as the rebuilt model's:", ""]
        lines += [f"* {r['model']} {r['format']}: {what}" for r, what in odd]
    lines += ["", f"wall time: {wall:.0f} s"]
    return "\n".join(lines)


def _parse_args(argv: Optional[list]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    add = parser.add_argument
    add("--models", default=None, help=f"comma-separated torchvision models and/or 'llama' (default {DEFAULT_MODELS}; "
                                       "mobilenet_v2 with --quick)")
    add("--ratio", type=float, default=0.5, help="pruning ratio (default 0.5)")
    add("--size", type=int, default=224, help="image height and width (default 224; 160 goes faster)")
    add("--vocab", type=int, default=32000, help="vocabulary of the llama model (default 32000)")
    add("--threads", type=int, default=1, help="CPU threads for timing (default 1)")
    add("--rounds", type=int, default=None, help="interleaved timing rounds (default 15; 5 with --quick)")
    add("--inner", type=int, default=3, help="forward passes per model per round (default 3)")
    add("--warmup", type=int, default=3, help="untimed forward passes per model first (default 3)")
    add("--channels-last", action=argparse.BooleanOptionalAction, default=True,
        help="also time conv nets in torch.channels_last, models and inputs (default on)")
    add("--quick", action="store_true", help="a smoke test: one model (mobilenet_v2), 5 rounds")
    add("--write", nargs="?", const=os.path.join(_HERE, "results", "latency_native.md"), default=None, metavar="FILE",
        help="also write the command line and the table to FILE (default benchmarks/results/latency_native.md)")
    args = parser.parse_args(argv)
    args.argv = list(sys.argv[1:] if argv is None else argv)
    args.models = [m.strip() for m in (args.models or ("mobilenet_v2" if args.quick else DEFAULT_MODELS)).split(",")
                   if m.strip()]
    args.rounds = (5 if args.quick else 15) if args.rounds is None else args.rounds
    if not 0 < args.ratio < 1:
        parser.error("--ratio must lie in (0, 1)")
    for flag in ("threads", "rounds", "inner", "size", "vocab"):
        if getattr(args, flag) < 1:
            parser.error(f"--{flag} must be at least 1")
    return args


def main(argv: Optional[list] = None) -> int:
    args = _parse_args(argv)
    os.environ.setdefault("OMP_NUM_THREADS", str(args.threads))
    torch.set_num_threads(args.threads)
    started, started_load = time.perf_counter(), os.getloadavg()
    rows: list = []
    try:
        for name in args.models:
            rows += bench_model(name, args)
    except KeyboardInterrupt:
        print("interrupted; partial results follow", file=sys.stderr)
    text = render(rows, args, started_load, time.perf_counter() - started)
    print(text)
    if args.write:
        with open(args.write, "w") as fh:
            fh.write(text + "\n")
    return 1 if any(r["status"] != "ok" for r in rows) else 0


if __name__ == "__main__":
    sys.exit(main())
