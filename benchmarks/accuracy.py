"""Accuracy after pruning, per criterion: the digits protocol (runs anywhere) and a CIFAR-10 ResNet-56 protocol.

    python benchmarks/accuracy.py                                  # digits, every criterion, ~4 min on 2 CPU cores
    python benchmarks/accuracy.py --criteria l1,fpgm,taylor --finetune-epochs 5
    python benchmarks/accuracy.py --workflow                       # tests/test_workflow.py's pipeline, 5 seeds pooled
    python benchmarks/accuracy.py --data-dir ~/data/cifar10 --device cuda          # CIFAR-10 ResNet-56
    python benchmarks/accuracy.py --data-dir ~/data/cifar10 --checkpoint resnet56.pt --criteria l1

**Digits** (default): scikit-learn's bundled 8x8 digits (1,437 train / 360 test images, 10
classes, stratified split fixed by ``--seed``; :func:`graphprune.data.digits_loaders`),
bilinearly upsampled to ``--image-size`` pixels and copied to 3 channels, so that the CIFAR
models of :mod:`graphprune.models` take them unchanged. ``--model`` (default ``resnet20``)
is trained from scratch with a fixed seed (SGD + momentum, warm-up then cosine decay,
:func:`graphprune.finetune`) for ``--epochs`` epochs, long enough for the training loss to
flatten. Then, for every criterion, a copy is pruned by ``--ratio`` (every prunable group
loses ``floor(ratio * n)`` channels), evaluated, fine-tuned ``--finetune-epochs`` epochs
(same seed and batch order for every criterion) and evaluated again. With ``--seeds N`` this
runs for seeds ``--seed`` .. ``--seed + N - 1`` (each its own split, initialisation and batch
order) and the accuracies are pooled over the N x 360 test images.

**Workflow** (``--workflow``): the digits protocol set up as tests/test_workflow.py's
pipeline, whose accuracy goal the tests leave to this benchmark (a fixed-seed figure differs
from machine to machine): ResNet-20, 50% of every group removed with L1, then a fine-tune of
5 epochs at lr 0.02 without warm-up that distils from the unpruned model (alpha 0.9,
temperature 4), pooled over 5 seeds; the goal is a fine-tuned accuracy at most
``--tolerance`` (0.5) points below the unpruned model's.

**CIFAR-10 ResNet-56** (``--data-dir``, never downloaded): the python-pickle layout of
https://www.cs.toronto.edu/~kriz/cifar.html (``data_batch_1`` .. ``data_batch_5`` and
``test_batch``, in ``--data-dir`` or in its ``cifar-10-batches-py/``). ResNet-56 comes from
``--checkpoint`` (a ``state_dict`` of ``graphprune.models.get_model("resnet56")``) or is
trained from scratch (``--cifar-epochs``, default 200, lr 0.1). Each criterion prunes a copy
to ``1 / --speedup`` of its FLOPs (default 2.12, ``target_flops=``), which is then
fine-tuned ``--cifar-finetune-epochs`` (default 100) at lr 0.01 with random crop + flip.
Literature anchor (Torch-Pruning, Fang et al., CVPR 2023, benchmark table): Group-L1 takes
ResNet-56 from 93.53% to 92.93% at 2.12x fewer FLOPs.
"""
from __future__ import annotations

import argparse
import copy
import json
import os
import pickle
import sys
import time
import warnings
from typing import Optional

# When a script here runs, benchmarks/ is sys.path[0]: drop it, so that a module in benchmarks/ can never
# shadow one of the project's top-level packages (a benchmarks/criteria.py would hide the criteria package).
_HERE = os.path.dirname(os.path.abspath(__file__))
sys.path[:] = [p for p in sys.path if os.path.abspath(p or os.curdir) != _HERE]

import numpy as np  # noqa: E402
import torch  # noqa: E402
from torch import nn  # noqa: E402
from torch.utils.data import DataLoader, Dataset  # noqa: E402

from graphprune import criteria  # noqa: E402
import graphprune  # noqa: E402
from graphprune.reporting.measure import count_flops, count_parameters  # noqa: E402

try:  # graphprune.finetune: SGD + momentum, LinearLR warm-up -> cosine, per iteration
    from graphprune.workflow.evaluation import evaluate
    from graphprune.workflow.finetune import finetune
