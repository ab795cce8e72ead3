"""split-cifar100 (alias split-cifar) and split-cifar10 from a local root in torchvision's layout.

``<root>/cifar-100-python/{train,test,meta}`` or ``<root>/cifar-10-batches-py/{data_batch_1..5,
test_batch,batches.meta}``: the pickles torchvision downloads. Nothing is ever downloaded here
(Avalanche's SplitCIFAR classes always try to); the files are md5-checked against torchvision's
own checksums (copied below, a test keeps them equal to torchvision's lists) unless
``verify_checksums=false`` (for generated test data in the same format), then read directly and
wrapped into an Avalanche benchmark. A missing root fails before anything heavy is imported.
"""

from __future__ import annotations

import hashlib
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


# torchvision.datasets.CIFAR10 / CIFAR100 (base_folder, train_list, test_list, meta), copied so that
# checking a root needs no torchvision import (2-3 s); tests/scenarios asserts they stay equal.
LAYOUTS = {
    "cifar10": CifarLayout(
        title="CIFAR-10",
        folder="cifar-10-batches-py",
        train_files=(
            ("data_batch_1", "c99cafc152244af753f735de768cd75f"),
            ("data_batch_2", "d4bba439e000b95fd0a9bffe97cbabec"),
            ("data_batch_3", "54ebc095f3ab1f0389bbae665268c751"),
            ("data_batch_4", "634d18415352ddfa80567beed471001a"),
            ("data_batch_5", "482c414d41f54cd18b22e5b47cb7c3cb"),
        ),
        test_files=(("test_batch", "40351d587109b95175f43aff81a1287e"),),
        meta_file=("batches.meta", "5ff9c542aee3614f3951f8cda6e48888"),
        label_key="labels",
        names_key="label_names",
        n_classes=10,
    ),
    "cifar100": CifarLayout(
        title="CIFAR-100",
        folder="cifar-100-python",
        train_files=(("train", "16019d7e3df5f24257cddd939b257f8d"),),
        test_files=(("test", "f0ef6b0ae62326f3e7ffdfab6717acfc"),),
        meta_file=("meta", "7973b15100ade9c7d40fb424638fde48"),
        label_key="fine_labels",
        names_key="fine_label_names",
        n_classes=100,
    ),
}


def layout(variant: str) -> CifarLayout:
    """The folder, file names and md5s of ``cifar10`` or ``cifar100`` (torchvision's)."""
    return LAYOUTS[variant]


def md5(path: Path, chunk: int = 1 << 20) -> str:
    """Hex md5 of a file, read in chunks (torchvision's check, without importing torchvision)."""
    digest = hashlib.md5(usedforsecurity=False)
    with path.open("rb") as fh:
        while block := fh.read(chunk):
            digest.update(block)
    return digest.hexdigest()


def _unpickle(path: Path) -> dict[str, Any]:
    try:
        with path.open("rb") as fh:
            entry = pickle.load(fh, encoding="latin1")
    except (pickle.UnpicklingError, EOFError, ValueError, TypeError, AttributeError, ImportError) as err:
        raise DataError(f"{path}: not a readable CIFAR pickle ({type(err).__name__}: {err})") from None
    if not isinstance(entry, dict):
        raise DataError(f"{path}: not a CIFAR pickle (holds a {type(entry).__name__}, expected a dict)")
    return entry


def _pixels(entry: dict[str, Any], path: Path) -> np.ndarray:
    """The ``data`` of one pickle as N x 3072 uint8 (DataError for anything else)."""
    try:
        array = np.asarray(entry["data"])
    except (ValueError, TypeError) as err:  # ragged or mixed lists
        raise DataError(f"{path}: 'data' is not an N x 3072 array of pixels ({err})") from None
    if array.ndim != 2 or array.shape[1] != 3 * 32 * 32:
        raise DataError(f"{path}: expected N x 3072 uint8 data, got shape {array.shape}")
    if array.dtype != np.uint8:
        if array.dtype.kind not in "iu" or (array.size and (array.min() < 0 or array.max() > 255)):
            raise DataError(f"{path}: 'data' must hold pixel values 0..255, got dtype {array.dtype}")
        array = array.astype(np.uint8)
    return array


def _labels(entry: dict[str, Any], key: str, n: int, path: Path, n_classes: int) -> np.ndarray:
    """The class indices of one pickle: N integers in 0..n_classes-1 (DataError for anything else)."""
    raw = entry[key]
    try:
        labels = np.asarray(raw)
    except (ValueError, TypeError) as err:
        raise DataError(f"{path}: '{key}' is not a list of class indices ({err})") from None
    if labels.ndim != 1 or (labels.size and labels.dtype.kind not in "iu"):
        first = labels.flat[0].item() if labels.size else None  # a Python value, for the message
        got = (
            f"{type(first).__name__} values such as {first!r}"
            if labels.ndim == 1
            else f"shape {labels.shape}"
        )
        raise DataError(f"{path}: '{key}' must be a list of integer class indices, got {got}")
    if len(labels) != n:
        raise DataError(f"{path}: {len(labels)} labels for {n} images")
    if labels.size and (labels.min() < 0 or labels.max() >= n_classes):
        raise DataError(f"{path}: labels outside 0..{n_classes - 1} (min {labels.min()}, max {labels.max()})")
    return labels.astype(np.int64)


def _read_split(folder: Path, files: tuple[tuple[str, str], ...], lay: CifarLayout) -> ImageSource:
    data, labels = [], []
    for name, _ in files:
        path = folder / name
        entry = _unpickle(path)
        if "data" not in entry or lay.label_key not in entry:
            raise DataError(f"{path}: missing 'data' or '{lay.label_key}' (not {lay.title}?)")
        array = _pixels(entry, path)
        data.append(array)
        labels.append(_labels(entry, lay.label_key, array.shape[0], path, lay.n_classes))
    targets = torch.from_numpy(np.concatenate(labels))
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
        for name, expected_md5 in expected:
            if md5(folder / name) != expected_md5:
                raise DataError(
                    f"{folder / name}: md5 mismatch (expected {expected_md5}); the file is corrupt or "
                    f"not the original {lay.title} (scenario.verify_checksums=false for generated data)"
                )
    meta = _unpickle(folder / lay.meta_file[0])
    class_names = meta.get(lay.names_key)
    if not isinstance(class_names, list | tuple) or len(class_names) != lay.n_classes:
        raise DataError(
            f"{folder / lay.meta_file[0]}: expected {lay.n_classes} names under '{lay.names_key}'"
        )
    names = [str(n).replace("_", " ") for n in class_names]
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
        """Check and read ``root`` (DataError naming the path and files) and stream it by ``order_seed``."""
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
    """CIFAR-100 from ``root``/cifar-100-python; 10 experiences of 10 classes by default."""

    n_experiences: int = 10


@SCENARIOS.register(
    "split-cifar10", description="CIFAR-10 from a local root (torchvision layout), 5 x 2 classes"
)
@dataclass(frozen=True)
class SplitCifar10(_SplitCifar):
    """CIFAR-10 from ``root``/cifar-10-batches-py; 5 experiences of 2 classes by default."""

    variant: ClassVar[str] = "cifar10"
    n_experiences: int = 5
