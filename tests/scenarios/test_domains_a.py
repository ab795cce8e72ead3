"""Domain readers and fixture writers of Aircraft, Caltech101, CIFAR100, DTD, EuroSAT, Flowers102.

Each fixture is written in every accepted layout and read back for every benchmark the layout
serves; the expected class names, sizes and per-class counts are typed from MULTIDOMAIN.md §3
and the fixture's own split rules, never computed by the code under test.
"""

from __future__ import annotations

import json
import pickle
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from scipy.io import savemat

from cl_bench.errors import DataError
from scenarios.domains import aircraft, caltech101, cifar100, dtd, eurosat, flowers102
from scenarios.domains.base import Benchmark, DomainData, DomainSpec, ReadOptions, lookup, missing_files

SPECS = (aircraft.SPEC, caltech101.SPEC, cifar100.SPEC, dtd.SPEC, eurosat.SPEC, flowers102.SPEC)
NO_MD5 = ReadOptions(verify_checksums=False)

AIRCRAFT_NAMES = ("707-320", "Cessna 172", "F-16A/B", "F/A-18")
CALTECH_XTAIL = ("face", "car_side", "crocodile_head")
CALTECH_MTIL = ("off-center face", "centered face", "side of a car", "head of a  crocodile")
DTD_NAMES = ("banded", "polka-dotted", "zigzagged")
EUROSAT_XTAIL = (
    "Annual Crop Land satellite location",
    "Herbaceous Vegetation Land satellite location",
    "Industrial Buildings satellite location",
    "Sea or Lake satellite location",
)
EUROSAT_MTIL = (
    "annual crop land",
    "brushland or shrubland",
    "industrial buildings or commercial buildings",
    "lake or sea",
)
FLOWERS_XTAIL = ("pink primrose", "barbeton daisy", "pink-yellow dahlia", "lotus lotus")

# (layout, benchmark) -> (class names, train size, test size, train per class, test per class)
# per class: bincount over the labels (Flowers MTIL: over the 102-class space, listed sparsely).
CASES: dict[str, dict[tuple[str, Benchmark], tuple[tuple[str, ...], int, int, list[int], list[int]]]] = {
    "Aircraft": {
        (layout, bench): (AIRCRAFT_NAMES, 12, 8, [3, 3, 3, 3], [2, 2, 2, 2])
        for layout in aircraft.SPEC.layouts
        for bench in ("x-tail", "mtil")
    },
    "Caltech101": {
        **{
            (layout, "x-tail"): (CALTECH_XTAIL, 6, 5, [2, 2, 2], [2, 2, 1])
            for layout in caltech101.SPEC.layouts
        },
        # 18 images (Faces 5, Faces_easy 4, car_side 5, crocodile_head 4): int(0.8 * 18) = 14 train.
        **{(layout, "mtil"): (CALTECH_MTIL, 14, 4, [], []) for layout in caltech101.SPEC.layouts},
    },
    "DTD": {
        (dtd.COOP_LAYOUT, "x-tail"): (DTD_NAMES, 9, 6, [3, 3, 3], [2, 2, 2]),
        (dtd.COOP_LAYOUT, "mtil"): (DTD_NAMES, 6, 6, [2, 2, 2], [2, 2, 2]),
        (dtd.TV_LAYOUT, "mtil"): (DTD_NAMES, 6, 6, [2, 2, 2], [2, 2, 2]),
    },
    "EuroSAT": {
        (eurosat.LAYOUT, "x-tail"): (EUROSAT_XTAIL, 8, 8, [2, 2, 2, 2], [2, 2, 2, 2]),
        (eurosat.LAYOUT, "mtil"): (EUROSAT_MTIL, 16, 4, [], []),
    },
    "Flowers102": {
        (flowers102.MORAM_LAYOUT, "x-tail"): (FLOWERS_XTAIL, 8, 8, [2, 2, 2, 2], [2, 2, 2, 2]),
        (flowers102.COOP_LAYOUT, "x-tail"): (FLOWERS_XTAIL, 8, 8, [2, 2, 2, 2], [2, 2, 2, 2]),
        (flowers102.MORAM_LAYOUT, "mtil"): (flowers102.MTIL_NAMES, 8, 8, [], []),
    },
}
FILE_CASES = [(name, layout, bench) for name, cases in CASES.items() for layout, bench in cases]


