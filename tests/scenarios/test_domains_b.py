"""Domain readers and fixture writers of Food101, MNIST, OxfordPet, StanfordCars, SUN397.

Each fixture is written in every accepted layout and read back for every benchmark; the expected
class names, sizes, per-class counts and layout labels are typed from MULTIDOMAIN.md §3 and the
fixture's own split rules. The MTIL reads are also checked against torchvision's own dataset
classes reading the same fixture folders (so the fixtures are in the real on-disk formats).
"""

from __future__ import annotations

import gzip
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from cl_bench.errors import DataError
from scenarios.domains import food101, mnist, oxford_pet, stanford_cars, sun397
from scenarios.domains.base import Benchmark, DomainData, DomainSpec, ReadOptions, lookup, missing_files

SPECS = (food101.SPEC, mnist.SPEC, oxford_pet.SPEC, stanford_cars.SPEC, sun397.SPEC)
NO_MD5 = ReadOptions(verify_checksums=False)

DIGITS = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")
MNIST_MTIL = tuple(f"{i} - {word}" for i, word in enumerate(DIGITS))
MNIST_XTAIL = tuple(f'number: "{i} - {word}"' for i, word in enumerate(DIGITS))

MNIST_NAMES: tuple[tuple[Benchmark, tuple[str, ...]], ...] = (("x-tail", MNIST_XTAIL), ("mtil", MNIST_MTIL))

Case = tuple[tuple[str, ...], int, int, list[int], list[int]]
# (domain, layout, benchmark) -> (class names, train size, test size, train per class, test per class)
CASES: dict[tuple[str, str, Benchmark], Case] = {
    ("Food101", "food-101 (MoRAM, RAIL, CoOp, torchvision)", "x-tail"): (
        ("apple_pie", "hot_and_sour_soup", "pizza"),
        6,
        6,
        [2, 2, 2],
        [2, 2, 2],
    ),
    ("Food101", "food-101 (MoRAM, RAIL, CoOp, torchvision)", "mtil"): (
        ("apple pie", "hot and sour soup", "pizza"),
        9,
        6,
        [3, 3, 3],
        [2, 2, 2],
    ),
    **{
        ("MNIST", layout, bench): (names, 30, 20, [3] * 10, [2] * 10)
        for layout in (
            "MNIST/raw (idx files; MoRAM, RAIL, torchvision)",
            "MNIST/processed (legacy torchvision .pt)",
            "mnist/raw (MoRAM README; idx files)",
            "mnist/processed (MoRAM README; legacy .pt)",
        )
        for bench, names in MNIST_NAMES
    },
    **{
        ("OxfordPet", layout, "x-tail"): (
            ("abyssinian", "american_bulldog", "american_pit_bull_terrier", "basset_hound"),
            16,
            8,
            [4, 4, 4, 4],
            [2, 2, 2, 2],
        )
        for layout in ("oxford-iiit-pet (MoRAM code, torchvision)", "oxford_pets (RAIL, CoOp, MoRAM README)")
    },
    **{
        ("OxfordPet", layout, "mtil"): (
            ("Abyssinian", "American Bulldog", "American Pit Bull Terrier", "Basset Hound"),
            20,
            8,
            [5, 5, 5, 5],
            [2, 2, 2, 2],
        )
        for layout in ("oxford-iiit-pet (MoRAM code, torchvision)", "oxford_pets (RAIL, CoOp, MoRAM README)")
    },
    ("StanfordCars", "stanford_cars (MoRAM, RAIL, CoOp, torchvision)", "x-tail"): (
        (
            "2000 AM General Hummer SUV",
            "2012 Ram C/V Cargo Van Minivan",
            "2012 Tesla Model S Sedan",
            "2012 smart fortwo Convertible",
        ),
        16,
        8,
        [4, 4, 4, 4],
        [2, 2, 2, 2],
    ),
    ("StanfordCars", "stanford_cars (MoRAM, RAIL, CoOp, torchvision)", "mtil"): (
        (
            "AM General Hummer SUV 2000",
            "Ram C/V Cargo Van Minivan 2012",
            "Tesla Model S Sedan 2012",
            "smart fortwo Convertible 2012",
        ),
        20,
        8,
        [5, 5, 5, 5],
        [2, 2, 2, 2],
    ),
    **{
        ("SUN397", layout, "x-tail"): (
            ("abbey", "outdoor apartment_building", "shop bakery", "pagoda"),
            16,
            8,
            [4, 4, 4, 4],
            [2, 2, 2, 2],
        )
        for layout in (
            "SUN397 (MoRAM code, torchvision; json inside)",
            "sun397 (RAIL, CoOp, MoRAM README; json beside SUN397/)",
        )
    },
    # 4 categories x 8 images = 32; int(0.8 * 32) = 25 train, 7 test; per class only in total.
    **{
        ("SUN397", layout, "mtil"): (
            ("abbey", "apartment building/outdoor", "bakery/shop", "pagoda"),
            25,
            7,
            [],
            [],
        )
        for layout in (
            "SUN397 (MoRAM code, torchvision; json inside)",
            "sun397 (RAIL, CoOp, MoRAM README; json beside SUN397/)",
        )
    },
}

