"""Caltech101: X-TAIL 100 classes (CoOp json), MTIL 101 classes (torchvision), MULTIDOMAIN.md §3.2.

X-TAIL reads ``split_zhou_Caltech101.json`` (paths relative to ``101_ObjectCategories/``; CoOp
already dropped ``BACKGROUND_Google`` and ``Faces_easy`` and renamed ``Faces`` to ``face``; the
other names keep their underscores). MTIL indexes ``101_ObjectCategories`` the way torchvision
does (sorted folders minus ``BACKGROUND_Google``; ``image_0001.jpg`` .. ``image_<n>.jpg`` per
folder, n = the number of files in it), renames classes as ZSCL does and splits 80/20 with
``random_split`` seed 42.
"""

from __future__ import annotations

from pathlib import Path
from typing import cast

import numpy as np
import torch
from torch.utils.data import Dataset, random_split

from cl_bench.errors import ConfigError
from scenarios.domains import base
from scenarios.domains.base import Benchmark, DomainData, DomainSpec, ReadOptions, Sizes, Split
from scenarios.domains.files import read_coop_split, write_coop_split, write_image

NAME = "Caltech101"
MORAM_LAYOUT = "caltech101 (MoRAM/RAIL code, torchvision)"
COOP_LAYOUT = "caltech-101 (CoOp, MoRAM README)"
LAYOUTS = ((MORAM_LAYOUT, "caltech101"), (COOP_LAYOUT, "caltech-101"))
IMAGE_DIR = "101_ObjectCategories"
SPLIT_FILE = "split_zhou_Caltech101.json"
BACKGROUND = "BACKGROUND_Google"
# ZSCL's names for the folders it does not just de-underscore (src/datasets/collections.py::Caltech101).
MTIL_RENAMES = {
    "Faces": "off-center face",
    "Faces_easy": "centered face",
    "Leopards": "leopard",
    "Motorbikes": "motorbike",
    "airplanes": "airplane",
    "car_side": "side of a car",
    "cougar_body": "body of a cougar cat",
    "cougar_face": "face of a cougar cat",
    "crocodile_head": "head of a  crocodile",
    "flamingo_head": "head of a flamingo",
    "snoopy": "snoopy (cartoon beagle)",
    "yin_yang": "yin and yang symbol",
}
# CoOp's split rules (datasets/caltech101.py): folders it ignores and the ones it renames.
COOP_IGNORED = (BACKGROUND, "Faces_easy")
COOP_RENAMES = {"airplanes": "airplane", "Faces": "face", "Leopards": "leopard", "Motorbikes": "motorbike"}
FIXTURE_FOLDERS = {BACKGROUND: 2, "Faces": 5, "Faces_easy": 4, "car_side": 5, "crocodile_head": 4}
TEMPLATES = (
    "a photo of a {}.",
    "a painting of a {}.",
    "a plastic {}.",
    "a sculpture of a {}.",
    "a sketch of a {}.",
    "a tattoo of a {}.",
    "a toy {}.",
    "a rendition of a {}.",
    "a embroidered {}.",
    "a cartoon {}.",
    "a {} in a video game.",
    "a plushie {}.",
    "a origami {}.",
    "art of a {}.",
    "graffiti of a {}.",
    "a drawing of a {}.",
    "a doodle of a {}.",
    "a photo of the {}.",
    "a painting of the {}.",
    "the plastic {}.",
    "a sculpture of the {}.",
    "a sketch of the {}.",
    "a tattoo of the {}.",
    "the toy {}.",
    "a rendition of the {}.",
    "the embroidered {}.",
    "the cartoon {}.",
    "the {} in a video game.",
    "the plushie {}.",
    "the origami {}.",
    "art of the {}.",
    "graffiti of the {}.",
    "a drawing of the {}.",
    "a doodle of the {}.",
)


def _find_folder(root: Path) -> tuple[str, Path]:
    """The first accepted layout present under ``root`` (its label and folder)."""
    tried = [(label, root / rel) for label, rel in LAYOUTS]
    for label, folder in tried:
        if folder.is_dir():
            return label, folder
    raise base.no_layout(NAME, root, tried)


def mtil_name(folder: str) -> str:
    """ZSCL's class name for one ``101_ObjectCategories`` folder."""
    return MTIL_RENAMES.get(folder, folder.replace("_", " "))


