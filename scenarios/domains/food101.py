"""Food101 (101 dishes), MULTIDOMAIN.md §3.7.

One folder serves both benchmarks: ``R/food-101/images/<class>/<id>.jpg``. X-TAIL reads CoOp's
re-split ``split_zhou_Food101.json`` (paths relative to ``images/``, names = folder names with
underscores kept); MTIL reads torchvision's official split ``meta/{train,test}.json``
(``{class: ["class/id", ...]}`` without ``.jpg``; classes = sorted keys, ``_`` -> space).
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from cl_bench.errors import DataError
from scenarios.domains import base, files
from scenarios.domains.base import Benchmark, DomainData, DomainSpec, ReadOptions, Sizes, Split

NAME = "Food101"
FOLDER = "food-101"
LAYOUT = "food-101 (MoRAM, RAIL, CoOp, torchvision)"
SPLIT_JSON = "split_zhou_Food101.json"
TEMPLATE = "a photo of a {}, a type of food."

# Real Food-101 classes for the fixture (underscores exercise the X-TAIL/MTIL name rules).
FIXTURE_CLASSES = ("apple_pie", "hot_and_sour_soup", "pizza")


def _read_meta_json(path: Path) -> dict[str, list[str]]:
    """One of torchvision's ``meta/{train,test}.json``: class -> ["class/id", ...]."""
    if not path.is_file():
        raise base.missing(NAME, path, "torchvision split file", LAYOUT)
    try:
        raw = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise DataError(f"{NAME}: {path} is not a readable JSON file ({err})") from None
    ok = isinstance(raw, dict) and all(
        isinstance(v, list) and all(isinstance(s, str) for s in v) for v in raw.values()
    )
    if not ok or not raw:
        raise DataError(f'{NAME}: {path} must be a JSON object {{"class": ["class/id", ...]}}')
    return raw


def _mtil_split(meta: dict[str, list[str]], classes: list[str], images: Path, path: Path) -> Split:
    """Files in the json's own order (torchvision iterates the dict), labels = sorted-class index."""
    index = {name: i for i, name in enumerate(classes)}
    paths: list[Path] = []
    labels: list[int] = []
    for name, entries in meta.items():
        if name not in index:
            raise DataError(f"{NAME}: {path} has class {name!r} that meta/train.json does not have")
        paths += [images / f"{entry}.jpg" for entry in entries]
        labels += [index[name]] * len(entries)
    return Split(np.asarray(labels, dtype=np.int64), files=tuple(paths))


def read(root: Path, benchmark: Benchmark, options: ReadOptions) -> DomainData:
    """Food101 of ``benchmark`` under ``root`` (CoOp json for X-TAIL, TV meta for MTIL)."""
    del options  # no checksums: torchvision does not md5 the extracted Food-101 files
    _, folder = base.find_layout(NAME, root, [(LAYOUT, FOLDER)])
    images = folder / "images"
    if benchmark == "x-tail":
        notes = (f"CoOp re-split {SPLIT_JSON} (not the official train/test)",)
        return files.read_coop_domain(NAME, benchmark, LAYOUT, folder, SPLIT_JSON, images, notes)
    train_path, test_path = folder / "meta" / "train.json", folder / "meta" / "test.json"
    train_meta, test_meta = _read_meta_json(train_path), _read_meta_json(test_path)
    classes = sorted(train_meta)
    return DomainData(
        NAME,
        benchmark,
        LAYOUT,
        folder,
        tuple(name.replace("_", " ") for name in classes),
        _mtil_split(train_meta, classes, images, train_path),
        _mtil_split(test_meta, classes, images, test_path),
        ("official split meta/train.json, meta/test.json",),
    )


def write_fixture(root: Path, layout: str, rng: np.random.Generator) -> None:
    """A tiny food-101 folder: 3 real classes, 3 official-train + 2 official-test JPEGs each,
    torchvision's ``meta/`` files and a CoOp json re-splitting the same images 2/1/2."""
    if layout != LAYOUT:
        raise ValueError(f"{NAME} has no layout {layout!r}")
    folder = root / FOLDER
    meta: dict[str, dict[str, list[str]]] = {"train": {}, "test": {}}
    coop = files.coop_items()
    for label, name in enumerate(FIXTURE_CLASSES):
        ids = sorted(int(x) for x in 100000 + rng.choice(3900000, size=5, replace=False))
        entries = [f"{name}/{i}" for i in ids]
        for entry in entries:
            files.write_image(folder / "images" / f"{entry}.jpg", rng)
        meta["train"][name], meta["test"][name] = entries[:3], entries[3:]
        files.add_coop_items(coop, [f"{entry}.jpg" for entry in entries], label, name, n_train=2, n_val=1)
    (folder / "meta").mkdir(parents=True, exist_ok=True)
    for split in ("train", "test"):
        (folder / "meta" / f"{split}.json").write_text(json.dumps(meta[split]))
        lines = [entry for entries in meta[split].values() for entry in entries]
        (folder / "meta" / f"{split}.txt").write_text("\n".join(lines) + "\n")
    (folder / "meta" / "classes.txt").write_text("\n".join(FIXTURE_CLASSES) + "\n")
    labels = [name.replace("_", " ").capitalize() for name in FIXTURE_CLASSES]
    (folder / "meta" / "labels.txt").write_text("\n".join(labels) + "\n")
    files.write_coop_split(folder / SPLIT_JSON, coop)


SPEC = base.register(
    DomainSpec(
        name=NAME,
        aliases=("food", "food-101", "food_101"),
        benchmarks=("x-tail", "mtil"),
        layouts=(LAYOUT,),
        xtail_template=TEMPLATE,
        mtil_train_template=TEMPLATE,
        mtil_eval_templates=(TEMPLATE,),
        sizes={"x-tail": Sizes(50500, 30300), "mtil": Sizes(75750, 25250)},
        read=read,
        write_fixture=write_fixture,
        folder_names=(FOLDER,),
    )
)
