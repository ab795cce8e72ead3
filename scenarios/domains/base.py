"""What every image domain of the multi-domain benchmarks (X-TAIL, MTIL) provides.

A domain module (``scenarios/domains/<name>.py``, one per dataset) registers one
:class:`DomainSpec`: its canonical name, the spellings a user may write, its prompt templates
(exact strings of ``MULTIDOMAIN.md`` §3) and three functions:

- ``read(root, benchmark, options)``: find the domain's folder under the data root (every accepted layout,
  in the order of §3.13), parse its split files and return a :class:`DomainData`: the files (or
  arrays) and 0-based labels of the train and test splits, the class names cleaned by the
  benchmark's rules, and which layout matched. A missing folder or split file raises
  :class:`~cl_bench.errors.DataError` with the exact path that is missing and the layouts that
  are accepted (:func:`no_layout`). Image files are *listed*, not opened: :func:`missing_files`
  checks that they exist and the image cache decodes them.
- ``write_fixture(root, layout, rng)``: write a tiny copy of the domain in one of its
  ``layouts``, in the exact on-disk format (real JPEG/PNG files of varied sizes and modes, the
  split JSON/TXT/MAT files with the real field names), for tests and for ``cl-bench data
  fixture``. The fixture's classes are a few real class names, so the name rules are exercised.

Labels are always the domain's own (0..C-1); the scenario adds the union offsets.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import numpy as np

from cl_bench.errors import DataError

Benchmark = Literal["x-tail", "mtil"]
BENCHMARKS: tuple[Benchmark, ...] = ("x-tail", "mtil")


@dataclass(frozen=True, eq=False)
class Split:
    """One split of one domain: image ``files`` (decoded later by the cache) or in-memory
    ``arrays`` (uint8 [N, H, W] greyscale or [N, H, W, 3] RGB: MNIST, CIFAR-100), and ``labels``
    (int64 [N], 0-based). Exactly one of ``files`` and ``arrays`` is given."""

    labels: np.ndarray
    files: tuple[Path, ...] = ()
    arrays: np.ndarray | None = None

    def __post_init__(self) -> None:
        n = len(self.files) if self.arrays is None else len(self.arrays)
        if self.files and self.arrays is not None:
            raise ValueError("a split holds files or arrays, not both")
        if self.labels.shape != (n,):
            raise ValueError(f"{n} images but labels of shape {self.labels.shape}")

    def __len__(self) -> int:
        return int(self.labels.shape[0])

    def subset(self, indices: Sequence[int]) -> Split:
        """The samples at ``indices`` (in that order; repeats allowed: X-TAIL's draw with replacement)."""
        idx = np.asarray(indices, dtype=np.int64)
        if self.arrays is not None:
            return Split(self.labels[idx], arrays=self.arrays[idx])
        return Split(self.labels[idx], files=tuple(self.files[i] for i in idx))


@dataclass(frozen=True, eq=False)
class DomainData:
    """One domain as a benchmark reads it."""

    domain: str  # the canonical name (DomainSpec.name)
    benchmark: Benchmark
    layout: str  # which accepted layout matched, e.g. "fgvc-aircraft-2013b/data (MoRAM code, torchvision)"
    folder: Path  # the folder that matched
    class_names: tuple[str, ...]  # label order; cleaned by the benchmark's rules (MULTIDOMAIN.md §3)
    train: Split
    test: Split
    notes: tuple[str, ...] = ()  # e.g. "80/20 random_split seed 42 of the sorted file list"


@dataclass(frozen=True)
class ReadOptions:
    """How a reader checks what it reads: ``verify_checksums`` md5-checks the files torchvision
    checks (CIFAR-100's pickles); off only for generated fixtures."""

    verify_checksums: bool = True


@dataclass(frozen=True)
class Sizes:
    """The published split sizes (MULTIDOMAIN.md §3.12), shown beside the counted ones."""

    train: int
    test: int


@dataclass(frozen=True)
class DomainSpec:
    """A domain: names, templates, published sizes, its reader and its fixture writer."""

    name: str  # canonical, as in the reference order: "Aircraft", "Caltech101", ...
    aliases: tuple[str, ...]  # other accepted spellings (lower-case), e.g. ("flowers", "oxford_flowers")
    benchmarks: tuple[Benchmark, ...]
    layouts: tuple[str, ...]  # accepted layouts in detection order (names for write_fixture)
    xtail_template: str  # MoRAM's single template ("" where the domain is not in X-TAIL)
    mtil_train_template: str  # template[0] of ZSCL ("" where not in MTIL)
    mtil_eval_templates: tuple[str, ...]  # the ZSCL/MoE evaluation ensemble
    sizes: dict[Benchmark, Sizes]  # published sizes (X-TAIL train is the full train split, before shots)
    read: Callable[[Path, Benchmark, ReadOptions], DomainData]
    write_fixture: Callable[[Path, str, np.random.Generator], None]
    folder_names: tuple[str, ...] = field(default=())  # the folders tried, for messages

    def templates(self, benchmark: Benchmark) -> tuple[str, ...]:
        """The evaluation templates of ``benchmark`` (X-TAIL: one; MTIL: the ensemble)."""
        return (self.xtail_template,) if benchmark == "x-tail" else self.mtil_eval_templates

    def train_template(self, benchmark: Benchmark) -> str:
        return self.xtail_template if benchmark == "x-tail" else self.mtil_train_template


DOMAINS: dict[str, DomainSpec] = {}


def register(spec: DomainSpec) -> DomainSpec:
    """Add ``spec`` to :data:`DOMAINS` (a domain module calls it once, at import)."""
    if spec.name in DOMAINS:
        raise ValueError(f"domain {spec.name} registered twice")
    DOMAINS[spec.name] = spec
    return spec


def lookup(name: str) -> DomainSpec:
    """The domain called ``name`` (canonical name or alias, case-insensitive)."""
    wanted = name.strip().lower()
    for spec in DOMAINS.values():
        if wanted == spec.name.lower() or wanted in spec.aliases:
            return spec
    from cl_bench.registry import closest

    raise DataError(f"unknown domain {name!r}; known: {', '.join(DOMAINS)}{closest(name, list(DOMAINS))}")


def no_layout(domain: str, root: Path, tried: Sequence[tuple[str, Path]]) -> DataError:
    """The error for a domain none of whose layouts is under ``root``: every path tried, by layout."""
    options = "; ".join(f"{label}: {path}" for label, path in tried)
    return DataError(f"{domain}: no accepted layout under {root} (tried {options})")


def find_layout(domain: str, root: Path, candidates: Sequence[tuple[str, str]]) -> tuple[str, Path]:
    """The first of ``candidates`` (layout label, folder relative to ``root``) whose folder exists:
    its label and folder. Every reader detects its layouts this way, in the order of §3.13, so
    the first match wins; none present raises :func:`no_layout` listing every folder tried."""
    tried = [(label, root / rel) for label, rel in candidates]
    for label, folder in tried:
        if folder.is_dir():
            return label, folder
    raise no_layout(domain, root, tried)


def missing(domain: str, path: Path, what: str, layout: str) -> DataError:
    """The error for one missing file or folder of a layout that otherwise matched."""
    return DataError(f"{domain}: missing {what} {path} (layout {layout})")


def missing_files(data: DomainData, limit: int | None = None) -> list[Path]:
    """The image files of ``data`` that do not exist (at most ``limit``), train then test."""
    out: list[Path] = []
    for split in (data.train, data.test):
        for path in split.files:
            if not path.is_file():
                out.append(path)
                if limit is not None and len(out) >= limit:
                    return out
    return out
