"""Accuracy of the current model on test experiences, with the label-space rules of METRICS.md.

One forward pass per test experience gives logits over every class; each accuracy-matrix cell is
then an argmax over the classes its label space allows:
- ``seen`` (class-incremental default): classes of experiences 0..max(i, j) for cell (i, j),
  so future experiences are scored against the classes seen so far plus their own;
- ``all`` (X-TAIL): every class of the scenario;
- task-incremental protocol: the classes of the sample's own task (experience j).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from contextlib import nullcontext

import torch

from cl_bench.data import ExperienceData, Preprocess
from cl_bench.strategy import ExperienceInfo, Strategy


def autocast(device: torch.device, precision: str) -> torch.autocast | nullcontext[None]:
    """bf16 autocast when requested, nothing otherwise (fp32)."""
    if precision == "bf16":
        return torch.autocast(device_type=device.type, dtype=torch.bfloat16)
    return nullcontext()


@torch.inference_mode()
def test_logits(
    strategy: Strategy,
    data: ExperienceData,
    info: ExperienceInfo,
    preprocess: Preprocess,
    batch_size: int,
    precision: str,
    on_batch: Callable[[int], None] | None = None,  # noqa: PT028 (not a pytest test)
) -> torch.Tensor:
    """Float32 logits [N, n_classes] of the model in eval mode on every sample of ``data``;
    ``on_batch(n)`` is called after each batch of ``n`` samples (progress)."""
    chunks = []
    with autocast(data.device, precision):
        for images, _ in data.batches(batch_size, shuffle=False):
            chunks.append(strategy.forward(preprocess(images, train=False), info).float())
            if on_batch is not None:
                on_batch(len(images))
    return torch.cat(chunks)


def allowed_classes(
    n_classes: int,
    classes_per_experience: Sequence[Sequence[int]],
    row: int,
    column: int,
    *,
    label_space: str,
    protocol: str,
    device: torch.device,
) -> torch.Tensor:
    """Boolean mask [n_classes] of the classes that compete in cell (row, column).

    ``row`` is -1 for the before-training row b.
    """
    mask = torch.zeros(n_classes, dtype=torch.bool, device=device)
    if protocol == "task":
        mask[list(classes_per_experience[column])] = True
    elif label_space == "all":
        mask[:] = True
    else:
        for exp in classes_per_experience[: max(row, column) + 1]:
            mask[list(exp)] = True
    return mask


def n_correct(logits: torch.Tensor, targets: torch.Tensor, allowed: torch.Tensor) -> int:
    """Number of samples whose best allowed class is the target."""
    masked = logits.masked_fill(~allowed, float("-inf"))
    return int((masked.argmax(dim=1) == targets).sum().item())
