"""Oxford Flowers-102 (102 classes), MULTIDOMAIN.md §3.6.

X-TAIL reads CoOp's ``split_zhou_OxfordFlowers.json`` (paths relative to ``jpg/``; class names
from the json). MTIL reads the official split as torchvision's ``Flowers102`` does:
``imagelabels.mat`` (``labels``: one class id 1..102 per image, image id = position + 1) and
``setid.mat`` (``trnid`` train, ``tstid`` test, 1-based image ids; ``valid`` unused); image =
``jpg/image_<id:05d>.jpg``, label = class id - 1, names = ZSCL's list of all 102 classes.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from cl_bench.errors import ConfigError, DataError
from scenarios.domains import base, files
from scenarios.domains.base import Benchmark, DomainData, DomainSpec, ReadOptions, Sizes, Split

NAME = "Flowers102"
TEMPLATE = "a photo of a {}, a type of flower."
MORAM_LAYOUT = "flowers-102 (MoRAM code, torchvision)"
COOP_LAYOUT = "oxford_flowers (CoOp, RAIL, MoRAM README)"
FOLDERS = {MORAM_LAYOUT: "flowers-102", COOP_LAYOUT: "oxford_flowers"}
# CoOp's folder holds no setid.mat, so MTIL (torchvision) reads only flowers-102.
SEARCH: dict[Benchmark, tuple[str, ...]] = {"x-tail": (MORAM_LAYOUT, COOP_LAYOUT), "mtil": (MORAM_LAYOUT,)}
SPLIT_FILE = "split_zhou_OxfordFlowers.json"
# ZSCL's class names (src/datasets/collections.py::Flowers), label 0..101 = class id 1..102.
MTIL_NAMES = (
    "pink primrose", "hard-leaved pocket orchid", "canterbury bells", "sweet pea", "english marigold",
    "tiger lily", "moon orchid", "bird of paradise", "monkshood", "globe thistle", "snapdragon",
    "colt's foot", "king protea", "spear thistle", "yellow iris", "globe-flower", "purple coneflower",
    "peruvian lily", "balloon flower", "giant white arum lily", "fire lily", "pincushion flower",
    "fritillary", "red ginger", "grape hyacinth", "corn poppy", "prince of wales feathers",
    "stemless gentian", "artichoke", "sweet william", "carnation", "garden phlox", "love in the mist",
    "mexican aster", "alpine sea holly", "ruby-lipped cattleya", "cape flower", "great masterwort",
    "siam tulip", "lenten rose", "barbeton daisy", "daffodil", "sword lily", "poinsettia",
    "bolero deep blue", "wallflower", "marigold", "buttercup", "oxeye daisy", "common dandelion",
    "petunia", "wild pansy", "primula", "sunflower", "pelargonium", "bishop of llandaff", "gaura",
    "geranium", "orange dahlia", "pink-yellow dahlia", "cautleya spicata", "japanese anemone",
    "black-eyed susan", "silverbush", "californian poppy", "osteospermum", "spring crocus",
    "bearded iris", "windflower", "tree poppy", "gazania", "azalea", "water lily", "rose",
    "thorn apple", "morning glory", "passion flower", "lotus", "toad lily", "anthurium", "frangipani",
    "clematis", "hibiscus", "columbine", "desert-rose", "tree mallow", "magnolia", "cyclamen",
    "watercress", "canna lily", "hippeastrum", "bee balm", "ball moss", "foxglove", "bougainvillea",
    "camellia", "mallow", "mexican petunia", "bromelia", "blanket flower", "trumpet creeper",
    "blackberry lily",
)  # fmt: skip
# Fixture classes: class id -> name in the widely copied cat_to_name.json (CoOp's source of names).
FIXTURE_CLASSES = {1: "pink primrose", 41: "barbeton daisy", 60: "pink-yellow dahlia", 78: "lotus lotus"}
FIXTURE_PER_CLASS = 5


def _find_folder(root: Path, benchmark: Benchmark) -> tuple[str, Path]:
    """The first layout of ``benchmark`` present under ``root`` (its label and folder)."""
    return base.find_layout(NAME, root, [(label, FOLDERS[label]) for label in SEARCH[benchmark]])


def _mat_ids(path: Path, variable: str, layout: str) -> np.ndarray:
    """One integer vector of a ``.mat`` file (DataError naming the file and variable otherwise)."""
    from scipy.io import loadmat

    if not path.is_file():
        raise base.missing(NAME, path, "annotation file", layout)
    try:
        content = loadmat(path)
    except (OSError, ValueError, TypeError, NotImplementedError) as err:
        raise DataError(f"{NAME}: {path} is not a readable .mat file ({err})") from None
    if variable not in content:
        raise DataError(f"{NAME}: {path} has no variable {variable!r}")
    values = np.asarray(content[variable]).ravel()
    if values.dtype.kind not in "iuf" or not np.array_equal(values, np.round(values)):
        raise DataError(f"{NAME}: {path}: {variable!r} must hold integer ids")
    return values.astype(np.int64)


def _read_mtil(folder: Path, layout: str) -> tuple[Split, Split]:
    labels_path, setid_path = folder / "imagelabels.mat", folder / "setid.mat"
    class_ids = _mat_ids(labels_path, "labels", layout)
    if class_ids.size and (class_ids.min() < 1 or class_ids.max() > len(MTIL_NAMES)):
        raise DataError(f"{NAME}: {labels_path}: 'labels' must be class ids 1..{len(MTIL_NAMES)}")

    def split(variable: str) -> Split:
        ids = _mat_ids(setid_path, variable, layout)
        if ids.size and (ids.min() < 1 or ids.max() > class_ids.size):
            raise DataError(f"{NAME}: {setid_path}: {variable!r} has image ids outside 1..{class_ids.size}")
        paths = tuple(folder / "jpg" / f"image_{i:05d}.jpg" for i in ids.tolist())
        return Split(class_ids[ids - 1] - 1, files=paths)

    return split("trnid"), split("tstid")


def read(root: Path, benchmark: Benchmark, options: ReadOptions) -> DomainData:
    """X-TAIL: the CoOp json's train/test; MTIL: the official ``trnid`` / ``tstid`` split."""
    del options
    layout, folder = _find_folder(root, benchmark)
    if not (folder / "jpg").is_dir():
        raise base.missing(NAME, folder / "jpg", "image folder", layout)
    if benchmark == "x-tail":
        notes = (f"CoOp {SPLIT_FILE}: train (before the 16-shot draw) / test; val unused",)
        return files.read_coop_domain(NAME, benchmark, layout, folder, SPLIT_FILE, folder / "jpg", notes)
    train, test = _read_mtil(folder, layout)
    notes = ("official split: setid.mat trnid (train) / tstid (test); valid unused",)
    return DomainData(NAME, benchmark, layout, folder, MTIL_NAMES, train, test, notes)


