"""Group-level sparse training before pruning, on scikit-learn's digits (8x8 images, 10 classes).

The protocol of ``criteria.py`` (its CNN, data folds and training functions are reused): a
small CNN (3 conv + BN layers, 32/64/128 channels) is trained with a fixed seed until its
training loss stops improving, in each of 5 stratified cross-validation folds and for 5 seeds,
and accuracies are pooled over seeds and folds. Then, from that trained model:

* **l1**: 50% of every prunable group removed with L1 (``graphprune.prune``), nothing else;
* **dense +N, l1**: the control: N more epochs of the sparse-training loop without any
  penalty, then L1 (so that the sparse rows' gain is not just N more epochs);
* **group_norm**: N epochs with :class:`graphprune.GroupRegularizer` (``regularizer.step()``
  after every backward), then ``criterion="group_norm"``;
* **group_norm growing**: the same with growing regularisation (``target_ratio=0.5``,
  ``update()`` at the start of every epoch), then ``"group_norm"``;
* **bn slimming**: N epochs with ``mode="bn_scale"`` (L1 on the BN scales), then ``"bn_scale"``;
* **torch-pruning GroupNormPruner**: Torch-Pruning's own sparse training (``pruner.regularize``
  after every backward, same loop and epochs) and its own 50% pruning (``pruner.step()``),
  when ``torch_pruning`` is installed (the row is skipped otherwise).

The sparse-training loop is the same for every row: SGD with momentum 0.9 at ``--sparse-lr``,
cosine schedule, batches of 64. Every pruned model is evaluated as pruned (nothing updated), after re-estimating
its BatchNorm statistics (no weight changes), and after the same short fine-tune (``criteria.py``'s:
``--finetune-epochs`` of Adam at ``--finetune-lr``, cross-entropy). Every group loses
``floor(0.5 n)`` channels, so the pruned models have the same FLOPs; the table shows them.

    python benchmarks/sparse.py --jobs 2                  # 5 seeds x 5 folds, writes benchmarks/results/sparse.md
    python benchmarks/sparse.py --seeds 1 --folds 1 --sparse-epochs 10 --output /tmp/sparse.md
"""
from __future__ import annotations

import argparse
import copy
import importlib.util
import multiprocessing
import sys
import time
import warnings
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import graphprune  # noqa: E402
from graphprune.reporting.measure import count_flops, count_parameters  # noqa: E402

# criteria.py's CNN, folds and training functions (loaded by path: a module named criteria would
# shadow graphprune's criteria package)
_SPEC = importlib.util.spec_from_file_location("digits_criteria", Path(__file__).resolve().parent / "criteria.py")
digits = importlib.util.module_from_spec(_SPEC)
_SPEC.loader.exec_module(digits)

METHODS = ["l1", "dense", "group_norm", "growing", "bn_slimming", "torch_pruning"]
LABELS = {"l1": "l1", "dense": "dense +{n}, l1", "group_norm": "group_norm (λ {c})",
          "growing": "group_norm growing (λ {g}, +{d}/epoch)", "bn_slimming": "bn slimming (λ {b}), bn_scale",
          "torch_pruning": "torch-pruning GroupNormPruner (reg {t})"}
COUNTS = ("before", "pruned", "recal", "ce")


def sparse_train(model: nn.Module, data, epochs: int, lr: float, seed: int, after_backward=None, each_epoch=None) -> None:
    """SGD with momentum 0.9 and a cosine schedule, batches of 64; ``after_backward()`` runs
    between ``backward`` and the step, ``each_epoch()`` at the start of every epoch."""
    torch.manual_seed(seed)
    optimiser = torch.optim.SGD(model.parameters(), lr=lr, momentum=0.9)
    schedule = torch.optim.lr_scheduler.CosineAnnealingLR(optimiser, epochs)
    for _ in range(epochs):
        if each_epoch is not None:
            each_epoch()
        model.train()
        for x, y in digits.loader(data, 64, True, seed):
            optimiser.zero_grad()
            nn.functional.cross_entropy(model(x), y).backward()
            if after_backward is not None:
                after_backward()
            optimiser.step()
        schedule.step()
    model.eval()


