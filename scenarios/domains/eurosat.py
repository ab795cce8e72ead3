"""EuroSAT RGB (10 classes of 64x64 satellite JPEGs), MULTIDOMAIN.md §3.5.

Every reference uses ``eurosat/2750/<Folder>/<Folder>_<n>.jpg``. X-TAIL reads CoOp's
``eurosat/split_zhou_EuroSAT.json`` (paths relative to ``2750/``) and appends
``' satellite location'`` to each class name as MoRAM does. MTIL reads ``2750`` as torchvision's
``ImageFolder`` (sorted folders, sorted file names), names the classes with ZSCL's list and
splits 80/20 with ``random_split`` seed 42.
"""

from __future__ import annotations

from pathlib import Path
from typing import cast

import numpy as np
import torch
from torch.utils.data import Dataset, random_split

from cl_bench.errors import ConfigError, DataError
from scenarios.domains import base
from scenarios.domains.base import Benchmark, DomainData, DomainSpec, ReadOptions, Sizes, Split
from scenarios.domains.files import read_coop_split, write_coop_split, write_image

NAME = "EuroSAT"
LAYOUT = "eurosat/2750 (MoRAM, RAIL, CoOp, torchvision)"
FOLDER = "eurosat"
IMAGE_DIR = "2750"
SPLIT_FILE = "split_zhou_EuroSAT.json"
XTAIL_SUFFIX = " satellite location"
# Per class folder: CoOp's json name (datasets/eurosat.py NEW_CNAMES) and ZSCL's MTIL name.
COOP_NAMES = {
    "AnnualCrop": "Annual Crop Land",
    "Forest": "Forest",
    "HerbaceousVegetation": "Herbaceous Vegetation Land",
    "Highway": "Highway or Road",
    "Industrial": "Industrial Buildings",
    "Pasture": "Pasture Land",
    "PermanentCrop": "Permanent Crop Land",
    "Residential": "Residential Buildings",
    "River": "River",
    "SeaLake": "Sea or Lake",
}
MTIL_NAMES = {
    "AnnualCrop": "annual crop land",
    "Forest": "forest",
    "HerbaceousVegetation": "brushland or shrubland",
    "Highway": "highway or road",
    "Industrial": "industrial buildings or commercial buildings",
    "Pasture": "pasture land",
    "PermanentCrop": "permanent crop land",
    "Residential": "residential buildings or homes or apartments",
    "River": "river",
    "SeaLake": "lake or sea",
}
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".ppm", ".bmp", ".pgm", ".tif", ".tiff", ".webp")  # ImageFolder's
FIXTURE_FOLDERS = ("AnnualCrop", "HerbaceousVegetation", "Industrial", "SeaLake")
FIXTURE_PER_CLASS = 5


def _random_split(n: int) -> tuple[list[int], list[int]]:
    """ZSCL's ``split_dataset``: an 80/20 ``random_split`` of ``range(n)`` with seed 42."""
    n_train = int(0.8 * n)
    indices = cast("Dataset[int]", range(n))
    train, test = random_split(indices, [n_train, n - n_train], generator=torch.Generator().manual_seed(42))
    return list(train.indices), list(test.indices)


def _read_mtil(images: Path) -> tuple[tuple[str, ...], Split]:
    """``ImageFolder(2750)``: every image, sorted by class folder then file name."""
    folders = sorted(p.name for p in images.iterdir() if p.is_dir())
    unknown = [name for name in folders if name not in MTIL_NAMES]
    if unknown:
        raise DataError(f"{NAME}: {images} holds folders that are not EuroSAT classes: {unknown}")
    files: list[Path] = []
    labels: list[int] = []
    for label, name in enumerate(folders):
        found = sorted(p.name for p in (images / name).iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)
        files.extend(images / name / file for file in found)
        labels.extend([label] * len(found))
    names = tuple(MTIL_NAMES[f] for f in folders)
    return names, Split(np.asarray(labels, dtype=np.int64), files=tuple(files))