# layout label -> the folder it matches, relative to the root
FOLDERS = {
    "food-101 (MoRAM, RAIL, CoOp, torchvision)": "food-101",
    "MNIST/raw (idx files; MoRAM, RAIL, torchvision)": "MNIST/raw",
    "MNIST/processed (legacy torchvision .pt)": "MNIST/processed",
    "mnist/raw (MoRAM README; idx files)": "mnist/raw",
    "mnist/processed (MoRAM README; legacy .pt)": "mnist/processed",
    "oxford-iiit-pet (MoRAM code, torchvision)": "oxford-iiit-pet",
    "oxford_pets (RAIL, CoOp, MoRAM README)": "oxford_pets",
    "stanford_cars (MoRAM, RAIL, CoOp, torchvision)": "stanford_cars",
    "SUN397 (MoRAM code, torchvision; json inside)": "SUN397",
    "sun397 (RAIL, CoOp, MoRAM README; json beside SUN397/)": "sun397",
}


def _spec(name: str) -> DomainSpec:
    return next(spec for spec in SPECS if spec.name == name)


def _fixture(tmp_path: Path, name: str, layout: str, seed: int = 0) -> Path:
    root = tmp_path / "data"
    _spec(name).write_fixture(root, layout, np.random.default_rng(seed))
    return root


def _read(root: Path, name: str, bench: Benchmark) -> DomainData:
    return _spec(name).read(root, bench, NO_MD5)


def test_every_layout_and_benchmark_is_covered() -> None:
    expected = {(s.name, layout, b) for s in SPECS for layout in s.layouts for b in s.benchmarks}
    assert set(CASES) == expected
    assert all(s.benchmarks == ("x-tail", "mtil") for s in SPECS)


@pytest.mark.parametrize(("name", "layout", "bench"), sorted(CASES))
def test_fixture_reads_back_with_the_benchmark_names_and_sizes(
    tmp_path: Path, name: str, layout: str, bench: Benchmark
) -> None:
    root = _fixture(tmp_path, name, layout)
    names, n_train, n_test, train_counts, test_counts = CASES[(name, layout, bench)]
    data = _read(root, name, bench)
    assert (data.domain, data.benchmark, data.layout) == (name, bench, layout)
    assert data.folder == root / FOLDERS[layout]
    assert data.class_names == names
    assert (len(data.train), len(data.test)) == (n_train, n_test)
    for split in (data.train, data.test):
        assert split.labels.dtype == np.int64
        assert set(split.labels.tolist()) == set(range(len(names)))  # every class in both splits
    if train_counts:
        assert np.bincount(data.train.labels).tolist() == train_counts
        assert np.bincount(data.test.labels).tolist() == test_counts
    else:
        assert np.bincount(np.concatenate([data.train.labels, data.test.labels])).tolist() == [8, 8, 8, 8]
    if name == "MNIST":
        assert data.train.arrays is not None
        assert data.test.arrays is not None
        assert (data.train.arrays.shape, data.train.arrays.dtype) == ((30, 28, 28), np.uint8)
        assert data.test.arrays.shape == (20, 28, 28)
        assert data.train.files == ()
    else:
        assert data.train.arrays is None
        assert missing_files(data) == []
        assert not set(data.train.files) & set(data.test.files)
    files = sum(1 for p in root.rglob("*") if p.is_file())
    assert files < 100


