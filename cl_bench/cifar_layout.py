"""CIFAR-10/100 in torchvision's on-disk layout: folder, file names, md5s, and the root check.

Torch-free on purpose: ``cl-bench run`` checks a CIFAR root with :func:`precheck` before it
imports the components (torch alone takes 1-3 s to import), so a missing or corrupt root fails
within two seconds. The scenarios in :mod:`scenarios.split_cifar` read the files afterwards and
call the same :func:`check_root`, which does not hash a root twice in one process.
"""

from __future__ import annotations

import hashlib
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from cl_bench.errors import DataError, MissingDataError

SCENARIO_VARIANTS = {"split-cifar": "cifar100", "split-cifar100": "cifar100", "split-cifar10": "cifar10"}
"""Registered CIFAR scenario names (aliases included) and the variant each reads."""


@dataclass(frozen=True)
class CifarLayout:
    """Where torchvision keeps one CIFAR variant and what its files hold."""

    title: str
    folder: str
    train_files: tuple[tuple[str, str], ...]  # (file name, md5)
    test_files: tuple[tuple[str, str], ...]
    meta_file: tuple[str, str]
    label_key: str
    names_key: str
    n_classes: int
    url: str  # the archive torchvision downloads (https://www.cs.toronto.edu/~kriz/cifar.html)


# torchvision.datasets.CIFAR10 / CIFAR100 (base_folder, train_list, test_list, meta), copied so that
# checking a root needs no torchvision import (2-3 s); tests/scenarios asserts they stay equal.
LAYOUTS = {
    "cifar10": CifarLayout(
        title="CIFAR-10",
        folder="cifar-10-batches-py",
        train_files=(
            ("data_batch_1", "c99cafc152244af753f735de768cd75f"),
            ("data_batch_2", "d4bba439e000b95fd0a9bffe97cbabec"),
            ("data_batch_3", "54ebc095f3ab1f0389bbae665268c751"),
            ("data_batch_4", "634d18415352ddfa80567beed471001a"),
            ("data_batch_5", "482c414d41f54cd18b22e5b47cb7c3cb"),
        ),
        test_files=(("test_batch", "40351d587109b95175f43aff81a1287e"),),
        meta_file=("batches.meta", "5ff9c542aee3614f3951f8cda6e48888"),
        label_key="labels",
        names_key="label_names",
        n_classes=10,
        url="https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz",
    ),
    "cifar100": CifarLayout(
        title="CIFAR-100",
        folder="cifar-100-python",
        train_files=(("train", "16019d7e3df5f24257cddd939b257f8d"),),
        test_files=(("test", "f0ef6b0ae62326f3e7ffdfab6717acfc"),),
        meta_file=("meta", "7973b15100ade9c7d40fb424638fde48"),
        label_key="fine_labels",
        names_key="fine_label_names",
        n_classes=100,
        url="https://www.cs.toronto.edu/~kriz/cifar-100-python.tar.gz",
    ),
}


def layout(variant: str) -> CifarLayout:
    """The folder, file names and md5s of ``cifar10`` or ``cifar100`` (torchvision's)."""
    return LAYOUTS[variant]


def no_root(scenario: str, variant: str) -> MissingDataError:
    """The error of a CIFAR scenario run without ``scenario.root``."""
    lay = layout(variant)
    return MissingDataError(
        f"{scenario} reads {lay.title} from disk and nothing is downloaded: set scenario.root=DIR, "
        f"the directory that holds {lay.folder}/",
        variant=variant,
        root="",
    )


def download_command(variant: str, root: str) -> str:
    """A shell command that puts ``variant`` under ``root`` in torchvision's on-disk layout."""
    return f"mkdir -p {root} && curl -L {layout(variant).url} | tar xz -C {root}"


def md5(path: Path, chunk: int = 1 << 20) -> str:
    """Hex md5 of a file, read in chunks (torchvision's check, without importing torchvision)."""
    digest = hashlib.md5(usedforsecurity=False)
    with path.open("rb") as fh:
        while block := fh.read(chunk):
            digest.update(block)
    return digest.hexdigest()


# (folder, variant, (size, mtime) of each file) of the roots whose md5s matched in this process
_VERIFIED: set[tuple[str, str, tuple[tuple[int, int], ...]]] = set()


def check_root(root: str | Path, variant: str, *, verify_checksums: bool = True) -> Path:
    """The variant's folder under ``root``, after checking that every file is there and, with
    ``verify_checksums``, has torchvision's md5 (DataError naming the path and files otherwise).

    A folder verified earlier in this process, with unchanged files, is not hashed again.
    """
    lay = layout(variant)
    folder = Path(root) / lay.folder
    expected = [*lay.train_files, *lay.test_files, lay.meta_file]
    missing = [name for name, _ in expected if not (folder / name).is_file()]
    if missing:
        raise MissingDataError(
            f"{lay.title} not found: expected {folder}/ with {', '.join(n for n, _ in expected)} "
            f"(torchvision's on-disk format; missing: {', '.join(missing)}). Nothing is downloaded: "
            f"copy the extracted archive there",
            variant=variant,
            root=str(root),
        )
    if verify_checksums:
        stats = tuple((st.st_size, st.st_mtime_ns) for st in ((folder / n).stat() for n, _ in expected))
        key = (str(folder.resolve()), variant, stats)
        if key not in _VERIFIED:
            for name, expected_md5 in expected:
                if md5(folder / name) != expected_md5:
                    raise DataError(
                        f"{folder / name}: md5 mismatch (expected {expected_md5}); the file is corrupt or "
                        f"not the original {lay.title} (scenario.verify_checksums=false for generated data)"
                    )
            _VERIFIED.add(key)
    return folder


def precheck(scenario: object, args: Mapping[str, Any]) -> None:
    """Check the root of a CIFAR scenario before anything heavy is imported: no root or a missing
    folder raise :class:`MissingDataError` (other scenarios: nothing to do here)."""
    variant = SCENARIO_VARIANTS.get(scenario) if isinstance(scenario, str) else None
    root = args.get("root")
    if variant is None or not isinstance(root, str):
        return
    if not root:
        raise no_root(str(scenario), variant)
    verify = args.get("verify_checksums", True)
    check_root(root, variant, verify_checksums=verify if isinstance(verify, bool) else True)
