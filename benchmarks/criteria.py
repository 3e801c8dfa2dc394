"""Compare pruning criteria on scikit-learn's bundled digits (8x8 images, 10 classes).

A small CNN (3 conv + BN layers, 32/64/128 channels) is trained with a fixed seed until its
training loss stops improving; then a copy is pruned (default: 50% of every prunable group,
one shot) with each criterion and evaluated on held-out images. This is done in each of 5
stratified cross-validation folds, so that every one of the 1797 images is a test image
exactly once, and repeated for 5 seeds (split, initialisation, batch order and the seeded
criteria all change with the seed); accuracies are pooled over seeds and folds. One seed's
result moves by several images from one seed to the next, more than the gaps between
criteria, so the table shows the pooled figure and a second table each seed's:

* **pruned**: right after pruning, nothing updated;
* **+BN recal.**: after re-estimating the BatchNorm statistics on the training set (one
  pass, no weight changes; the pruned channels shift the later layers' statistics);
* **fine-tuned CE / KD**: after a short fine-tune from the recalibrated model (default 5
  epochs, Adam, cosine schedule) with cross-entropy, or with knowledge distillation from the
  unpruned model (0.1 CE + 0.9 T^2 KL at T=4; ``--no-kd`` to skip).

Taylor and K-Taylor get ``loss_fn`` = cross-entropy with label smoothing 0.1: the model is
trained to ~0 training loss, where the plain cross-entropy gradient vanishes and the first
order estimate degenerates (the row ``taylor (plain CE)`` shows it). ``random`` is the mean
over ``--random-seeds`` seeds (the spread is printed under the tables).

    python benchmarks/criteria.py --jobs 2             # all criteria, 5 seeds x 5 folds, ~12 minutes on 2 CPU cores
    python benchmarks/criteria.py --seeds 1 --folds 1 --criteria l1,taylor --finetune-epochs 3 --no-kd
"""
from __future__ import annotations

import argparse
import copy
import json
import multiprocessing
import sys
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from graphprune import criteria  # noqa: E402
import graphprune  # noqa: E402
from graphprune.reporting.measure import count_flops, count_parameters  # noqa: E402

ALL = ["l1", "l2", "fpgm", "bn_scale", "random", "taylor", "k_l1", "k_taylor", "k_distance"]


class DigitsCNN(nn.Module):
    def __init__(self, width: int = 32, classes: int = 10):
        super().__init__()
        self.conv1 = nn.Conv2d(1, width, 3, padding=1)
        self.bn1 = nn.BatchNorm2d(width)
        self.conv2 = nn.Conv2d(width, 2 * width, 3, padding=1)
        self.bn2 = nn.BatchNorm2d(2 * width)
        self.pool = nn.MaxPool2d(2)
        self.conv3 = nn.Conv2d(2 * width, 4 * width, 3, padding=1)
        self.bn3 = nn.BatchNorm2d(4 * width)
        self.fc = nn.Linear(4 * width, classes)

    def forward(self, x):
        x = torch.relu(self.bn1(self.conv1(x)))
        x = self.pool(torch.relu(self.bn2(self.conv2(x))))
        x = torch.relu(self.bn3(self.conv3(x)))
        return self.fc(x.mean((2, 3)))


def load_folds(folds: int, seed: int) -> list:
    """``[(train, test), ...]``: stratified ``folds``-fold splits of digits, or one 80/20 split."""
    from sklearn.datasets import load_digits
    from sklearn.model_selection import StratifiedKFold, train_test_split

    digits = load_digits()
    x = torch.tensor(digits.images / 16.0, dtype=torch.float32).unsqueeze(1)
    y = torch.tensor(digits.target, dtype=torch.long)
    if folds == 1:
        splits = [train_test_split(np.arange(len(y)), test_size=0.2, random_state=seed, stratify=digits.target)]
    else:
        splits = StratifiedKFold(folds, shuffle=True, random_state=seed).split(digits.images, digits.target)
    return [((x[train], y[train]), (x[test], y[test])) for train, test in splits]


def loader(data, batch_size: int, shuffle: bool, seed: int) -> DataLoader:
    return DataLoader(TensorDataset(*data), batch_size=batch_size, shuffle=shuffle,
                      generator=torch.Generator().manual_seed(seed))


def correct(model: nn.Module, data) -> int:
    """How many of ``data``'s images ``model`` classifies right."""
    model.eval()
    with torch.no_grad():
        return int((model(data[0]).argmax(1) == data[1]).sum())