except ImportError:  # pragma: no cover - an older graphprune without the fine-tuning module
    finetune = evaluate = None

ALL = ["l1", "l2", "fpgm", "bn_scale", "random", "taylor", "k_l1", "k_taylor", "k_distance"]
CIFAR_MEAN, CIFAR_STD = (0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616)
ANCHOR = "Torch-Pruning Group-L1: ResNet-56 93.53% -> 92.93% at 2.12x fewer FLOPs"
# --workflow: tests/test_workflow.py's fine-tune (graphprune.finetune with the unpruned model as teacher)
WORKFLOW_DISTILL = {"alpha": 0.9, "temperature": 4.0, "warmup_epochs": 0}
WORKFLOW_DEFAULTS = {"criteria": "l1", "finetune_epochs": 5, "finetune_lr": 0.02, "seeds": 5}
PLAIN_DEFAULTS = {"criteria": ",".join(ALL), "finetune_epochs": 2, "finetune_lr": 0.01, "seeds": 1}


# ---------------------------------------------------------------------------- training helpers


def _train(model, loader, *, epochs, lr, seed, device, weight_decay=5e-4, warmup_epochs=1.0, **distill):
    """Seeded SGD training (graphprune.finetune, or a minimal stand-in when it is missing);
    ``distill``: graphprune.finetune's ``teacher``, ``alpha`` and ``temperature``."""
    torch.manual_seed(seed)
    warmup = min(warmup_epochs, epochs - 0.5) if epochs > 1 else 0
    if finetune is not None:
        return finetune(model, loader, epochs=epochs, lr=lr, weight_decay=weight_decay, warmup_epochs=warmup,
                        device=device, progress=False, **distill)
    if distill:
        raise SystemExit("accuracy.py: error: distillation (--workflow) needs graphprune.finetune")
    model.to(device).train()
    optimiser = torch.optim.SGD(model.parameters(), lr=lr, momentum=0.9, weight_decay=weight_decay)
    schedule = torch.optim.lr_scheduler.CosineAnnealingLR(optimiser, epochs * len(loader))
    history = []
    for _ in range(epochs):
        total = count = 0
        for x, y in loader:
            x, y = x.to(device), y.to(device)
            loss = nn.functional.cross_entropy(model(x), y)
            optimiser.zero_grad()
            loss.backward()
            optimiser.step()
            schedule.step()
            total, count = total + loss.item() * len(y), count + len(y)
        history.append({"loss": total / count})
    model.eval()
    return history


def _accuracy(model, loader, device) -> float:
    if evaluate is not None:
        return 100.0 * evaluate(model, loader, device=device)
    model.to(device).eval()
    correct = total = 0
    with torch.no_grad():
        for x, y in loader:
            correct += int((model(x.to(device)).argmax(-1) == y.to(device)).sum())
            total += len(y)
    return 100.0 * correct / total


def make_criterion(name: str, data_loader, seed: int, max_batches: Optional[int]):
    """A criterion by name; the data-driven ones read ``data_loader`` (at most ``max_batches`` batches)."""
    if name == "taylor":
        return criteria.Taylor(data_loader, max_batches=max_batches, progress=False)
    if name == "k_taylor":
        return criteria.KTaylor(data_loader, max_batches=max_batches, seed=seed, progress=False)
    if name in ("k_l1", "k_distance"):
        return criteria.CRITERIA[name](seed=seed)
    if name == "random":
        return criteria.Random(seed=seed)
    return criteria.get_criterion(name)


