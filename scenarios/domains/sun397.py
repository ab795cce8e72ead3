"""SUN397 (397 scene categories), MULTIDOMAIN.md §3.11.

Images ``SUN397/<letter>/<category path>/sun_*.jpg`` with ``SUN397/ClassName.txt`` (lines
``/a/apartment_building/outdoor``, alphabetical = label order). X-TAIL reads CoOp's
``split_zhou_SUN397.json`` (paths relative to ``SUN397/``; names: letter dropped, parts reversed,
underscores kept: ``outdoor apartment_building``). MTIL reads it as torchvision does (names =
``line[3:]`` with ``_`` -> space: ``apartment building/outdoor``; every ``sun_*.jpg`` below the folder,
label from its directory) and takes ZSCL's 80/20 ``random_split`` seed 42 over the SORTED file list:
torchvision's ``rglob`` order depends on the filesystem, so the split is not byte-identical to ZSCL's.
"""

from __future__ import annotations

from pathlib import Path
from typing import cast

import numpy as np

from cl_bench.errors import DataError
from scenarios.domains import files
from scenarios.domains.base import (
    Benchmark,
    DomainData,
    DomainSpec,
    ReadOptions,
    Sizes,
    Split,
    missing,
    no_layout,
    register,
)

NAME = "SUN397"
SPLIT_JSON = "split_zhou_SUN397.json"
IMAGES = "SUN397"
# (label, folder under the root, image folder under that folder): the detection order of §3.13.
LAYOUTS = (
    ("SUN397 (MoRAM code, torchvision; json inside)", "SUN397", "."),
    ("sun397 (RAIL, CoOp, MoRAM README; json beside SUN397/)", "sun397", IMAGES),
)
SPLIT_SEED = 42
MTIL_NOTE = "80/20 random_split seed 42 of the sorted file list (not byte-identical to ZSCL's rglob order)"

# Real categories: one-part, two-part (the '/' and '_' of §3.11) and one shared with Caltech101.
FIXTURE_CLASSES = ("/a/abbey", "/a/apartment_building/outdoor", "/b/bakery/shop", "/p/pagoda")


def _find(root: Path) -> tuple[str, Path, Path]:
    """(layout label, matched folder, image folder) of the first layout whose folder exists."""
    for label, rel, images in LAYOUTS:
        folder = root / rel
        if folder.is_dir():
            image_dir = folder if images == "." else folder / images
            if not image_dir.is_dir():
                raise missing(NAME, image_dir, "image folder", label)
            return label, folder, image_dir
    raise no_layout(NAME, root, [(label, root / rel) for label, rel, _ in LAYOUTS])


def _categories(path: Path, layout: str) -> tuple[str, ...]:
    """The category paths of ``ClassName.txt`` without ``/<letter>/`` (torchvision's ``line[3:]``)."""
    if not path.is_file():
        raise missing(NAME, path, "class list", layout)
    out: list[str] = []
    for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        entry = line.strip()
        if not entry:
            continue
        if len(entry) < 4 or entry[0] != "/" or entry[2] != "/":
            raise DataError(f"{NAME}: {path} line {number} is not '/<letter>/<category>' (got {entry!r})")
        out.append(entry[3:])
    if not out:
        raise DataError(f"{NAME}: {path} lists no category")
    return tuple(out)


def mtil_split(n: int) -> tuple[list[int], list[int]]:
    """ZSCL's ``split_dataset``: ``random_split`` of ``n`` items into int(0.8 n) / rest, seed 42."""
    import torch

    n_train = int(0.8 * n)
    items = cast("torch.utils.data.Dataset[int]", range(n))
    train, test = torch.utils.data.random_split(
        items, [n_train, n - n_train], generator=torch.Generator().manual_seed(SPLIT_SEED)
    )
    return list(train.indices), list(test.indices)


