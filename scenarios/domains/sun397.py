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

import numpy as np

from cl_bench.errors import DataError
from scenarios.domains import base, files
from scenarios.domains.base import Benchmark, DomainData, DomainSpec, ReadOptions, Sizes, Split

NAME = "SUN397"
SPLIT_JSON = "split_zhou_SUN397.json"
IMAGES = "SUN397"
# (label, folder under the root, image folder under that folder): the detection order of §3.13.
LAYOUTS = (
    ("SUN397 (MoRAM code, torchvision; json inside)", "SUN397", "."),
    ("sun397 (RAIL, CoOp, MoRAM README; json beside SUN397/)", "sun397", IMAGES),
)
SPLIT_SEED = files.ZSCL_SEED
MTIL_NOTE = "80/20 random_split seed 42 of the sorted file list (not byte-identical to ZSCL's rglob order)"

# Real categories: one-part, two-part (the '/' and '_' of §3.11) and one shared with Caltech101.
FIXTURE_CLASSES = ("/a/abbey", "/a/apartment_building/outdoor", "/b/bakery/shop", "/p/pagoda")


def _find(root: Path) -> tuple[str, Path, Path]:
    """(layout label, matched folder, image folder) of the first layout whose folder exists."""
    label, folder = base.find_layout(NAME, root, [(name, rel) for name, rel, _ in LAYOUTS])
    images = {name: images for name, _, images in LAYOUTS}[label]
    image_dir = folder if images == "." else folder / images
    if not image_dir.is_dir():
        raise base.missing(NAME, image_dir, "image folder", label)
    return label, folder, image_dir


def _categories(path: Path, layout: str) -> tuple[str, ...]:
    """The category paths of ``ClassName.txt`` without ``/<letter>/`` (torchvision's ``line[3:]``)."""
    if not path.is_file():
        raise base.missing(NAME, path, "class list", layout)
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


mtil_split = files.zscl_split  # ZSCL's 80/20 seed-42 split of SUN397's sorted file list


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
    train, test = files.zscl_subsets(everything)
    names = tuple(category.replace("_", " ") for category in categories)
    return DomainData(NAME, "mtil", layout, folder, names, train, test, (MTIL_NOTE,))


def read(root: Path, benchmark: Benchmark, options: ReadOptions) -> DomainData:
    """SUN397 of ``benchmark``: the CoOp json (X-TAIL) or every image, split 80/20 (MTIL)."""
    del options  # torchvision does not md5 the extracted SUN397 files
    layout, folder, image_dir = _find(root)
    if benchmark == "mtil":
        return _read_mtil(layout, folder, image_dir)
    notes = (f"CoOp split {SPLIT_JSON} (train = 80% of Training_01, test = Testing_01)",)
    return files.read_coop_domain(NAME, benchmark, layout, folder, SPLIT_JSON, image_dir, notes)


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
    coop = files.coop_items()
    letters = np.array(list("abcdefghijklmnopqrstuvwxyz"))
    for label, category in enumerate(FIXTURE_CLASSES):
        names = sorted("sun_" + "".join(rng.choice(letters, size=16)) + ".jpg" for _ in range(8))
        for name in names:
            files.write_image(image_dir / category.lstrip("/") / name, rng)
        entries = [f"{category}/{name}" for name in names]
        partitions["Training_01"] += entries[:5]
        partitions["Testing_01"] += entries[5:7]
        rels = [entry.lstrip("/") for entry in entries[:7]]
        files.add_coop_items(coop, rels, label, _coop_name(category), n_train=4, n_val=1)
    class_list = "\n".join(FIXTURE_CLASSES) + "\n"
    (image_dir / "ClassName.txt").write_text(class_list)
    files.write_coop_split(folder / SPLIT_JSON, coop)
    if images != ".":
        (folder / "ClassName.txt").write_text(class_list)
        for name, entries in partitions.items():
            (folder / f"{name}.txt").write_text("\n".join(entries) + "\n")


SPEC = base.register(
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