def torch_pruning_trained(model: nn.Module, args, seed: int, train_data, example):
    """Torch-Pruning's GroupNormPruner on ``model``, after its regularisation in the same loop; its
    ``step()`` prunes 50% of every group."""
    import torch_pruning as tp

    pruner = tp.pruner.GroupNormPruner(model, example, importance=tp.importance.GroupMagnitudeImportance(p=2),
                                       pruning_ratio=args.ratio, ignored_layers=[model.fc], reg=args.tp_reg)
    sparse_train(model, train_data, args.sparse_epochs, args.sparse_lr, seed, after_backward=lambda: pruner.regularize(model))
    return pruner


def prepared(method: str, model: nn.Module, args, seed: int, train_data, example) -> tuple:
    """``(a copy of model trained for the method, a function that prunes it)``."""
    model = copy.deepcopy(model)
    if method == "torch_pruning":
        pruner = torch_pruning_trained(model, args, seed, train_data, example)
        return model, lambda m: pruner.step()
    criterion = {"l1": "l1", "dense": "l1", "bn_slimming": "bn_scale"}.get(method, "group_norm")
    if method == "dense":
        sparse_train(model, train_data, args.sparse_epochs, args.sparse_lr, seed)
    elif method != "l1":
        settings = {"group_norm": dict(coefficient=args.coefficient),
                    "growing": dict(coefficient=args.growing_coefficient, target_ratio=args.ratio, delta=args.delta),
                    "bn_slimming": dict(coefficient=args.bn_coefficient, mode="bn_scale")}[method]
        regularizer = graphprune.GroupRegularizer(model, example, **settings)
        sparse_train(model, train_data, args.sparse_epochs, args.sparse_lr, seed, after_backward=regularizer.step,
                     each_epoch=regularizer.update if regularizer.growing else None)
    return model, lambda m: graphprune.prune(m, args.ratio, example, criterion=criterion)


def evaluate(method: str, model: nn.Module, args, seed: int, train_data, test_data, example) -> dict:
    """One row's counts of correct test images: before pruning, pruned, BN-recalibrated, fine-tuned."""
    start = time.time()
    trained, prune = prepared(method, model, args, seed, train_data, example)
    row = {"method": method, "before": digits.correct(trained, test_data)}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        prune(trained)
    row.update(seconds=time.time() - start, pruned=digits.correct(trained, test_data))
    row["flops"], row["params"] = count_flops(trained, example), count_parameters(trained)
    digits.recalibrate_bn(trained, train_data)
    row["recal"] = digits.correct(trained, test_data)
    digits.train(trained, train_data, args.finetune_epochs, args.finetune_lr, seed)
    row["ce"] = digits.correct(trained, test_data)
    return row


def run_fold(methods: list, args, seed: int, fold: int) -> list:
    """Train the unpruned model on fold ``fold`` of the ``seed`` split, then every method from it."""
    torch.set_num_threads(args.threads)
    train_data, test_data = digits.load_folds(args.folds, seed)[fold]
    tag = f"seed {seed} fold {fold + 1}/{args.folds}"
    example = test_data[0][:1]
    torch.manual_seed(seed)
    model = digits.DigitsCNN()
    epochs = digits.train(model, train_data, args.epochs, 3e-3, seed, patience=5)
    model.eval()
    base = digits.correct(model, test_data)
    print(f"{tag}: trained {epochs} epochs: {base}/{len(test_data[1])} test images right", file=sys.stderr)
    rows = [{"method": "unpruned", **dict.fromkeys(COUNTS, base), "flops": count_flops(model, example),
             "params": count_parameters(model), "seconds": 0.0}]
    for method in methods:
        rows.append(evaluate(method, model, args, seed, train_data, test_data, example))
        r = rows[-1]
        print(f"{tag}:   {method}: {r['before']} -> pruned {r['pruned']} / recal. {r['recal']} -> fine-tuned {r['ce']} "
              f"({r['seconds']:.1f}s)", file=sys.stderr)
    return rows


def pooled(per_fold: list, total: int) -> list:
    """Rows summed over runs (seeds, folds), the counts as accuracy % of ``total`` test images."""
    rows = []
    for fold_rows in zip(*per_fold):
        row = {"method": fold_rows[0]["method"], "flops": fold_rows[0]["flops"], "params": fold_rows[0]["params"],
               "seconds": sum(r["seconds"] for r in fold_rows)}
        row.update({k: 100.0 * sum(r[k] for r in fold_rows) / total for k in COUNTS})
        rows.append(row)
    return rows


