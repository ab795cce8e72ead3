"""The stream adapter: Avalanche experiences -> fast batches on the training device.

An experience's images are gathered once from the scenario's uint8 :class:`ImageSource` by the
experience dataset's ``sample_id`` attribute and kept on the device as uint8 when they fit
(CIFAR-100 train is 150 MB). Batches are index slices of a device-side permutation; resizing,
augmentation (random translation, horizontal flip) and normalisation run batched on the device
in one ``grid_sample``/``interpolate`` call. Nothing here synchronises with the host.

An experience larger than the host memory budget (``RunConfig.host_memory_gb``: real image
folders, memory-mapped by :mod:`cl_bench.image_cache`) is not copied: it is *streamed*, each
batch's rows read from the memory map one or two batches ahead in a background thread (into
pinned buffers for a CUDA device). Its batches are exactly the resident path's.
"""

from __future__ import annotations

import math
from collections import deque
from collections.abc import Generator, Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F

from cl_bench.scenario import ImageSource, ShardedImages

RESIDENT_FRACTION = 0.25  # keep an experience on the GPU when it takes under this share of free memory
CROP_PAD_FRACTION = 4 / 32  # random translation of up to 4 px at 32 px, as the CIFAR pad-and-crop
PREFETCH = 2  # batches a streamed experience reads ahead of the one being trained on


def sample_ids(experience: Any) -> torch.Tensor:
    """Indices into the scenario's ImageSource of the samples of an Avalanche experience."""
    try:
        ids = experience.dataset.sample_id
    except AttributeError:
        raise ValueError(
            "experience dataset carries no 'sample_id' attribute (build it with scenarios.common)"
        ) from None
    return torch.as_tensor(list(ids), dtype=torch.long)


class StreamedRows:
    """An experience's rows ``ids`` of a (memory-mapped) source, read only when indexed:
    ``rows[idx]`` is ``source[ids[idx]]`` as a host uint8 tensor. Stands in for the gathered
    images of a streamed :class:`ExperienceData`."""

    def __init__(self, source: torch.Tensor | ShardedImages, ids: torch.Tensor) -> None:
        self.source = source
        self.ids = ids.cpu()
        self.shape = torch.Size([len(self.ids), *source.shape[1:]])
        self.device = torch.device("cpu")  # where batch orders of a streamed experience live

    def __len__(self) -> int:
        return int(self.shape[0])

    def numel(self) -> int:
        return self.shape.numel()

    def __getitem__(self, idx: torch.Tensor) -> torch.Tensor:
        return self.source[self.ids[idx]]

    def read(self, idx: torch.Tensor, pin: bool) -> torch.Tensor:
        """The rows ``idx``; in a pinned buffer when ``pin`` (so a non-blocking copy to the GPU
        overlaps compute). Buffers come from torch's caching host allocator, which reuses one
        only after the copies that read it have finished."""
        rows = self[idx]
        if not pin:
            return rows
        pinned = torch.empty(rows.shape, dtype=rows.dtype, pin_memory=True)
        return pinned.copy_(rows)