# Where each image's class shows in its path (Cars: only in the .mat files, checked against torchvision).
CLASS_OF_PATH = {
    "Food101": (lambda p: p.parent.name, ("apple_pie", "hot_and_sour_soup", "pizza")),
    "OxfordPet": (
        lambda p: p.stem.rsplit("_", 1)[0],
        ("Abyssinian", "american_bulldog", "american_pit_bull_terrier", "basset_hound"),
    ),
    "SUN397": (
        lambda p: p.parent.as_posix().split("/SUN397/")[-1],
        ("a/abbey", "a/apartment_building/outdoor", "b/bakery/shop", "p/pagoda"),
    ),
}


@pytest.mark.parametrize(("name", "layout", "bench"), sorted(k for k in CASES if k[0] in CLASS_OF_PATH))
def test_labels_match_the_class_in_each_image_path(
    tmp_path: Path, name: str, layout: str, bench: Benchmark
) -> None:
    data = _read(_fixture(tmp_path, name, layout), name, bench)
    class_of, raw_names = CLASS_OF_PATH[name]
    for split in (data.train, data.test):
        assert [class_of(p) for p in split.files] == [raw_names[i] for i in split.labels]


@pytest.mark.parametrize("name", ["Food101", "OxfordPet", "StanfordCars", "SUN397"])
def test_an_image_in_both_benchmarks_has_the_same_label(tmp_path: Path, name: str) -> None:
    root = _fixture(tmp_path, name, _spec(name).layouts[0])
    xtail, mtil = _read(root, name, "x-tail"), _read(root, name, "mtil")
    mtil_label = {
        p: int(label)
        for split in (mtil.train, mtil.test)
        for p, label in zip(split.files, split.labels, strict=True)
    }
    shared = 0
    for split in (xtail.train, xtail.test):
        for path, label in zip(split.files, split.labels, strict=True):
            assert mtil_label[path] == label
            shared += 1
    assert shared == len(xtail.train) + len(xtail.test)


def test_fixture_images_are_real_jpegs_of_varied_sizes(tmp_path: Path) -> None:
    for spec in SPECS:
        if spec.name != "MNIST":
            spec.write_fixture(tmp_path, spec.layouts[0], np.random.default_rng(1))
    sizes = set()
    for path in tmp_path.rglob("*.jpg"):
        with Image.open(path) as image:
            assert image.format == "JPEG"
            sizes.add(image.size)
    assert len(sizes) > 20


# ----------------------------------------------------------------------------- torchvision parity


def _torchvision_pairs(
    name: str, layout: str, root: Path, split: str
) -> tuple[list[str], list[tuple[Path, int]]]:
    """(classes, sorted (file, label) pairs) as torchvision's dataset class reads the fixture."""
    datasets = pytest.importorskip("torchvision.datasets")
    if name == "Food101":
        ds = datasets.Food101(str(root), split=split)
        return ds.classes, sorted(zip(map(Path, ds._image_files), ds._labels, strict=True))
    if name == "OxfordPet":
        ds = datasets.OxfordIIITPet(str(root), split="trainval" if split == "train" else "test")
        return ds.classes, sorted(zip(map(Path, ds._images), ds._labels, strict=True))
    if name == "StanfordCars":
        ds = datasets.StanfordCars(str(root), split=split)
        return ds.classes, sorted((Path(p), int(label)) for p, label in ds._samples)
    tv_root = root if layout.startswith("SUN397 ") else root / "sun397"
    ds = datasets.SUN397(str(tv_root))
    return ds.classes, sorted(zip(map(Path, ds._image_files), ds._labels, strict=True))


