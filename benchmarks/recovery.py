"""Calibration recovery: how much of what a model knew survives pruning, with and without it.

    python benchmarks/recovery.py --quick                  # both models, l1 + obs, 30% / 50%, epochs 0 / 1
    python benchmarks/recovery.py --write                  # every row (hours), to benchmarks/results/recovery.md
    python benchmarks/recovery.py --models digits_cnn --criteria l1,taylor --recover none,lstsq --tp l1,taylor

``minilm``: the real pretrained all-MiniLM-L6-v2 (``pretrained_minilm.load_minilm``) loses ``--removed``
of its *encoder's* parameters (the word embeddings and the hidden width, the embedding's width, stay
whole), and is scored on held-out sentences as pruned and after 1 and 3 epochs of distillation from
the unpruned model (one run, scored after each of its epochs). ``digits_cnn``: a small CNN trained
here on scikit-learn's digits loses ``--ratios`` of the channels of every group and is scored with no
training at all. Every criterion runs with each ``--recover`` method (``graphprune.prune(...,
calibration=..., recover=...)``) on ``--calib`` training examples. ``tp_<importance>`` rows prune the
same structures with Torch-Pruning at the same budget, without recovery. Each row is printed as
``RESULT {json}`` when it is done; the markdown table follows. See benchmarks/README.md.
"""
from __future__ import annotations

import argparse
import copy
import inspect
import json
import math
import os
import statistics
import sys
import time
import warnings
from types import SimpleNamespace
from typing import Callable, Optional

_HERE = os.path.dirname(os.path.abspath(__file__))
sys.path[:] = [p for p in sys.path if os.path.abspath(p or os.curdir) != _HERE]
sys.path.append(_HERE)

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
# pretrained_minilm first: importing latency drops benchmarks/ from sys.path again
from pretrained_minilm import (_Call, batches, distill, embed, load_minilm, make_criterion, mean_pooled,  # noqa: E402
                               scores, split_sentences, stdlib_sentences)
from latency import time_interleaved  # noqa: E402  # isort: skip
from torch import nn  # noqa: E402

import graphprune  # noqa: E402
from graphprune.reporting.measure import count_flops, count_parameters  # noqa: E402

ACTIVATION_CRITERIA = ("wanda", "flap", "obs")  # criteria that read the calibration batches' activations
KEYS = ("model", "removed", "criterion", "recover", "epochs", "cos", "top1", "accuracy", "seconds")
QUICK = {"removed": "0.3,0.5", "criteria": "l1,obs", "epochs": "0,1", "train": 256, "test": 256, "calib": 128,
         "rounds": 3, "tp": "taylor"}


# ---------------------------------------------------------------------------- rows
def result(model: str, removed: float, criterion: str, recover: str, epochs: int, cos=None, top1=None, accuracy=None,
           seconds=None, **extra) -> dict:
    """One row: the keys every RESULT line has, in order, then ``extra``."""
    return dict(zip(KEYS, (model, removed, criterion, recover, epochs, cos, top1, accuracy, seconds)), **extra)


def missing(criterion: str, recover: str) -> Optional[str]:
    """Why the installed graphprune cannot run this row yet, or None."""
    accepted = inspect.signature(graphprune.prune).parameters
    if recover != "none" and not ("recover" in accepted and hasattr(graphprune, "Recovery")):
        return "graphprune.prune takes no recover= (graphprune.Recovery) yet"
    if criterion in ACTIVATION_CRITERIA and not ("calibration" in accepted and criterion in graphprune.criteria.CRITERIA):
        return f"graphprune has no criterion {criterion!r} read from calibration= yet"
    return None


