"""DTD, the Describable Textures Dataset (47 classes), MULTIDOMAIN.md §3.4.

X-TAIL reads CoOp's ``dtd/split_zhou_DescribableTextures.json`` (paths relative to ``images/``).
MTIL reads partition 1 of the official split files, ``labels/{train1,test1}.txt`` (lines
``<class>/<file>.jpg``; classes = the sorted folder names, as torchvision's ``DTD``), first in
torchvision's ``dtd/dtd`` (it extracts the tarball inside ``dtd/``), then in ``dtd/`` itself
(the extracted tarball that CoOp adds its json to).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from cl_bench.errors import ConfigError, DataError
from scenarios.domains import base, files
from scenarios.domains.base import Benchmark, DomainData, DomainSpec, ReadOptions, Sizes, Split

NAME = "DTD"
COOP_LAYOUT = "dtd (MoRAM/RAIL/CoOp: images/, split_zhou_DescribableTextures.json)"
TV_LAYOUT = "dtd/dtd (torchvision: images/, labels/)"
FOLDERS = {COOP_LAYOUT: "dtd", TV_LAYOUT: "dtd/dtd"}
SEARCH: dict[Benchmark, tuple[str, ...]] = {"x-tail": (COOP_LAYOUT,), "mtil": (TV_LAYOUT, COOP_LAYOUT)}
SPLIT_FILE = "split_zhou_DescribableTextures.json"
FIXTURE_CLASSES = ("banded", "polka-dotted", "zigzagged")
FIXTURE_PER_CLASS = 6
TEMPLATES = (
    "a photo of a {} texture.",
    "a photo of a {} pattern.",
    "a photo of a {} thing.",
    "a photo of a {} object.",
    "a photo of the {} texture.",
    "a photo of the {} pattern.",
    "a photo of the {} thing.",
    "a photo of the {} object.",
)


def _find_folder(root: Path, benchmark: Benchmark) -> tuple[str, Path]:
    """The first layout of ``benchmark`` present under ``root`` (its label and folder)."""
    return base.find_layout(NAME, root, [(label, FOLDERS[label]) for label in SEARCH[benchmark]])


def _read_label_file(path: Path, layout: str) -> list[tuple[str, str]]:
    """The (class, relative path) pairs of one ``labels/<split>1.txt``."""
    if not path.is_file():
        raise base.missing(NAME, path, "split file", layout)
    pairs = []
    for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
        rel = line.strip()
        if not rel:
            continue
        cls, sep, file = rel.partition("/")
        if not sep or not cls or not file or "/" in file:
            raise DataError(f"{NAME}: {path} line {number}: expected '<class>/<file>.jpg', got {rel!r}")
        pairs.append((cls, rel))
    return pairs


def _read_mtil(folder: Path, layout: str) -> tuple[tuple[str, ...], Split, Split]:
    images = folder / "images"
    train = _read_label_file(folder / "labels" / "train1.txt", layout)
    test = _read_label_file(folder / "labels" / "test1.txt", layout)
    names = tuple(sorted({cls for cls, _ in train}))
    index = {name: label for label, name in enumerate(names)}
    unknown = sorted({cls for cls, _ in test} - set(index))
    if unknown:
        raise DataError(f"{NAME}: {folder / 'labels' / 'test1.txt'} has classes not in train1.txt: {unknown}")

    def split(pairs: list[tuple[str, str]]) -> Split:
        labels = np.asarray([index[cls] for cls, _ in pairs], dtype=np.int64)
        return Split(labels, files=tuple(images / rel for _, rel in pairs))

    return names, split(train), split(test)


def read(root: Path, benchmark: Benchmark, options: ReadOptions) -> DomainData:
    """X-TAIL: the CoOp json's train/test; MTIL: partition 1 (train1 / test1; val1 unused)."""
    del options
    layout, folder = _find_folder(root, benchmark)
    if benchmark == "x-tail":
        notes = (f"CoOp {SPLIT_FILE}: train (before the 16-shot draw) / test; val unused",)
        return files.read_coop_domain(NAME, benchmark, layout, folder, SPLIT_FILE, folder / "images", notes)
    names, train, test = _read_mtil(folder, layout)
    notes = ("official partition 1: labels/train1.txt (train) / labels/test1.txt (test); val1 unused",)
    return DomainData(NAME, benchmark, layout, folder, names, train, test, notes)


def write_fixture(root: Path, layout: str, rng: np.random.Generator) -> None:
    """A tiny extracted DTD tarball (``images/<class>/<class>_NNNN.jpg``, ``labels/{train1,val1,
    test1}.txt``) for three real classes (one hyphenated); the CoOp layout adds its json."""
    if layout not in FOLDERS:
        raise ConfigError(f"{NAME}: unknown layout {layout!r}; known: {', '.join(FOLDERS)}")
    folder = root / FOLDERS[layout]
    partition: dict[str, list[str]] = {"train1": [], "val1": [], "test1": []}
    items = files.coop_items()
    per_part = FIXTURE_PER_CLASS // len(partition)
    for label, name in enumerate(FIXTURE_CLASSES):
        numbers = sorted(rng.choice(np.arange(1, 200), FIXTURE_PER_CLASS, replace=False).tolist())
        rels = [f"{name}/{name}_{n:04d}.jpg" for n in numbers]
        for rel in rels:
            files.write_image(folder / "images" / rel, rng)
        shuffled = [rels[i] for i in rng.permutation(len(rels))]
        for k, part in enumerate(partition):
            partition[part] += sorted(shuffled[k * per_part : (k + 1) * per_part])
        files.add_coop_items(items, [rels[i] for i in rng.permutation(len(rels))], label, name)
    (folder / "labels").mkdir(parents=True, exist_ok=True)
    for part, rels in partition.items():
        (folder / "labels" / f"{part}.txt").write_text("".join(f"{rel}\n" for rel in rels))
    if layout == COOP_LAYOUT:
        files.write_coop_split(folder / SPLIT_FILE, items)


SPEC = base.register(
    DomainSpec(
        name=NAME,
        aliases=("describabletextures", "describable-textures", "describable_textures", "textures"),
        benchmarks=("x-tail", "mtil"),
        layouts=(COOP_LAYOUT, TV_LAYOUT),
        xtail_template="{} texture.",
        mtil_train_template="a photo of a {} texture.",
        mtil_eval_templates=TEMPLATES,
        sizes={"x-tail": Sizes(2820, 1692), "mtil": Sizes(1880, 1880)},
        read=read,
        write_fixture=write_fixture,
        folder_names=tuple(FOLDERS.values()),
    )
)