def _random_split(n: int) -> tuple[list[int], list[int]]:
    """ZSCL's ``split_dataset``: an 80/20 ``random_split`` of ``range(n)`` with seed 42."""
    n_train = int(0.8 * n)
    indices = cast("Dataset[int]", range(n))
    train, test = random_split(indices, [n_train, n - n_train], generator=torch.Generator().manual_seed(42))
    return list(train.indices), list(test.indices)


def _read_mtil(images: Path) -> tuple[tuple[str, ...], Split]:
    """All images in torchvision's order, with the renamed class names."""
    folders = sorted(p.name for p in images.iterdir() if p.is_dir() and p.name != BACKGROUND)
    files: list[Path] = []
    labels: list[int] = []
    for label, name in enumerate(folders):
        count = sum(1 for _ in (images / name).iterdir())
        files.extend(images / name / f"image_{i:04d}.jpg" for i in range(1, count + 1))
        labels.extend([label] * count)
    return tuple(mtil_name(f) for f in folders), Split(np.asarray(labels, dtype=np.int64), files=tuple(files))


def read(root: Path, benchmark: Benchmark, options: ReadOptions) -> DomainData:
    """X-TAIL: the CoOp json's train/test; MTIL: torchvision's index split 80/20 (seed 42)."""
    del options
    layout, folder = _find_folder(root)
    images = folder / IMAGE_DIR
    if not images.is_dir():
        raise base.missing(NAME, images, "image folder", layout)
    if benchmark == "x-tail":
        path = folder / SPLIT_FILE
        if not path.is_file():
            raise base.missing(NAME, path, "CoOp split file", layout)
        split = read_coop_split(path, images, NAME)
        names = split.class_names
        train = Split(split.labels["train"], files=split.files["train"])
        test = Split(split.labels["test"], files=split.files["test"])
        notes = (f"CoOp {SPLIT_FILE}: train (before the 16-shot draw) / test; val unused",)
    else:
        names, everything = _read_mtil(images)
        train_idx, test_idx = _random_split(len(everything))
        train, test = everything.subset(train_idx), everything.subset(test_idx)
        notes = (
            "80/20 random_split seed 42 of the files sorted by class folder then image number "
            "(torchvision's order)",
        )
    return DomainData(NAME, benchmark, layout, folder, tuple(names), train, test, notes)


def write_fixture(root: Path, layout: str, rng: np.random.Generator) -> None:
    """A tiny Caltech101 folder: ``101_ObjectCategories/<folder>/image_NNNN.jpg`` for five real
    folders (background, both face classes, two underscored names) and the CoOp json beside it."""
    folders = dict(LAYOUTS)
    if layout not in folders:
        raise ConfigError(f"{NAME}: unknown layout {layout!r}; known: {', '.join(folders)}")
    folder = root / folders[layout]
    items: dict[str, list[tuple[str, int, str]]] = {"train": [], "val": [], "test": []}
    label = 0
    for name, count in FIXTURE_FOLDERS.items():
        rels = [f"{name}/image_{i:04d}.jpg" for i in range(1, count + 1)]
        for rel in rels:
            write_image(folder / IMAGE_DIR / rel, rng)
        if name in COOP_IGNORED:
            continue
        order = [rels[i] for i in rng.permutation(count)]
        n_train, n_val = round(count * 0.5), round(count * 0.2)
        cname = COOP_RENAMES.get(name, name)
        items["train"] += [(rel, label, cname) for rel in order[:n_train]]
        items["val"] += [(rel, label, cname) for rel in order[n_train : n_train + n_val]]
        items["test"] += [(rel, label, cname) for rel in order[n_train + n_val :]]
        label += 1
    write_coop_split(folder / SPLIT_FILE, {split: rows for split, rows in items.items()})


SPEC = base.register(
    DomainSpec(
        name=NAME,
        aliases=("caltech-101", "caltech_101", "caltech"),
        benchmarks=("x-tail", "mtil"),
        layouts=tuple(label for label, _ in LAYOUTS),
        xtail_template="a photo of a {}.",
        mtil_train_template="a photo of a {}.",
        mtil_eval_templates=TEMPLATES,
        sizes={"x-tail": Sizes(4128, 2465), "mtil": Sizes(6941, 1736)},
        read=read,
        write_fixture=write_fixture,
        folder_names=tuple(rel for _, rel in LAYOUTS),
    )
)