def _fixture(spec: DomainSpec, root: Path, layout: str, seed: int = 0) -> Path:
    spec.write_fixture(root, layout, np.random.default_rng(seed))
    return root


def _read(spec: DomainSpec, root: Path, bench: Benchmark) -> DomainData:
    return spec.read(root, bench, NO_MD5)


def _spec(name: str) -> DomainSpec:
    return {s.name: s for s in SPECS}[name]


@pytest.mark.parametrize(("name", "layout", "bench"), FILE_CASES)
def test_fixture_reads_back(tmp_path: Path, name: str, layout: str, bench: Benchmark) -> None:
    spec = _spec(name)
    data = _read(spec, _fixture(spec, tmp_path, layout), bench)
    names, n_train, n_test, train_counts, test_counts = CASES[name][layout, bench]
    assert data.domain == name
    assert data.benchmark == bench
    assert data.layout == layout
    assert data.folder.is_dir()
    assert data.class_names == names
    assert (len(data.train), len(data.test)) == (n_train, n_test)
    if train_counts:
        assert np.bincount(data.train.labels, minlength=len(names)).tolist() == train_counts
        assert np.bincount(data.test.labels, minlength=len(names)).tolist() == test_counts
    assert data.train.labels.dtype == np.int64
    assert missing_files(data) == []
    assert all(data.folder in path.parents for path in data.train.files + data.test.files)
    assert data.notes


def test_layout_folders(tmp_path: Path) -> None:
    """Each layout lands in its own folder, the one the reader reports."""
    expected = {
        aircraft.MORAM_LAYOUT: "fgvc-aircraft-2013b/data",
        aircraft.COOP_LAYOUT: "fgvc_aircraft",
        caltech101.MORAM_LAYOUT: "caltech101",
        caltech101.COOP_LAYOUT: "caltech-101",
        dtd.COOP_LAYOUT: "dtd",
        dtd.TV_LAYOUT: "dtd/dtd",
        eurosat.LAYOUT: "eurosat",
        flowers102.MORAM_LAYOUT: "flowers-102",
        flowers102.COOP_LAYOUT: "oxford_flowers",
    }
    for k, (name, layout, bench) in enumerate(FILE_CASES):
        root = tmp_path / str(k)
        data = _read(_spec(name), _fixture(_spec(name), root, layout), bench)
        assert data.folder == root / expected[layout]


def test_aircraft_labels_follow_variants_txt(tmp_path: Path) -> None:
    root = _fixture(aircraft.SPEC, tmp_path, aircraft.MORAM_LAYOUT)
    folder = root / "fgvc-aircraft-2013b" / "data"
    assert (folder / "variants.txt").read_text() == "707-320\nCessna 172\nF-16A/B\nF/A-18\n"
    (folder / "images_variant_test.txt").write_text("1000042 F/A-18\n1000007 707-320\n1000013 F-16A/B\n")
    data = _read(aircraft.SPEC, root, "mtil")
    assert data.test.labels.tolist() == [3, 0, 2]
    assert data.test.files == tuple(folder / "images" / f"{i}.jpg" for i in ("1000042", "1000007", "1000013"))
    lines = (folder / "images_variant_train.txt").read_text().splitlines()
    by_id = dict(line.split(" ", 1) for line in lines)
    for path, label in zip(data.train.files, data.train.labels.tolist(), strict=True):
        assert AIRCRAFT_NAMES[label] == by_id[path.stem]
        assert len(path.stem) == 7


def test_aircraft_unknown_variant(tmp_path: Path) -> None:
    root = _fixture(aircraft.SPEC, tmp_path, aircraft.COOP_LAYOUT)
    path = root / "fgvc_aircraft" / "images_variant_train.txt"
    path.write_text("1000001 707-320\n1000002 Boeing 999\n")
    with pytest.raises(DataError, match=r"images_variant_train.txt line 2: variant 'Boeing 999'"):
        _read(aircraft.SPEC, root, "x-tail")