def write_fixture(root: Path, layout: str, rng: np.random.Generator) -> None:
    """A tiny Flowers-102 folder: ``jpg/image_NNNNN.jpg`` for four real classes, ``imagelabels.mat``
    and CoOp's json; torchvision's layout adds ``setid.mat``, CoOp's adds ``cat_to_name.json``."""
    from scipy.io import savemat

    if layout not in FOLDERS:
        raise ConfigError(f"{NAME}: unknown layout {layout!r}; known: {', '.join(FOLDERS)}")
    folder = root / FOLDERS[layout]
    class_ids = np.repeat(np.asarray(list(FIXTURE_CLASSES)), FIXTURE_PER_CLASS)[
        rng.permutation(len(FIXTURE_CLASSES) * FIXTURE_PER_CLASS)
    ]
    for image_id in range(1, class_ids.size + 1):
        files.write_image(folder / "jpg" / f"image_{image_id:05d}.jpg", rng)
    savemat(folder / "imagelabels.mat", {"labels": class_ids[None, :].astype(np.uint8)})
    setid: dict[str, list[int]] = {"trnid": [], "valid": [], "tstid": []}
    items = files.coop_items()
    for label, (class_id, name) in enumerate(FIXTURE_CLASSES.items()):
        ids = (np.flatnonzero(class_ids == class_id) + 1).tolist()
        setid["trnid"] += ids[:2]
        setid["valid"] += ids[2:3]
        setid["tstid"] += ids[3:]
        shuffled = [f"image_{ids[i]:05d}.jpg" for i in rng.permutation(len(ids))]
        files.add_coop_items(items, shuffled, label, name)
    files.write_coop_split(folder / SPLIT_FILE, items)
    if layout == MORAM_LAYOUT:
        savemat(
            folder / "setid.mat",
            {k: np.asarray(sorted(v), dtype=np.uint16)[None, :] for k, v in setid.items()},
        )
    else:
        names = {str(class_id): name for class_id, name in FIXTURE_CLASSES.items()}
        (folder / "cat_to_name.json").write_text(json.dumps(names))


SPEC = base.register(
    DomainSpec(
        name=NAME,
        aliases=(
            "flowers",
            "flowers-102",
            "flowers_102",
            "oxford_flowers",
            "oxford-flowers",
            "oxfordflowers",
        ),
        benchmarks=("x-tail", "mtil"),
        layouts=(MORAM_LAYOUT, COOP_LAYOUT),
        xtail_template=TEMPLATE,
        mtil_train_template=TEMPLATE,
        mtil_eval_templates=(TEMPLATE,),
        sizes={"x-tail": Sizes(4093, 2463), "mtil": Sizes(1020, 6149)},
        read=read,
        write_fixture=write_fixture,
        folder_names=tuple(FOLDERS.values()),
    )
)