def _read_mtil(layout: str, folder: Path, image_dir: Path) -> DomainData:
    categories = _categories(image_dir / "ClassName.txt", layout)
    index = {category: i for i, category in enumerate(categories)}
    paths = sorted(image_dir.rglob("sun_*.jpg"), key=lambda p: p.relative_to(image_dir).as_posix())
    if not paths:
        raise DataError(f"{NAME}: no sun_*.jpg image below {image_dir} (layout {layout})")
    labels: list[int] = []
    for path in paths:
        category = "/".join(path.relative_to(image_dir).parts[1:-1])
        if category not in index:
            raise DataError(f"{NAME}: image {path} is in category {category!r}, which ClassName.txt lacks")
        labels.append(index[category])
    everything = Split(np.asarray(labels, dtype=np.int64), files=tuple(paths))
    train, test = mtil_split(len(paths))
    return DomainData(
        NAME,
        "mtil",
        layout,
        folder,
        tuple(category.replace("_", " ") for category in categories),
        everything.subset(train),
        everything.subset(test),
        (MTIL_NOTE,),
    )


def read(root: Path, benchmark: Benchmark, options: ReadOptions) -> DomainData:
    """SUN397 of ``benchmark``: the CoOp json (X-TAIL) or every image, split 80/20 (MTIL)."""
    del options  # torchvision does not md5 the extracted SUN397 files
    layout, folder, image_dir = _find(root)
    if benchmark == "mtil":
        return _read_mtil(layout, folder, image_dir)
    json_path = folder / SPLIT_JSON
    if not json_path.is_file():
        raise missing(NAME, json_path, "CoOp split file", layout)
    split = files.read_coop_split(json_path, image_dir, NAME)
    return DomainData(
        NAME,
        benchmark,
        layout,
        folder,
        split.class_names,
        Split(split.labels["train"], files=split.files["train"]),
        Split(split.labels["test"], files=split.files["test"]),
        (f"CoOp split {SPLIT_JSON} (train = 80% of Training_01, test = Testing_01)",),
    )


def _coop_name(category: str) -> str:
    """CoOp's class name: letter dropped, remaining parts reversed, space-joined."""
    return " ".join(category.strip("/").split("/")[1:][::-1])


def write_fixture(root: Path, layout: str, rng: np.random.Generator) -> None:
    """A tiny SUN397 in ``layout``: 4 real categories of 8 JPEGs each (5 in Training_01, 2 in
    Testing_01, 1 in neither, as in the real partitions), ClassName.txt and the CoOp json
    (4 train, 1 val per category); the sun397 layout also holds CoOp's partition files."""
    found = {label: (rel, images) for label, rel, images in LAYOUTS}
    if layout not in found:
        raise ValueError(f"{NAME} has no layout {layout!r}")
    rel, images = found[layout]
    folder = root / rel
    image_dir = folder if images == "." else folder / images
    partitions: dict[str, list[str]] = {"Training_01": [], "Testing_01": []}
    coop: dict[str, list[files.CoopItem]] = {"train": [], "val": [], "test": []}
    letters = np.array(list("abcdefghijklmnopqrstuvwxyz"))
    for label, category in enumerate(FIXTURE_CLASSES):
        names = sorted("sun_" + "".join(rng.choice(letters, size=16)) + ".jpg" for _ in range(8))
        for name in names:
            files.write_image(image_dir / category.lstrip("/") / name, rng)
        entries = [f"{category}/{name}" for name in names]
        partitions["Training_01"] += entries[:5]
        partitions["Testing_01"] += entries[5:7]
        for split, part in (("train", entries[:4]), ("val", entries[4:5]), ("test", entries[5:7])):
            coop[split] += [(entry.lstrip("/"), label, _coop_name(category)) for entry in part]
    class_list = "\n".join(FIXTURE_CLASSES) + "\n"
    (image_dir / "ClassName.txt").write_text(class_list)
    files.write_coop_split(folder / SPLIT_JSON, {split: items for split, items in coop.items()})
    if images != ".":
        (folder / "ClassName.txt").write_text(class_list)
        for name, entries in partitions.items():
            (folder / f"{name}.txt").write_text("\n".join(entries) + "\n")


SPEC = register(
    DomainSpec(
        name=NAME,
        aliases=("sun", "sun-397", "sun_397"),
        benchmarks=("x-tail", "mtil"),
        layouts=tuple(label for label, _, _ in LAYOUTS),
        xtail_template="a photo of a {}.",
        mtil_train_template="a photo of a {}.",
        mtil_eval_templates=("a photo of a {}.", "a photo of the {}."),
        sizes={"x-tail": Sizes(15880, 19850), "mtil": Sizes(87003, 21751)},
        read=read,
        write_fixture=write_fixture,
        folder_names=tuple(rel for _, rel, _ in LAYOUTS),
    )
)
