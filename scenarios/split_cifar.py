"""split-cifar100 (alias split-cifar) and split-cifar10 from a local root in torchvision's layout.

``<root>/cifar-100-python/{train,test,meta}`` or ``<root>/cifar-10-batches-py/{data_batch_1..5,
test_batch,batches.meta}``: the pickles torchvision downloads. Nothing is ever downloaded here
(Avalanche's SplitCIFAR classes always try to); the files are md5-checked against torchvision's
own checksums (copied in :mod:`cl_bench.cifar_layout`, a test keeps them equal to torchvision's
lists) unless ``verify_checksums=false`` (for generated test data in the same format), then read
directly and wrapped into an Avalanche benchmark. ``cl-bench run`` checks the root before anything
heavy is imported (:func:`cl_bench.cifar_layout.precheck`). The pickles are read by a restricted
unpickler that resolves only the few numpy globals an array needs, so a crafted file (checksums
off, or a tampered copy) is refused with a DataError and can never run code while it loads.
"""

from __future__ import annotations

import importlib
import pickle
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
import torch

from cl_bench.cifar_layout import CifarLayout, check_root, layout, no_root
from cl_bench.errors import DataError
from cl_bench.registry import SCENARIOS
from cl_bench.scenario import ImageSource, Scenario
from scenarios.common import StreamConfig, make_scenario


def _multiarray() -> Any:
    """numpy's ``multiarray`` module under its numpy 2 name, or its numpy 1 one (no deprecation warning)."""
    try:
        return importlib.import_module("numpy._core.multiarray")
    except ImportError:  # numpy < 2
        return importlib.import_module("numpy.core.multiarray")


class _Latin1Bytes:
    """``_codecs.encode`` as Python 3 uses it for bytes in a protocol-2 pickle (the files that
    ``scenarios/cifar_files.py`` writes): latin-1 text to bytes, no other codec. Slotted, so a
    pickle's BUILD cannot set attributes on it."""

    __slots__ = ()

    def __call__(self, text: object, encoding: object) -> bytes:
        if not isinstance(text, str) or encoding not in ("latin1", "latin-1"):
            raise pickle.UnpicklingError("_codecs.encode is only allowed to turn latin-1 text into bytes")
        return text.encode("latin1")


_MULTIARRAY = _multiarray()
# Every global a CIFAR pickle may name, as (module, name) exactly as the file spells it, mapped to
# what it loads as; dicts, lists, str, bytes and ints need none. A numpy array pickles as
# ``_reconstruct(ndarray, (0,), b"b")`` plus its state (shape, a ``dtype``, the raw bytes), under
# numpy 1's module name in torchvision's files (Python 2 cPickle) and numpy 2's in files written
# today; a numpy scalar pickles through ``scalar``; Python 3 writes the array's bytes into a
# protocol-2 pickle as ``_codecs.encode(text, "latin1")``.
_ALLOWED_GLOBALS: dict[tuple[str, str], Any] = {
    ("numpy.core.multiarray", "_reconstruct"): _MULTIARRAY._reconstruct,
    ("numpy._core.multiarray", "_reconstruct"): _MULTIARRAY._reconstruct,
    ("numpy.core.multiarray", "scalar"): _MULTIARRAY.scalar,
    ("numpy._core.multiarray", "scalar"): _MULTIARRAY.scalar,
    ("numpy", "ndarray"): np.ndarray,
    ("numpy", "dtype"): np.dtype,
    ("_codecs", "encode"): _Latin1Bytes(),
}


class _RefusedGlobalError(Exception):
    """A pickle named a global outside :data:`_ALLOWED_GLOBALS` (carries the name, as printable text)."""


class _CifarUnpickler(pickle.Unpickler):
    """An unpickler that resolves only :data:`_ALLOWED_GLOBALS`: nothing is imported and no other
    callable is reachable, so loading a file can build data but never run code."""

    def find_class(self, module: str, name: str) -> Any:
        try:
            return _ALLOWED_GLOBALS[(module, name)]
        except KeyError:
            pass
        wanted = f"{module}.{name}"
        if not wanted.isprintable() or len(wanted) > 120:  # keep the error to one short line
            wanted = repr(wanted[:120])
        raise _RefusedGlobalError(wanted)


def _unpickle(path: Path) -> dict[str, Any]:
    try:
        with path.open("rb") as fh:
            entry = _CifarUnpickler(fh, encoding="latin1").load()
    except _RefusedGlobalError as err:
        raise DataError(
            f"{path}: refused to load: the pickle asks for {err}, which a CIFAR file never holds "
            "(loading data never runs code)"
        ) from None
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
    folder = check_root(root, variant, verify_checksums=verify_checksums)
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
        name = "split-cifar100" if self.variant == "cifar100" else "split-cifar10"
        if not self.root:
            raise no_root(name, self.variant)
        train, test, names = load_cifar(self.root, self.variant, verify_checksums=self.verify_checksums)
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