@pytest.mark.parametrize(
    ("name", "layout"),
    [
        ("Food101", "food-101 (MoRAM, RAIL, CoOp, torchvision)"),
        ("OxfordPet", "oxford-iiit-pet (MoRAM code, torchvision)"),
        ("StanfordCars", "stanford_cars (MoRAM, RAIL, CoOp, torchvision)"),
        ("SUN397", "SUN397 (MoRAM code, torchvision; json inside)"),
        ("SUN397", "sun397 (RAIL, CoOp, MoRAM README; json beside SUN397/)"),
    ],
)
def test_mtil_reads_what_torchvision_reads(tmp_path: Path, name: str, layout: str) -> None:
    root = _fixture(tmp_path, name, layout)
    data = _read(root, name, "mtil")
    ours = {
        split: sorted(zip(getattr(data, split).files, getattr(data, split).labels.tolist(), strict=True))
        for split in ("train", "test")
    }
    if name == "SUN397":  # torchvision has no split: compare the union
        classes, pairs = _torchvision_pairs(name, layout, root, "train")
        assert sorted(ours["train"] + ours["test"]) == pairs
    else:
        for split in ("train", "test"):
            classes, pairs = _torchvision_pairs(name, layout, root, split)
            assert ours[split] == pairs
    if name == "StanfordCars":
        assert tuple(classes) == data.class_names
    else:
        assert tuple(c.replace("_", " ") for c in classes) == data.class_names


def test_mnist_idx_fixture_is_what_torchvision_reads(tmp_path: Path) -> None:
    datasets = pytest.importorskip("torchvision.datasets")
    root = _fixture(tmp_path, "MNIST", "MNIST/raw (idx files; MoRAM, RAIL, torchvision)")
    data = _read(root, "MNIST", "mtil")
    for train, split in ((True, data.train), (False, data.test)):
        tv = datasets.MNIST(str(root), train=train)
        assert split.arrays is not None
        assert np.array_equal(tv.data.numpy(), split.arrays)
        assert np.array_equal(tv.targets.numpy(), split.labels)
    assert tuple(datasets.MNIST.classes) == MNIST_MTIL


def test_mnist_files_have_the_idx_headers_and_gz_copies(tmp_path: Path) -> None:
    root = _fixture(tmp_path, "MNIST", "MNIST/raw (idx files; MoRAM, RAIL, torchvision)")
    raw = root / "MNIST" / "raw"
    images, labels = (
        (raw / "train-images-idx3-ubyte").read_bytes(),
        (raw / "t10k-labels-idx1-ubyte").read_bytes(),
    )
    assert images[:16] == bytes.fromhex("00000803 0000001e 0000001c 0000001c")  # 2051, 30, 28, 28
    assert len(images) == 16 + 30 * 28 * 28
    assert labels[:8] == bytes.fromhex("00000801 00000014")  # 2049, 20
    assert gzip.decompress((raw / "t10k-labels-idx1-ubyte.gz").read_bytes()) == labels