def prune_with_graphprune(model: nn.Module, example, criterion, recover: str, calibration: list, sequential: bool,
                          **budget) -> None:
    """``graphprune.prune`` in place; the calibration batches go along where the criterion or the recovery reads them."""
    if recover != "none" or criterion in ACTIVATION_CRITERIA:
        budget["calibration"] = calibration
    if recover != "none":
        budget["recover"] = graphprune.Recovery(recover, sequential=sequential, progress=False)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        graphprune.prune(model, example_inputs=example, criterion=criterion, **budget)


def prune_with_torch_pruning(model: nn.Module, example, name: str, ratio: float, backward: Callable, **options) -> None:
    """Torch-Pruning's MetaPruner with importance ``name`` at ``ratio``, in place. Taylor importance
    reads the gradients that ``backward(model)`` leaves (summed over the calibration batches)."""
    import torch_pruning as tp

    importances = {"l1": lambda: tp.importance.MagnitudeImportance(p=1), "l2": lambda: tp.importance.MagnitudeImportance(p=2),
                   "taylor": tp.importance.TaylorImportance, "lamp": tp.importance.LAMPImportance,
                   "fpgm": tp.importance.FPGMImportance, "bn_scale": tp.importance.BNScaleImportance}
    if name not in importances:
        raise ValueError(f"unknown Torch-Pruning importance {name!r}; choose from {sorted(importances)}")
    if name == "taylor":
        model.zero_grad()
        backward(model)
    pruner = tp.pruner.MetaPruner(model, example, importance=importances[name](), pruning_ratio=ratio, **options)
    pruner.step()
    model.zero_grad(set_to_none=True)


def pruned_copy(base: nn.Module, prune: Callable) -> tuple:
    """``(pruned deep copy, seconds, None)``, or ``(None, None, 'failed: ...')`` when pruning raises."""
    student = copy.deepcopy(base)
    start = time.perf_counter()
    try:
        prune(student)
    except Exception as exc:  # a failure is a row, not a crash
        return None, None, f"failed: {type(exc).__name__}: {exc}"[:160]
    return student, time.perf_counter() - start, None


def jobs(args, model: str) -> list:
    """``(criterion, recover)`` in order: every criterion with each recovery, then the Torch-Pruning rows;
    a row the installed graphprune cannot run yet is left out, with a note."""
    runnable = []
    for criterion, recover in [(c, r) for c in args.criteria for r in args.recover]:
        reason = missing(criterion, recover)
        if reason:
            args.notes.add(f"{model} {criterion} recover={recover}: skipped, {reason}")
        else:
            runnable.append((criterion, recover))
    return runnable + [(f"tp_{name}", "none") for name in args.tp]


# ---------------------------------------------------------------------------- MiniLM
def minilm_context(args) -> SimpleNamespace:
    teacher, tokenizer = load_minilm()
    train_text, test_text = split_sentences(stdlib_sentences(), args.train, args.test, args.seed)
    train = batches(tokenizer, train_text, args.batch, args.max_length)
    calib = batches(tokenizer, train_text[: args.calib], args.batch, args.max_length)
    ctx = SimpleNamespace(teacher=teacher, train=train, calib=calib, test=batches(tokenizer, test_text, args.batch,
                          args.max_length), targets=[embed(teacher, [b]) for b in train])
    ctx.calib_targets, ctx.original, ctx.example = ctx.targets[: len(calib)], embed(teacher, ctx.test), ctx.test[0]
    ctx.params, ctx.flops = count_parameters(teacher), count_flops(teacher, ctx.example)
    ctx.share = count_parameters(teacher.encoder) / ctx.params  # removing x of the encoder removes x * share of all
    return ctx


def cosine_backward(model: nn.Module, ctx) -> None:
    """Gradients of 1 - cos(pruned embedding, original embedding), summed over the calibration batches."""
    for batch, target in zip(ctx.calib, ctx.calib_targets):
        (1 - F.cosine_similarity(mean_pooled(model, batch), target).mean()).backward()


