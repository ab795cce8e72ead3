"""split-cifar100 (alias split-cifar) and split-cifar10 from a local root in torchvision's layout.

``<root>/cifar-100-python/{train,test,meta}`` or ``<root>/cifar-10-batches-py/{data_batch_1..5,
test_batch,batches.meta}``: the pickles torchvision downloads. Nothing is ever downloaded here
(Avalanche's SplitCIFAR classes always try to); the files are md5-checked against torchvision's
own checksums unless ``verify_checksums=false`` (for generated test data in the same format), then
read directly and wrapped into an Avalanche benchmark.
"""

from __future__ import annotations

import pickle
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
import torch

from cl_bench.errors import ConfigError, DataError
from cl_bench.registry import SCENARIOS
from cl_bench.scenario import ImageSource, Scenario
from scenarios.common import StreamConfig, make_scenario


@dataclass(frozen=True)
class CifarLayout:
    """Where torchvision keeps one CIFAR variant and what its files hold."""

    title: str
    folder: str
    train_files: tuple[tuple[str, str], ...]  # (file name, md5)
    test_files: tuple[tuple[str, str], ...]
    meta_file: tuple[str, str]
    label_key: str
    names_key: str
    n_classes: int


def layout(variant: str) -> CifarLayout:
    """The file list and checksums, taken from torchvision's dataset classes."""
    from torchvision.datasets import CIFAR10, CIFAR100

    cls = CIFAR100 if variant == "cifar100" else CIFAR10
    return CifarLayout(
        title="CIFAR-100" if variant == "cifar100" else "CIFAR-10",
        folder=cls.base_folder,
        train_files=tuple((f, m) for f, m in cls.train_list),
        test_files=tuple((f, m) for f, m in cls.test_list),
        meta_file=(cls.meta["filename"], cls.meta["md5"]),
        label_key="fine_labels" if variant == "cifar100" else "labels",
        names_key=cls.meta["key"],
        n_classes=100 if variant == "cifar100" else 10,
    )


def _unpickle(path: Path) -> dict[str, Any]:
    try:
        with path.open("rb") as fh:
            entry = pickle.load(fh, encoding="latin1")
    except (pickle.UnpicklingError, EOFError, ValueError, TypeError, AttributeError, ImportError) as err:
        raise DataError(f"{path}: not a readable CIFAR pickle ({type(err).__name__}: {err})") from None
    if not isinstance(entry, dict):
        raise DataError(f"{path}: not a CIFAR pickle (holds a {type(entry).__name__}, expected a dict)")
    return entry


def _read_split(folder: Path, files: tuple[tuple[str, str], ...], lay: CifarLayout) -> ImageSource:
    data, labels = [], []
    for name, _ in files:
        entry = _unpickle(folder / name)
        if "data" not in entry or lay.label_key not in entry:
            raise DataError(f"{folder / name}: missing 'data' or '{lay.label_key}' (not {lay.title}?)")
        array = np.asarray(entry["data"], dtype=np.uint8)
        if array.ndim != 2 or array.shape[1] != 3 * 32 * 32 or len(entry[lay.label_key]) != array.shape[0]:
            raise DataError(f"{folder / name}: expected N x 3072 uint8 data with N labels, got {array.shape}")
        data.append(array)
        labels.extend(entry[lay.label_key])
    targets = torch.as_tensor(labels, dtype=torch.long)
    if targets.min() < 0 or targets.max() >= lay.n_classes:
        raise DataError(f"{folder}: labels outside 0..{lay.n_classes - 1}")
    images = torch.from_numpy(np.concatenate(data).reshape(-1, 3, 32, 32))
    return ImageSource(images, targets)


def load_cifar(
    root: str | Path, variant: str, *, verify_checksums: bool = True
) -> tuple[ImageSource, ImageSource, list[str]]:
    """Read a CIFAR variant from ``root``; fail fast, naming the expected path and files."""
    lay = layout(variant)
    folder = Path(root) / lay.folder
    expected = [*lay.train_files, *lay.test_files, lay.meta_file]
    missing = [name for name, _ in expected if not (folder / name).is_file()]
    if missing:
        raise DataError(
            f"{lay.title} not found: expected {folder}/ with {', '.join(n for n, _ in expected)} "
            f"(torchvision's on-disk format; missing: {', '.join(missing)}). Nothing is downloaded: "
            f"copy the extracted archive there"
        )
    if verify_checksums:
        from torchvision.datasets.utils import check_integrity

        for name, md5 in expected:
            if not check_integrity(str(folder / name), md5):
                raise DataError(
                    f"{folder / name}: md5 mismatch (expected {md5}); the file is corrupt or not "
                    f"the original {lay.title} (scenario.verify_checksums=false for generated data)"
                )
    meta = _unpickle(folder / lay.meta_file[0])
    if lay.names_key not in meta or len(meta[lay.names_key]) != lay.n_classes:
        raise DataError(
            f"{folder / lay.meta_file[0]}: expected {lay.n_classes} names under '{lay.names_key}'"
        )
    names = [str(n).replace("_", " ") for n in meta[lay.names_key]]
    return _read_split(folder, lay.train_files, lay), _read_split(folder, lay.test_files, lay), names


@dataclass(frozen=True)
class _SplitCifar(StreamConfig):
    """``root``: the directory that holds torchvision's extracted CIFAR folder;
    ``verify_checksums``: md5-check every file (turn off only for generated test data)."""

    default_backbone: ClassVar[str] = "clip-vit-b-16"
    variant: ClassVar[str] = "cifar100"
    root: str = ""
    verify_checksums: bool = True

    def build(self, order_seed: int) -> Scenario:
        if not self.root:
            folder = layout(self.variant).folder
            raise ConfigError(f"set scenario.root=DIR, the directory containing {folder}/")
        train, test, names = load_cifar(self.root, self.variant, verify_checksums=self.verify_checksums)
        name = "split-cifar100" if self.variant == "cifar100" else "split-cifar10"
        return make_scenario(
            name,
            train=train,
            test=test,
            class_names=names,
            cfg=self,
            order_seed=order_seed,
            default_backbone=self.default_backbone,
            augmentations=("crop", "flip"),
            metadata={"root": str(Path(self.root).resolve()), "checksums_verified": self.verify_checksums},
        )


@SCENARIOS.register(
    "split-cifar100",
    aliases=("split-cifar",),
    description="CIFAR-100 from a local root (torchvision layout), 10 x 10 classes",
)
@dataclass(frozen=True)
class SplitCifar100(_SplitCifar):
    n_experiences: int = 10


@SCENARIOS.register(
    "split-cifar10", description="CIFAR-10 from a local root (torchvision layout), 5 x 2 classes"
)
@dataclass(frozen=True)
class SplitCifar10(_SplitCifar):
    variant: ClassVar[str] = "cifar10"
    n_experiences: int = 5
