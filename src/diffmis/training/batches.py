"""Data order: a permutation per epoch from (seed, epoch), sharded over ranks, resumable mid-epoch.

Each item is drawn with RNGs seeded from (seed, epoch, index), so augmentation is reproducible and an interrupted
epoch resumes with the same augmented samples; :class:`Batches` records its position (epoch, batch in epoch) for
checkpoints.
"""

from __future__ import annotations

import random
from typing import Any, Iterator, Optional, Sequence

import numpy as np
import torch

from diffmis.errors import DataError

__all__ = ["Batches", "collate", "epoch_batches"]


class _SeededItems(torch.utils.data.Dataset):
    """Items drawn under RNGs seeded from (seed, epoch, index); the caller's RNG states are restored."""

    def __init__(self, base: torch.utils.data.Dataset, seed: int, epoch: int) -> None:
        self.base, self.seed, self.epoch = base, seed, epoch

    def __len__(self) -> int:
        return len(self.base)  # type: ignore[arg-type]

    def __getitem__(self, i: int) -> Any:
        s = (self.seed * 1_000_003 + self.epoch * 10_007 + int(i)) % (2**31)
        np_state, py_state = np.random.get_state(), random.getstate()
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(s)
            np.random.seed(s)
            random.seed(s)
            if hasattr(self.base, "set_item_seed"):
                self.base.set_item_seed(s)
            try:
                return self.base[i]
            finally:
                np.random.set_state(np_state)
                random.setstate(py_state)


def epoch_batches(n: int, batch: int, seed: int, epoch: int, rank: int, world: int) -> list[list[int]]:
    """Index batches of one epoch for ``rank`` of ``world``: a seeded permutation, an equal share per rank,
    full batches only."""
    g = torch.Generator().manual_seed(seed * 7919 + epoch)
    order = torch.randperm(n, generator=g).tolist()
    per_rank = n // world
    mine = order[rank * per_rank:(rank + 1) * per_rank]
    nb = len(mine) // batch
    return [mine[j * batch:(j + 1) * batch] for j in range(nb)]


def collate(items: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """Stack tensor / array fields of dataset items into a batch; other fields become lists."""
    out: dict[str, Any] = {}
    for key in items[0]:
        vals = [it[key] for it in items]
        out[key] = torch.stack([torch.as_tensor(v) for v in vals]) if isinstance(vals[0], (torch.Tensor, np.ndarray)) \
            else vals
    return out


class Batches:
    """Infinite iterator of training batches with its position (``epoch``, ``batch_in_epoch``) for checkpoints.

    Raises:
        DataError: the split has fewer samples per rank than one batch.
    """

    def __init__(self, ds: Any, batch: int, seed: int, rank: int, world: int, workers: int,
                 epoch: int = 0, batch_in_epoch: int = 0, pin_memory: bool = False) -> None:
        self.ds, self.batch, self.seed, self.rank, self.world, self.workers = ds, batch, seed, rank, world, workers
        self.pin_memory = pin_memory
        self.epoch, self.batch_in_epoch = epoch, batch_in_epoch
        if len(ds) // world < batch:
            raise DataError(f"the training split has {len(ds)} samples: fewer than batch_size={batch} per rank "
                            f"(x {world} ranks); lower train.batch_size")
        self._it: Optional[Iterator] = None

    def _start_epoch(self) -> None:
        batches = epoch_batches(len(self.ds), self.batch, self.seed, self.epoch, self.rank, self.world)
        loader = torch.utils.data.DataLoader(
            _SeededItems(self.ds, self.seed, self.epoch), batch_sampler=batches[self.batch_in_epoch:],
            num_workers=self.workers, collate_fn=collate, persistent_workers=False, pin_memory=self.pin_memory)
        self._it = iter(loader)

    def __iter__(self) -> "Batches":
        return self

    def __next__(self) -> dict[str, Any]:
        while True:
            if self._it is None:
                self._start_epoch()
            try:
                b = next(self._it)  # type: ignore[arg-type]
                self.batch_in_epoch += 1
                return b
            except StopIteration:
                self._it = None
                self.epoch += 1
                self.batch_in_epoch = 0