def test_mnist_raw_and_legacy_layouts_hold_the_same_digits(tmp_path: Path) -> None:
    raw = _read(
        _fixture(tmp_path / "a", "MNIST", "mnist/raw (MoRAM README; idx files)", seed=3), "MNIST", "x-tail"
    )
    pt_root = _fixture(tmp_path / "b", "MNIST", "MNIST/processed (legacy torchvision .pt)", seed=3)
    legacy = _read(pt_root, "MNIST", "x-tail")
    assert raw.train.arrays is not None
    assert legacy.train.arrays is not None
    assert np.array_equal(raw.train.arrays, legacy.train.arrays)
    assert np.array_equal(raw.test.labels, legacy.test.labels)
    images, labels = torch.load(pt_root / "MNIST" / "processed" / "test.pt", weights_only=True)
    assert (images.dtype, tuple(images.shape), labels.dtype) == (torch.uint8, (20, 28, 28), torch.int64)


def test_mnist_prefers_the_torchvision_folder_over_the_readme_spelling(tmp_path: Path) -> None:
    root = tmp_path / "data"
    mnist.SPEC.write_fixture(root, "mnist/processed (MoRAM README; legacy .pt)", np.random.default_rng(0))
    mnist.SPEC.write_fixture(
        root, "MNIST/raw (idx files; MoRAM, RAIL, torchvision)", np.random.default_rng(0)
    )
    assert _read(root, "MNIST", "mtil").layout == "MNIST/raw (idx files; MoRAM, RAIL, torchvision)"


# ----------------------------------------------------------------------------- MTIL random split


def _perm(n: int) -> list[int]:
    """torch's seed-42 permutation of range(n), what random_split cuts."""
    return torch.randperm(n, generator=torch.Generator().manual_seed(42)).tolist()


def test_sun397_mtil_split_is_stable_disjoint_and_complete(tmp_path: Path) -> None:
    root = _fixture(tmp_path, "SUN397", "SUN397 (MoRAM code, torchvision; json inside)")
    first, second = _read(root, "SUN397", "mtil"), _read(root, "SUN397", "mtil")
    assert first.train.files == second.train.files
    assert first.test.files == second.test.files
    every = sorted(root.rglob("sun_*.jpg"))
    assert not set(first.train.files) & set(first.test.files)
    assert sorted(first.train.files + first.test.files) == every
    assert any("random_split seed 42 of the sorted file list" in note for note in first.notes)
    # the split is torch's seed-42 permutation of the sorted list (random_split = randperm, then cut)
    perm = _perm(32)
    ordered = sorted(every, key=lambda p: p.relative_to(root / "SUN397").as_posix())
    assert list(first.train.files) == [ordered[i] for i in perm[:25]]
    assert list(first.test.files) == [ordered[i] for i in perm[25:]]
    assert sun397.mtil_split(10) == (_perm(10)[:8], _perm(10)[8:])


# ----------------------------------------------------------------------------- errors

TRIED = {
    "Food101": ("food-101",),
    "MNIST": ("MNIST/raw", "MNIST/processed", "mnist/raw", "mnist/processed"),
    "OxfordPet": ("oxford-iiit-pet", "oxford_pets"),
    "StanfordCars": ("stanford_cars",),
    "SUN397": ("SUN397", "sun397"),
}


@pytest.mark.parametrize("name", sorted(TRIED))
@pytest.mark.parametrize("bench", ["x-tail", "mtil"])
def test_a_missing_domain_folder_names_every_path_tried(tmp_path: Path, name: str, bench: Benchmark) -> None:
    with pytest.raises(DataError) as err:
        _read(tmp_path, name, bench)
    message = str(err.value)
    assert message.startswith(f"{name}: no accepted layout under {tmp_path} (tried ")
    for rel in TRIED[name]:
        assert f": {tmp_path / rel}" in message
    for label in _spec(name).layouts:
        assert label in message
    assert "\n" not in message


