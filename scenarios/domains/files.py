"""File formats several domains share: CoOp's ``split_zhou_*.json`` and fixture images.

CoOp split file (``CoOp:datasets/oxford_pets.py::save_split``): a JSON object with keys
``"train"``, ``"val"``, ``"test"``, each a list of ``[relative_image_path, label_int, classname]``;
paths are relative to the domain's image directory, labels 0-based and contiguous. Class names
come from the ``train`` items in label order (``DatasetBase.get_lab2cname``), MULTIDOMAIN.md §2.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from cl_bench.errors import DataError

CoopItem = tuple[str, int, str]
SPLITS = ("train", "val", "test")


@dataclass(frozen=True)
class CoopSplit:
    """A parsed CoOp split file: per split, image paths (under ``image_dir``) and labels, and
    the class names in label order (from the train items)."""

    files: dict[str, tuple[Path, ...]]
    labels: dict[str, np.ndarray]
    class_names: tuple[str, ...]


def read_coop_split(path: Path, image_dir: Path, domain: str) -> CoopSplit:
    """Parse ``path``; DataError naming the file for a missing file, bad JSON or bad items."""
    if not path.is_file():
        raise DataError(f"{domain}: missing split file {path}")
    try:
        raw = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise DataError(f"{domain}: {path} is not a readable JSON split file ({err})") from None
    if not isinstance(raw, dict) or any(key not in raw for key in SPLITS):
        raise DataError(f"{domain}: {path} must be a JSON object with keys train, val, test")
    files: dict[str, tuple[Path, ...]] = {}
    labels: dict[str, np.ndarray] = {}
    names: dict[int, str] = {}
    for split in SPLITS:
        items = raw[split]
        ok = isinstance(items, list) and all(
            isinstance(it, list)
            and len(it) == 3
            and isinstance(it[0], str)
            and isinstance(it[1], int)
            and isinstance(it[2], str)
            for it in items
        )
        if not ok:
            raise DataError(f"{domain}: {path}: '{split}' must be a list of [path, label, classname]")
        files[split] = tuple(image_dir / it[0].lstrip("/") for it in items)
        labels[split] = np.asarray([it[1] for it in items], dtype=np.int64)
        if split == "train":
            for _, label, name in items:
                names.setdefault(label, name)
    if sorted(names) != list(range(len(names))):
        raise DataError(
            f"{domain}: {path}: train labels are not contiguous from 0 (got {sorted(names)[:5]}...)"
        )
    for split in ("val", "test"):
        if labels[split].size and (labels[split].min() < 0 or labels[split].max() >= len(names)):
            raise DataError(f"{domain}: {path}: '{split}' has labels outside the train classes")
    return CoopSplit(files, labels, tuple(names[i] for i in range(len(names))))


def write_coop_split(path: Path, items: dict[str, Sequence[CoopItem]]) -> None:
    """Write a CoOp split file (fixtures): ``items[split]`` = [(relative path, label, classname)]."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({s: [list(it) for it in items.get(s, ())] for s in SPLITS}, indent=1))


MODES = ("RGB", "L", "RGBA", "CMYK", "P")


def write_image(
    path: Path, rng: np.random.Generator, *, mode: str | None = None, size: tuple[int, int] | None = None
) -> None:
    """A real image file (format from the suffix: .jpg/.jpeg or .png) of a random size (or
    ``size`` = (width, height)) and mode: RGB, greyscale, RGBA (PNG only), CMYK (JPEG only),
    palette. Fixtures use it so the decoder meets every case the real datasets hold."""
    from PIL import Image

    path.parent.mkdir(parents=True, exist_ok=True)
    jpeg = path.suffix.lower() in (".jpg", ".jpeg")
    if mode is None:
        choices = ("RGB", "RGB", "L", "CMYK") if jpeg else ("RGB", "L", "RGBA", "P")
        mode = str(rng.choice(choices))
    width, height = size or (int(rng.integers(24, 97)), int(rng.integers(24, 97)))
    pixels = rng.integers(0, 256, size=(height, width, 3), dtype=np.uint8)
    image = Image.fromarray(pixels, "RGB")
    if mode == "P":
        image = image.quantize(16)
    elif mode != "RGB":
        image = image.convert(mode)
    image.save(path, format="JPEG" if jpeg else "PNG", **({"quality": 85} if jpeg else {}))
