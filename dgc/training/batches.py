"""Per-rank batches in ``DistributedSampler`` order that can resume in the middle of an epoch."""

from __future__ import annotations

from collections.abc import Iterator

import torch
from torch import Tensor
from torch.utils.data import DistributedSampler

__all__ = ["ShardedBatches"]


class ShardedBatches:
    """The index batches one rank trains on, epoch by epoch.

    The order is ``DistributedSampler``'s (shuffled with ``seed + epoch``, every rank a disjoint
    shard, ``drop_last`` so every rank takes the same number of steps), cut into batches of
    ``batch_size``; an incomplete last batch is dropped for the same reason.  ``epoch(e, start=b)``
    skips the first ``b`` batches, which is how a resumed run picks up where it stopped.
    """

    def __init__(self, num_samples: int, *, batch_size: int, rank: int, world_size: int,
                 seed: int, shuffle: bool = True) -> None:
        self.batch_size = batch_size
        self.sampler = DistributedSampler(range(num_samples), num_replicas=world_size, rank=rank,
                                          shuffle=shuffle, seed=seed, drop_last=True)
        if len(self) == 0:
            raise ValueError(
                f"train.batch_size = {batch_size} is too large: each of the {world_size} ranks "
                f"gets {len(self.sampler)} of the {num_samples} training samples, not one full "
                "batch. Lower train.batch_size or use fewer ranks."
            )

    def __len__(self) -> int:
        return len(self.sampler) // self.batch_size

    def epoch(self, epoch: int, start: int = 0) -> Iterator[Tensor]:
        """Index batches of ``epoch``, from batch ``start`` on."""
        self.sampler.set_epoch(epoch)
        order = torch.tensor(list(self.sampler), dtype=torch.long)
        for b in range(start, len(self)):
            yield order[b * self.batch_size : (b + 1) * self.batch_size]