def run_all(methods: list, args) -> list:
    """``[(seed, fold, rows), ...]`` for every seed and fold, on ``--jobs`` processes."""
    tasks = [(seed, fold) for seed in range(args.seed, args.seed + args.seeds) for fold in range(args.folds)]
    if args.jobs == 1:
        return [(seed, fold, run_fold(methods, args, seed, fold)) for seed, fold in tasks]
    with ProcessPoolExecutor(args.jobs, mp_context=multiprocessing.get_context("spawn")) as pool:
        futures = [pool.submit(run_fold, methods, args, seed, fold) for seed, fold in tasks]
        return [(seed, fold, future.result()) for (seed, fold), future in zip(tasks, futures)]


def label(method: str, args) -> str:
    return LABELS.get(method, method).format(n=args.sparse_epochs, c=f"{args.coefficient:g}", d=f"{args.delta:g}",
                                             g=f"{args.growing_coefficient:g}",
                                             b=f"{args.bn_coefficient:g}", t=f"{args.tp_reg:g}")


def table(rows: list, args, total: int) -> list:
    """The pooled table's lines: accuracies, changes in points (and test images), FLOPs."""
    base, l1 = rows[0], next((r for r in rows if r["method"] == "l1"), None)

    def delta(value: float, reference: float) -> str:
        return f"{value - reference:+.2f} ({round((value - reference) * total / 100.0) + 0:+d})"

    lines = ["| method | before pruning % | pruned % | +BN recal. % | fine-tuned % | Δ pruned vs unpruned (images) | "
             "Δ fine-tuned vs l1 (images) | MFLOPs | FLOPs left | params | train + prune s |",
             "|---|" + "---:|" * 10]
    for row in rows:
        versus_l1 = delta(row["ce"], l1["ce"]) if l1 is not None and row is not base else "–"
        lines.append(f"| {label(row['method'], args)} | {row['before']:.2f} | {row['pruned']:.2f} | {row['recal']:.2f} | "
                     f"{row['ce']:.2f} | {delta(row['pruned'], base['pruned'])} | {versus_l1} | {row['flops'] / 1e6:.3f} | "
                     f"{row['flops'] / base['flops']:.3f} | {int(row['params']):,} | {row['seconds']:.0f} |")
    return lines


def goals(rows: list, args) -> list:
    """One line per sparse-trained row: the issue's two goals, met or missed."""
    base, l1 = rows[0], next((r for r in rows if r["method"] == "l1"), None)
    lines = []
    for row in rows:
        if row["method"] in ("unpruned", "l1", "dense"):
            continue
        first = "met" if row["pruned"] >= base["pruned"] - 1.0 else "missed"
        text = (f"* {label(row['method'], args)}: pruned without fine-tuning {row['pruned']:.2f}% vs unpruned "
                f"{base['pruned']:.2f}% (goal: within 1 point): **{first}**")
        if l1 is not None:
            second = "met" if row["ce"] >= l1["ce"] and row["flops"] <= l1["flops"] else "missed"
            text += (f"; fine-tuned {row['ce']:.2f}% vs l1 + fine-tune {l1['ce']:.2f}% at {row['flops'] / l1['flops']:.3f}× "
                     f"its FLOPs (goal: at least as good at equal FLOPs): **{second}**")
        lines.append(text)
    return lines


def per_seed(results: list, seeds: list, images: int, args) -> list:
    """Per method and seed, test images gained or lost against that seed's unpruned model: pruned / fine-tuned."""
    by_seed = {seed: pooled([rows for s, _, rows in results if s == seed], 100) for seed in seeds}
    lines = [f"Per seed: test images (of {images:,}) gained (+) or lost (-) against that seed's unpruned model, pruned / "
             "fine-tuned", "", "| method | " + " | ".join(f"seed {s}" for s in seeds) + " |", "|---|" + "---:|" * len(seeds)]
    for index, row in enumerate(by_seed[seeds[0]][1:], start=1):
        cells = []
        for seed in seeds:
            mine, base = by_seed[seed][index], by_seed[seed][0]
            cells.append(f"{round(mine['pruned'] - base['pruned']) + 0:+d} / {round(mine['ce'] - base['ce']) + 0:+d}")
        lines.append(f"| {label(row['method'], args)} | " + " | ".join(cells) + " |")
    return lines


