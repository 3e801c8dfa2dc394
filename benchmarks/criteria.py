"""Compare pruning criteria on scikit-learn's bundled digits (8x8 images, 10 classes).

A small CNN is trained with a fixed seed until its training loss stops improving, then a
copy is pruned (by default 50% of every prunable group) with each criterion, evaluated on
the held-out split before fine-tuning and after a short fine-tune. Prints a markdown table.

    python benchmarks/criteria.py                      # all criteria, ~2-4 minutes on 1 CPU thread
    python benchmarks/criteria.py --criteria l1,taylor --finetune-epochs 3
"""
from __future__ import annotations

import argparse
import copy
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import criteria  # noqa: E402
import graphprune  # noqa: E402
from graphprune.measure import count_flops, count_parameters  # noqa: E402

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


def load_data(seed: int):
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    digits = load_digits()
    x = torch.tensor(digits.images / 16.0, dtype=torch.float32).unsqueeze(1)
    y = torch.tensor(digits.target, dtype=torch.long)
    train_idx, test_idx = train_test_split(np.arange(len(y)), test_size=0.2, random_state=seed, stratify=digits.target)
    return (x[train_idx], y[train_idx]), (x[test_idx], y[test_idx])


def loader(data, batch_size: int, shuffle: bool, seed: int) -> DataLoader:
    return DataLoader(TensorDataset(*data), batch_size=batch_size, shuffle=shuffle,
                      generator=torch.Generator().manual_seed(seed))


def accuracy(model: nn.Module, data) -> float:
    model.eval()
    with torch.no_grad():
        return 100.0 * (model(data[0]).argmax(1) == data[1]).float().mean().item()


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


def make_criterion(name: str, train_data, seed: int):
    taylor_loader = loader(train_data, 64, False, seed)
    if name == "taylor":
        return criteria.Taylor(taylor_loader, progress=False)
    if name == "k_taylor":
        return criteria.KTaylor(taylor_loader, seed=seed, progress=False)
    if name in ("k_l1", "k_distance"):
        return criteria.CRITERIA[name](seed=seed)
    if name == "random":
        return criteria.Random(seed=seed)
    return criteria.get_criterion(name)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--criteria", default=",".join(ALL), help="comma-separated criterion names")
    parser.add_argument("--ratio", type=float, default=0.5, help="pruning ratio for every group")
    parser.add_argument("--epochs", type=int, default=60, help="most training epochs (stops when the loss plateaus)")
    parser.add_argument("--finetune-epochs", type=int, default=5)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--json", help="also write the results to this file")
    args = parser.parse_args(argv)
    names = [n.strip() for n in args.criteria.split(",") if n.strip()]
    unknown = [n for n in names if n not in criteria.CRITERIA]
    if unknown:
        parser.error(f"unknown criteria {unknown}; choose from {sorted(criteria.CRITERIA)}")
    torch.set_num_threads(args.threads)

    train_data, test_data = load_data(args.seed)
    example = test_data[0][:1]
    torch.manual_seed(args.seed)
    model = DigitsCNN()
    start = time.time()
    epochs = train(model, train_data, args.epochs, 3e-3, args.seed, patience=5)
    base_acc = accuracy(model, test_data)
    base_flops, base_params = count_flops(model, example), count_parameters(model)
    print(f"trained {epochs} epochs in {time.time() - start:.0f}s: test accuracy {base_acc:.2f}% "
          f"({len(train_data[1])} train / {len(test_data[1])} test images)", file=sys.stderr)

    rows = [{"criterion": "unpruned", "before": base_acc, "after": base_acc, "flops": base_flops,
             "params": base_params, "seconds": 0.0}]
    for name in names:
        pruned = copy.deepcopy(model)
        start = time.time()
        graphprune.prune(pruned, args.ratio, example, criterion=make_criterion(name, train_data, args.seed))
        seconds = time.time() - start
        before = accuracy(pruned, test_data)
        train(pruned, train_data, args.finetune_epochs, 1e-3, args.seed)
        after = accuracy(pruned, test_data)
        rows.append({"criterion": name, "before": before, "after": after, "flops": count_flops(pruned, example),
                     "params": count_parameters(pruned), "seconds": seconds})
        print(f"{name}: {before:.2f}% -> {after:.2f}% ({seconds:.1f}s to prune)", file=sys.stderr)

    print(f"Digits CNN, {100 * args.ratio:g}% of every group pruned, fine-tune {args.finetune_epochs} epochs "
          f"(seed {args.seed}; test split of {len(test_data[1])} images)\n")
    print("| criterion | acc. before fine-tune % | acc. after fine-tune % | Δ vs unpruned (after) | MFLOPs | params | prune s |")
    print("|---|---:|---:|---:|---:|---:|---:|")
    for row in rows:
        print(f"| {row['criterion']} | {row['before']:.2f} | {row['after']:.2f} | {row['after'] - base_acc:+.2f} | "
              f"{row['flops'] / 1e6:.3f} | {row['params']:,} | {row['seconds']:.1f} |")
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