def run_criteria(model, names, *, train_loader_fn, test_loader, example, device, args, prune_kwargs) -> list:
    """Prune a copy of ``model`` with every criterion, evaluate, fine-tune, evaluate again."""
    base_acc = _accuracy(model, test_loader, device)
    flops, params = count_flops(model, example), count_parameters(model)
    rows = [{"criterion": "unpruned", "before": base_acc, "after": None, "flops": flops, "params": params,
             "prune_s": None, "finetune_s": None}]
    for name in names:
        pruned = copy.deepcopy(model)
        row = {"criterion": name}
        start = time.perf_counter()
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                graphprune.prune(pruned, example_inputs=example,
                                 criterion=make_criterion(name, train_loader_fn(), args.seed, args.taylor_batches),
                                 **prune_kwargs)
        except Exception as exc:  # a failing criterion is a row, not a crash
            rows.append({**row, "status": f"{type(exc).__name__}: {exc}"[:200]})
            print(f"  {name}: prune failed: {exc}", file=sys.stderr)
            continue
        row["prune_s"] = time.perf_counter() - start
        row["flops"], row["params"] = count_flops(pruned, example), count_parameters(pruned)
        row["before"] = _accuracy(pruned, test_loader, device)
        start = time.perf_counter()
        distill = {"teacher": model, **WORKFLOW_DISTILL} if args.workflow else {}
        _train(pruned, train_loader_fn(), epochs=args.finetune_epochs, lr=args.finetune_lr, seed=args.seed,
               device=device, **distill)
        row["finetune_s"] = time.perf_counter() - start
        row["after"] = _accuracy(pruned, test_loader, device)
        print(f"  {name}: {row['before']:.2f}% -> {row['after']:.2f}% (prune {row['prune_s']:.1f}s, "
              f"fine-tune {row['finetune_s']:.0f}s)", file=sys.stderr, flush=True)
        rows.append(row)
    return rows


def _table(rows: list, images: Optional[int] = None) -> str:
    """The markdown table; with ``images`` (test images in all), Δ also in images."""
    base = rows[0]
    lines = ["| criterion | params left | FLOPs ratio | acc. before fine-tune % | acc. after fine-tune % | "
             "Δ vs unpruned (after) | prune s |", "|---|---:|---:|---:|---:|---:|---:|"]
    for row in rows:
        if "before" not in row:
            lines.append(f"| {row['criterion']} | – | – | – | – | – | failed: {row['status']} |")
            continue
        after = row["after"]
        delta = f"{after - base['before']:+.2f}" if after is not None else ""
        if after is not None and images:
            delta += f" ({round((after - base['before']) * images / 100) + 0:+d})"  # + 0: no "-0"
        lines.append(
            f"| {row['criterion']} | {100 * row['params'] / base['params']:.1f}% | {base['flops'] / row['flops']:.2f}× | "
            f"{row['before']:.2f} | {after:.2f} | {delta} | {row['prune_s']:.1f} |"
            if after is not None else
            f"| {row['criterion']} | 100.0% | 1.00× | {row['before']:.2f} | – | – | – |"
        )
    return "\n".join(lines)


# ---------------------------------------------------------------------------- digits


def digits_protocol(args, names) -> tuple:
    from graphprune.data import digits_loaders
    from graphprune.models import get_model

    device = torch.device(args.device)

    def train_loader_fn():  # a fresh, identically seeded loader: every criterion sees the same batches
        return digits_loaders(batch_size=args.batch_size, image_size=args.image_size, seed=args.seed)[0]

    test_loader = digits_loaders(batch_size=256, image_size=args.image_size, seed=args.seed)[1]
    torch.manual_seed(args.seed)
    model = get_model(args.model, num_classes=10).to(device)
    start = time.perf_counter()
    history = _train(model, train_loader_fn(), epochs=args.epochs, lr=args.lr, seed=args.seed, device=device)
    losses = [h["loss"] for h in history]
    train_acc = _accuracy(model, train_loader_fn(), device)
    print(f"seed {args.seed}: trained {args.model} {args.epochs} epochs in {time.perf_counter() - start:.0f}s: loss "
          f"{' '.join(f'{l:.3f}' for l in losses[-3:])} (last 3 epochs), train accuracy {train_acc:.2f}%",
          file=sys.stderr, flush=True)
    example = torch.randn(1, 3, args.image_size, args.image_size, device=device)
    rows = run_criteria(model, names, train_loader_fn=train_loader_fn, test_loader=test_loader, example=example,
                        device=device, args=args, prune_kwargs={"ratio": args.ratio})
    title = (f"Digits ({args.image_size}x{args.image_size}x3, 1,437 train / 360 test), {args.model} trained "
             f"{args.epochs} epochs (final training loss {losses[-1]:.3f}, train accuracy {train_acc:.2f}%), "
             f"{100 * args.ratio:g}% of every prunable group removed, {_finetune_text(args)}; seed {args.seed}, "
             f"{torch.get_num_threads()} thread(s)")
    return title, rows


