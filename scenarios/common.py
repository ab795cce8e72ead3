"""Build an Avalanche class- or task-incremental benchmark from two in-memory ImageSources.

Every experience dataset carries a ``sample_id`` data attribute (its indices into the
ImageSource), which is how :mod:`cl_bench.data` gathers its images as one tensor instead of
iterating the dataset item by item.
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from cl_bench.errors import ConfigError
from cl_bench.scenario import ImageSource, Protocol, Scenario


@dataclass(frozen=True)
class StreamConfig:
    """Stream options shared by every scenario config.

    ``n_experiences``: how many experiences the classes are split into (equal sizes);
    ``protocol``: ``class`` (class-incremental, no task labels) or ``task`` (task-incremental);
    ``class_order``: an explicit order of all classes; empty: a permutation drawn from the run's
    ``order_seed`` (``shuffle=false`` keeps the natural order 0..C-1).
    """

    n_experiences: int = 5
    protocol: Protocol = "class"
    class_order: tuple[int, ...] = ()
    shuffle: bool = True


def class_order(n_classes: int, cfg: StreamConfig, order_seed: int) -> list[int]:
    """The class order of the stream: explicit, natural, or permuted by ``order_seed``."""
    if cfg.class_order:
        if sorted(cfg.class_order) != list(range(n_classes)):
            raise ConfigError(f"scenario.class_order must be a permutation of 0..{n_classes - 1}")
        return list(cfg.class_order)
    if not cfg.shuffle:
        return list(range(n_classes))
    return [int(c) for c in np.random.default_rng(order_seed).permutation(n_classes)]


def _quiet_avalanche_import() -> None:
    """Avalanche imports qpsolvers, which warns on every run that no QP solver is installed (only
    Avalanche's GEM/A-GEM strategies need one; cl-bench uses none): silence that one warning."""
    warnings.filterwarnings("ignore", message="no QP solver found", category=UserWarning)


def _avalanche_dataset(source: ImageSource) -> Any:
    _quiet_avalanche_import()
    from avalanche.benchmarks.utils import DataAttribute
    from avalanche.benchmarks.utils.classification_dataset import ClassificationDataset

    return ClassificationDataset(
        [source],
        data_attributes=[
            DataAttribute(source.targets.tolist(), "targets"),
            DataAttribute(torch.arange(len(source)).tolist(), "sample_id"),
        ],
    )


def make_scenario(
    name: str,
    *,
    train: ImageSource,
    test: ImageSource,
    class_names: Sequence[str],
    cfg: StreamConfig,
    order_seed: int,
    default_backbone: str,
    augmentations: tuple[str, ...] = (),
    metadata: dict[str, Any] | None = None,
) -> Scenario:
    """Split the classes into ``cfg.n_experiences`` equal experiences and wrap them in a Scenario."""
    n_classes = len(class_names)
    if cfg.n_experiences < 1 or n_classes % cfg.n_experiences:
        raise ConfigError(
            f"scenario.n_experiences must divide the {n_classes} classes, got {cfg.n_experiences}"
        )
    for split, source in (("train", train), ("test", test)):
        present = set(source.targets.unique().tolist())
        if present != set(range(n_classes)):
            raise ConfigError(
                f"{name}: the {split} split lacks classes {sorted(set(range(n_classes)) - present)}"
            )
    order = class_order(n_classes, cfg, order_seed)
    return _stream(
        name,
        train,
        test,
        class_names,
        cfg.protocol,
        default_backbone,
        {"class_order": order, "num_experiences": cfg.n_experiences},
        augmentations=augmentations,
        metadata={"class_order": order, "order_seed": order_seed, **(metadata or {})},
    )


def make_domain_scenario(
    name: str,
    *,
    train: ImageSource,
    test: ImageSource,
    class_names: Sequence[str],
    classes_per_domain: Sequence[int],
    protocol: Protocol,
    default_backbone: str,
    metadata: dict[str, Any] | None = None,
) -> Scenario:
    """One experience per domain: experience k holds the next ``classes_per_domain[k]`` labels
    of the union label space (labels are already offset, domains in stream order)."""
    return _stream(
        name,
        train,
        test,
        class_names,
        protocol,
        default_backbone,
        {"class_order": list(range(len(class_names))), "num_classes_per_exp": list(classes_per_domain)},
        metadata=metadata or {},
    )


def _stream(
    name: str,
    train: ImageSource,
    test: ImageSource,
    class_names: Sequence[str],
    protocol: Protocol,
    default_backbone: str,
    split: dict[str, Any],
    *,
    augmentations: tuple[str, ...] = (),
    metadata: dict[str, Any],
) -> Scenario:
    """Avalanche's class-incremental benchmark of ``train``/``test`` split by ``split`` (its
    ``class_order`` and ``num_experiences`` or ``num_classes_per_exp``), task-incremental for
    the task protocol, wrapped in a Scenario."""
    _quiet_avalanche_import()
    from avalanche.benchmarks.scenarios import (
        class_incremental_benchmark,
        task_incremental_benchmark,
        with_classes_timeline,
    )

    benchmark = class_incremental_benchmark(
        {"train": _avalanche_dataset(train), "test": _avalanche_dataset(test)}, **split
    )
    if protocol == "task":
        benchmark = with_classes_timeline(task_incremental_benchmark(benchmark, reset_task_labels=True))
    per_exp = [sorted(int(c) for c in e.classes_in_this_experience) for e in benchmark.train_stream]
    return Scenario(
        name=name,
        benchmark=benchmark,
        class_names=list(class_names),
        protocol=protocol,
        classes_per_experience=per_exp,
        train_source=train,
        test_source=test,
        default_backbone=default_backbone,
        augmentations=augmentations,
        metadata=metadata,
    )


def to_uint8_rgb(images: np.ndarray) -> torch.Tensor:
    """[N, H, W] or [N, H, W, 3] uint8 arrays -> uint8 tensor [N, 3, H, W]."""
    t = torch.from_numpy(np.ascontiguousarray(images))
    if t.ndim == 3:
        t = t.unsqueeze(-1).expand(-1, -1, -1, 3)
    return t.permute(0, 3, 1, 2).contiguous()