def test_caltech_files_follow_folders(tmp_path: Path) -> None:
    """X-TAIL json paths keep the folder name (Faces -> 'face'); MTIL keeps both face classes."""
    root = _fixture(caltech101.SPEC, tmp_path, caltech101.MORAM_LAYOUT)
    images = root / "caltech101" / "101_ObjectCategories"
    xtail = _read(caltech101.SPEC, root, "x-tail")
    folder_of = {0: "Faces", 1: "car_side", 2: "crocodile_head"}
    for split in (xtail.train, xtail.test):
        assert [folder_of[int(y)] for y in split.labels] == [p.parent.name for p in split.files]
    assert all(p.parent.parent == images for p in xtail.train.files)
    mtil = _read(caltech101.SPEC, root, "mtil")
    expected = [
        images / f / f"image_{i:04d}.jpg"
        for f, n in caltech101.FIXTURE_FOLDERS.items()
        for i in range(1, n + 1)
    ]
    expected = [p for p in expected if p.parent.name != "BACKGROUND_Google"]
    labels = [0] * 5 + [1] * 4 + [2] * 5 + [3] * 4
    perm = torch.randperm(18, generator=torch.Generator().manual_seed(42)).tolist()
    assert list(mtil.train.files) == [expected[i] for i in perm[:14]]
    assert list(mtil.test.files) == [expected[i] for i in perm[14:]]
    assert mtil.train.labels.tolist() == [labels[i] for i in perm[:14]]
    assert mtil.test.labels.tolist() == [labels[i] for i in perm[14:]]


def test_caltech_mtil_names() -> None:
    assert caltech101.mtil_name("Faces_easy") == "centered face"
    assert caltech101.mtil_name("water_lilly") == "water lilly"
    assert caltech101.mtil_name("yin_yang") == "yin and yang symbol"
    assert caltech101.mtil_name("accordion") == "accordion"


@pytest.mark.parametrize("domain", ["Caltech101", "EuroSAT"])
def test_mtil_random_split_is_stable_disjoint_and_complete(tmp_path: Path, domain: str) -> None:
    spec = _spec(domain)
    first = _read(spec, _fixture(spec, tmp_path / "a", spec.layouts[0], seed=1), "mtil")
    again = _read(spec, tmp_path / "a", "mtil")
    other_images = _read(spec, _fixture(spec, tmp_path / "b", spec.layouts[0], seed=2), "mtil")
    assert first.train.files == again.train.files
    assert first.test.files == again.test.files
    train, test = set(first.train.files), set(first.test.files)
    assert not train & test
    n_images = 18 if domain == "Caltech101" else 20
    assert len(train | test) == n_images
    assert "random_split seed 42" in first.notes[0]
    rel = [p.relative_to(tmp_path / "a") for p in first.train.files]
    if domain == "Caltech101":  # same names on disk: the split depends on the count only
        assert rel == [p.relative_to(tmp_path / "b") for p in other_images.train.files]


def test_eurosat_mtil_split_follows_imagefolder_order(tmp_path: Path) -> None:
    root = _fixture(eurosat.SPEC, tmp_path, eurosat.LAYOUT)
    images = root / "eurosat" / "2750"
    ordered = [
        (images / folder / file, label)
        for label, folder in enumerate(("AnnualCrop", "HerbaceousVegetation", "Industrial", "SeaLake"))
        for file in sorted(p.name for p in (images / folder).iterdir())
    ]
    perm = torch.randperm(20, generator=torch.Generator().manual_seed(42)).tolist()
    data = _read(eurosat.SPEC, root, "mtil")
    assert list(zip(data.train.files, data.train.labels.tolist(), strict=True)) == [
        ordered[i] for i in perm[:16]
    ]
    assert list(zip(data.test.files, data.test.labels.tolist(), strict=True)) == [
        ordered[i] for i in perm[16:]
    ]


def test_eurosat_images_are_64px_rgb_jpegs(tmp_path: Path) -> None:
    data = _read(eurosat.SPEC, _fixture(eurosat.SPEC, tmp_path, eurosat.LAYOUT), "x-tail")
    for path in data.train.files:
        with Image.open(path) as image:
            assert (image.format, image.mode, image.size) == ("JPEG", "RGB", (64, 64))
        assert path.name.startswith(path.parent.name + "_")


def test_eurosat_unknown_class_folder(tmp_path: Path) -> None:
    root = _fixture(eurosat.SPEC, tmp_path, eurosat.LAYOUT)
    (root / "eurosat" / "2750" / "Desert").mkdir()
    with pytest.raises(DataError, match=r"not EuroSAT classes: \['Desert'\]"):
        _read(eurosat.SPEC, root, "mtil")