# (domain, layout, benchmark, file removed relative to the root)
MISSING = [
    ("Food101", "food-101 (MoRAM, RAIL, CoOp, torchvision)", "x-tail", "food-101/split_zhou_Food101.json"),
    ("Food101", "food-101 (MoRAM, RAIL, CoOp, torchvision)", "mtil", "food-101/meta/test.json"),
    ("MNIST", "MNIST/raw (idx files; MoRAM, RAIL, torchvision)", "mtil", "MNIST/raw/t10k-labels-idx1-ubyte"),
    ("MNIST", "mnist/raw (MoRAM README; idx files)", "x-tail", "mnist/raw/train-images-idx3-ubyte"),
    ("MNIST", "MNIST/processed (legacy torchvision .pt)", "x-tail", "MNIST/processed/training.pt"),
    (
        "OxfordPet",
        "oxford_pets (RAIL, CoOp, MoRAM README)",
        "x-tail",
        "oxford_pets/split_zhou_OxfordPets.json",
    ),
    (
        "OxfordPet",
        "oxford-iiit-pet (MoRAM code, torchvision)",
        "mtil",
        "oxford-iiit-pet/annotations/trainval.txt",
    ),
    (
        "StanfordCars",
        "stanford_cars (MoRAM, RAIL, CoOp, torchvision)",
        "x-tail",
        "stanford_cars/split_zhou_StanfordCars.json",
    ),
    (
        "StanfordCars",
        "stanford_cars (MoRAM, RAIL, CoOp, torchvision)",
        "mtil",
        "stanford_cars/devkit/cars_meta.mat",
    ),
    (
        "StanfordCars",
        "stanford_cars (MoRAM, RAIL, CoOp, torchvision)",
        "mtil",
        "stanford_cars/cars_test_annos_withlabels.mat",
    ),
    ("SUN397", "SUN397 (MoRAM code, torchvision; json inside)", "x-tail", "SUN397/split_zhou_SUN397.json"),
    (
        "SUN397",
        "sun397 (RAIL, CoOp, MoRAM README; json beside SUN397/)",
        "x-tail",
        "sun397/split_zhou_SUN397.json",
    ),
    (
        "SUN397",
        "sun397 (RAIL, CoOp, MoRAM README; json beside SUN397/)",
        "mtil",
        "sun397/SUN397/ClassName.txt",
    ),
]


@pytest.mark.parametrize(("name", "layout", "bench", "rel"), MISSING)
def test_a_missing_split_file_is_named(
    tmp_path: Path, name: str, layout: str, bench: Benchmark, rel: str
) -> None:
    root = _fixture(tmp_path, name, layout)
    (root / rel).unlink()
    with pytest.raises(DataError) as err:
        _read(root, name, bench)
    assert str(err.value) == f"{name}: missing {_what(rel)} {root / rel} (layout {layout})"


def _what(rel: str) -> str:
    if rel.endswith(".json") and "split_zhou" in rel:
        return "CoOp split file"
    kinds = {
        ".json": "torchvision split file",
        ".txt": "annotation file",
        ".mat": ".mat file",
        ".pt": "legacy torchvision file",
    }
    if rel.endswith("ClassName.txt"):
        return "class list"
    return kinds.get(Path(rel).suffix, "idx file (uncompressed)")


def test_a_sun397_folder_without_its_image_folder_is_named(tmp_path: Path) -> None:
    (tmp_path / "sun397").mkdir()
    layout = "sun397 (RAIL, CoOp, MoRAM README; json beside SUN397/)"
    with pytest.raises(DataError, match="missing image folder") as err:
        _read(tmp_path, "SUN397", "mtil")
    assert (
        str(err.value) == f"SUN397: missing image folder {tmp_path / 'sun397' / 'SUN397'} (layout {layout})"
    )


JSONS = [
    ("Food101", "food-101/split_zhou_Food101.json"),
    ("OxfordPet", "oxford-iiit-pet/split_zhou_OxfordPets.json"),
    ("StanfordCars", "stanford_cars/split_zhou_StanfordCars.json"),
    ("SUN397", "SUN397/split_zhou_SUN397.json"),
]