def train(model: nn.Module, data, epochs: int, lr: float, seed: int, patience: int = 0, label_smoothing: float = 0.0) -> int:
    """Adam with a cosine schedule; with ``patience``, stop once the epoch loss has not
    improved by 1% for that many epochs. Returns the number of epochs run."""
    torch.manual_seed(seed)
    optimiser = torch.optim.Adam(model.parameters(), lr=lr)
    schedule = torch.optim.lr_scheduler.CosineAnnealingLR(optimiser, epochs)
    batches = loader(data, 64, True, seed)
    best, stale = float("inf"), 0
    for epoch in range(epochs):
        model.train()
        total = 0.0
        for x, y in batches:
            optimiser.zero_grad()
            loss = nn.functional.cross_entropy(model(x), y, label_smoothing=label_smoothing)
            loss.backward()
            optimiser.step()
            total += loss.item() * len(y)
        schedule.step()
        total /= len(data[1])
        if patience:
            stale = 0 if total < 0.99 * best else stale + 1
            best = min(best, total)
            if stale >= patience:
                return epoch + 1
    return epochs


def distill(student: nn.Module, teacher: nn.Module, data, epochs: int, lr: float, seed: int,
            temperature: float = 4.0, alpha: float = 0.9) -> None:
    """Fine-tune ``student`` on ``(1 - alpha) CE + alpha T^2 KL(teacher || student)`` at temperature T."""
    torch.manual_seed(seed)
    teacher.eval()
    optimiser = torch.optim.Adam(student.parameters(), lr=lr)
    schedule = torch.optim.lr_scheduler.CosineAnnealingLR(optimiser, epochs)
    for _ in range(epochs):
        student.train()
        for x, y in loader(data, 64, True, seed):
            with torch.no_grad():
                target = (teacher(x) / temperature).softmax(1)
            logits = student(x)
            kl = nn.functional.kl_div((logits / temperature).log_softmax(1), target, reduction="batchmean")
            loss = (1 - alpha) * nn.functional.cross_entropy(logits, y) + alpha * temperature ** 2 * kl
            optimiser.zero_grad()
            loss.backward()
            optimiser.step()
        schedule.step()


def recalibrate_bn(model: nn.Module, data) -> None:
    """Re-estimate every BatchNorm's running statistics with one pass over ``data`` (no grad)."""
    norms = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    momenta = [m.momentum for m in norms]
    for m in norms:
        m.reset_running_stats()
        m.momentum = None  # cumulative average over the pass
    model.train()
    with torch.no_grad():
        for x, _ in loader(data, 64, False, 0):
            model(x)
    for m, momentum in zip(norms, momenta):
        m.momentum = momentum
    model.eval()


def smoothed_ce(output, target):
    return nn.functional.cross_entropy(output, target, label_smoothing=0.1)


def make_criterion(name: str, train_data, seed: int):
    taylor_loader = loader(train_data, 64, False, seed)
    if name == "taylor":
        return criteria.Taylor(taylor_loader, loss_fn=smoothed_ce, progress=False)
    if name == "taylor (plain CE)":
        return criteria.Taylor(taylor_loader, progress=False)
    if name == "k_taylor":
        return criteria.KTaylor(taylor_loader, loss_fn=smoothed_ce, seed=seed, progress=False)
    if name in ("k_l1", "k_distance"):
        return criteria.CRITERIA[name](seed=seed)
    if name == "random":
        return criteria.Random(seed=seed)
    return criteria.get_criterion(name)


def evaluate(name: str, criterion, model: nn.Module, args, seed: int, train_data, test_data, example) -> dict:
    pruned = copy.deepcopy(model)
    start = time.time()
    graphprune.prune(pruned, args.ratio, example, criterion=criterion)
    row = {"criterion": name, "seconds": time.time() - start, "pruned": correct(pruned, test_data)}
    recalibrate_bn(pruned, train_data)
    row["recal"] = correct(pruned, test_data)
    row["flops"], row["params"] = count_flops(pruned, example), count_parameters(pruned)
    tuned = copy.deepcopy(pruned)
    train(tuned, train_data, args.finetune_epochs, args.finetune_lr, seed)
    row["ce"] = correct(tuned, test_data)
    if args.kd:
        distill(pruned, model, train_data, args.finetune_epochs, args.kd_lr, seed)
        row["kd"] = correct(pruned, test_data)
    return row


COUNTS = ("pruned", "recal", "ce", "kd")