def test_dtd_mtil_reads_partition_one(tmp_path: Path) -> None:
    root = _fixture(dtd.SPEC, tmp_path, dtd.TV_LAYOUT)
    folder = root / "dtd" / "dtd"
    (folder / "labels" / "train1.txt").write_text("zigzagged/zigzagged_0001.jpg\nbanded/banded_0002.jpg\n")
    (folder / "labels" / "test1.txt").write_text("banded/banded_0003.jpg\n")
    data = _read(dtd.SPEC, root, "mtil")
    assert data.class_names == ("banded", "zigzagged")
    assert data.train.labels.tolist() == [1, 0]
    assert data.train.files == (
        folder / "images" / "zigzagged" / "zigzagged_0001.jpg",
        folder / "images" / "banded" / "banded_0002.jpg",
    )
    assert data.test.labels.tolist() == [0]


def test_dtd_bad_label_line(tmp_path: Path) -> None:
    root = _fixture(dtd.SPEC, tmp_path, dtd.TV_LAYOUT)
    (root / "dtd" / "dtd" / "labels" / "test1.txt").write_text("banded_0003.jpg\n")
    with pytest.raises(DataError, match=r"test1.txt line 1: expected '<class>/<file>.jpg'"):
        _read(dtd.SPEC, root, "mtil")


def test_dtd_fixture_label_lines(tmp_path: Path) -> None:
    root = _fixture(dtd.SPEC, tmp_path, dtd.COOP_LAYOUT)
    lines = (root / "dtd" / "labels" / "train1.txt").read_text().splitlines()
    assert [line.split("/")[0] for line in lines] == ["banded"] * 2 + ["polka-dotted"] * 2 + ["zigzagged"] * 2
    assert all(line.split("/")[1].startswith(line.split("/")[0] + "_") for line in lines)


def test_flowers_mtil_uses_setid_and_imagelabels(tmp_path: Path) -> None:
    root = _fixture(flowers102.SPEC, tmp_path, flowers102.MORAM_LAYOUT)
    folder = root / "flowers-102"
    savemat(folder / "imagelabels.mat", {"labels": np.array([[78, 1, 41, 1, 60]], dtype=np.float64)})
    savemat(folder / "setid.mat", {"trnid": [[2, 5]], "valid": [[4]], "tstid": [[1, 3, 4]]})
    data = _read(flowers102.SPEC, root, "mtil")
    assert len(data.class_names) == 102
    assert data.class_names[0] == "pink primrose"
    assert data.class_names[101] == "blackberry lily"
    assert [data.class_names[i] for i in (40, 59, 77)] == ["barbeton daisy", "pink-yellow dahlia", "lotus"]
    assert data.train.labels.tolist() == [0, 59]
    assert data.train.files == (folder / "jpg" / "image_00002.jpg", folder / "jpg" / "image_00005.jpg")
    assert data.test.labels.tolist() == [77, 40, 0]


def test_flowers_bad_mat(tmp_path: Path) -> None:
    root = _fixture(flowers102.SPEC, tmp_path, flowers102.MORAM_LAYOUT)
    folder = root / "flowers-102"
    savemat(folder / "setid.mat", {"trnid": [[1, 99]], "valid": [[2]], "tstid": [[3]]})
    with pytest.raises(DataError, match=r"setid.mat: 'trnid' has image ids outside 1..20"):
        _read(flowers102.SPEC, root, "mtil")
    savemat(folder / "imagelabels.mat", {"labels": [[0, 1]]})
    with pytest.raises(DataError, match=r"imagelabels.mat: 'labels' must be class ids 1..102"):
        _read(flowers102.SPEC, root, "mtil")
    savemat(folder / "imagelabels.mat", {"lbls": [[1]]})
    with pytest.raises(DataError, match=r"imagelabels.mat has no variable 'labels'"):
        _read(flowers102.SPEC, root, "mtil")


