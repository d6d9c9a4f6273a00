"""Batches for the classification harness: fixed-shape, seeded, shardable batches of decoded images.

BatchLoader turns a data.ImageSplit (uint8 images in one ragged buffer) into (normalised float32 images, labels)
batches: FGVC's random crop + flip (or the centre crop) is one index gather on the device (gather_crops), every
batch has the same shape (padding rows carry PAD_LABEL), evaluation shards are contiguous per rank
(shard_range). StreamedBatchLoader gives the same batches for a data.StreamedSplit, chunk by chunk.
"""
from __future__ import annotations

import hashlib
import math

import torch

from harness.data.datasets import IMAGE_SIZE, ImageSplit, StreamedSplit, imagenet_normalize

PAD_LABEL = -100  # F.cross_entropy's default ignore_index: padded rows leave the mean loss unchanged


def shard_range(n: int, rank: int, world_size: int) -> tuple[int, int]:
    """Contiguous eval shard [start, stop) of rank: no padding, shards cover 0..n-1 exactly once."""
    return n * rank // world_size, n * (rank + 1) // world_size


def _epoch_seed(seed: int, epoch: int) -> int:
    """Generator seed for (seed, epoch); hashing avoids seed+epoch collisions such as (42, 1) == (43, 0)."""
    return int.from_bytes(hashlib.sha256(f"{seed}:{epoch}".encode()).digest()[:8], "little") >> 1


