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

import numpy as np

from cl_bench.errors import ConfigError
from scenarios.domains import base, files
from scenarios.domains.base import Benchmark, DomainData, DomainSpec, ReadOptions, Sizes, Split

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


def mtil_name(folder: str) -> str:
    """ZSCL's class name for one ``101_ObjectCategories`` folder."""
    return MTIL_RENAMES.get(folder, folder.replace("_", " "))


def _read_mtil(images: Path) -> tuple[tuple[str, ...], Split]:
    """All images in torchvision's order, with the renamed class names."""
    folders = sorted(p.name for p in images.iterdir() if p.is_dir() and p.name != BACKGROUND)
    paths: list[Path] = []
    labels: list[int] = []
    for label, name in enumerate(folders):
        count = sum(1 for _ in (images / name).iterdir())
        paths.extend(images / name / f"image_{i:04d}.jpg" for i in range(1, count + 1))
        labels.extend([label] * count)
    return tuple(mtil_name(f) for f in folders), Split(np.asarray(labels, dtype=np.int64), files=tuple(paths))


def read(root: Path, benchmark: Benchmark, options: ReadOptions) -> DomainData:
    """X-TAIL: the CoOp json's train/test; MTIL: torchvision's index split 80/20 (seed 42)."""
    del options
    layout, folder = base.find_layout(NAME, root, LAYOUTS)
    images = folder / IMAGE_DIR
    if not images.is_dir():
        raise base.missing(NAME, images, "image folder", layout)
    if benchmark == "x-tail":
        notes = (f"CoOp {SPLIT_FILE}: train (before the 16-shot draw) / test; val unused",)
        return files.read_coop_domain(NAME, benchmark, layout, folder, SPLIT_FILE, images, notes)
    names, everything = _read_mtil(images)
    train, test = files.zscl_subsets(everything)
    notes = (
        "80/20 random_split seed 42 of the files sorted by class folder then image number "
        "(torchvision's order)",
    )
    return DomainData(NAME, benchmark, layout, folder, names, train, test, notes)


def write_fixture(root: Path, layout: str, rng: np.random.Generator) -> None:
    """A tiny Caltech101 folder: ``101_ObjectCategories/<folder>/image_NNNN.jpg`` for five real
    folders (background, both face classes, two underscored names) and the CoOp json beside it."""
    folders = dict(LAYOUTS)
    if layout not in folders:
        raise ConfigError(f"{NAME}: unknown layout {layout!r}; known: {', '.join(folders)}")
    folder = root / folders[layout]
    items = files.coop_items()
    label = 0
    for name, count in FIXTURE_FOLDERS.items():
        rels = [f"{name}/image_{i:04d}.jpg" for i in range(1, count + 1)]
        for rel in rels:
            files.write_image(folder / IMAGE_DIR / rel, rng)
        if name in COOP_IGNORED:
            continue
        order = [rels[i] for i in rng.permutation(count)]
        files.add_coop_items(items, order, label, COOP_RENAMES.get(name, name))
        label += 1
    files.write_coop_split(folder / SPLIT_FILE, items)


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