@pytest.mark.parametrize(("name", "rel"), JSONS)
@pytest.mark.parametrize(
    "content", ['{"train": [], "val": [', '{"train": [["a.jpg", "0", "x"]], "val": [], "test": []}']
)
def test_a_malformed_split_json_is_a_one_line_error_naming_it(
    tmp_path: Path, name: str, rel: str, content: str
) -> None:
    root = _fixture(tmp_path, name, _spec(name).layouts[0])
    (root / rel).write_text(content)
    with pytest.raises(DataError) as err:
        _read(root, name, "x-tail")
    assert str(root / rel) in str(err.value)
    assert "\n" not in str(err.value)


# (domain, benchmark, file relative to the root, bad content, expected message after "<domain>: <path>")
MALFORMED = [
    (
        "Food101",
        "mtil",
        "food-101/meta/train.json",
        "[1, 2]",
        ' must be a JSON object {"class": ["class/id", ...]}',
    ),
    ("Food101", "mtil", "food-101/meta/test.json", '{"apple_pie": [', " is not a readable JSON file"),
    ("OxfordPet", "mtil", "oxford-iiit-pet/annotations/test.txt", "Abyssinian_1 1 1\n", " line 1 is not"),
    (
        "OxfordPet",
        "mtil",
        "oxford-iiit-pet/annotations/trainval.txt",
        "Abyssinian_1 40 1 1\n",
        " line 1 is not",
    ),
    (
        "StanfordCars",
        "mtil",
        "stanford_cars/devkit/cars_meta.mat",
        "not a mat file",
        " is not a readable .mat file",
    ),
    ("SUN397", "mtil", "SUN397/ClassName.txt", "/a/abbey\nabbey\n", " line 2 is not '/<letter>/<category>'"),
    (
        "MNIST",
        "mtil",
        "MNIST/raw/train-labels-idx1-ubyte",
        "\x00\x00\x08\x03",
        " is not an idx file with magic 2049",
    ),
]


@pytest.mark.parametrize(("name", "bench", "rel", "content", "message"), MALFORMED)
def test_a_malformed_annotation_file_is_a_one_line_error_naming_it(
    tmp_path: Path, name: str, bench: Benchmark, rel: str, content: str, message: str
) -> None:
    root = _fixture(tmp_path, name, _spec(name).layouts[0])
    (root / rel).write_bytes(content.encode("latin-1"))
    with pytest.raises(DataError) as err:
        _read(root, name, bench)
    assert str(err.value).startswith(f"{name}: {root / rel}{message}")
    assert "\n" not in str(err.value)


def test_a_truncated_idx_file_and_a_foreign_pt_file_are_named(tmp_path: Path) -> None:
    root = _fixture(tmp_path / "a", "MNIST", "MNIST/raw (idx files; MoRAM, RAIL, torchvision)")
    path = root / "MNIST" / "raw" / "t10k-images-idx3-ubyte"
    path.write_bytes(path.read_bytes()[:-5])
    with pytest.raises(DataError, match="holds 15675 bytes of data, its header says") as err:
        _read(root, "MNIST", "mtil")
    assert str(path) in str(err.value)
    root = _fixture(tmp_path / "b", "MNIST", "MNIST/processed (legacy torchvision .pt)")
    pt = root / "MNIST" / "processed" / "test.pt"
    torch.save({"images": torch.zeros(2, 28, 28)}, pt)
    with pytest.raises(DataError) as err:
        _read(root, "MNIST", "mtil")
    assert str(err.value) == f"MNIST: {pt} must hold (uint8 images [N,H,W], integer labels [N])"


