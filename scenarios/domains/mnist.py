"""MNIST (10 digits, 28x28 greyscale), MULTIDOMAIN.md §3.8.

Read in memory, as torchvision's ``MNIST(root)`` does: the four uncompressed idx files of
``R/MNIST/raw`` (big-endian header: magic 2051 + count, rows, cols for images, 2049 + count for
labels) or the legacy ``R/MNIST/processed/{training.pt,test.pt}`` (``(uint8 [N,28,28], int64 [N])``);
MoRAM's README spells the folder ``mnist/``. Both benchmarks use the full 60000/10000 sets (the
X-TAIL 16-shot draw is the scenario's). Names are torchvision's ``"0 - zero"``...; X-TAIL wraps
them as ``number: "0 - zero"`` (MoRAM and RAIL), MTIL uses them plain.
"""

from __future__ import annotations

import gzip
import struct
from pathlib import Path

import numpy as np

from cl_bench.errors import DataError
from scenarios.domains import base
from scenarios.domains.base import Benchmark, DomainData, DomainSpec, ReadOptions, Sizes, Split

NAME = "MNIST"
TEMPLATE = 'a photo of the number: "{}".'
CLASSES = tuple(
    f"{i} - {word}"
    for i, word in enumerate(("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine"))
)
IMAGES_MAGIC, LABELS_MAGIC = 2051, 2049
RAW_FILES = {
    "train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
    "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"),
}
PROCESSED_FILES = {"train": "training.pt", "test": "test.pt"}

# (label, folder under the root, format): detection order of §3.13.
LAYOUTS = (
    ("MNIST/raw (idx files; MoRAM, RAIL, torchvision)", "MNIST/raw", "raw"),
    ("MNIST/processed (legacy torchvision .pt)", "MNIST/processed", "processed"),
    ("mnist/raw (MoRAM README; idx files)", "mnist/raw", "raw"),
    ("mnist/processed (MoRAM README; legacy .pt)", "mnist/processed", "processed"),
)


def _read_idx(path: Path, magic: int) -> np.ndarray:
    """An uncompressed idx file with ``magic`` (2051: uint8 [N, rows, cols]; 2049: uint8 [N])."""
    data = path.read_bytes()
    ndim = 3 if magic == IMAGES_MAGIC else 1
    header = 4 * (1 + ndim)
    if len(data) < header or int.from_bytes(data[:4], "big") != magic:
        found = int.from_bytes(data[:4], "big") if len(data) >= 4 else None
        raise DataError(f"{NAME}: {path} is not an idx file with magic {magic} (found {found})")
    shape = struct.unpack(f">{ndim}I", data[4:header])
    if len(data) != header + int(np.prod(shape)):
        raise DataError(f"{NAME}: {path} holds {len(data) - header} bytes of data, its header says {shape}")
    return np.frombuffer(bytearray(data), dtype=np.uint8, offset=header).reshape(shape)


def _read_raw(folder: Path, split: str, layout: str) -> tuple[np.ndarray, np.ndarray]:
    image_name, label_name = RAW_FILES[split]
    for name in (image_name, label_name):
        if not (folder / name).is_file():
            raise base.missing(NAME, folder / name, "idx file (uncompressed)", layout)
    images = _read_idx(folder / image_name, IMAGES_MAGIC)
    labels = _read_idx(folder / label_name, LABELS_MAGIC)
    if len(images) != len(labels):
        raise DataError(
            f"{NAME}: {folder / image_name} has {len(images)} images, {label_name} {len(labels)} labels"
        )
    return images, labels.astype(np.int64)


