"""Batches as slices of tensors in memory: a (seed, epoch) permutation each epoch, a shard per process, resumable."""

from collections.abc import Iterator
from math import ceil

import numpy as np
import torch

from cnnlab import UserError


class TensorBatches:
    """Batches as slices of tensors already in memory: one random permutation per epoch, no per-sample work.

    The epoch's order comes from a generator of its own, seeded by (seed, epoch), as torch's DistributedSampler
    seeds its own: every process of a multi-process run draws the same order whatever else draws random numbers,
    and a checkpoint need not carry it. Its state (the epoch, how many batches were served) goes into Lightning's
    checkpoints, so a run stopped mid-epoch resumes at the next batch of the same order (cnnlab.resume).

    Several processes (DDP): process `rank` takes its shard of the order, rank::world_size. Training shards are
    cut to one length (DDP needs as many steps on each process; the few images left over differ each epoch);
    evaluation shards (`drop_uneven=False`) keep every image, so that the metrics, summed over the processes by
    torchmetrics, are those of the whole split. Lightning shards only DataLoaders: these batches do it themselves.
    """

    def __init__(
        self,
        images: torch.Tensor,
        labels: torch.Tensor,
        batch_size: int,
        shuffle: bool,
        seed: int = 0,
        rank: int = 0,
        world_size: int = 1,
        drop_uneven: bool = True,
    ):
        self.images, self.labels, self.batch_size, self.shuffle, self.seed = images, labels, batch_size, shuffle, seed
        self.rank, self.world_size, self.drop_uneven = rank, world_size, drop_uneven
        # Lightning reads a loader's `sampler` / `batch_sampler` as it would a DataLoader's, and calls
        # `sampler.set_epoch(n)` before each epoch (as for a DistributedSampler): so the batches know their epoch.
        self.sampler, self.batch_sampler = self, None
        self.epoch = 0
        self.served = 0  # batches of this epoch served so far
        self.resume_at: tuple | None = None  # (epoch, batches served, its order if stored) of a mid-epoch checkpoint

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return ceil(self.shard_size / self.batch_size)

    @property
    def shard_size(self) -> int:
        n = len(self.labels)
        return n // self.world_size if self.drop_uneven else len(range(self.rank, n, self.world_size))

    def order(self, epoch: int) -> torch.Tensor:
        """The order of the images in `epoch`: the same on every process, for every run with this seed."""
        n = len(self.labels)
        if not self.shuffle:
            return torch.arange(n)
        # Independent streams for each (seed, epoch) pair (seed + epoch, as DistributedSampler has it, would give
        # seed 1 the orders of seed 0 shifted by an epoch).
        (state,) = np.random.SeedSequence([self.seed, epoch]).generate_state(1, np.uint64)
        return torch.randperm(n, generator=torch.Generator().manual_seed(int(state)))

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        resume, self.resume_at = self.resume_at, None
        if resume is None or resume[0] != self.epoch:
            resume = (self.epoch, 0, None)
        _, self.served, order = resume
        order = self.order(self.epoch) if order is None else order
        # On the data's device: a GPU-resident set is indexed on the GPU (one small copy of the order an epoch).
        shard = order[self.rank :: self.world_size][: self.shard_size].to(self.images.device)
        while self.served < len(self):
            index = shard[self.served * self.batch_size : (self.served + 1) * self.batch_size]
            self.served += 1
            # index_select: a plain gather of whole rows (indexing with [index] takes PyTorch's general, slower
            # advanced-indexing path)
            yield self.images.index_select(0, index), self.labels.index_select(0, index)

    def state_dict(self) -> dict:
        return {"epoch": self.epoch, "served": self.served, "batch_size": self.batch_size, "seed": self.seed,
                "images": len(self.labels), "world_size": self.world_size}  # fmt: skip

    def load_state_dict(self, state: dict) -> None:
        """Resume mid-epoch: the next epoch starts at the checkpoint's next batch if it is the checkpoint's own
        epoch (Lightning may have ended that one early, with limit_train_batches). Mid-epoch needs the same images,
        batches, seed and number of processes, or the rest of its epoch would not be the rest of the same order."""
        ours = {"images": len(self.labels), "batch_size": self.batch_size, "seed": self.seed,
                "world_size": self.world_size}  # fmt: skip
        theirs = {key: state.get(key, ours[key]) for key in ours}  # older checkpoints name fewer
        if "order" in state:  # written when checkpoints carried the order (before it came from (seed, epoch))
            theirs["images"] = len(state["order"])
        batches = ceil(theirs["images"] // theirs["world_size"] / theirs["batch_size"])
        if not 0 < state["served"] < batches:
            return
        if theirs != ours:
            differ = ", ".join(f"{key} {theirs[key]} (here {ours[key]})" for key in ours if theirs[key] != ours[key])
            raise UserError(
                f"the checkpoint was taken mid-epoch with {differ}: resume it with the same data.root, data.val_size, "
                f"data.batch_size, seed and number of processes (trainer.devices × trainer.num_nodes), or from a "
                f"checkpoint taken at an epoch's end"
            )
        self.resume_at = (state["epoch"], state["served"], state.get("order"))