@dataclass
class ExperienceData:
    """One experience's samples as uint8 images and int64 targets (on the device when
    resident; :class:`StreamedRows` of the memory-mapped source when streamed)."""

    images: torch.Tensor | StreamedRows
    targets: torch.Tensor
    device: torch.device

    @classmethod
    def gather(
        cls,
        source: ImageSource,
        ids: torch.Tensor,
        device: torch.device,
        *,
        budget_bytes: int | None = None,
    ) -> ExperienceData:
        """The samples ``ids`` of ``source``: copied to the device (or pinned host memory), or,
        when their images take more than ``budget_bytes`` of host memory, streamed from the
        source in :meth:`batches` (None: never streamed)."""
        targets = source.targets[ids].to(device)
        per_image = math.prod(source.images.shape[1:])
        if budget_bytes is not None and len(ids) * per_image > budget_bytes:
            return cls(images=StreamedRows(source.images, ids), targets=targets, device=device)
        images = source.images[ids]
        if device.type == "cuda":
            free, _ = torch.cuda.mem_get_info(device)
            if images.numel() < RESIDENT_FRACTION * free:
                images = images.to(device, non_blocking=True)
            else:
                images = images.pin_memory()
        return cls(images=images, targets=targets, device=device)

    def subset(self, rows: torch.Tensor) -> ExperienceData:
        """The samples ``rows`` (positions in this experience) alone: a federated client's share.
        A streamed experience stays streamed (its source rows are picked, nothing is read)."""
        if isinstance(self.images, StreamedRows):
            images: torch.Tensor | StreamedRows = StreamedRows(
                self.images.source, self.images.ids[rows.cpu()]
            )
        else:
            images = self.images[rows.to(self.images.device)]
        return ExperienceData(
            images=images, targets=self.targets[rows.to(self.targets.device)], device=self.device
        )

    @property
    def streamed(self) -> bool:
        """True: the images stay in their (memory-mapped) source and are read batch by batch."""
        return isinstance(self.images, StreamedRows)

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
    ) -> Generator[tuple[torch.Tensor, torch.Tensor], None, None]:
        """Yield (uint8 images on the device, targets); ``n_steps`` cycles through epochs.

        ``cursor`` (optional) is kept up to date as batches are yielded, so a checkpoint can save
        where the stream is; a cursor restored from one continues the same epoch's order at the
        same place, drawing nothing new from ``generator``. Streamed or resident, the batches
        and the draws from ``generator`` are the same."""
        cursor = cursor if cursor is not None else BatchCursor(self.images.device)
        orders = self._orders(batch_size, shuffle, generator, n_steps, cursor)
        if isinstance(self.images, StreamedRows):
            yield from self._streamed(self.images, orders, batch_size, n_steps, cursor)
            return
        for idx in orders:
            x = self.images[idx].to(self.device, non_blocking=True)
            yield x, self.targets[idx.to(self.targets.device)]

    def _total(self, batch_size: int, n_steps: int | None) -> int:
        return n_steps if n_steps is not None else self.n_batches(batch_size)

    def _orders(
        self,
        batch_size: int,
        shuffle: bool,
        generator: torch.Generator | None,
        n_steps: int | None,
        cursor: BatchCursor,
    ) -> Iterator[torch.Tensor]:
        """The sample indices of each batch, advancing ``cursor`` before each is yielded; a new
        epoch's order is drawn when its first batch is asked for, never earlier."""
        n = len(self)
        total = self._total(batch_size, n_steps)
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
                yield idx
            if cursor.start >= n:
                cursor.order = None

    def _streamed(
        self,
        rows: StreamedRows,
        orders: Iterator[torch.Tensor],
        batch_size: int,
        n_steps: int | None,
        cursor: BatchCursor,
    ) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """The batches of ``orders`` read by a background thread up to :data:`PREFETCH` batches
        ahead. Only batches of the current epoch are read ahead (their indices are known from
        ``cursor``), so the next epoch's order is drawn at the same moment as when resident."""
        n, total = len(self), self._total(batch_size, n_steps)
        pin = self.device.type == "cuda"
        ahead: deque[tuple[int, Future[torch.Tensor]]] = deque()  # (batch number, its rows)
        with ThreadPoolExecutor(1, thread_name_prefix="cl-bench-stream") as reader:
            try:
                for idx in orders:
                    number = cursor.done - 1
                    if ahead and ahead[0][0] == number:
                        rows_now = ahead.popleft()[1]
                    else:
                        ahead.clear()
                        rows_now = reader.submit(rows.read, idx, pin)
                    assert cursor.order is not None
                    queued = ahead[-1][0] if ahead else number
                    while queued < number + PREFETCH and queued + 1 < total:
                        start = cursor.start + (queued - number) * batch_size
                        if start >= n:
                            break
                        queued += 1
                        ahead.append(
                            (queued, reader.submit(rows.read, cursor.order[start : start + batch_size], pin))
                        )
                    x = rows_now.result().to(self.device, non_blocking=True)
                    yield x, self.targets[idx.to(self.targets.device)]
            finally:
                for _, future in ahead:
                    future.cancel()


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
