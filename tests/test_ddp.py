"""Two CPU processes (gloo): Taylor pruning on each rank's own shard + one DDP epoch give identical models,
and so does a DDP epoch of sparse training with a growing GroupRegularizer."""
from __future__ import annotations

import datetime
import os
import sys
import socket
import time

import numpy as np
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

import graphprune
from graphprune.workflow import distributed
from graphprune.criteria import Taylor
from graphprune.models import get_model
from torch.nn.parallel import DistributedDataParallel

WORLD = 2
RATIO = 0.3


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _worker(rank: int, world: int, port: int, out_dir: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group(
        "gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world,
        timeout=datetime.timedelta(seconds=60),
    )
    try:
        torch.manual_seed(0)  # same initial weights on every rank
        model = get_model("resnet20")
        x = torch.randn(1, 3, 16, 16)
        train, test = graphprune.data.digits_loaders(batch_size=32, image_size=16)  # sharded train loader
        taylor = Taylor(train, max_batches=2, progress=False)
        graphprune.prune(model, RATIO, x, criterion=distributed.sync_criterion(taylor))
        local = {gid: scores.copy() for gid, scores in taylor._scores.items()}  # this rank's own scores
        history = graphprune.finetune(model, train, epochs=1, lr=0.05, warmup_epochs=0, eval_loader=test,
                                      progress=False)
        first_batch = next(iter(train))[1]
        try:  # groups of different sizes on the ranks: an error on every rank, not a hang
            distributed.all_reduce_scores(np.ones(3 + rank))
            mismatch = None
        except RuntimeError as exc:
            mismatch = str(exc)
        torch.save(
            {"state": model.state_dict(), "local": local, "history": history, "labels": first_batch,
             "shard": len(train.sampler), "mismatch": mismatch},
            os.path.join(out_dir, f"rank{rank}.pt"),
        )
    finally:
        dist.destroy_process_group()


def _sparse_worker(rank: int, world: int, port: int, out_dir: str) -> None:
    """A DDP epoch of growing group-level sparse training on this rank's shard, then group_norm pruning."""
    torch.set_num_threads(1)
    dist.init_process_group(
        "gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world,
        timeout=datetime.timedelta(seconds=60),
    )
    try:
        torch.manual_seed(0)
        model = get_model("resnet20")
        x = torch.randn(1, 3, 8, 8)
        train, _ = graphprune.data.digits_loaders(batch_size=32, image_size=8)  # sharded
        regularizer = graphprune.GroupRegularizer(model, x, coefficient=1e-3, target_ratio=0.5, delta=0.05)
        wrapped = graphprune.GroupRegularizer(DistributedDataParallel(model), x)  # reads the module's own parameters
        same = [p is q for p, q in zip(wrapped.parameters(), regularizer.parameters())]
        history = graphprune.finetune(model, train, epochs=1, lr=0.05, warmup_epochs=0, regularizer=regularizer,
                                      progress=False)
        trained = {k: v.clone() for k, v in model.state_dict().items()}
        graphprune.prune(model, 0.5, x, criterion="group_norm")
        torch.save({"trained": trained, "pruned": model.state_dict(), "history": history,
                    "coefficients": regularizer.coefficients(), "same": same, "labels": next(iter(train))[1]},
                   os.path.join(out_dir, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


def _autograd_survives_fork() -> bool:
    """Whether a forked child can run a backward: not once autograd's device threads started in
    this process (an earlier test's torch.export, say), which no API reports; a forked probe tells."""
    pid = os.fork()
    if pid == 0:
        try:
            torch.ones(1, requires_grad=True).sum().backward()
        finally:
            os._exit(0 if sys.exc_info()[0] is None else 1)
    return os.waitpid(pid, 0)[1] == 0


def _spawn(out_dir: str, limit: float = 120.0, worker=_worker) -> None:
    # fork skips re-importing torch in the children (most of the run time on a small machine); the
    # parent runs with one intra-op thread (conftest), so no OpenMP pool is forked. Once CUDA is
    # initialised (an earlier test in this process used it) its state and autograd's device
    # threads do not survive a fork: spawn then.
    forkable = "fork" in mp.get_all_start_methods() and not torch.cuda.is_initialized() and _autograd_survives_fork()
    method = "fork" if forkable else "spawn"
    context = mp.start_processes(worker, args=(WORLD, _free_port(), out_dir), nprocs=WORLD, join=False,
                                 start_method=method)
    deadline = time.monotonic() + limit
    try:
        while not context.join(timeout=1):
            if time.monotonic() > deadline:
                raise TimeoutError(f"the {WORLD} ranks did not finish within {limit:.0f} s")
    finally:
        for process in context.processes:
            if process.is_alive():
                process.kill()


@pytest.mark.skipif(not dist.is_available() or not dist.is_gloo_available(), reason="needs torch.distributed gloo")
def test_ranks_prune_and_finetune_identically(tmp_path):
    _spawn(str(tmp_path))
    results = [torch.load(tmp_path / f"rank{r}.pt", weights_only=False) for r in range(WORLD)]
    first, second = results

    # each rank read its own shard (different batches), so its own Taylor scores differ...
    assert first["shard"] == second["shard"] == 719
    assert not torch.equal(first["labels"], second["labels"])
    assert set(first["local"]) == set(second["local"])
    differing = [g for g in first["local"] if not np.allclose(first["local"][g], second["local"][g])]
    assert len(differing) >= len(first["local"]) - 1
    # ... and would pick different channels on their own
    own_choices_differ = False
    for g in first["local"]:
        k = int(RATIO * first["local"][g].size)
        picks = [set(np.argsort(r["local"][g], kind="stable")[:k].tolist()) for r in results]
        own_choices_differ |= picks[0] != picks[1]
    assert own_choices_differ

    # but the synced scores made both prune the same channels, and DDP kept the weights identical
    reference = graphprune.models.get_model("resnet20").state_dict()
    assert list(first["state"]) == list(second["state"])
    shrunk = 0
    for key, tensor in first["state"].items():
        other = second["state"][key]
        assert tensor.shape == other.shape, key
        assert torch.equal(tensor, other), f"{key} differs between the ranks"
        shrunk += tensor.shape != reference[key].shape
    assert shrunk > 20  # really pruned
    assert first["history"][0]["accuracy"] == second["history"][0]["accuracy"]
    assert first["history"][0]["loss"] == pytest.approx(second["history"][0]["loss"])
    assert np.isfinite(first["history"][0]["loss"])
    for result in results:
        assert "ranks scored groups of different sizes (3 to 4 channels)" in result["mismatch"]


@pytest.mark.skipif(not dist.is_available() or not dist.is_gloo_available(), reason="needs torch.distributed gloo")
def test_ranks_stay_identical_under_sparse_training(tmp_path):
    _spawn(str(tmp_path), worker=_sparse_worker)
    first, second = [torch.load(tmp_path / f"rank{r}.pt", weights_only=False) for r in range(WORLD)]
    assert not torch.equal(first["labels"], second["labels"])  # each rank trained on its own shard
    assert all(first["same"]) and len(first["same"]) > 20
    reference = get_model("resnet20").state_dict()
    for stage in ("trained", "pruned"):
        assert list(first[stage]) == list(second[stage])
        for key, tensor in first[stage].items():
            assert tensor.shape == second[stage][key].shape and torch.equal(tensor, second[stage][key]), f"{stage} {key}"
    assert sum(t.shape != reference[k].shape for k, t in first["pruned"].items()) > 20
    assert first["history"][0]["penalty"] == second["history"][0]["penalty"] > 0
    for gid, values in first["coefficients"].items():  # the same channels scheduled on both ranks
        np.testing.assert_array_equal(values, second["coefficients"][gid])
        assert values.max() == pytest.approx(1e-3 + 0.05)


def test_sync_criterion_without_distribution_is_the_wrapped_criterion():
    from graphprune.criteria import L1

    model = get_model("resnet20")
    x = torch.randn(1, 3, 16, 16)
    synced = distributed.sync_criterion("l1")
    assert isinstance(synced, distributed.SyncedCriterion) and isinstance(synced.criterion, L1)
    assert distributed.sync_criterion(synced) is synced
    assert synced.name == "synced_l1" and not synced.requires_data
    assert distributed.sync_criterion(Taylor([(x, torch.tensor([1]))])).requires_data
    report = graphprune.analyze(model, x)
    for group in report.prunable_groups:
        np.testing.assert_array_equal(synced.scores(group), L1().scores(group))
    a = graphprune.prune(model, 0.4, x, inplace=False)
    b = graphprune.prune(model, 0.4, x, inplace=False, criterion=synced)
    for (key, left), right in zip(a.state_dict().items(), b.state_dict().values()):
        assert torch.equal(left, right), key
    with pytest.raises(TypeError, match="must be a name or a Criterion"):
        distributed.sync_criterion(3)
    with pytest.raises(ValueError, match="1-D array"):
        distributed.all_reduce_scores(np.ones((2, 2)))