def tp_minilm(model: nn.Module, ctx, name: str, ratio: float) -> None:
    """Torch-Pruning on what it can prune here: whole heads and the MLP width, both at ``ratio``;
    the modules that write the hidden width are ignored, so it stays whole."""
    attention = [m for m in model.modules() if hasattr(m, "num_attention_heads") and hasattr(m, "query")]
    heads = {linear: m.num_attention_heads for m in attention for linear in (m.query, m.key, m.value)}
    hidden = [model.embeddings, model.pooler] + [m for layer in model.encoder.layer for m in (layer.attention.output,
                                                                                             layer.output)]
    prune_with_torch_pruning(model, dict(ctx.example), name, ratio, lambda m: cosine_backward(m, ctx),
                             ignored_layers=hidden, num_heads=heads, prune_num_heads=True, prune_head_dims=False,
                             head_pruning_ratio=ratio, output_transform=lambda out: out.last_hidden_state)
    for module in attention:
        module.num_attention_heads = module.query.out_features // module.attention_head_size
        module.all_head_size = module.query.out_features


def tp_minilm_budget(model: nn.Module, ctx, name: str, removed: float) -> None:
    """:func:`tp_minilm` at the ratio that removes ``removed`` of the encoder: one trial at ``removed``, one secant step."""
    trial = copy.deepcopy(model)
    tp_minilm(trial, ctx, name, removed)
    got = (1 - count_parameters(trial) / ctx.params) / ctx.share
    tp_minilm(model, ctx, name, min(0.95, removed * removed / max(got, 1e-6)))


class EpochProbe:
    """Given to ``distill`` as its regularizer: ``update()`` runs at the start of every epoch, so the
    probe scores the student after each finished epoch in ``wanted`` (scoring time left out)."""

    def __init__(self, student: nn.Module, ctx, wanted: set):
        self.student, self.ctx, self.wanted = student, ctx, wanted
        self.epoch, self.scores, self.seconds, self.started = 0, {}, [], time.perf_counter()

    def update(self) -> None:
        if self.epoch:
            self.seconds.append(time.perf_counter() - self.started)
            if self.epoch in self.wanted:
                mode = self.student.training
                self.scores[self.epoch] = scores(self.ctx.original, embed(self.student.eval(), self.ctx.test))
                self.student.train(mode)
        self.epoch += 1
        self.started = time.perf_counter()

    def step(self) -> None:
        """No gradient of its own."""


def minilm_rows(ctx, removed: float, criterion: str, recover: str, args, emit: Callable) -> None:
    key = ("minilm", removed, criterion, recover)
    if criterion.startswith("tp_"):
        prune = lambda m: tp_minilm_budget(m, ctx, criterion[3:], removed)  # noqa: E731
    else:
        built = make_criterion(criterion, ctx.calib, ctx.calib_targets)
        ignored = [name for name, _ in ctx.teacher.named_modules() if name.endswith(".attention")] if args.mlp_only else []
        prune = lambda m: prune_with_graphprune(m, ctx.example, built, recover, ctx.calib, args.sequential,  # noqa: E731
                                                prune_heads=args.prune_heads, target_params=1 - removed * ctx.share,
                                                ignored_layers=ignored)
    student, seconds, failure = pruned_copy(ctx.teacher, prune)
    if failure:
        return emit(result(*key, 0, status=failure))
    times = time_interleaved({"base": _Call(ctx.teacher), "pruned": _Call(student)}, {"base": ctx.example, "pruned":
                             ctx.example}, rounds=args.rounds, inner=2, warmup=1, threads=args.threads)
    shape = {"params": count_parameters(student) / ctx.params, "flops": count_flops(student, ctx.example) / ctx.flops,
             "speedup": statistics.median(b / p for b, p in zip(times["base"], times["pruned"]))}
    probe = EpochProbe(student, ctx, set(args.epochs))
    probe.scores[0] = scores(ctx.original, embed(student, ctx.test))
    if max(args.epochs) > 0:
        distill(student, ctx.targets, ctx.train, max(args.epochs), args.lr, args.seed, regularizer=probe)
        probe.update()  # closes the last epoch
    for epochs in args.epochs:
        s = probe.scores[epochs]
        emit(result(*key, epochs, s["cosine"], s["top1"], None, seconds, top5=s["top5"], **shape,
                    epoch_s=probe.seconds[0] if probe.seconds else None, distill_s=sum(probe.seconds[:epochs])))