def run_fold(names: list, args, seed: int, fold: int) -> tuple[list, list]:
    """Train the unpruned model on fold ``fold`` of the ``seed`` split and evaluate every
    criterion on it: the rows hold numbers of correct test images (random: the mean over its
    seeds), and the random runs."""
    torch.set_num_threads(args.threads)
    train_data, test_data = load_folds(args.folds, seed)[fold]
    tag = f"seed {seed} fold {fold + 1}/{args.folds}"
    example = test_data[0][:1]
    torch.manual_seed(seed)
    model = DigitsCNN()
    start = time.time()
    epochs = train(model, train_data, args.epochs, 3e-3, seed, patience=5)
    model.eval()
    base = correct(model, test_data)
    print(f"{tag}: trained {epochs} epochs in {time.time() - start:.0f}s: {base}/{len(test_data[1])} test images "
          f"right ({len(train_data[1])} train images)", file=sys.stderr)
    rows = [{"criterion": "unpruned", **dict.fromkeys(COUNTS, base),
             "flops": count_flops(model, example), "params": count_parameters(model), "seconds": 0.0}]
    random_runs = []
    for name in names:
        if name == "random":
            random_runs = [evaluate(name, criteria.Random(seed=s), model, args, seed, train_data, test_data, example)
                           for s in range(seed, seed + args.random_seeds)]
            row = {k: float(np.mean([r[k] for r in random_runs])) for k in random_runs[0] if k != "criterion"}
            row["criterion"] = f"random (mean of {len(random_runs)} seeds)"
        else:
            row = evaluate(name, make_criterion(name, train_data, seed), model, args, seed, train_data, test_data,
                           example)
        rows.append(row)
        print(f"{tag}:   {row['criterion']}: {row['pruned']:.0f} / {row['recal']:.0f} -> {row['ce']:.0f} "
              f"(KD {row.get('kd', float('nan')):.0f}), {row['seconds']:.1f}s to prune", file=sys.stderr)
    return rows, random_runs


def summed(per_fold: list) -> list:
    """Rows summed over runs (folds, seeds): numbers of correct test images and prune time."""
    rows = []
    for fold_rows in zip(*per_fold):
        row = {"criterion": fold_rows[0]["criterion"], "flops": fold_rows[0]["flops"], "params": fold_rows[0]["params"],
               "seconds": sum(r["seconds"] for r in fold_rows)}
        row.update({k: sum(r[k] for r in fold_rows) for k in COUNTS if k in fold_rows[0]})
        rows.append(row)
    return rows


def pooled(per_fold: list, total: int) -> list:
    """Rows summed over runs, the counts as accuracy % of ``total`` test images."""
    return [{**row, **{k: 100.0 * row[k] / total for k in COUNTS if k in row}} for row in summed(per_fold)]


def run_all(names: list, args) -> list:
    """``[(seed, fold, rows, random_runs), ...]`` for every seed and fold, on ``--jobs`` processes."""
    tasks = [(seed, fold) for seed in range(args.seed, args.seed + args.seeds) for fold in range(args.folds)]
    if args.jobs == 1:
        return [(seed, fold, *run_fold(names, args, seed, fold)) for seed, fold in tasks]
    with ProcessPoolExecutor(args.jobs, mp_context=multiprocessing.get_context("spawn")) as pool:
        futures = [pool.submit(run_fold, names, args, seed, fold) for seed, fold in tasks]
        return [(seed, fold, *future.result()) for (seed, fold), future in zip(tasks, futures)]


def print_table(rows: list, kd: bool, total: int) -> None:
    """The pooled table, with the change against the unpruned row in points and test images."""
    base = rows[0]
    header = "| criterion | pruned % | +BN recal. % | fine-tuned CE % | Δ CE (images) |" + (" fine-tuned KD % | Δ KD (images) |" if kd else "")
    print(header + " MFLOPs | params | prune s |")
    print("|---|" + "---:|" * (header.count("|") - 2 + 3))

    def delta(key: str, row: dict) -> str:
        """Points and test images gained (+) or lost (-) against the unpruned model."""
        images = round((row[key] - base[key]) * total / 100.0, 1) + 0.0  # + 0.0: no "-0"
        return f"{row[key] - base[key]:+.2f} ({images:+g})"

    for row in rows:
        line = f"| {row['criterion']} | {row['pruned']:.2f} | {row['recal']:.2f} | {row['ce']:.2f} | {delta('ce', row)} |"
        if kd:
            line += f" {row['kd']:.2f} | {delta('kd', row)} |"
        print(line + f" {row['flops'] / 1e6:.3f} | {int(row['params']):,} | {row['seconds']:.1f} |")


