"""A warning, before minutes of silence, when a run on the CPU will take long.

A new user's first ``cl-bench run --scenario split-cifar`` on a laptop evaluates 10,000 images with
a ViT-B/16 before training even starts: about 17 minutes on 2 cores. A big backbone on the CPU is
timed on two images first (a second or two, beside a run of many minutes) and the whole run's
time is extrapolated from that: forward passes of every evaluation plus ~3 forward-equivalents
(forward and backward) per training image.
"""

from __future__ import annotations

import logging
import time

import torch

from cl_bench.backbones.base import Backbone

log = logging.getLogger("cl_bench")

BIG_BACKBONE = 20_000_000
"""Parameters from which a CPU run is timed (tiny test backbones are never timed)."""
WARN_AFTER_S = 600.0
"""Estimated run time from which the warning is shown."""
TRAIN_COST = 3.0
"""Forward-equivalents of one training image (forward, then backward at about twice the cost)."""


def seconds_per_image(backbone: Backbone, image_size: int, n: int = 2) -> float:
    """Wall time of one eval-mode image forward, measured on ``n`` images after a warm-up of one.

    Leaves the random state and the module's mode as they were.
    """
    was_training = backbone.training
    backbone.eval()
    try:
        with torch.random.fork_rng(devices=[]), torch.inference_mode():
            images = torch.zeros(n, 3, image_size, image_size)
            backbone.encode_image(images[:1])
            tic = time.perf_counter()
            backbone.encode_image(images)
            return (time.perf_counter() - tic) / n
    finally:
        backbone.train(was_training)


def estimate_s(per_image: float, eval_images: int, train_images: int) -> float:
    """Seconds of a run that evaluates ``eval_images`` and trains on ``train_images`` images."""
    return per_image * (eval_images + TRAIN_COST * train_images)


def warn_if_long(
    backbone: Backbone,
    *,
    name: str,
    image_size: int,
    n_parameters: int,
    device: torch.device,
    eval_images: int,
    train_images: int,
) -> float | None:
    """Log a warning with the expected time when a CPU run of a big backbone will take long.

    Returns the estimate in seconds (None when not timed: a GPU run or a small backbone).
    """
    if device.type != "cpu" or n_parameters < BIG_BACKBONE:
        return None
    per_image = seconds_per_image(backbone, image_size)
    total = estimate_s(per_image, eval_images, train_images)
    if total >= WARN_AFTER_S:
        log.warning(
            "this run on the CPU will take about %.0f min (%s: %.2f s per image with %d thread(s); "
            "%s images evaluated, %s trained on); for a quick look use --backbone tiny-clip "
            "(random weights, seconds) or --scenario split-digits, or run on a CUDA GPU",
            total / 60,
            name,
            per_image,
            torch.get_num_threads(),
            f"{eval_images:,}",
            f"{train_images:,}",
        )
    return total
