"""The Scenario abstraction: an Avalanche benchmark plus what Avalanche does not carry.

Scenario factories live in the top-level ``scenarios`` package (the only importer of
Avalanche besides this module's duck-typed use of its streams). The loop consumes
``train_stream`` and ``test_stream``; images come from in-memory :class:`ImageSource` tensors,
addressed by the ``sample_id`` attribute that every experience dataset carries.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

import torch
from torch.utils.data import Dataset

Protocol = Literal["class", "task"]


class ShardedImages:
    """Several uint8 image tensors [N_k, 3, H, W] (e.g. memory-mapped caches, one per domain)
    addressed as one [sum N_k, 3, H, W] array: ``images[ids]`` gathers the rows of ``ids`` (a
    1-D int64 tensor) from the shards they fall in, reading only those rows. Nothing is
    concatenated: a memory-mapped shard stays on disk until its rows are asked for."""

    def __init__(self, shards: Sequence[torch.Tensor]) -> None:
        if not shards:
            raise ValueError("ShardedImages needs at least one shard")
        shape = tuple(shards[0].shape[1:])
        for shard in shards:
            if shard.dtype != torch.uint8 or tuple(shard.shape[1:]) != shape:
                raise ValueError(f"every shard must be uint8 [N, {', '.join(map(str, shape))}]")
        self.shards = list(shards)
        self.starts = torch.tensor([0, *(len(s) for s in shards)]).cumsum(0)
        self.shape = torch.Size([int(self.starts[-1]), *shape])
        self.dtype = torch.uint8
        self.ndim = len(self.shape)

    def __len__(self) -> int:
        return int(self.shape[0])

    def contiguous(self) -> ShardedImages:
        return self

    def numel(self) -> int:
        return self.shape.numel()

    def element_size(self) -> int:
        return 1

    def __getitem__(self, ids: torch.Tensor | int) -> torch.Tensor:
        if isinstance(ids, int):
            return self[torch.tensor([ids])][0]
        ids = torch.as_tensor(ids, dtype=torch.long).cpu()
        if ids.numel() and (int(ids.min()) < 0 or int(ids.max()) >= len(self)):
            raise IndexError(f"image index out of range 0..{len(self) - 1}")
        shard_of = torch.bucketize(ids, self.starts[1:], right=True)
        out = torch.empty((len(ids), *self.shape[1:]), dtype=torch.uint8)
        for k in shard_of.unique().tolist():
            rows = (shard_of == k).nonzero().squeeze(1)
            out[rows] = self.shards[k][ids[rows] - self.starts[k]]
        return out


class ImageSource(Dataset):
    """All images of one split as a uint8 tensor [N, 3, H, W] (or :class:`ShardedImages`) plus
    int64 targets [N]."""

    def __init__(self, images: torch.Tensor | ShardedImages, targets: torch.Tensor) -> None:
        if images.dtype != torch.uint8 or images.ndim != 4 or images.shape[1] != 3:
            raise ValueError(f"images must be uint8 [N, 3, H, W], got {images.dtype} {tuple(images.shape)}")
        if targets.shape != (images.shape[0],):
            raise ValueError(f"{images.shape[0]} images but targets of shape {tuple(targets.shape)}")
        self.images = images.contiguous()
        self.targets = targets.long()

    def __len__(self) -> int:
        return self.images.shape[0]

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        return self.images[index], int(self.targets[index])


@dataclass
class Scenario:
    """A continual-learning scenario ready for the loop."""

    name: str
    benchmark: Any  # avalanche CLScenario with train_stream / test_stream
    class_names: list[str]
    protocol: Protocol
    classes_per_experience: list[list[int]]  # global labels, in stream order
    train_source: ImageSource
    test_source: ImageSource
    default_backbone: str
    augmentations: tuple[str, ...] = ()  # applied on the device when RunConfig.augment is true
    metadata: dict[str, Any] = field(default_factory=dict)
    # per class, the prompts whose normalized text features are averaged at evaluation (a
    # template ensemble), and the one prompt training uses; None: the head's default template
    prompts: list[tuple[str, ...]] | None = None
    train_prompts: list[str] | None = None
    # JSON files written beside the run record (name -> content), e.g. the few-shot indices
    files: dict[str, Any] = field(default_factory=dict)

    @property
    def n_experiences(self) -> int:
        return len(self.classes_per_experience)

    @property
    def n_classes(self) -> int:
        return len(self.class_names)

    @property
    def train_stream(self) -> Sequence[Any]:
        return list(self.benchmark.train_stream)

    @property
    def test_stream(self) -> Sequence[Any]:
        return list(self.benchmark.test_stream)

    def describe(self) -> dict[str, Any]:
        """The run record's ``scenario`` section."""
        return {
            "name": self.name,
            "protocol": self.protocol,
            "n_experiences": self.n_experiences,
            "n_classes": self.n_classes,
            "classes_per_experience": self.classes_per_experience,
            "class_names": self.class_names,
            "n_train": len(self.train_source),
            "n_test": len(self.test_source),
            "image_shape": list(self.train_source.images.shape[1:]),
            "augmentations": list(self.augmentations),
            **self.metadata,
        }