def print_per_seed(results: list, seeds: list, kd: bool, images: int) -> None:
    """Per criterion, the test images gained or lost after fine-tuning against each seed's own unpruned model."""
    keys = ["ce", "kd"] if kd else ["ce"]
    by_seed = {seed: summed([rows for s, _, rows, _ in results if s == seed]) for seed in seeds}
    columns = [f"{key.upper()} seed {seed}" for key in keys for seed in seeds]
    print(f"\nPer seed: test images (of {images:,}) gained (+) or lost (-) after fine-tuning, against that seed's "
          "unpruned model (" + ", ".join(f"seed {s}: {100 * by_seed[s][0]['ce'] / images:.2f}%" for s in seeds)
          + ")\n")
    print("| criterion | " + " | ".join(columns) + " |")
    print("|---|" + "---:|" * len(columns))
    for index, row in enumerate(by_seed[seeds[0]][1:], start=1):
        cells = [f"{by_seed[seed][index][key] - by_seed[seed][0][key] + 0.0:+g}" for key in keys for seed in seeds]
        print(f"| {row['criterion']} | " + " | ".join(cells) + " |")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--criteria", default=",".join(ALL), help="comma-separated criterion names")
    parser.add_argument("--ratio", type=float, default=0.5, help="pruning ratio for every group")
    parser.add_argument("--epochs", type=int, default=60, help="most training epochs (stops when the loss plateaus)")
    parser.add_argument("--finetune-epochs", type=int, default=5)
    parser.add_argument("--finetune-lr", type=float, default=1e-3)
    parser.add_argument("--kd-lr", type=float, default=3e-3)
    parser.add_argument("--no-kd", dest="kd", action="store_false", help="skip the distillation fine-tune")
    parser.add_argument("--random-seeds", type=int, default=5, help="seeds averaged for the random criterion")
    parser.add_argument("--folds", type=int, default=5, help="cross-validation folds (1: a single 80/20 split)")
    parser.add_argument("--seed", type=int, default=0, help="first seed")
    parser.add_argument("--seeds", type=int, default=5, help="repeat with seeds --seed ... --seed + N - 1 and pool")
    parser.add_argument("--threads", type=int, default=1, help="torch threads per process")
    parser.add_argument("--jobs", type=int, default=1, help="processes running (seed, fold) pairs side by side")
    parser.add_argument("--json", help="also write the results to this file")
    args = parser.parse_args(argv)
    for option in ("folds", "seeds", "jobs", "threads", "random_seeds", "finetune_epochs"):
        if getattr(args, option) < 1:
            parser.error(f"--{option.replace('_', '-')} must be at least 1, got {getattr(args, option)}")
    if not 0 <= args.ratio < 1:
        parser.error(f"--ratio must be in [0, 1), got {args.ratio}")
    names = [n.strip() for n in args.criteria.split(",") if n.strip()]
    unknown = [n for n in names if n not in criteria.CRITERIA]
    if unknown:
        parser.error(f"unknown criteria {unknown}; choose from {sorted(criteria.CRITERIA)}")
    if "taylor" in names:
        names.insert(names.index("taylor") + 1, "taylor (plain CE)")

    start = time.time()
    results = run_all(names, args)
    seeds = list(range(args.seed, args.seed + args.seeds))
    images = sum(len(test[1]) for _, test in load_folds(args.folds, args.seed))
    total = images * len(seeds)
    rows = pooled([r[2] for r in results], total)
    random_runs = pooled([r[3] for r in results], total) if all(r[3] for r in results) else []

    protocol = f"{args.folds}-fold cross-validation, every image tested once per seed" if args.folds > 1 else "one 80/20 split per seed"
    seed_text = f"seed {args.seed}" if len(seeds) == 1 else f"seeds {seeds[0]}-{seeds[-1]}, pooled"
    print(f"Digits CNN, {100 * args.ratio:g}% of every prunable group removed in one shot; fine-tune "
          f"{args.finetune_epochs} epochs ({seed_text}; {protocol}: {total:,} test images, 1 image = "
          f"{100 / total:.3f} points; prune s summed over seeds and folds; {time.time() - start:.0f} s on "
          f"{args.jobs} process(es) of {args.threads} thread(s))\n")
    print_table(rows, args.kd, total)
    if len(seeds) > 1:
        print_per_seed(results, seeds, args.kd, images)
    if random_runs:
        spread = ", ".join(f"{r['pruned']:.1f}/{r['recal']:.1f}/{r['ce']:.1f}" + (f"/{r['kd']:.1f}" if args.kd else "")
                           for r in random_runs)
        print("\nrandom, per criterion seed (run i uses seed + i; pruned/recal./CE" + ("/KD" if args.kd else "")
              + f"): {spread}")
    if args.json:
        Path(args.json).write_text(json.dumps({
            "rows": rows, "random_runs": random_runs,
            "per_fold": [{"seed": seed, "fold": fold, "rows": fold_rows} for seed, fold, fold_rows, _ in results]},
            indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