def run_minilm(args, emit: Callable) -> None:
    ctx = minilm_context(args)
    emit(result("minilm", 0.0, "unpruned", "none", 0, 1.0, 1.0, None, 0.0, top5=1.0, params=1.0, flops=1.0, speedup=1.0))
    for removed in args.removed:
        for criterion, recover in jobs(args, "minilm"):
            minilm_rows(ctx, removed, criterion, recover, args, emit)


# ---------------------------------------------------------------------------- digits CNN
class DigitsCNN(nn.Module):
    """Three conv-BN-ReLU blocks (32, 64, 128 channels; max-pooling after the second) and a linear head."""

    def __init__(self, classes: int = 10):
        super().__init__()
        blocks, width = [], 1
        for i, out in enumerate((32, 64, 128)):
            blocks += [nn.Conv2d(width, out, 3, padding=1, bias=False), nn.BatchNorm2d(out), nn.ReLU()]
            blocks += [nn.MaxPool2d(2)] if i == 1 else []
            width = out
        self.features = nn.Sequential(*blocks)
        self.head = nn.Linear(width, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x).mean((2, 3)))


def train_cnn(images: torch.Tensor, labels: torch.Tensor, args) -> DigitsCNN:
    """Adam (lr 3e-3, cosine decay) for ``--cnn-epochs`` over the training images, batch 64, seeded."""
    torch.manual_seed(args.seed)
    model = DigitsCNN()
    optimizer = torch.optim.Adam(model.parameters(), lr=3e-3)
    schedule = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, args.cnn_epochs)
    for _ in range(args.cnn_epochs):
        for index in torch.randperm(len(labels)).split(64):
            loss = F.cross_entropy(model(images[index]), labels[index])
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
        schedule.step()
    return model.eval()


def cnn_scores(model: nn.Module, ctx) -> dict:
    """Test accuracy, and cosine / top-1 agreement of the logits with the unpruned model's."""
    with torch.no_grad():
        logits = model(ctx.test_images)
    return {"cos": float(F.cosine_similarity(logits, ctx.logits, dim=1).mean()),
            "top1": float((logits.argmax(1) == ctx.logits.argmax(1)).float().mean()),
            "accuracy": float((logits.argmax(1) == ctx.test_labels).float().mean())}


def same_counts(model: nn.Module, ratio: float) -> dict:
    """Torch-Pruning's ratio per convolution that removes floor(ratio * n) of its n channels, as graphprune
    does (Torch-Pruning keeps int(n * (1 - ratio)), one channel fewer where n * ratio is not whole)."""
    return {m: math.floor(ratio * m.out_channels) / m.out_channels - 1e-6 for m in model.modules()
            if isinstance(m, nn.Conv2d)}


def cnn_row(ctx, ratio: float, criterion: str, recover: str, args) -> dict:
    if criterion.startswith("tp_"):
        backward = lambda m: sum(F.cross_entropy(m(x), y) for x, y in ctx.pairs).backward()  # noqa: E731
        prune = lambda m: prune_with_torch_pruning(m, ctx.example, criterion[3:], ratio, backward,  # noqa: E731
                                                   ignored_layers=[m.head], pruning_ratio_dict=same_counts(m, ratio))
    else:
        built = graphprune.criteria.Taylor(ctx.pairs, progress=False) if criterion == "taylor" else criterion
        prune = lambda m: prune_with_graphprune(m, ctx.example, built, recover, ctx.calib, args.sequential,  # noqa: E731
                                                ratio=ratio)
    student, seconds, failure = pruned_copy(ctx.model, prune)
    if failure:
        return result("digits_cnn", ratio, criterion, recover, 0, status=failure)
    s = cnn_scores(student, ctx)
    return result("digits_cnn", ratio, criterion, recover, 0, s["cos"], s["top1"], s["accuracy"], seconds,
                  params=count_parameters(student) / ctx.params, flops=count_flops(student, ctx.example) / ctx.flops)