def _finetune_text(args) -> str:
    text = f"fine-tune {args.finetune_epochs} epochs at lr {args.finetune_lr:g}"
    if args.workflow:
        text += (f" distilling from the unpruned model (alpha {WORKFLOW_DISTILL['alpha']:g}, temperature "
                 f"{WORKFLOW_DISTILL['temperature']:g}, no warm-up)")
    return text


def pooled_digits(args, names) -> tuple:
    """The digits protocol for every seed; rows pooled over the seeds' test images, the per-seed rows
    and the test images in all."""
    seeds = list(range(args.seed, args.seed + args.seeds))
    per_seed = [digits_protocol(argparse.Namespace(**{**vars(args), "seed": seed}), names)[1] for seed in seeds]
    rows = []
    for same in zip(*per_seed):  # one criterion's rows; every seed tests 360 images: the mean is the pooled accuracy
        failed = [row for row in same if "before" not in row]
        if failed:
            rows.append(failed[0])
            continue
        mean = {key: float(np.mean([row[key] for row in same])) for key in ("before", "after") if same[0][key] is not None}
        times = {key: sum(row[key] for row in same) for key in ("prune_s", "finetune_s") if same[0][key] is not None}
        rows.append({**same[0], "after": None, **mean, **times})
    images = 360 * len(seeds)
    title = (f"Digits ({args.image_size}x{args.image_size}x3, 1,437 train / 360 test per seed), {args.model} trained "
             f"{args.epochs} epochs at lr {args.lr:g}, {100 * args.ratio:g}% of every prunable group removed, "
             f"{_finetune_text(args)}; seeds {seeds[0]}-{seeds[-1]} pooled, each with its own stratified split, "
             f"initialisation and batch order ({images:,} test images, 1 image = {100 / images:.3f} points; prune s "
             f"summed over seeds), {torch.get_num_threads()} thread(s)")
    return title, rows, list(zip(seeds, per_seed)), images