def test_a_sun397_image_outside_the_class_list_is_named(tmp_path: Path) -> None:
    root = _fixture(tmp_path, "SUN397", "SUN397 (MoRAM code, torchvision; json inside)")
    stray = root / "SUN397" / "z" / "zoo" / "sun_aaaaaaaaaaaaaaaa.jpg"
    stray.parent.mkdir(parents=True)
    stray.write_bytes((next((root / "SUN397" / "p" / "pagoda").glob("*.jpg"))).read_bytes())
    with pytest.raises(DataError) as err:
        _read(root, "SUN397", "mtil")
    assert str(err.value) == f"SUN397: image {stray} is in category 'zoo', which ClassName.txt lacks"


def test_food101_meta_classes_missing_from_train_are_named(tmp_path: Path) -> None:
    root = _fixture(tmp_path, "Food101", "food-101 (MoRAM, RAIL, CoOp, torchvision)")
    path = root / "food-101" / "meta" / "test.json"
    path.write_text(json.dumps({"tiramisu": ["tiramisu/1"]}))
    with pytest.raises(DataError) as err:
        _read(root, "Food101", "mtil")
    assert str(err.value) == f"Food101: {path} has class 'tiramisu' that meta/train.json does not have"


# ----------------------------------------------------------------------------- specs


def test_names_and_aliases_are_unique_lower_case_and_looked_up() -> None:
    spellings = [s.name.lower() for s in SPECS] + [a for s in SPECS for a in s.aliases]
    assert len(spellings) == len(set(spellings))
    assert all(a == a.lower() for s in SPECS for a in s.aliases)
    for spec in SPECS:
        for spelling in (spec.name, spec.name.upper(), *spec.aliases):
            assert lookup(spelling) is spec
    assert lookup("food") is food101.SPEC
    assert lookup("cars") is stanford_cars.SPEC
    assert lookup("pets") is oxford_pet.SPEC
    assert lookup("oxford_pets") is oxford_pet.SPEC


def test_templates_and_published_sizes_are_those_of_the_spec() -> None:
    assert food101.SPEC.templates("x-tail") == ("a photo of a {}, a type of food.",)
    assert food101.SPEC.templates("mtil") == ("a photo of a {}, a type of food.",)
    assert mnist.SPEC.train_template("x-tail") == 'a photo of the number: "{}".'
    assert mnist.SPEC.templates("mtil") == ('a photo of the number: "{}".',)
    assert oxford_pet.SPEC.templates("mtil") == ("a photo of a {}, a type of pet.",)
    assert stanford_cars.SPEC.xtail_template == "a photo of a {}."
    assert stanford_cars.SPEC.mtil_train_template == "a photo of a {}, a type of car."
    assert len(stanford_cars.SPEC.mtil_eval_templates) == 9
    assert stanford_cars.SPEC.mtil_eval_templates[4] == "i love my {}!"
    assert stanford_cars.SPEC.mtil_eval_templates[-1] == "a photo of my old {}."
    assert sun397.SPEC.mtil_eval_templates == ("a photo of a {}.", "a photo of the {}.")
    sizes = {s.name: {b: (s.sizes[b].train, s.sizes[b].test) for b in s.benchmarks} for s in SPECS}
    assert sizes == {
        "Food101": {"x-tail": (50500, 30300), "mtil": (75750, 25250)},
        "MNIST": {"x-tail": (60000, 10000), "mtil": (60000, 10000)},
        "OxfordPet": {"x-tail": (2944, 3669), "mtil": (3680, 3669)},
        "StanfordCars": {"x-tail": (6509, 8041), "mtil": (8144, 8041)},
        "SUN397": {"x-tail": (15880, 19850), "mtil": (87003, 21751)},
    }
    # the MoRAM MNIST prompt is double-wrapped (§3.8)
    assert mnist.SPEC.xtail_template.format(MNIST_XTAIL[0]) == 'a photo of the number: "number: "0 - zero"".'


def test_an_unknown_layout_is_refused_by_the_fixture_writer(tmp_path: Path) -> None:
    for spec in SPECS:
        with pytest.raises(ValueError, match="has no layout 'nope'"):
            spec.write_fixture(tmp_path, "nope", np.random.default_rng(0))