def run_cnn(args, emit: Callable) -> None:
    train, test = graphprune.data.digits_datasets(image_size=8, seed=args.seed, channels=1)
    images, labels = train.tensors
    ctx = SimpleNamespace(model=train_cnn(images, labels, args), test_images=test.tensors[0], test_labels=test.tensors[1])
    chosen = torch.randperm(len(labels), generator=torch.Generator().manual_seed(args.seed))[: args.calib]
    ctx.calib = list(images[chosen].split(args.batch))
    ctx.pairs = list(zip(ctx.calib, labels[chosen].split(args.batch)))
    ctx.example = ctx.calib[0]
    ctx.params, ctx.flops = count_parameters(ctx.model), count_flops(ctx.model, ctx.example)
    with torch.no_grad():
        ctx.logits = ctx.model(ctx.test_images)
    emit(result("digits_cnn", 0.0, "unpruned", "none", 0, **cnn_scores(ctx.model, ctx), seconds=0.0, params=1.0,
                flops=1.0))
    for ratio in args.ratios:
        for criterion, recover in jobs(args, "digits_cnn"):
            emit(cnn_row(ctx, ratio, criterion, recover, args))


# ---------------------------------------------------------------------------- output
def _cell(value, form: str) -> str:
    return "–" if value is None else format(value, form)