def _goal_and_seeds(rows: list, per_seed: list, tolerance: float) -> str:
    """The goal per criterion (pooled fine-tuned accuracy at most ``tolerance`` points below the
    unpruned model's), then every seed's accuracies."""
    lines = [f"Goal: fine-tuned accuracy, pooled, at most {tolerance:g} points below the unpruned model's:", ""]
    for row in rows[1:]:
        if row.get("after") is not None:
            delta = row["after"] - rows[0]["before"]
            met = delta >= -tolerance - 1e-9  # a mean of per-seed percentages: no rounding noise at the bound
            lines.append(f"* {row['criterion']}: {delta:+.2f} points, {'met' if met else 'missed'}")
    names = [row["criterion"] for row in rows[1:]]
    lines += ["", "Per seed: accuracy % on that seed's 360 test images (criterion: before -> after fine-tuning, "
              "Δ vs unpruned)", "", "| seed | unpruned % | " + " | ".join(names) + " |",
              "|---:|---:|" + "---:|" * len(names)]
    for seed, seed_rows in per_seed:
        base = seed_rows[0]["before"]
        cells = [f"{r['before']:.2f} -> {r['after']:.2f} ({r['after'] - base:+.2f})" if r.get("after") is not None
                 else "failed" for r in seed_rows[1:]]
        lines.append(f"| {seed} | {base:.2f} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


# ---------------------------------------------------------------------------- CIFAR-10


def _cifar_dir(data_dir: str) -> Optional[str]:
    for candidate in (data_dir, os.path.join(data_dir, "cifar-10-batches-py")):
        if all(os.path.exists(os.path.join(candidate, f)) for f in ("data_batch_1", "test_batch")):
            return candidate
    return None


def _load_cifar(directory: str, files: list) -> tuple:
    images, labels = [], []
    for name in files:
        with open(os.path.join(directory, name), "rb") as fh:
            batch = pickle.load(fh, encoding="bytes")
        images.append(np.asarray(batch[b"data"], dtype=np.uint8).reshape(-1, 3, 32, 32))
        labels.extend(batch[b"labels"])
    x = torch.from_numpy(np.concatenate(images)).float().div_(255)
    mean, std = torch.tensor(CIFAR_MEAN).view(1, 3, 1, 1), torch.tensor(CIFAR_STD).view(1, 3, 1, 1)
    return (x - mean) / std, torch.tensor(labels, dtype=torch.long)


class _Cifar(Dataset):
    """Normalised CIFAR tensors; with ``augment``, random 32x32 crop of the 4-pixel zero-padded image + flip."""

    def __init__(self, images, labels, augment: bool):
        self.images, self.labels, self.augment = images, labels, augment

    def __len__(self):
        return len(self.labels)

    def __getitem__(self, i):
        image = self.images[i]
        if self.augment:
            padded = nn.functional.pad(image, (4, 4, 4, 4))
            top, left = np.random.randint(0, 9, size=2)
            image = padded[:, top:top + 32, left:left + 32]
            if np.random.rand() < 0.5:
                image = image.flip(-1)
        return image, self.labels[i]


def cifar_protocol(args, names) -> tuple:
    from graphprune.models import get_model

    directory = _cifar_dir(args.data_dir)
    if directory is None:
        raise SystemExit(f"accuracy.py: error: no CIFAR-10 python-pickle files (data_batch_1..5, test_batch) in "
                         f"{args.data_dir} or {os.path.join(args.data_dir, 'cifar-10-batches-py')}; it is not "
                         "downloaded by this script")
    device = torch.device(args.device)
    train_files = sorted(f for f in os.listdir(directory) if f.startswith("data_batch_"))
    train = _Cifar(*_load_cifar(directory, train_files), augment=True)
    test = _Cifar(*_load_cifar(directory, ["test_batch"]), augment=False)

    def train_loader_fn():
        return DataLoader(train, batch_size=128, shuffle=True, num_workers=args.workers, drop_last=True,
                          generator=torch.Generator().manual_seed(args.seed),
                          worker_init_fn=lambda w: np.random.seed(args.seed * 100 + w))

    test_loader = DataLoader(test, batch_size=512, num_workers=args.workers)
    torch.manual_seed(args.seed)
    np.random.seed(args.seed)
    model = get_model("resnet56", num_classes=10).to(device)
    if args.checkpoint:
        state = torch.load(args.checkpoint, map_location=device)
        model.load_state_dict(state.get("state_dict", state) if isinstance(state, dict) else state)
        origin = f"checkpoint {args.checkpoint}"
    else:
        start = time.perf_counter()
        _train(model, train_loader_fn(), epochs=args.cifar_epochs, lr=0.1, seed=args.seed, device=device)
        origin = f"trained {args.cifar_epochs} epochs from scratch in {time.perf_counter() - start:.0f}s"
        if args.save_checkpoint:
            torch.save(model.state_dict(), args.save_checkpoint)
    args.finetune_epochs, args.finetune_lr = args.cifar_finetune_epochs, 0.01
    example = torch.randn(1, 3, 32, 32, device=device)
    prune_kwargs = {"target_flops": 1.0 / args.speedup, "global_ranking": args.global_ranking}
    rows = run_criteria(model, names, train_loader_fn=train_loader_fn, test_loader=test_loader, example=example,
                        device=device, args=args, prune_kwargs=prune_kwargs)
    title = (f"CIFAR-10 ResNet-56 ({origin}), pruned to 1/{args.speedup:g} of its FLOPs "
             f"({'global' if args.global_ranking else 'uniform'} ratio), fine-tuned {args.finetune_epochs} epochs at "
             f"lr 0.01; seed {args.seed}. Anchor: {ANCHOR}")
    return title, rows


# ---------------------------------------------------------------------------- main


def _parse_args(argv: Optional[list]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--criteria", help="comma-separated criterion names (default: all 9; l1 with --workflow)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=len(os.sched_getaffinity(0)), help="torch threads (default: all cores)")
    parser.add_argument("--device", default="cpu", help="cpu or cuda (default cpu)")
    parser.add_argument("--taylor-batches", type=int, default=None,
                        help="batches read by taylor / k_taylor (default: the whole training set)")
    parser.add_argument("--json", metavar="FILE", help="also write the raw rows as JSON")
    digits = parser.add_argument_group("digits protocol (default)")
    digits.add_argument("--model", default="resnet20", help="a graphprune.models CIFAR model (default resnet20)")
    digits.add_argument("--image-size", type=int, default=16,
                        help="digits upsampled from 8x8 to this size (default 16; 32 is 4x slower)")
    digits.add_argument("--epochs", type=int, default=15, help="training epochs from scratch (default 15)")
    digits.add_argument("--lr", type=float, default=0.1, help="training learning rate (default 0.1)")
    digits.add_argument("--batch-size", type=int, default=64)
    digits.add_argument("--ratio", type=float, default=0.5, help="pruning ratio of every group (default 0.5)")
    digits.add_argument("--finetune-epochs", type=int, help="fine-tune epochs (default 2; 5 with --workflow)")
    digits.add_argument("--finetune-lr", type=float, help="fine-tune learning rate (default 0.01; 0.02 with --workflow)")
    digits.add_argument("--seeds", type=int, help="run seeds --seed .. --seed + N - 1 and pool (default 1; 5 with "
                        "--workflow)")
    digits.add_argument("--workflow", action="store_true",
                        help="tests/test_workflow.py's pipeline: fine-tune by distilling from the unpruned model "
                             "(alpha 0.9, temperature 4, no warm-up); defaults --criteria l1, --finetune-epochs 5, "
                             "--finetune-lr 0.02, --seeds 5")
    digits.add_argument("--tolerance", type=float, default=0.5,
                        help="accuracy goal with --seeds > 1: pooled fine-tuned accuracy at most this many points "
                             "below the unpruned model's (default 0.5)")
    cifar = parser.add_argument_group("CIFAR-10 ResNet-56 protocol")
    cifar.add_argument("--data-dir", help="CIFAR-10 python-pickle directory; selects this protocol")
    cifar.add_argument("--checkpoint", help="trained ResNet-56 state_dict (default: train from scratch)")
    cifar.add_argument("--save-checkpoint", help="where to save the ResNet-56 trained from scratch")
    cifar.add_argument("--cifar-epochs", type=int, default=200, help="epochs from scratch (default 200)")
    cifar.add_argument("--cifar-finetune-epochs", type=int, default=100, help="fine-tune epochs (default 100)")
    cifar.add_argument("--speedup", type=float, default=2.12, help="FLOPs reduction to reach (default 2.12)")
    cifar.add_argument("--global-ranking", action="store_true", help="global channel ranking instead of uniform ratio")
    cifar.add_argument("--workers", type=int, default=2, help="DataLoader workers (default 2)")
    args = parser.parse_args(argv)
    for key, value in (WORKFLOW_DEFAULTS if args.workflow else PLAIN_DEFAULTS).items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    if args.data_dir and (args.workflow or args.seeds > 1):
        parser.error("--workflow and --seeds are options of the digits protocol, not of --data-dir")
    if not 0 < args.ratio < 1:
        parser.error("--ratio must lie in (0, 1)")
    if args.speedup <= 1:
        parser.error("--speedup must be above 1")
    for flag in ("threads", "epochs", "finetune_epochs", "cifar_epochs", "cifar_finetune_epochs", "batch_size", "seeds"):
        if getattr(args, flag) < 1:
            parser.error(f"--{flag.replace('_', '-')} must be at least 1")
    return args


def main(argv: Optional[list] = None) -> int:
    args = _parse_args(argv)
    names = [n.strip() for n in args.criteria.split(",") if n.strip()]
    unknown = [n for n in names if n not in criteria.CRITERIA]
    if unknown:
        print(f"accuracy.py: error: unknown criteria {unknown}; choose from {sorted(criteria.CRITERIA)}", file=sys.stderr)
        return 2
    torch.set_num_threads(args.threads)
    started = time.perf_counter()
    per_seed = images = None
    if args.data_dir:
        title, rows = cifar_protocol(args, names)
    elif args.seeds > 1:
        title, rows, per_seed, images = pooled_digits(args, names)
    else:
        title, rows = digits_protocol(args, names)
    print(title + "\n")
    print(_table(rows, images))
    if per_seed:
        print("\n" + _goal_and_seeds(rows, per_seed, args.tolerance))
    print(f"\nwall time: {time.perf_counter() - started:.0f} s"
          + ("" if finetune is not None else " (graphprune.finetune missing: used the script's own SGD loop)"))
    if args.json:
        with open(args.json, "w") as fh:
            json.dump({"title": title, "rows": rows, **({"per_seed": [{"seed": seed, "rows": seed_rows}
                                                                      for seed, seed_rows in per_seed]}
                                                        if per_seed else {})}, fh, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
