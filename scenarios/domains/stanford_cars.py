"""Stanford Cars (196 models), MULTIDOMAIN.md §3.10.

One folder ``R/stanford_cars/`` serves both benchmarks. MTIL reads it as torchvision does: names =
``devkit/cars_meta.mat`` variable ``class_names`` (year last: ``Tesla Model S Sedan 2012``), train =
``devkit/cars_train_annos.mat`` and test = ``cars_test_annos_withlabels.mat`` (beside ``devkit/``),
variable ``annotations`` with fields ``fname`` and ``class`` (1..196), images ``cars_train/`` and
``cars_test/``. X-TAIL reads CoOp's ``split_zhou_StanfordCars.json`` (paths relative to the folder;
CoOp moved the year to the front: ``2012 Tesla Model S Sedan``).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from cl_bench.errors import DataError
from scenarios.domains import base, files
from scenarios.domains.base import Benchmark, DomainData, DomainSpec, ReadOptions, Sizes, Split

NAME = "StanfordCars"
FOLDER = "stanford_cars"
LAYOUT = "stanford_cars (MoRAM, RAIL, CoOp, torchvision)"
SPLIT_JSON = "split_zhou_StanfordCars.json"
MTIL_TEMPLATES = (
    "a photo of a {}, a type of car.",
    "a photo of a {}.",
    "a photo of the {}.",
    "a photo of my {}.",
    "i love my {}!",
    "a photo of my dirty {}.",
    "a photo of my clean {}.",
    "a photo of my new {}.",
    "a photo of my old {}.",
)

# Real class names (cars_meta.mat spelling), with a '/' and a lower-case make among them.
FIXTURE_CLASSES = (
    "AM General Hummer SUV 2000",
    "Ram C/V Cargo Van Minivan 2012",
    "Tesla Model S Sedan 2012",
    "smart fortwo Convertible 2012",
)
BBOX_FIELDS = ("bbox_x1", "bbox_y1", "bbox_x2", "bbox_y2")


def _loadmat(path: Path, variable: str, layout: str) -> np.ndarray:
    """``variable`` of the .mat file ``path`` (squeezed, at least 1-d), errors naming the file."""
    import scipy.io

    if not path.is_file():
        raise base.missing(NAME, path, ".mat file", layout)
    try:
        content = scipy.io.loadmat(str(path), squeeze_me=True)
    except Exception as err:  # scipy raises several types for a corrupt or foreign file
        raise DataError(f"{NAME}: {path} is not a readable .mat file ({type(err).__name__}: {err})") from None
    if variable not in content:
        raise DataError(f"{NAME}: {path} has no variable {variable!r}")
    return np.atleast_1d(content[variable])


def _class_names(path: Path, layout: str) -> tuple[str, ...]:
    names = _loadmat(path, "class_names", layout)
    if not all(isinstance(name, str) for name in names):
        raise DataError(f"{NAME}: {path}: class_names must be a cell array of strings")
    return tuple(str(name) for name in names)


def _annotations(path: Path, images: Path, n_classes: int, layout: str) -> Split:
    annos = _loadmat(path, "annotations", layout)
    fields = annos.dtype.names or ()
    if "fname" not in fields or "class" not in fields:
        raise DataError(f"{NAME}: {path}: annotations must be a struct array with fields fname and class")
    try:
        labels = np.asarray([int(c) for c in annos["class"]], dtype=np.int64) - 1
    except (TypeError, ValueError):
        raise DataError(f"{NAME}: {path}: annotations.class must be integers 1..{n_classes}") from None
    if labels.size and (labels.min() < 0 or labels.max() >= n_classes):
        raise DataError(f"{NAME}: {path}: annotations.class outside 1..{n_classes}")
    return Split(labels, files=tuple(images / str(name) for name in annos["fname"]))


def read(root: Path, benchmark: Benchmark, options: ReadOptions) -> DomainData:
    """StanfordCars of ``benchmark``: the CoOp json (X-TAIL) or the devkit .mat files (MTIL)."""
    del options  # torchvision does not md5 the Stanford Cars files
    _, folder = base.find_layout(NAME, root, [(LAYOUT, FOLDER)])
    if benchmark == "x-tail":
        notes = (f"CoOp split {SPLIT_JSON} (train = 80% of cars_train, test = cars_test)",)
        return files.read_coop_domain(NAME, benchmark, LAYOUT, folder, SPLIT_JSON, folder, notes)
    names = _class_names(folder / "devkit" / "cars_meta.mat", LAYOUT)
    train = _annotations(
        folder / "devkit" / "cars_train_annos.mat", folder / "cars_train", len(names), LAYOUT
    )
    test = _annotations(folder / "cars_test_annos_withlabels.mat", folder / "cars_test", len(names), LAYOUT)
    notes = ("torchvision split devkit/cars_train_annos.mat, cars_test_annos_withlabels.mat",)
    return DomainData(NAME, benchmark, LAYOUT, folder, names, train, test, notes)


def _coop_name(name: str) -> str:
    """CoOp's class name: the trailing year moved to the front."""
    *words, year = name.split(" ")
    return " ".join([year, *words])