def read(root: Path, benchmark: Benchmark, options: ReadOptions) -> DomainData:
    """X-TAIL: the CoOp json's train/test; MTIL: ``ImageFolder`` split 80/20 (seed 42)."""
    del options
    folder = root / FOLDER
    if not folder.is_dir():
        raise base.no_layout(NAME, root, [(LAYOUT, folder)])
    images = folder / IMAGE_DIR
    if not images.is_dir():
        raise base.missing(NAME, images, "image folder", LAYOUT)
    if benchmark == "x-tail":
        path = folder / SPLIT_FILE
        if not path.is_file():
            raise base.missing(NAME, path, "CoOp split file", LAYOUT)
        coop = read_coop_split(path, images, NAME)
        names = tuple(name + XTAIL_SUFFIX for name in coop.class_names)
        train = Split(coop.labels["train"], files=coop.files["train"])
        test = Split(coop.labels["test"], files=coop.files["test"])
        notes: tuple[str, ...] = (
            f"CoOp {SPLIT_FILE}: train (before the 16-shot draw) / test; val unused",
            f"{XTAIL_SUFFIX.strip()!r} appended to every class name (MoRAM)",
        )
    else:
        names, everything = _read_mtil(images)
        train_idx, test_idx = _random_split(len(everything))
        train, test = everything.subset(train_idx), everything.subset(test_idx)
        notes = (
            "80/20 random_split seed 42 of the files sorted by class folder then file name (ImageFolder)",
        )
    return DomainData(NAME, benchmark, LAYOUT, folder, names, train, test, notes)


def write_fixture(root: Path, layout: str, rng: np.random.Generator) -> None:
    """A tiny ``eurosat/``: 64x64 RGB JPEGs ``2750/<Folder>/<Folder>_<n>.jpg`` for four real
    classes and CoOp's json (per class 50% train, 20% val, the rest test)."""
    if layout != LAYOUT:
        raise ConfigError(f"{NAME}: unknown layout {layout!r}; known: {LAYOUT}")
    folder = root / FOLDER
    items: dict[str, list[tuple[str, int, str]]] = {"train": [], "val": [], "test": []}
    n_train, n_val = round(FIXTURE_PER_CLASS * 0.5), round(FIXTURE_PER_CLASS * 0.2)
    for label, name in enumerate(FIXTURE_FOLDERS):
        numbers = rng.choice(np.arange(1, 3001), FIXTURE_PER_CLASS, replace=False).tolist()
        rels = [f"{name}/{name}_{n}.jpg" for n in numbers]
        for rel in rels:
            write_image(folder / IMAGE_DIR / rel, rng, mode="RGB", size=(64, 64))
        cname = COOP_NAMES[name]
        items["train"] += [(rel, label, cname) for rel in rels[:n_train]]
        items["val"] += [(rel, label, cname) for rel in rels[n_train : n_train + n_val]]
        items["test"] += [(rel, label, cname) for rel in rels[n_train + n_val :]]
    write_coop_split(folder / SPLIT_FILE, {split: rows for split, rows in items.items()})


SPEC = base.register(
    DomainSpec(
        name=NAME,
        aliases=("eurosat-rgb", "eurosat_rgb", "euro-sat", "euro_sat"),
        benchmarks=("x-tail", "mtil"),
        layouts=(LAYOUT,),
        xtail_template="a centered satellite photo of the {}.",
        mtil_train_template="a centered satellite photo of {}.",
        mtil_eval_templates=(
            "a centered satellite photo of {}.",
            "a centered satellite photo of a {}.",
            "a centered satellite photo of the {}.",
        ),
        sizes={"x-tail": Sizes(13500, 8100), "mtil": Sizes(21600, 5400)},
        read=read,
        write_fixture=write_fixture,
        folder_names=(FOLDER,),
    )
)
