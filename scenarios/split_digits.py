"""split-digits: scikit-learn's bundled handwritten digits (real 8x8 images), the CPU demo.

1,797 images of the digits 0-9 (UCI optical recognition data, 16 grey levels) are split once
into 80% train / 20% test, stratified with a fixed seed, then streamed as 5 experiences of two
classes each (by default). No download: the data ships inside scikit-learn.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import numpy as np
import torch

from cl_bench.registry import SCENARIOS
from cl_bench.scenario import ImageSource, Scenario
from scenarios.common import StreamConfig, make_scenario, to_uint8_rgb

DIGIT_NAMES = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")


def load_digits_sources(test_fraction: float, split_seed: int) -> tuple[ImageSource, ImageSource]:
    """scikit-learn's digits as (train, test) ImageSources of 8x8 RGB uint8 images.

    Grey levels 0..16 are scaled to 0..255; the split is stratified by class, ``test_fraction``
    of each digit going to test, and fixed by ``split_seed`` (independent of the class order).
    """
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    digits = load_digits()
    images = np.rint(digits.images * (255.0 / 16.0)).astype(np.uint8)
    x_tr, x_te, y_tr, y_te = train_test_split(
        images, digits.target, test_size=test_fraction, random_state=split_seed, stratify=digits.target
    )
    return (
        ImageSource(to_uint8_rgb(x_tr), torch.as_tensor(y_tr)),
        ImageSource(to_uint8_rgb(x_te), torch.as_tensor(y_te)),
    )


@SCENARIOS.register(
    "split-digits", description="scikit-learn digits (real 8x8 images), 5 x 2 classes; CPU demo"
)
@dataclass(frozen=True)
class SplitDigits(StreamConfig):
    """``test_fraction`` and ``split_seed`` fix the train/test split (independent of order_seed)."""

    default_backbone: ClassVar[str] = "tiny-clip"
    # ~290 images per experience: 10 epochs (~100 steps) let the random tiny CLIP learn each task
    run_defaults: ClassVar[dict[str, object]] = {"epochs": 10}
    test_fraction: float = 0.2
    split_seed: int = 0

    def build(self, order_seed: int) -> Scenario:
        """Split the digits once (``split_seed``) and stream them in the order of ``order_seed``."""
        train, test = load_digits_sources(self.test_fraction, self.split_seed)
        return make_scenario(
            "split-digits",
            train=train,
            test=test,
            class_names=DIGIT_NAMES,
            cfg=self,
            order_seed=order_seed,
            default_backbone=self.default_backbone,
            metadata={"source": "sklearn.datasets.load_digits"},
        )
