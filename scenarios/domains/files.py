"""File formats and rules several domains share: CoOp's ``split_zhou_*.json`` (reading it into a
:class:`~scenarios.domains.base.DomainData`, writing it for fixtures), ZSCL's 80/20 split and
fixture images.

CoOp split file (``CoOp:datasets/oxford_pets.py::save_split``): a JSON object with keys
``"train"``, ``"val"``, ``"test"``, each a list of ``[relative_image_path, label_int, classname]``;
paths are relative to the domain's image directory, labels 0-based and contiguous. Class names
come from the ``train`` items in label order (``DatasetBase.get_lab2cname``), MULTIDOMAIN.md §2.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import cast

import numpy as np

from cl_bench.errors import DataError
from scenarios.domains.base import Benchmark, DomainData, Split, missing

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


def read_coop_domain(
    domain: str,
    benchmark: Benchmark,
    layout: str,
    folder: Path,
    split_file: str,
    image_dir: Path,
    notes: tuple[str, ...],
    rename: Callable[[str], str] | None = None,
) -> DomainData:
    """A domain as X-TAIL reads it: the train and test items of the CoOp split file
    ``folder / split_file`` (paths under ``image_dir``; ``val`` unused), the class names of the
    json (passed through ``rename`` where the benchmark changes them). A missing json raises
    :func:`~scenarios.domains.base.missing` naming it, as a "CoOp split file" of ``layout``."""
    path = folder / split_file
    if not path.is_file():
        raise missing(domain, path, "CoOp split file", layout)
    coop = read_coop_split(path, image_dir, domain)
    names = coop.class_names if rename is None else tuple(rename(name) for name in coop.class_names)
    train = Split(coop.labels["train"], files=coop.files["train"])
    test = Split(coop.labels["test"], files=coop.files["test"])
    return DomainData(domain, benchmark, layout, folder, names, train, test, notes)


def write_coop_split(path: Path, items: Mapping[str, Sequence[CoopItem]]) -> None:
    """Write a CoOp split file (fixtures): ``items[split]`` = [(relative path, label, classname)]."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({s: [list(it) for it in items.get(s, ())] for s in SPLITS}, indent=1))


def coop_items() -> dict[str, list[CoopItem]]:
    """Empty per-split item lists for a fixture's CoOp json, filled by :func:`add_coop_items`."""
    return {split: [] for split in SPLITS}


def add_coop_items(
    items: dict[str, list[CoopItem]],
    rels: Sequence[str],
    label: int,
    name: str,
    *,
    n_train: int | None = None,
    n_val: int | None = None,
) -> None:
    """Append one class's images (``rels``, in the order given) to a fixture's CoOp items: the
    first ``n_train`` to train, the next ``n_val`` to val, the rest to test. Left out, the counts
    follow CoOp's ``read_and_split_data`` (``round(50%)`` train, ``round(20%)`` val per class), which
    the fixtures of the domains that CoOp re-split imitate."""
    if n_train is None:
        n_train = round(len(rels) * 0.5)
    if n_val is None:
        n_val = round(len(rels) * 0.2)
    items["train"] += [(rel, label, name) for rel in rels[:n_train]]
    items["val"] += [(rel, label, name) for rel in rels[n_train : n_train + n_val]]
    items["test"] += [(rel, label, name) for rel in rels[n_train + n_val :]]


ZSCL_SEED = 42


def zscl_split(n: int) -> tuple[list[int], list[int]]:
    """ZSCL's ``split_dataset``: a ``random_split`` of ``range(n)`` into ``int(0.8 n)`` train and the
    rest test, seeded 42, as MTIL splits the domains that have no official test set (Caltech101,
    EuroSAT, SUN397). Returns the train and test indices."""
    import torch

    n_train = int(0.8 * n)
    indices = cast("torch.utils.data.Dataset[int]", range(n))
    train, test = torch.utils.data.random_split(
        indices, [n_train, n - n_train], generator=torch.Generator().manual_seed(ZSCL_SEED)
    )
    return list(train.indices), list(test.indices)


def zscl_subsets(everything: Split) -> tuple[Split, Split]:
    """The train and test subsets of ``everything`` by :func:`zscl_split` (MTIL's split of a domain
    read as one list of files)."""
    train, test = zscl_split(len(everything))
    return everything.subset(train), everything.subset(test)


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
