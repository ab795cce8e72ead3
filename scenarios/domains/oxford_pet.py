"""Oxford-IIIT Pet (37 breeds), MULTIDOMAIN.md §3.9.

Images ``images/<image_id>.jpg``; annotation lines ``<image_id> <class_id 1..37> <species 1..2>
<breed_id>`` in ``annotations/{trainval,test}.txt``; label = class id - 1. The breed is the image id
without its last ``_`` part: X-TAIL (CoOp json) lower-cases it (``american_pit_bull_terrier``),
MTIL (torchvision) title-cases each part and joins with spaces (``American Pit Bull Terrier``).
X-TAIL reads ``split_zhou_OxfordPets.json`` (paths relative to ``images/``; 80/20 of trainval, test).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from cl_bench.errors import DataError
from scenarios.domains import base, files
from scenarios.domains.base import Benchmark, DomainData, DomainSpec, ReadOptions, Sizes, Split

NAME = "OxfordPet"
SPLIT_JSON = "split_zhou_OxfordPets.json"
TEMPLATE = "a photo of a {}, a type of pet."
LAYOUTS = (
    ("oxford-iiit-pet (MoRAM code, torchvision)", "oxford-iiit-pet"),
    ("oxford_pets (RAIL, CoOp, MoRAM README)", "oxford_pets"),
)

# The first four real breeds: (file-name stem, class id, species 1=cat 2=dog, breed id within species).
FIXTURE_BREEDS = (
    ("Abyssinian", 1, 1, 1),
    ("american_bulldog", 2, 2, 1),
    ("american_pit_bull_terrier", 3, 2, 2),
    ("basset_hound", 4, 2, 3),
)
LIST_HEADER = (
    "#Image CLASS-ID SPECIES BREED ID",
    "#ID: 1:37 Class ids",
    "#SPECIES: 1:Cat 2:Dog",
    "#BREED ID: 1-25:Cat 1:12:Dog",
    "#All images with 1st letter as captial are cat images",
    "#images with small first letter are dog images",
)


def _read_annotations(path: Path, layout: str) -> list[tuple[str, int]]:
    """(image id, 0-based label) per line of a torchvision annotation file."""
    if not path.is_file():
        raise base.missing(NAME, path, "annotation file", layout)
    out: list[tuple[str, int]] = []
    for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip() or line.startswith("#"):
            continue
        parts = line.split()
        if len(parts) != 4 or not all(p.isdigit() for p in parts[1:]) or not 1 <= int(parts[1]) <= 37:
            raise DataError(
                f"{NAME}: {path} line {number} is not '<image_id> <class 1..37> <species> <breed>'"
            )
        out.append((parts[0], int(parts[1]) - 1))
    return out


def _breed_names(items: list[tuple[str, int]], path: Path) -> tuple[str, ...]:
    """torchvision's class names: per label, the id's stem, each ``_`` part title-cased."""
    stems: dict[int, str] = {}
    for image_id, label in items:
        stem = image_id.rsplit("_", 1)[0]
        if stems.setdefault(label, stem) != stem:
            raise DataError(f"{NAME}: {path} gives class {label + 1} to both {stems[label]!r} and {stem!r}")
    if sorted(stems) != list(range(len(stems))):
        raise DataError(f"{NAME}: {path}: class ids are not contiguous from 1 (got {sorted(stems)[:5]}...)")
    return tuple(" ".join(part.title() for part in stems[i].split("_")) for i in range(len(stems)))


def _split(items: list[tuple[str, int]], images: Path, n_classes: int, path: Path) -> Split:
    labels = np.asarray([label for _, label in items], dtype=np.int64)
    if labels.size and labels.max() >= n_classes:
        raise DataError(f"{NAME}: {path} has class ids beyond the {n_classes} of trainval.txt")
    return Split(labels, files=tuple(images / f"{image_id}.jpg" for image_id, _ in items))


def read(root: Path, benchmark: Benchmark, options: ReadOptions) -> DomainData:
    """OxfordPet of ``benchmark``: the CoOp json (X-TAIL) or the trainval/test annotations (MTIL)."""
    del options  # torchvision does not md5 the extracted files
    layout, folder = base.find_layout(NAME, root, LAYOUTS)
    images = folder / "images"
    if benchmark == "x-tail":
        notes = (f"CoOp split {SPLIT_JSON} (train = 80% of trainval, test = test)",)
        return files.read_coop_domain(NAME, benchmark, layout, folder, SPLIT_JSON, images, notes)
    train_path, test_path = folder / "annotations" / "trainval.txt", folder / "annotations" / "test.txt"
    train_items, test_items = _read_annotations(train_path, layout), _read_annotations(test_path, layout)
    names = _breed_names(train_items, train_path)
    train = _split(train_items, images, len(names), train_path)
    test = _split(test_items, images, len(names), test_path)
    notes = ("torchvision split annotations/trainval.txt, annotations/test.txt",)
    return DomainData(NAME, benchmark, layout, folder, names, train, test, notes)


def write_fixture(root: Path, layout: str, rng: np.random.Generator) -> None:
    """A tiny pet folder in ``layout``: 4 real breeds, 5 trainval and 2 test JPEGs each, the
    annotation files with real line formats and the CoOp json (4 train, 1 val per breed)."""
    folders = dict(LAYOUTS)
    if layout not in folders:
        raise ValueError(f"{NAME} has no layout {layout!r}")
    folder = root / folders[layout]
    lines: dict[str, list[str]] = {"trainval": [], "test": []}
    coop = files.coop_items()
    for stem, class_id, species, breed in FIXTURE_BREEDS:
        ids = sorted(f"{stem}_{n}" for n in 1 + rng.choice(200, size=7, replace=False))
        for image_id in ids:
            files.write_image(folder / "images" / f"{image_id}.jpg", rng)
        name = stem.lower()
        for split, part in (("trainval", ids[:5]), ("test", ids[5:])):
            lines[split] += [f"{image_id} {class_id} {species} {breed}" for image_id in part]
        rels = [f"{image_id}.jpg" for image_id in ids]
        files.add_coop_items(coop, rels, class_id - 1, name, n_train=4, n_val=1)
    annotations = folder / "annotations"
    annotations.mkdir(parents=True, exist_ok=True)
    for split, content in lines.items():
        (annotations / f"{split}.txt").write_text("\n".join(content) + "\n")
    every = sorted(lines["trainval"] + lines["test"])
    (annotations / "list.txt").write_text("\n".join(LIST_HEADER + tuple(every)) + "\n")
    files.write_coop_split(folder / SPLIT_JSON, coop)


SPEC = base.register(
    DomainSpec(
        name=NAME,
        aliases=("pets", "pet", "oxford_pets", "oxford-iiit-pet", "oxfordpets", "oxford-pets", "oxford_pet"),
        benchmarks=("x-tail", "mtil"),
        layouts=tuple(label for label, _ in LAYOUTS),
        xtail_template=TEMPLATE,
        mtil_train_template=TEMPLATE,
        mtil_eval_templates=(TEMPLATE,),
        sizes={"x-tail": Sizes(2944, 3669), "mtil": Sizes(3680, 3669)},
        read=read,
        write_fixture=write_fixture,
        folder_names=tuple(rel for _, rel in LAYOUTS),
    )
)