def test_flowers_fixture_files(tmp_path: Path) -> None:
    _fixture(flowers102.SPEC, tmp_path / "tv", flowers102.MORAM_LAYOUT)
    _fixture(flowers102.SPEC, tmp_path / "coop", flowers102.COOP_LAYOUT)
    assert sorted(p.name for p in (tmp_path / "tv" / "flowers-102").iterdir()) == [
        "imagelabels.mat",
        "jpg",
        "setid.mat",
        "split_zhou_OxfordFlowers.json",
    ]
    coop = tmp_path / "coop" / "oxford_flowers"
    assert json.loads((coop / "cat_to_name.json").read_text()) == {
        "1": "pink primrose",
        "41": "barbeton daisy",
        "60": "pink-yellow dahlia",
        "78": "lotus lotus",
    }
    assert not (coop / "setid.mat").exists()


def test_cifar100_reads_pickles_as_hwc_arrays(tmp_path: Path) -> None:
    _fixture(cifar100.SPEC, tmp_path, cifar100.TV_LAYOUT)
    data = _read(cifar100.SPEC, tmp_path, "mtil")
    assert data.layout == "cifar-100-python (torchvision)"
    assert data.folder == tmp_path / "cifar-100-python"
    assert len(data.class_names) == 100
    assert data.class_names[:3] == ("apple", "aquarium fish", "baby")
    assert data.class_names[41] == "lawn mower"
    assert data.class_names[99] == "worm"
    assert data.train.arrays is not None
    assert data.test.arrays is not None
    assert (data.train.arrays.shape, data.test.arrays.shape) == ((200, 32, 32, 3), (100, 32, 32, 3))
    assert data.train.arrays.dtype == np.uint8
    with (tmp_path / "cifar-100-python" / "train").open("rb") as fh:
        raw = pickle.load(fh, encoding="latin1")  # the test's own file
    first = np.asarray(raw["data"][0]).reshape(3, 32, 32)
    assert np.array_equal(data.train.arrays[0], first.transpose(1, 2, 0))
    assert data.train.labels.tolist() == raw["fine_labels"]
    assert np.bincount(data.train.labels).tolist() == [2] * 100
    assert data.train.files == ()


def test_cifar100_checks_md5_and_benchmark(tmp_path: Path) -> None:
    _fixture(cifar100.SPEC, tmp_path, cifar100.TV_LAYOUT)
    with pytest.raises(DataError, match="md5 mismatch"):
        cifar100.SPEC.read(tmp_path, "mtil", ReadOptions(verify_checksums=True))
    with pytest.raises(DataError, match="CIFAR100 is not part of x-tail"):
        _read(cifar100.SPEC, tmp_path, "x-tail")


NO_LAYOUT = [
    ("Aircraft", "x-tail", ["fgvc-aircraft-2013b/data", "fgvc_aircraft"]),
    ("Aircraft", "mtil", ["fgvc-aircraft-2013b/data", "fgvc_aircraft"]),
    ("Caltech101", "x-tail", ["caltech101", "caltech-101"]),
    ("Caltech101", "mtil", ["caltech101", "caltech-101"]),
    ("CIFAR100", "mtil", ["cifar-100-python"]),
    ("DTD", "x-tail", ["dtd"]),
    ("DTD", "mtil", ["dtd/dtd", "dtd"]),
    ("EuroSAT", "x-tail", ["eurosat"]),
    ("EuroSAT", "mtil", ["eurosat"]),
    ("Flowers102", "x-tail", ["flowers-102", "oxford_flowers"]),
    ("Flowers102", "mtil", ["flowers-102"]),
]


@pytest.mark.parametrize(("name", "bench", "folders"), NO_LAYOUT)
def test_missing_domain_folder_lists_every_path_tried(
    tmp_path: Path, name: str, bench: Benchmark, folders: list[str]
) -> None:
    with pytest.raises(DataError) as info:
        _read(_spec(name), tmp_path, bench)
    message = str(info.value)
    assert message.startswith(f"{name}: no accepted layout under {tmp_path} (tried ")
    assert "\n" not in message
    tried = message.split(" (tried ", 1)[1].removesuffix(")").split("; ")
    assert [entry.rsplit(": ", 1)[1] for entry in tried] == [str(tmp_path / folder) for folder in folders]