class BatchLoader:
    """(float32 normalized images [B, 3, crop, crop], int64 labels [B]) batches from an ImageSplit.

    Every batch has exactly batch_size rows; in the last one, rows past the real samples repeat real
    samples' images and carry PAD_LABEL. No sample is dropped.
    train=True: a fresh shuffle each epoch (call set_epoch), a pure function of (seed, epoch); ranks
    take strided slices of the permutation padded by wrapping, like torch's DistributedSampler
    (drop_last=False), so every rank has the same count. augment=True (FGVC train): RandomCrop with
    offsets uniform over each image's own extent + horizontal flip (p=0.5), drawn from the same
    generator. Otherwise: CenterCrop. train=False: contiguous unpadded shards (see shard_range).
    Crops are one index gather into the uint8 pixels on their device. Images stay on the host (each
    batch's crops moved with non_blocking, pinned for CUDA) unless images_on_device=True.
    """

    def __init__(self, split: ImageSplit, batch_size: int, *, train: bool, augment: bool = False,
                 crop_size: int = IMAGE_SIZE, seed: int = 42, rank: int = 0, world_size: int = 1,
                 device: str | torch.device | None = None, images_on_device: bool = False):
        if augment and not train:
            raise ValueError("augment applies to training batches only")
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} outside world_size {world_size}")
        if batch_size < 1 or len(split) == 0:
            raise ValueError(f"need batch_size >= 1 and a non-empty split, got {batch_size} and {len(split)}")
        if split.pixels.dtype != torch.uint8 or int(split.sizes.min()) < crop_size:
            raise ValueError(f"expected uint8 pixels and images of at least {crop_size}x{crop_size} "
                             f"(smallest side here: {int(split.sizes.min())})")
        self.split = split
        self.device = torch.device(device) if device is not None else torch.device("cpu")
        self.images_on_device = images_on_device
        self.pixels = split.pixels.to(self.device) if images_on_device else split.pixels
        self.batch_size, self.train, self.augment, self.crop_size = batch_size, train, augment, crop_size
        self.seed, self.rank, self.world_size = seed, rank, world_size
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        """Select the epoch whose shuffle/augmentation the next iteration uses."""
        self.epoch = epoch

    @property
    def num_samples(self) -> int:
        """Real samples this rank visits per epoch (train: DistributedSampler's padded share)."""
        n = len(self.split)
        if self.train:
            return math.ceil(n / self.world_size)
        start, stop = shard_range(n, self.rank, self.world_size)
        return stop - start

    def __len__(self) -> int:
        return math.ceil(self.num_samples / self.batch_size)

    def sample_indices(self, epoch: int | None = None) -> torch.Tensor:
        """Dataset indices this rank visits, in batch order, without the padding rows."""
        return self._plan(self.epoch if epoch is None else epoch)[0]

    def sample_crops(self, epoch: int | None = None) -> torch.Tensor:
        """int64 [num_samples, 3] (top, left, flip) of each sample in sample_indices' order."""
        return self._plan(self.epoch if epoch is None else epoch)[1]

    def _plan(self, epoch: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(indices [M], crops [M, 3]) of this rank for an epoch, CPU tensors."""
        n = len(self.split)
        if not self.train:
            indices = torch.arange(*shard_range(n, self.rank, self.world_size))
            return indices, self._center_crops(indices)
        generator = torch.Generator().manual_seed(_epoch_seed(self.seed, epoch))
        total = math.ceil(n / self.world_size) * self.world_size
        order = torch.randperm(n, generator=generator).repeat(math.ceil(total / n))[:total]
        crops = self._random_crops(order, generator) if self.augment else self._center_crops(order)
        return order[self.rank::self.world_size], crops[self.rank::self.world_size]

    def _center_crops(self, indices: torch.Tensor) -> torch.Tensor:
        """torchvision CenterCrop offsets int(round((size - crop) / 2)); torch.round, like Python's
        round, rounds halves to even."""
        margins = (self.split.sizes[indices] - self.crop_size).double()
        no_flip = torch.zeros(len(indices), 1, dtype=torch.int64)
        return torch.cat([torch.round(margins / 2).long(), no_flip], dim=1)

    def _random_crops(self, indices: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        """RandomCrop: top in 0..h-crop and left in 0..w-crop uniformly per image; flip with p=0.5."""
        choices = self.split.sizes[indices] - self.crop_size + 1  # [T, 2] possible offsets per axis
        uniform = torch.rand(len(indices), 2, generator=generator, dtype=torch.float64)
        top_left = torch.minimum((uniform * choices).long(), choices - 1)  # min: float rounding guard
        flip = (torch.rand(len(indices), 1, generator=generator) < 0.5).long()
        return torch.cat([top_left, flip], dim=1)

    def __iter__(self):
        indices, crops = self._plan(self.epoch)
        rows = len(self) * self.batch_size
        if rows == 0:  # an eval shard can be empty when there are more ranks than images
            return
        # padding rows repeat this rank's real samples from the start
        indices, crops = indices[torch.arange(rows) % len(indices)], crops[torch.arange(rows) % len(indices)]
        labels = self.split.labels[indices].masked_fill(torch.arange(rows) >= self.num_samples, PAD_LABEL)
        widths = self.split.sizes[indices, 1]
        starts = self.split.offsets[indices] + crops[:, 0] * widths + crops[:, 1]  # crop's top-left pixel
        # non_blocking: these small per-epoch copies must not synchronize the device either
        gather = torch.stack([starts, widths, crops[:, 2]], dim=1).to(self.pixels.device, non_blocking=True)
        labels = labels.to(self.device, non_blocking=True)
        for start in range(0, rows, self.batch_size):
            batch = gather[start:start + self.batch_size]
            images = gather_crops(self.pixels, batch[:, 0], batch[:, 1], batch[:, 2], self.crop_size)
            yield imagenet_normalize(self._to_device(images)), labels[start:start + self.batch_size]

    def _to_device(self, images: torch.Tensor) -> torch.Tensor:
        if images.device == self.device:
            return images
        if self.device.type == "cuda":
            images = images.pin_memory()  # pinned source makes the copy truly asynchronous
        return images.to(self.device, non_blocking=True)


def gather_crops(pixels: torch.Tensor, starts: torch.Tensor, widths: torch.Tensor, flips: torch.Tensor,
                 crop: int) -> torch.Tensor:
    """uint8 [B, 3, crop, crop] crops of ragged images as one index gather on pixels' device.

    Pixel (y, x) of crop b is pixels[starts[b] + y * widths[b] + x], with x -> crop - 1 - x where
    flips[b] == 1 (horizontal flip); starts[b] is the crop's top-left pixel, widths[b] its image's width.
    """
    steps = torch.arange(crop, device=pixels.device)
    columns = torch.where(flips[:, None] == 1, crop - 1 - steps, steps)  # [B, crop]
    rows = starts[:, None] + steps * widths[:, None]  # [B, crop]
    index = rows[:, :, None] + columns[:, None, :]  # [B, crop, crop]
    crops = pixels.index_select(0, index.flatten()).view(len(starts), crop, crop, 3)
    return crops.permute(0, 3, 1, 2).contiguous()


class StreamedBatchLoader:
    """Evaluation batches of a StreamedSplit, as BatchLoader(train=False) gives them for the decoded split:
    this rank's contiguous shard (shard_range), chunk by chunk, every batch full size (padding rows carry
    PAD_LABEL). With a chunk size that is a multiple of batch_size, only the shard's last batch is padded."""

    def __init__(self, split: StreamedSplit, batch_size: int, *, crop_size: int = IMAGE_SIZE, rank: int = 0,
                 world_size: int = 1, device: str | torch.device | None = None, **unused):
        self.split, self.batch_size, self.crop_size, self.device = split, batch_size, crop_size, device
        self.start, self.stop = shard_range(len(split), rank, world_size)

    def set_epoch(self, epoch: int) -> None:
        pass

    def __len__(self) -> int:
        return sum(math.ceil(min(self.split.chunk, self.stop - a) / self.batch_size)
                   for a in range(self.start, self.stop, self.split.chunk))

    def __iter__(self):
        for part in self.split.chunks(self.start, self.stop):
            yield from BatchLoader(part, self.batch_size, train=False, crop_size=self.crop_size, device=self.device)
