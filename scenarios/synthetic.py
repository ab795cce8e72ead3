"""synthetic: tiny, deterministic, generated images for tests.

Each class has a smooth random colour prototype (a 4x4 pattern upsampled to ``image_size``);
samples are the prototype plus Gaussian pixel noise. The data depend only on ``data_seed``, so
tests and the regression gate see identical inputs on every machine.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch
import torch.nn.functional as F

from cl_bench.errors import ConfigError
from cl_bench.registry import SCENARIOS
from cl_bench.scenario import ImageSource, Scenario
from scenarios.common import StreamConfig, make_scenario

NAMES = (
    "alpha",
    "bravo",
    "charlie",
    "delta",
    "echo",
    "foxtrot",
    "golf",
    "hotel",
    "india",
    "juliet",
    "kilo",
    "lima",
    "mike",
    "november",
    "oscar",
    "papa",
    "quebec",
    "romeo",
    "sierra",
    "tango",
)


def generate(
    n_classes: int, per_class: int, image_size: int, noise: float, seed: int, split: int
) -> ImageSource:
    """``per_class`` noisy samples of each class prototype (prototypes depend on ``seed`` only)."""
    g = torch.Generator().manual_seed(seed)
    prototypes = F.interpolate(
        torch.rand(n_classes, 3, 4, 4, generator=g), size=image_size, mode="bilinear", align_corners=False
    )
    g_split = torch.Generator().manual_seed(seed * 1000 + 1 + split)
    targets = torch.arange(n_classes).repeat_interleave(per_class)
    images = prototypes[targets] + noise * torch.randn(
        len(targets), 3, image_size, image_size, generator=g_split
    )
    return ImageSource((images.clamp(0, 1) * 255).round().to(torch.uint8), targets)


@SCENARIOS.register("synthetic", description="generated deterministic images (10 classes, 16 px), for tests")
@dataclass(frozen=True)
class Synthetic(StreamConfig):
    """``n_classes`` (<= 20), samples ``train_per_class``/``test_per_class``, ``image_size``,
    pixel ``noise`` and ``data_seed``."""

    default_backbone: ClassVar[str] = "tiny-clip"
    n_classes: int = 10
    train_per_class: int = 16
    test_per_class: int = 8
    image_size: int = 16
    noise: float = 0.15
    data_seed: int = 0

    def __post_init__(self) -> None:
        if not 2 <= self.n_classes <= len(NAMES):
            raise ConfigError(f"scenario.n_classes must be in 2..{len(NAMES)}, got {self.n_classes}")
        if self.train_per_class < 1 or self.test_per_class < 1 or self.image_size < 4:
            raise ConfigError("scenario.train_per_class/test_per_class must be >= 1 and image_size >= 4")

    def build(self, order_seed: int) -> Scenario:
        """Generate the images (fixed by ``data_seed``) and stream them in the order of ``order_seed``."""
        train = generate(self.n_classes, self.train_per_class, self.image_size, self.noise, self.data_seed, 0)
        test = generate(self.n_classes, self.test_per_class, self.image_size, self.noise, self.data_seed, 1)
        return make_scenario(
            "synthetic",
            train=train,
            test=test,
            class_names=NAMES[: self.n_classes],
            cfg=self,
            order_seed=order_seed,
            default_backbone=self.default_backbone,
            metadata={"data_seed": self.data_seed},
        )