def _write_annos(path: Path, fnames: list[str], classes: list[int] | None, rng: np.random.Generator) -> None:
    """A Stanford Cars annotation .mat: struct array ``annotations`` (bbox, class, fname) of 1 x N."""
    import scipy.io

    names = (*BBOX_FIELDS, *(("class",) if classes is not None else ()), "fname")
    annos = np.empty((1, len(fnames)), dtype=[(name, object) for name in names])
    for i, fname in enumerate(fnames):
        for field in BBOX_FIELDS:
            annos[0, i][field] = np.array([[int(rng.integers(1, 90))]], dtype=np.uint16)
        if classes is not None:
            annos[0, i]["class"] = np.array([[classes[i]]], dtype=np.uint8)
        annos[0, i]["fname"] = fname
    path.parent.mkdir(parents=True, exist_ok=True)
    scipy.io.savemat(str(path), {"annotations": annos})


def write_fixture(root: Path, layout: str, rng: np.random.Generator) -> None:
    """A tiny stanford_cars folder: 4 real models, 5 cars_train and 2 cars_test JPEGs each
    (numbered in shuffled class order, as the real files are), the devkit and test .mat files
    and the CoOp json (4 train, 1 val per class from cars_train; test = cars_test)."""
    import scipy.io

    if layout != LAYOUT:
        raise ValueError(f"{NAME} has no layout {layout!r}")
    folder = root / FOLDER
    coop = files.coop_items()
    for subdir, per_class in (("cars_train", 5), ("cars_test", 2)):
        classes = [
            int(c) for c in rng.permutation(np.repeat(np.arange(1, len(FIXTURE_CLASSES) + 1), per_class))
        ]
        fnames = [f"{i:05d}.jpg" for i in range(1, len(classes) + 1)]
        for fname in fnames:
            files.write_image(folder / subdir / fname, rng)
        seen: dict[int, int] = {}
        for fname, class_id in zip(fnames, classes, strict=True):
            seen[class_id] = seen.get(class_id, 0) + 1
            split = "test" if subdir == "cars_test" else ("val" if seen[class_id] == per_class else "train")
            coop[split].append((f"{subdir}/{fname}", class_id - 1, _coop_name(FIXTURE_CLASSES[class_id - 1])))
        if subdir == "cars_train":
            _write_annos(folder / "devkit" / "cars_train_annos.mat", fnames, classes, rng)
        else:
            _write_annos(folder / "cars_test_annos_withlabels.mat", fnames, classes, rng)
            _write_annos(folder / "devkit" / "cars_test_annos.mat", fnames, None, rng)
    meta = np.array(FIXTURE_CLASSES, dtype=object).reshape(1, -1)
    scipy.io.savemat(str(folder / "devkit" / "cars_meta.mat"), {"class_names": meta})
    files.write_coop_split(folder / SPLIT_JSON, coop)


SPEC = base.register(
    DomainSpec(
        name=NAME,
        aliases=("cars", "stanford_cars", "stanford-cars", "stanfordcar"),
        benchmarks=("x-tail", "mtil"),
        layouts=(LAYOUT,),
        xtail_template="a photo of a {}.",
        mtil_train_template=MTIL_TEMPLATES[0],
        mtil_eval_templates=MTIL_TEMPLATES,
        sizes={"x-tail": Sizes(6509, 8041), "mtil": Sizes(8144, 8041)},
        read=read,
        write_fixture=write_fixture,
        folder_names=(FOLDER,),
    )
)
