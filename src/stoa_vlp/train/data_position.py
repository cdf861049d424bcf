"""Exactly resumable data order: a sampler that knows its epoch and position, and per-sample seeds.

The sampler cuts each epoch's permutation into global batches of `batch_size * world_size` samples;
rank r takes the r-th block of `batch_size` from each, so the rows of one global batch, gathered in
rank order, are the rows a single rank would see with the whole batch. It yields
`(dataset index, sample seed)` pairs. `SeededDataset` seeds torch, numpy and `random` from the
sample seed around each `dataset[index]`, so random frame sampling and augmentation depend on
(seed, epoch, index) only: not on the worker that loads the sample, nor on where a run was resumed.
"""

from __future__ import annotations

import random
from typing import Iterator

import numpy as np
import torch
from torch.utils.data import Dataset, Sampler


_SAMPLE, _ORDER, _WORKER, _LOADER, _RANK = range(5)  # domain tags, so that seeds of different uses never collide


def derive_seed(*parts: int) -> int:
    """A 32-bit seed mixed from non-negative integers (numpy's SeedSequence)."""
    return int(np.random.SeedSequence(list(parts)).generate_state(1, dtype=np.uint32)[0])


def sample_seed(seed: int, epoch: int, index: int) -> int:
    return derive_seed(_SAMPLE, seed, epoch, index)


def worker_seed(seed: int, rank: int, epoch: int, worker_id: int) -> int:
    """The seed of DataLoader worker `worker_id` of `rank` in `epoch` (mixed from seed, rank, epoch and
    worker by `derive_seed`)."""
    return derive_seed(_WORKER, seed, rank, epoch, worker_id)


def loader_seed(seed: int, rank: int, epoch: int) -> int:
    """Seed of the DataLoader's own generator (so starting a loader never draws from the global RNG)."""
    return derive_seed(_LOADER, seed, rank, epoch)


def rank_seed(seed: int, rank: int, step: int = 0) -> int:
    """The seed of rank `rank`'s training draws (MLM positions, PLM starts, VTM negatives, dropout) from
    `step` on, for ranks after the first: rank 0 goes on with the generators `seed` started."""
    return derive_seed(_RANK, seed, rank, step)


def seed_everything(seed: int) -> None:
    """Seed torch (CPU and every GPU), numpy and `random`."""
    torch.manual_seed(seed)
    np.random.seed(seed)
    random.seed(seed)


class WorkerSeeder:
    """`worker_init_fn` that seeds each worker's torch, numpy and `random` from `worker_seed`."""

    def __init__(self, seed: int, rank: int, epoch: int):
        self.seed, self.rank, self.epoch = seed, rank, epoch

    def __call__(self, worker_id: int) -> None:
        seed_everything(worker_seed(self.seed, self.rank, self.epoch, worker_id))


class ResumableSampler(Sampler):
    def __init__(self, dataset_size: int | None, batch_size: int, rank: int, world_size: int, seed: int,
                 shuffle: bool = True):
        """`dataset_size` None: a stream of unknown length; the sampler then only counts the position."""
        self.global_batch = batch_size * world_size
        if dataset_size is not None and dataset_size < self.global_batch:
            raise ValueError(
                f"the training set has {dataset_size} samples, fewer than one global batch "
                f"(data.batch_size={batch_size} per rank x {world_size} ranks)"
            )
        self.dataset_size, self.batch_size = dataset_size, batch_size
        self.rank, self.seed, self.shuffle = rank, seed, shuffle
        # the last partial batch is dropped
        self.batches_per_epoch = dataset_size // self.global_batch if dataset_size is not None else 2**62
        self.epoch = 0
        self.start_batch = 0  # global batches of this epoch already consumed

    def set_position(self, epoch: int, start_batch: int) -> None:
        if not 0 <= start_batch <= self.batches_per_epoch:
            raise ValueError(f"data position {start_batch} is outside the epoch ({self.batches_per_epoch} batches)")
        self.epoch, self.start_batch = epoch, start_batch

    def epoch_order(self) -> torch.Tensor:
        if not self.shuffle:
            return torch.arange(self.dataset_size)
        generator = torch.Generator().manual_seed(derive_seed(_ORDER, self.seed, self.epoch))
        return torch.randperm(self.dataset_size, generator=generator)

    def __iter__(self) -> Iterator[tuple[int, int]]:
        order = self.epoch_order().tolist()
        for batch in range(self.start_batch, self.batches_per_epoch):
            first = batch * self.global_batch + self.rank * self.batch_size
            for index in order[first : first + self.batch_size]:
                yield index, sample_seed(self.seed, self.epoch, index)

    def __len__(self) -> int:
        return (self.batches_per_epoch - self.start_batch) * self.batch_size


class SeededDataset(Dataset):
    """Wraps a map-style dataset; `self[(index, seed)]` loads `dataset[index]` under that seed and
    leaves the caller's random state as it was."""

    def __init__(self, dataset: Dataset):
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, item: tuple[int, int]):
        index, seed = item
        numpy_state, python_state = np.random.get_state(), random.getstate()
        with torch.random.fork_rng(devices=[]):
            torch.default_generator.manual_seed(seed)  # not torch.manual_seed: it reseeds the GPUs too
            np.random.seed(seed)
            random.seed(seed)
            try:
                return self.dataset[index]
            finally:
                np.random.set_state(numpy_state)
                random.setstate(python_state)