def parse(argv) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--methods", default=",".join(METHODS), help="comma-separated rows (besides unpruned)")
    parser.add_argument("--ratio", type=float, default=0.5, help="pruning ratio of every group")
    parser.add_argument("--epochs", type=int, default=60, help="most training epochs (stops when the loss plateaus)")
    parser.add_argument("--sparse-epochs", type=int, default=10, help="N: epochs of sparse training")
    parser.add_argument("--sparse-lr", type=float, default=0.01, help="SGD learning rate of sparse training")
    parser.add_argument("--coefficient", type=float, default=0.1, help="GroupRegularizer coefficient (group_norm row)")
    parser.add_argument("--growing-coefficient", type=float, default=1e-3, help="growing regularisation: starting coefficient")
    parser.add_argument("--delta", type=float, default=0.1, help="growing regularisation: rise per update (epoch)")
    parser.add_argument("--bn-coefficient", type=float, default=0.03, help="coefficient of BN slimming")
    parser.add_argument("--tp-reg", type=float, default=0.05, help="Torch-Pruning GroupNormPruner's reg")
    parser.add_argument("--finetune-epochs", type=int, default=5)
    parser.add_argument("--finetune-lr", type=float, default=1e-3)
    parser.add_argument("--folds", type=int, default=5, help="cross-validation folds (1: a single 80/20 split)")
    parser.add_argument("--seed", type=int, default=0, help="first seed")
    parser.add_argument("--seeds", type=int, default=5, help="repeat with seeds --seed ... --seed + N - 1 and pool")
    parser.add_argument("--threads", type=int, default=1, help="torch threads per process")
    parser.add_argument("--jobs", type=int, default=1, help="processes running (seed, fold) pairs side by side")
    parser.add_argument("--output", default=str(Path(__file__).resolve().parent / "results" / "sparse.md"),
                        help="where the results are written ('-': nowhere)")
    args = parser.parse_args(argv)
    for option in ("folds", "seeds", "jobs", "threads", "sparse_epochs", "finetune_epochs"):
        if getattr(args, option) < 1:
            parser.error(f"--{option.replace('_', '-')} must be at least 1, got {getattr(args, option)}")
    if not 0 < args.ratio < 1:
        parser.error(f"--ratio must be in (0, 1), got {args.ratio}")
    args.methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    unknown = [m for m in args.methods if m not in METHODS]
    if unknown:
        parser.error(f"unknown methods {unknown}; choose from {METHODS}")
    return args


def main(argv=None) -> int:
    args = parse(argv)
    methods = list(args.methods)
    skipped = ""
    if "torch_pruning" in methods and importlib.util.find_spec("torch_pruning") is None:
        methods.remove("torch_pruning")
        skipped = "\ntorch_pruning is not installed: its row is skipped.\n"
    start = time.time()
    results = run_all(methods, args)
    seeds = list(range(args.seed, args.seed + args.seeds))
    images = sum(len(test[1]) for _, test in digits.load_folds(args.folds, args.seed))
    total = images * len(seeds)
    rows = pooled([r[2] for r in results], total)
    protocol = f"{args.folds}-fold cross-validation, every image tested once per seed" if args.folds > 1 else "one 80/20 split per seed"
    seed_text = f"seed {args.seed}" if len(seeds) == 1 else f"seeds {seeds[0]}-{seeds[-1]}, pooled"
    title = (f"Digits CNN, {args.sparse_epochs} epochs of sparse training (SGD, lr {args.sparse_lr:g}, momentum 0.9, cosine) from the "
             f"trained model, then {100 * args.ratio:g}% of every prunable group removed; fine-tune {args.finetune_epochs} "
             f"epochs ({seed_text}; {protocol}: {total:,} test images, 1 image = {100 / total:.3f} points; seconds summed "
             f"over seeds and folds; {time.time() - start:.0f} s on {args.jobs} process(es) of {args.threads} thread(s))")
    text = [title, "", *table(rows, args, total), "", *goals(rows, args)]
    if len(seeds) > 1:
        text += ["", *per_seed(results, seeds, images, args)]
    output = "\n".join(text) + "\n" + skipped
    print(output)
    if args.output != "-":
        Path(args.output).write_text(output)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
