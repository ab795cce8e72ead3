"""FGVC-Aircraft 2013b (100 variants), MULTIDOMAIN.md §3.1.

Both benchmarks read the same files: ``variants.txt`` (one class name per line, label = line
index; names contain ``/`` such as ``F-16A/B``) and ``images_variant_{train,test}.txt`` (lines
``<image id> <variant name>``, split on the first space); image = ``images/<id>.jpg``. X-TAIL
draws its 16 shots later from ``train``; MTIL trains on all of it (``train``, not ``trainval``).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from cl_bench.errors import ConfigError, DataError
from scenarios.domains import base
from scenarios.domains.base import Benchmark, DomainData, DomainSpec, ReadOptions, Sizes, Split
from scenarios.domains.files import write_image

NAME = "Aircraft"
TEMPLATE = "a photo of a {}, a type of aircraft."
MORAM_LAYOUT = "fgvc-aircraft-2013b/data (MoRAM code, torchvision)"
COOP_LAYOUT = "fgvc_aircraft (CoOp, RAIL, MoRAM README)"
LAYOUTS = ((MORAM_LAYOUT, "fgvc-aircraft-2013b/data"), (COOP_LAYOUT, "fgvc_aircraft"))
FIXTURE_CLASSES = ("707-320", "Cessna 172", "F-16A/B", "F/A-18")
FIXTURE_PER_SPLIT = {"train": 3, "val": 1, "test": 2}


def _read_lines(path: Path, what: str, layout: str) -> list[str]:
    if not path.is_file():
        raise base.missing(NAME, path, what, layout)
    return [line.strip() for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


def _read_split(path: Path, images: Path, index: dict[str, int], layout: str) -> Split:
    """One ``images_variant_<split>.txt``: files ``images/<id>.jpg`` and the variants' labels."""
    files, labels = [], []
    for number, line in enumerate(_read_lines(path, "split file", layout), start=1):
        image_id, _, variant = line.partition(" ")
        if variant not in index:
            raise DataError(f"{NAME}: {path} line {number}: variant {variant!r} is not in variants.txt")
        files.append(images / f"{image_id}.jpg")
        labels.append(index[variant])
    return Split(np.asarray(labels, dtype=np.int64), files=tuple(files))


def read(root: Path, benchmark: Benchmark, options: ReadOptions) -> DomainData:
    """The train and test splits of the official FGVC split files (same for X-TAIL and MTIL)."""
    del options
    layout, folder = base.find_layout(NAME, root, LAYOUTS)
    names = _read_lines(folder / "variants.txt", "class list", layout)
    if len(set(names)) != len(names):
        raise DataError(f"{NAME}: {folder / 'variants.txt'} lists a variant twice")
    index = {name: label for label, name in enumerate(names)}
    images = folder / "images"
    if not images.is_dir():
        raise base.missing(NAME, images, "image folder", layout)
    train = _read_split(folder / "images_variant_train.txt", images, index, layout)
    test = _read_split(folder / "images_variant_test.txt", images, index, layout)
    return DomainData(
        domain=NAME,
        benchmark=benchmark,
        layout=layout,
        folder=folder,
        class_names=tuple(names),
        train=train,
        test=test,
        notes=("official split: images_variant_train.txt (train) / images_variant_test.txt (test)",),
    )


def write_fixture(root: Path, layout: str, rng: np.random.Generator) -> None:
    """A tiny FGVC folder: ``variants.txt``, ``images_variant_{train,val,trainval,test}.txt`` and
    JPEGs named by 7-digit image ids, for four real variants (two with ``/`` in the name)."""
    folders = dict(LAYOUTS)
    if layout not in folders:
        raise ConfigError(f"{NAME}: unknown layout {layout!r}; known: {', '.join(folders)}")
    folder = root / folders[layout]
    folder.mkdir(parents=True, exist_ok=True)
    lines: dict[str, list[str]] = {split: [] for split in FIXTURE_PER_SPLIT}
    ids = iter(rng.permutation(np.arange(1000000, 1000000 + 100))[:30].tolist())
    for variant in FIXTURE_CLASSES:
        for split, count in FIXTURE_PER_SPLIT.items():
            for _ in range(count):
                image_id = f"{next(ids):07d}"
                write_image(folder / "images" / f"{image_id}.jpg", rng)
                lines[split].append(f"{image_id} {variant}")
    lines["trainval"] = lines["train"] + lines["val"]
    (folder / "variants.txt").write_text("".join(f"{name}\n" for name in FIXTURE_CLASSES))
    for split, split_lines in lines.items():
        order = rng.permutation(len(split_lines))
        text = "".join(f"{split_lines[i]}\n" for i in order)
        (folder / f"images_variant_{split}.txt").write_text(text)


SPEC = base.register(
    DomainSpec(
        name=NAME,
        aliases=("fgvc-aircraft", "fgvc_aircraft", "fgvcaircraft", "fgvc-aircraft-2013b"),
        benchmarks=("x-tail", "mtil"),
        layouts=tuple(label for label, _ in LAYOUTS),
        xtail_template=TEMPLATE,
        mtil_train_template=TEMPLATE,
        mtil_eval_templates=(TEMPLATE, "a photo of the {}, a type of aircraft."),
        sizes={"x-tail": Sizes(3334, 3333), "mtil": Sizes(3334, 3333)},
        read=read,
        write_fixture=write_fixture,
        folder_names=tuple(rel for _, rel in LAYOUTS),
    )
)
