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


class ImageSource(Dataset):
    """All images of one split as a uint8 tensor [N, 3, H, W] plus int64 targets [N]."""

    def __init__(self, images: torch.Tensor, targets: torch.Tensor) -> None:
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
