"""Deterministic, resumable, sharded batch order.

Epoch e visits a permutation of the dataset seeded by (seed, e); its global batches are
consecutive slices of ``global_micro`` indices (last partial batch dropped), and process r takes
rows [r·B, (r+1)·B) of each. The position is (epoch, batch): saving it in a checkpoint and
starting from it reproduces exactly the batches an uninterrupted run would have seen.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Iterator

import torch
from torch.utils.data import DataLoader, Sampler

from sra.errors import SraError

SEED_STRIDE = 1_000_003  # separates per-epoch permutation seeds


@dataclass
class Position:
    epoch: int = 0
    batch: int = 0  # next global micro-batch index within the epoch


class ShardedBatchSampler(Sampler[list[int]]):
    """Yields this process's index lists forever, starting at ``start``; ``position`` tracks it."""

    def __init__(self, n: int, per_process: int, rank: int, world: int, seed: int,
                 start: Position | None = None):
        self.n, self.per_process, self.rank, self.world, self.seed = n, per_process, rank, world, seed
        self.global_micro = per_process * world
        self.batches_per_epoch = n // self.global_micro
        if self.batches_per_epoch < 1:
            raise SraError(
                f"the dataset has {n} samples, fewer than one global micro-batch "
                f"({self.global_micro}); lower the batch size"
            )
        self.position = Position(**vars(start)) if start else Position()

    def __len__(self) -> int:  # batches per epoch (the sampler itself is infinite)
        return self.batches_per_epoch

    def _perm(self, epoch: int) -> torch.Tensor:
        g = torch.Generator().manual_seed(self.seed * SEED_STRIDE + epoch)
        return torch.randperm(self.n, generator=g)

    def _rows(self, perm: torch.Tensor, batch: int) -> list[int]:
        lo = batch * self.global_micro + self.rank * self.per_process
        return perm[lo: lo + self.per_process].tolist()

    def indices_at(self, position: Position) -> list[int]:
        """This process's dataset indices of the global micro-batch at ``position`` (e.g. the
        failing batch of a non-finite step). ``self.position`` runs ahead of training (the
        DataLoader prefetches), so callers pass the position they counted themselves."""
        return self._rows(self._perm(position.epoch), position.batch)

    def __iter__(self) -> Iterator[list[int]]:
        while True:
            perm = self._perm(self.position.epoch)
            while self.position.batch < self.batches_per_epoch:
                batch = self.position.batch
                self.position.batch += 1
                yield self._rows(perm, batch)
            self.position = Position(self.position.epoch + 1, 0)


def advance(start: Position, k: int, batches_per_epoch: int) -> Position:
    """The position ``k`` global micro-batches after ``start``."""
    flat = start.epoch * batches_per_epoch + start.batch + k
    return Position(*divmod(flat, batches_per_epoch))


def make_loader(dataset, sampler: ShardedBatchSampler, num_workers: int,
                device: torch.device) -> DataLoader:
    """The training DataLoader over ``sampler``'s batches."""
    return DataLoader(
        dataset, batch_sampler=sampler, num_workers=num_workers,
        pin_memory=device.type == "cuda", persistent_workers=num_workers > 0,
        # Own generator: creating loader iterators must not consume the global RNG stream.
        generator=torch.Generator(),
    )
