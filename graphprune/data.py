"""Tiny image-classification data for examples and tests: scikit-learn's bundled digits.

:func:`digits_loaders` needs no download: the 1,797 8x8 grey-scale digits that ship with
scikit-learn are upsampled to ``image_size`` pixels, replicated to ``channels`` channels
and normalised, then split 80/20 (stratified, fixed by ``seed``) into a training and a
test set of 1,437 and 360 images over 10 classes. They fit the CIFAR models of
:mod:`graphprune.models` with the default ``image_size=32, channels=3``.

>>> train, test = digits_loaders(batch_size=64)      # doctest: +SKIP
>>> images, labels = next(iter(train))               # (64, 3, 32, 32) float32, (64,) int64
"""
from __future__ import annotations

import functools
from typing import Optional

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, TensorDataset
from torch.utils.data.distributed import DistributedSampler

from .validation import check_int

__all__ = ["digits_loaders", "digits_datasets", "DIGITS_CLASSES"]

DIGITS_CLASSES = 10
_TEST_FRACTION = 0.2


def digits_datasets(image_size: int = 32, seed: int = 0, channels: int = 3) -> tuple[TensorDataset, TensorDataset]:
    """``(train, test)`` :class:`~torch.utils.data.TensorDataset` s of ``(image, label)``.

    Images are ``(channels, image_size, image_size)`` float32, scaled to [0, 1], bilinearly
    upsampled from 8x8 and standardised with the upsampled training set's mean and standard
    deviation (one value for all channels, as they are copies); labels are int64 in 0..9.
    The split is stratified and fixed by ``seed``. Results are cached per arguments; the
    tensors are shared between calls, so do not modify them in place.
    """
    image_size = check_int(image_size, "image_size", 8)
    channels = check_int(channels, "channels", 1)
    seed = check_int(seed, "seed", 0)
    return _digits(image_size, seed, channels)


@functools.lru_cache(maxsize=8)
def _digits(image_size: int, seed: int, channels: int) -> tuple[TensorDataset, TensorDataset]:
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    digits = load_digits()
    images = digits.images.astype(np.float32) / 16.0  # (1797, 8, 8), values 0..16
    labels = digits.target.astype(np.int64)
    train_idx, test_idx = train_test_split(
        np.arange(labels.size), test_size=_TEST_FRACTION, random_state=seed, stratify=labels
    )
    tensor = torch.from_numpy(images).unsqueeze(1)
    if image_size != 8:
        tensor = F.interpolate(tensor, size=(image_size, image_size), mode="bilinear", align_corners=False)
    reference = tensor[torch.from_numpy(train_idx)]
    tensor = (tensor - reference.mean()) / reference.std()
    tensor = tensor.expand(-1, channels, -1, -1).contiguous()
    targets = torch.from_numpy(labels)
    train_idx, test_idx = torch.from_numpy(np.sort(train_idx)), torch.from_numpy(np.sort(test_idx))
    return TensorDataset(tensor[train_idx], targets[train_idx]), TensorDataset(tensor[test_idx], targets[test_idx])


def _distributed() -> bool:
    return torch.distributed.is_available() and torch.distributed.is_initialized()


def digits_loaders(
    batch_size: int = 64,
    image_size: int = 32,
    seed: int = 0,
    channels: int = 3,
    *,
    distributed: Optional[bool] = None,
    num_workers: int = 0,
) -> tuple[DataLoader, DataLoader]:
    """``(train_loader, test_loader)`` over the digits (see :func:`digits_datasets`).

    The training loader shuffles with a generator seeded by ``seed``. With
    ``distributed=True`` (default: whenever ``torch.distributed`` is initialised) it draws
    from a :class:`~torch.utils.data.distributed.DistributedSampler` (seeded by ``seed``), so
    each rank reads its own shard with the same number of batches; call
    ``train_loader.sampler.set_epoch(epoch)`` each epoch (:func:`graphprune.finetune` does).
    The test loader is never sharded: every rank sees all 360 test images in order, so an
    evaluation gives the same number on every rank. A final training batch of a single
    image (which BatchNorm cannot train on) is dropped.
    """
    batch_size = check_int(batch_size, "batch_size", 1)
    num_workers = check_int(num_workers, "num_workers", 0)
    if distributed is None:
        distributed = _distributed()
    elif not isinstance(distributed, bool):
        raise TypeError(f"distributed must be True, False or None, got {type(distributed).__name__}")
    elif distributed and not _distributed():
        raise RuntimeError("distributed=True needs torch.distributed to be initialised (init_process_group) first")
    train, test = digits_datasets(image_size, seed, channels)
    if distributed:
        sampler = DistributedSampler(train, shuffle=True, seed=seed)
        shard = len(sampler)
        train_loader = DataLoader(
            train, batch_size=batch_size, sampler=sampler, drop_last=shard % batch_size == 1, num_workers=num_workers
        )
    else:
        generator = torch.Generator().manual_seed(seed)
        train_loader = DataLoader(
            train, batch_size=batch_size, shuffle=True, generator=generator,
            drop_last=len(train) % batch_size == 1, num_workers=num_workers,
        )
    test_loader = DataLoader(test, batch_size=batch_size, shuffle=False, num_workers=num_workers)
    return train_loader, test_loader