def _read_processed(folder: Path, split: str, layout: str) -> tuple[np.ndarray, np.ndarray]:
    import torch

    path = folder / PROCESSED_FILES[split]
    if not path.is_file():
        raise base.missing(NAME, path, "legacy torchvision file", layout)
    try:
        obj = torch.load(path, weights_only=True)
    except Exception as err:  # torch raises many types for a corrupt or foreign file
        raise DataError(f"{NAME}: {path} is not a readable torch file ({type(err).__name__})") from None
    ok = (
        isinstance(obj, (tuple, list))
        and len(obj) == 2
        and all(isinstance(t, torch.Tensor) for t in obj)
        and obj[0].dtype == torch.uint8
        and obj[0].ndim == 3
        and obj[1].ndim == 1
        and not obj[1].is_floating_point()
        and len(obj[0]) == len(obj[1])
    )
    if not ok:
        raise DataError(f"{NAME}: {path} must hold (uint8 images [N,H,W], integer labels [N])")
    return obj[0].numpy(), obj[1].numpy().astype(np.int64)


def _split(images: np.ndarray, labels: np.ndarray, path: Path) -> Split:
    if labels.size and (labels.min() < 0 or labels.max() >= len(CLASSES)):
        raise DataError(f"{NAME}: labels in {path} outside 0..9")
    return Split(labels, arrays=np.ascontiguousarray(images))


def _find(root: Path) -> tuple[str, Path, str]:
    """(layout label, folder, "raw" or "processed") of the first layout whose folder exists."""
    label, folder = base.find_layout(NAME, root, [(name, rel) for name, rel, _ in LAYOUTS])
    return label, folder, {name: kind for name, _, kind in LAYOUTS}[label]


def read(root: Path, benchmark: Benchmark, options: ReadOptions) -> DomainData:
    """The full MNIST train/test arrays from the first layout found under ``root``."""
    del options  # torchvision checks only that the raw files exist, no md5 (§11)
    label, folder, kind = _find(root)
    reader = _read_raw if kind == "raw" else _read_processed
    train, test = reader(folder, "train", label), reader(folder, "test", label)
    names = CLASSES if benchmark == "mtil" else tuple(f'number: "{name}"' for name in CLASSES)
    return DomainData(
        NAME,
        benchmark,
        label,
        folder,
        names,
        _split(*train, folder),
        _split(*test, folder),
        ("full torchvision train/test arrays",),
    )


def _idx_bytes(array: np.ndarray, magic: int) -> bytes:
    return struct.pack(f">I{array.ndim}I", magic, *array.shape) + array.astype(np.uint8).tobytes()


def write_fixture(root: Path, layout: str, rng: np.random.Generator) -> None:
    """A tiny MNIST in ``layout``: 3 train and 2 test 28x28 images per digit, shuffled; the raw
    layouts hold the uncompressed idx files and their ``.gz`` (as torchvision leaves them)."""
    import torch

    kinds = {label: (rel, kind) for label, rel, kind in LAYOUTS}
    if layout not in kinds:
        raise ValueError(f"{NAME} has no layout {layout!r}")
    rel, kind = kinds[layout]
    folder = root / rel
    folder.mkdir(parents=True, exist_ok=True)
    for split, per_class in (("train", 3), ("test", 2)):
        labels = rng.permutation(np.repeat(np.arange(len(CLASSES)), per_class))
        images = rng.integers(0, 256, size=(len(labels), 28, 28), dtype=np.uint8)
        if kind == "processed":
            torch.save(
                (torch.from_numpy(images), torch.from_numpy(labels.astype(np.int64))),
                folder / PROCESSED_FILES[split],
            )
            continue
        for name, content in zip(
            RAW_FILES[split],
            (_idx_bytes(images, IMAGES_MAGIC), _idx_bytes(labels, LABELS_MAGIC)),
            strict=True,
        ):
            (folder / name).write_bytes(content)
            (folder / f"{name}.gz").write_bytes(gzip.compress(content, mtime=0))


SPEC = base.register(
    DomainSpec(
        name=NAME,
        aliases=(),
        benchmarks=("x-tail", "mtil"),
        layouts=tuple(label for label, _, _ in LAYOUTS),
        xtail_template=TEMPLATE,
        mtil_train_template=TEMPLATE,
        mtil_eval_templates=(TEMPLATE,),
        sizes={"x-tail": Sizes(60000, 10000), "mtil": Sizes(60000, 10000)},
        read=read,
        write_fixture=write_fixture,
        folder_names=tuple(rel for _, rel, _ in LAYOUTS),
    )
)