def table(rows: list, args) -> str:
    lines = [f"torch {torch.__version__}, {args.threads} CPU threads, seed {args.seed}, recovery sequential="
             f"{args.sequential}. minilm: all-MiniLM-L6-v2 (pretrained), the encoder's parameters removed (prune_heads="
             f"{args.prune_heads}); {args.train} training / {args.test} held-out sentences, calibration on the first "
             f"{args.calib} training sentences; distillation AdamW lr {args.lr}, batch {args.batch}; speed-up: CPU "
             f"latency against the unpruned model, interleaved. digits_cnn: 3 conv-BN-ReLU blocks + linear head "
             f"trained {args.cnn_epochs} epochs on 8x8 digits, the channels of every group removed, calibration on "
             f"{args.calib} training images, no training after pruning; cos / top-1: logits against the unpruned "
             "model's (cosine, same class).", "",
             "| model | removed | criterion | recover | epochs | cos | top-1 / top-5 | accuracy | params left | FLOPs left "
             "| speed-up | prune+calib s | epoch s | note |", "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        top = _cell(r["top1"], ".1%") + (f" / {r['top5']:.1%}" if r.get("top5") is not None else "")
        lines.append(f"| {r['model']} | {r['removed']:.0%} | {r['criterion']} | {r['recover']} | {r['epochs']} | "
                     f"{_cell(r['cos'], '.3f')} | {top} | {_cell(r['accuracy'], '.2%')} | {_cell(r.get('params'), '.3f')} | "
                     f"{_cell(r.get('flops'), '.3f')} | {_cell(r.get('speedup'), '.2f')} | {_cell(r['seconds'], '.1f')} | "
                     f"{_cell(r.get('epoch_s'), '.1f')} | {r.get('status', '')} |")
    return "\n".join(lines + [""] + [f"* {note}" for note in sorted(args.notes)])


def _split(text: str, kind: Callable = str) -> list:
    return [kind(t.strip()) for t in text.split(",") if t.strip()]


def parse_args(argv: Optional[list]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    add = parser.add_argument
    add("--quick", action="store_true", help=f"a run of a few minutes: {QUICK} (explicit options still win)")
    add("--models", default="minilm,digits_cnn", help="comma-separated: minilm, digits_cnn (default both)")
    add("--removed", default="0.1,0.2,0.3,0.5", help="minilm: fractions of the encoder's parameters to remove")
    add("--ratios", default="0.5,0.7", help="digits_cnn: fraction of the channels of every group to remove")
    add("--criteria", default="l1,taylor,random,wanda,flap,obs", help="graphprune criteria")
    add("--recover", default="none,bias,lstsq", help="recovery methods; 'none' for plain pruning")
    add("--tp", default="l2,taylor", help="Torch-Pruning importances for tp_<name> rows (l1, l2, taylor, lamp, fpgm, "
        "bn_scale); '' for none")
    add("--epochs", default="0,1,3", help="minilm: distillation epochs to score after (one run of the largest)")
    add("--prune-heads", action=argparse.BooleanOptionalAction, default=True,
        help="minilm: remove whole heads (default) rather than shrink every head's width")
    add("--sequential", action=argparse.BooleanOptionalAction, default=False,
        help="refit one layer per calibration pass, in forward order, or all layers from one pass (default)")
    add("--mlp-only", action="store_true",
        help="minilm: prune the MLP widths only (the attention layers are ignored_layers), not heads and MLP widths")
    add("--train", type=int, default=1024, help="minilm: training sentences (distillation; default 1024)")
    add("--calib", type=int, default=512, help="calibration examples: the first training sentences, random training images")
    add("--test", type=int, default=512, help="minilm: held-out sentences (default 512)")
    add("--batch", type=int, default=32, help="sentences or images per batch (default 32)")
    add("--max-length", type=int, default=64, help="minilm: tokens per sentence at most (default 64)")
    add("--lr", type=float, default=2e-4, help="minilm: distillation learning rate (default 2e-4)")
    add("--rounds", type=int, default=5, help="minilm: interleaved latency rounds (default 5)")
    add("--cnn-epochs", type=int, default=15, help="digits_cnn: training epochs (default 15)")
    add("--threads", type=int, default=2, help="torch threads (default 2)")
    add("--seed", type=int, default=0, help="data split, training and criterion seed (default 0)")
    add("--write", nargs="?", const=os.path.join(_HERE, "results", "recovery.md"), default=None, metavar="FILE",
        help="also write the table to FILE (default benchmarks/results/recovery.md)")
    if "--quick" in (sys.argv[1:] if argv is None else argv):
        parser.set_defaults(**QUICK)
    args = parser.parse_args(argv)
    args.removed, args.ratios, args.epochs = _split(args.removed, float), _split(args.ratios, float), _split(args.epochs, int)
    args.models, args.criteria, args.recover, args.tp = (_split(t) for t in (args.models, args.criteria, args.recover, args.tp))
    unknown = set(args.models) - {"minilm", "digits_cnn"} | set(args.recover) - {"none", "bias", "lstsq"}
    if unknown:
        parser.error(f"unknown models or recovery methods: {sorted(unknown)}")
    args.notes = set()
    return args


def main(argv: Optional[list] = None) -> int:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    started, rows = time.perf_counter(), []

    def emit(row: dict) -> None:
        if row["recover"] != "none":
            row["sequential"] = args.sequential
        if row["model"] == "minilm" and not row["criterion"].startswith(("tp_", "unpruned")):
            row["prune_heads"], row["mlp_only"] = args.prune_heads, args.mlp_only
        rows.append(row)
        print("RESULT " + json.dumps(row), flush=True)

    for name in args.models:
        (run_minilm if name == "minilm" else run_cnn)(args, emit)
    text = table(rows, args) + f"\n\nwall time: {time.perf_counter() - started:.0f} s"
    print(text)
    if args.write:
        with open(args.write, "w") as fh:
            fh.write(text + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