MISSING = [
    ("Aircraft", aircraft.MORAM_LAYOUT, "x-tail", "fgvc-aircraft-2013b/data/images_variant_test.txt"),
    ("Aircraft", aircraft.COOP_LAYOUT, "mtil", "fgvc_aircraft/variants.txt"),
    ("Caltech101", caltech101.MORAM_LAYOUT, "x-tail", "caltech101/split_zhou_Caltech101.json"),
    ("Caltech101", caltech101.COOP_LAYOUT, "mtil", "caltech-101/101_ObjectCategories"),
    ("CIFAR100", cifar100.TV_LAYOUT, "mtil", "cifar-100-python/meta"),
    ("DTD", dtd.COOP_LAYOUT, "x-tail", "dtd/split_zhou_DescribableTextures.json"),
    ("DTD", dtd.TV_LAYOUT, "mtil", "dtd/dtd/labels/test1.txt"),
    ("EuroSAT", eurosat.LAYOUT, "x-tail", "eurosat/split_zhou_EuroSAT.json"),
    ("EuroSAT", eurosat.LAYOUT, "mtil", "eurosat/2750"),
    ("Flowers102", flowers102.COOP_LAYOUT, "x-tail", "oxford_flowers/split_zhou_OxfordFlowers.json"),
    ("Flowers102", flowers102.MORAM_LAYOUT, "mtil", "flowers-102/setid.mat"),
]


@pytest.mark.parametrize(("name", "layout", "bench", "rel"), MISSING)
def test_missing_split_file_is_named(
    tmp_path: Path, name: str, layout: str, bench: Benchmark, rel: str
) -> None:
    spec = _spec(name)
    _fixture(spec, tmp_path, layout)
    target = tmp_path / rel
    if target.is_dir():
        for path in sorted(target.rglob("*"), reverse=True):
            path.unlink() if path.is_file() else path.rmdir()
        target.rmdir()
    else:
        target.unlink()
    with pytest.raises(DataError) as info:
        _read(spec, tmp_path, bench)
    assert str(info.value).startswith(f"{name}: missing ")
    assert f" {target} (layout {layout})" in str(info.value)


def test_dtd_xtail_does_not_read_the_torchvision_layout(tmp_path: Path) -> None:
    """torchvision's dtd/dtd holds no CoOp json: X-TAIL finds dtd/ and names the missing file."""
    _fixture(dtd.SPEC, tmp_path, dtd.TV_LAYOUT)
    with pytest.raises(DataError, match="missing CoOp split file .*dtd/split_zhou_DescribableTextures.json"):
        _read(dtd.SPEC, tmp_path, "x-tail")


JSON_FILES = [
    ("Caltech101", caltech101.MORAM_LAYOUT, "caltech101/split_zhou_Caltech101.json"),
    ("DTD", dtd.COOP_LAYOUT, "dtd/split_zhou_DescribableTextures.json"),
    ("EuroSAT", eurosat.LAYOUT, "eurosat/split_zhou_EuroSAT.json"),
    ("Flowers102", flowers102.MORAM_LAYOUT, "flowers-102/split_zhou_OxfordFlowers.json"),
]


@pytest.mark.parametrize(("name", "layout", "rel"), JSON_FILES)
@pytest.mark.parametrize(
    "content",
    [
        '{"train": [["a.jpg", 0',
        '{"train": [], "val": []}',
        '{"train": [["a.jpg", "0", "x"]], "val": [], "test": []}',
    ],
)
def test_malformed_json_is_one_line_naming_the_file(
    tmp_path: Path, name: str, layout: str, rel: str, content: str
) -> None:
    spec = _spec(name)
    _fixture(spec, tmp_path, layout)
    (tmp_path / rel).write_text(content)
    with pytest.raises(DataError) as info:
        _read(spec, tmp_path, "x-tail")
    message = str(info.value)
    assert "\n" not in message
    assert message.startswith(f"{name}: {tmp_path / rel}")


def test_fixture_images_are_real_files(tmp_path: Path) -> None:
    """JPEG datasets get JPEG files of varied sizes; the fixtures stay well under 100 files."""
    for k, spec in enumerate(SPECS):
        for j, layout in enumerate(spec.layouts):
            root = tmp_path / f"{k}-{j}"
            _fixture(spec, root, layout)
            files = [p for p in root.rglob("*") if p.is_file()]
            assert len(files) < 100
            images = [p for p in files if p.suffix == ".jpg"]
            sizes = set()
            for path in images:
                with Image.open(path) as image:
                    assert image.format == "JPEG"
                    sizes.add(image.size)
            if spec.name not in ("CIFAR100", "EuroSAT"):
                assert len(images) >= 15
                assert len(sizes) > 1


