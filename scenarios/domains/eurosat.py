"""EuroSAT RGB (10 classes of 64x64 satellite JPEGs), MULTIDOMAIN.md §3.5.

Every reference uses ``eurosat/2750/<Folder>/<Folder>_<n>.jpg``. X-TAIL reads CoOp's
``eurosat/split_zhou_EuroSAT.json`` (paths relative to ``2750/``) and appends
``' satellite location'`` to each class name as MoRAM does. MTIL reads ``2750`` as torchvision's
``ImageFolder`` (sorted folders, sorted file names), names the classes with ZSCL's list and
splits 80/20 with ``random_split`` seed 42.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from cl_bench.errors import ConfigError, DataError
from scenarios.domains import base, files
from scenarios.domains.base import Benchmark, DomainData, DomainSpec, ReadOptions, Sizes, Split

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


def _read_mtil(images: Path) -> tuple[tuple[str, ...], Split]:
    """``ImageFolder(2750)``: every image, sorted by class folder then file name."""
    folders = sorted(p.name for p in images.iterdir() if p.is_dir())
    unknown = [name for name in folders if name not in MTIL_NAMES]
    if unknown:
        raise DataError(f"{NAME}: {images} holds folders that are not EuroSAT classes: {unknown}")
    paths: list[Path] = []
    labels: list[int] = []
    for label, name in enumerate(folders):
        found = sorted(p.name for p in (images / name).iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)
        paths.extend(images / name / file for file in found)
        labels.extend([label] * len(found))
    names = tuple(MTIL_NAMES[f] for f in folders)
    return names, Split(np.asarray(labels, dtype=np.int64), files=tuple(paths))


def read(root: Path, benchmark: Benchmark, options: ReadOptions) -> DomainData:
    """X-TAIL: the CoOp json's train/test; MTIL: ``ImageFolder`` split 80/20 (seed 42)."""
    del options
    _, folder = base.find_layout(NAME, root, [(LAYOUT, FOLDER)])
    images = folder / IMAGE_DIR
    if not images.is_dir():
        raise base.missing(NAME, images, "image folder", LAYOUT)
    if benchmark == "x-tail":
        notes: tuple[str, ...] = (
            f"CoOp {SPLIT_FILE}: train (before the 16-shot draw) / test; val unused",
            f"{XTAIL_SUFFIX.strip()!r} appended to every class name (MoRAM)",
        )
        return files.read_coop_domain(
            NAME,
            benchmark,
            LAYOUT,
            folder,
            SPLIT_FILE,
            images,
            notes,
            rename=lambda name: name + XTAIL_SUFFIX,
        )
    names, everything = _read_mtil(images)
    train, test = files.zscl_subsets(everything)
    notes = ("80/20 random_split seed 42 of the files sorted by class folder then file name (ImageFolder)",)
    return DomainData(NAME, benchmark, LAYOUT, folder, names, train, test, notes)


def write_fixture(root: Path, layout: str, rng: np.random.Generator) -> None:
    """A tiny ``eurosat/``: 64x64 RGB JPEGs ``2750/<Folder>/<Folder>_<n>.jpg`` for four real
    classes and CoOp's json (per class 50% train, 20% val, the rest test)."""
    if layout != LAYOUT:
        raise ConfigError(f"{NAME}: unknown layout {layout!r}; known: {LAYOUT}")
    folder = root / FOLDER
    items = files.coop_items()
    for label, name in enumerate(FIXTURE_FOLDERS):
        numbers = rng.choice(np.arange(1, 3001), FIXTURE_PER_CLASS, replace=False).tolist()
        rels = [f"{name}/{name}_{n}.jpg" for n in numbers]
        for rel in rels:
            files.write_image(folder / IMAGE_DIR / rel, rng, mode="RGB", size=(64, 64))
        files.add_coop_items(items, rels, label, COOP_NAMES[name])
    files.write_coop_split(folder / SPLIT_FILE, items)


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
