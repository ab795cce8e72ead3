"""The stream adapter: Avalanche experiences -> fast batches on the training device.

An experience's images are gathered once from the scenario's uint8 :class:`ImageSource` by the
experience dataset's ``sample_id`` attribute and kept on the device as uint8 when they fit
(CIFAR-100 train is 150 MB). Batches are index slices of a device-side permutation; resizing,
augmentation (random translation, horizontal flip) and normalisation run batched on the device
in one ``grid_sample``/``interpolate`` call. Nothing here synchronises with the host.
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F

from cl_bench.scenario import ImageSource

RESIDENT_FRACTION = 0.25  # keep an experience on the GPU when it takes under this share of free memory
CROP_PAD_FRACTION = 4 / 32  # random translation of up to 4 px at 32 px, as the CIFAR pad-and-crop


def sample_ids(experience: Any) -> torch.Tensor:
    """Indices into the scenario's ImageSource of the samples of an Avalanche experience."""
    try:
        ids = experience.dataset.sample_id
    except AttributeError:
        raise ValueError(
            "experience dataset carries no 'sample_id' attribute (build it with scenarios.common)"
        ) from None
    return torch.as_tensor(list(ids), dtype=torch.long)


@dataclass
class ExperienceData:
    """One experience's samples as uint8 images and int64 targets (on the device when resident)."""

    images: torch.Tensor
    targets: torch.Tensor
    device: torch.device

    @classmethod
    def gather(cls, source: ImageSource, ids: torch.Tensor, device: torch.device) -> ExperienceData:
        images = source.images[ids]
        targets = source.targets[ids].to(device)
        if device.type == "cuda":
            free, _ = torch.cuda.mem_get_info(device)
            if images.numel() < RESIDENT_FRACTION * free:
                images = images.to(device, non_blocking=True)
            else:
                images = images.pin_memory()
        return cls(images=images, targets=targets, device=device)

    def __len__(self) -> int:
        return int(self.targets.shape[0])

    def n_batches(self, batch_size: int) -> int:
        return math.ceil(len(self) / batch_size)

    def batches(
        self,
        batch_size: int,
        *,
        shuffle: bool,
        generator: torch.Generator | None = None,
        n_steps: int | None = None,
        cursor: BatchCursor | None = None,
    ) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """Yield (uint8 images on the device, targets); ``n_steps`` cycles through epochs.

        ``cursor`` (optional) is kept up to date as batches are yielded, so a checkpoint can save
        where the stream is; a cursor restored from one continues the same epoch's order at the
        same place, drawing nothing new from ``generator``."""
        n = len(self)
        total = n_steps if n_steps is not None else self.n_batches(batch_size)
        cursor = cursor if cursor is not None else BatchCursor(self.images.device)
        while cursor.done < total:
            if cursor.order is None:
                if shuffle:
                    order = torch.randperm(
                        n, generator=generator, device=generator.device if generator else "cpu"
                    )
                    cursor.order = order.to(self.images.device)
                else:
                    cursor.order = torch.arange(n, device=self.images.device)
                cursor.start = 0
            order = cursor.order
            while cursor.start < n and cursor.done < total:
                idx = order[cursor.start : cursor.start + batch_size]
                cursor.start += batch_size
                cursor.done += 1
                x = self.images[idx].to(self.device, non_blocking=True)
                yield x, self.targets[idx.to(self.targets.device)]
            if cursor.start >= n:
                cursor.order = None


@dataclass
class BatchCursor:
    """Where :meth:`ExperienceData.batches` is: the current epoch's sample order (None: the next
    batch starts a new epoch), the start of the next batch in it and the batches yielded so far."""

    device: torch.device
    order: torch.Tensor | None = None
    start: int = 0
    done: int = 0


class Preprocess:
    """uint8 [B, 3, h, w] -> normalized float [B, 3, S, S], with optional training augmentation."""

    def __init__(
        self,
        image_size: int,
        mean: Sequence[float],
        std: Sequence[float],
        device: torch.device,
        augmentations: Sequence[str] = (),
    ) -> None:
        unknown = set(augmentations) - {"crop", "flip"}
        if unknown:
            raise ValueError(f"unknown augmentation(s) {sorted(unknown)}; valid: crop, flip")
        self.size = image_size
        self.mean = torch.tensor(mean, device=device).view(1, 3, 1, 1)
        self.std = torch.tensor(std, device=device).view(1, 3, 1, 1)
        self.augmentations = tuple(augmentations)

    def __call__(
        self, images: torch.Tensor, *, train: bool, generator: torch.Generator | None = None
    ) -> torch.Tensor:
        x = images.float().div_(255.0)
        if train and self.augmentations:
            x = self._augment(x, generator)
        elif x.shape[-1] != self.size or x.shape[-2] != self.size:
            x = F.interpolate(x, size=(self.size, self.size), mode="bilinear", align_corners=False)
        return (x - self.mean) / self.std

    def _augment(self, x: torch.Tensor, generator: torch.Generator | None) -> torch.Tensor:
        """Random translation (zero fill) and flip, fused with the resize in one grid_sample."""
        batch = x.shape[0]
        theta = torch.zeros(batch, 2, 3, device=x.device)
        theta[:, 0, 0] = 1.0
        theta[:, 1, 1] = 1.0
        if "flip" in self.augmentations:
            flip = torch.rand(batch, device=x.device, generator=generator) < 0.5
            theta[:, 0, 0] = torch.where(flip, -1.0, 1.0)
        if "crop" in self.augmentations:
            shift = torch.rand(batch, 2, device=x.device, generator=generator) * 2 - 1
            # grid coordinates span [-1, 1] over the image, so a shift of p pixels is 2p/size
            theta[:, :, 2] = shift * (2 * CROP_PAD_FRACTION)
        grid = F.affine_grid(theta, [batch, 3, self.size, self.size], align_corners=False)
        return F.grid_sample(x, grid, mode="bilinear", padding_mode="zeros", align_corners=False)