def test_fixture_is_deterministic(tmp_path: Path) -> None:
    for spec in SPECS:
        bench = spec.benchmarks[0]
        a = _read(spec, _fixture(spec, tmp_path / spec.name / "a", spec.layouts[0], seed=7), bench)
        b = _read(spec, _fixture(spec, tmp_path / spec.name / "b", spec.layouts[0], seed=7), bench)
        assert [p.relative_to(tmp_path / spec.name / "a") for p in a.train.files] == [
            p.relative_to(tmp_path / spec.name / "b") for p in b.train.files
        ]
        assert a.train.labels.tolist() == b.train.labels.tolist()


def test_names_and_aliases_are_unique_and_resolve() -> None:
    spellings = [s.name.lower() for s in SPECS] + [a for s in SPECS for a in s.aliases]
    assert len(spellings) == len(set(spellings))
    assert all(a == a.lower() for s in SPECS for a in s.aliases)
    for spec in SPECS:
        assert lookup(spec.name.upper()) is spec
        for alias in spec.aliases:
            assert lookup(alias) is spec
    assert lookup("fgvc-aircraft") is aircraft.SPEC
    assert lookup("flowers") is flowers102.SPEC
    assert lookup("oxford_flowers") is flowers102.SPEC
    assert lookup("caltech-101") is caltech101.SPEC


def test_specs_match_the_published_numbers() -> None:
    assert [s.name for s in SPECS] == ["Aircraft", "Caltech101", "CIFAR100", "DTD", "EuroSAT", "Flowers102"]
    sizes = {s.name: {b: (z.train, z.test) for b, z in s.sizes.items()} for s in SPECS}
    assert sizes == {
        "Aircraft": {"x-tail": (3334, 3333), "mtil": (3334, 3333)},
        "Caltech101": {"x-tail": (4128, 2465), "mtil": (6941, 1736)},
        "CIFAR100": {"mtil": (50000, 10000)},
        "DTD": {"x-tail": (2820, 1692), "mtil": (1880, 1880)},
        "EuroSAT": {"x-tail": (13500, 8100), "mtil": (21600, 5400)},
        "Flowers102": {"x-tail": (4093, 2463), "mtil": (1020, 6149)},
    }
    assert cifar100.SPEC.benchmarks == ("mtil",)
    assert cifar100.SPEC.xtail_template == ""


def test_templates() -> None:
    assert aircraft.SPEC.templates("x-tail") == ("a photo of a {}, a type of aircraft.",)
    assert aircraft.SPEC.templates("mtil") == (
        "a photo of a {}, a type of aircraft.",
        "a photo of the {}, a type of aircraft.",
    )
    caltech = caltech101.SPEC.templates("mtil")
    assert (len(caltech), caltech[0], caltech[10], caltech[17], caltech[-1]) == (
        34,
        "a photo of a {}.",
        "a {} in a video game.",
        "a photo of the {}.",
        "a doodle of the {}.",
    )
    assert caltech101.SPEC.templates("x-tail") == ("a photo of a {}.",)
    cifar = cifar100.SPEC.templates("mtil")
    assert (len(cifar), cifar[1], cifar[-1]) == (18, "a blurry photo of a {}.", "a photo of the big {}.")
    assert dtd.SPEC.train_template("x-tail") == "{} texture."
    assert dtd.SPEC.train_template("mtil") == "a photo of a {} texture."
    assert dtd.SPEC.templates("mtil")[-1] == "a photo of the {} object."
    assert len(dtd.SPEC.templates("mtil")) == 8
    assert eurosat.SPEC.xtail_template == "a centered satellite photo of the {}."
    assert eurosat.SPEC.mtil_train_template == "a centered satellite photo of {}."
    assert eurosat.SPEC.templates("mtil")[1] == "a centered satellite photo of a {}."
    assert flowers102.SPEC.templates("mtil") == ("a photo of a {}, a type of flower.",)
    assert flowers102.SPEC.train_template("x-tail") == "a photo of a {}, a type of flower."


def test_unknown_fixture_layout() -> None:
    from cl_bench.errors import ConfigError

    for spec in SPECS:
        with pytest.raises(ConfigError, match="unknown layout 'nope'"):
            spec.write_fixture(Path("/nonexistent"), "nope", np.random.default_rng(0))
