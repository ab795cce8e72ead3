"""X-TAIL and MTIL: one experience per image domain, read from the folders researchers already have.

``x-tail`` (RAIL, used by MoRA's paper): 10 domains, 16-shot training sets, full test sets, and
every test image scored against the **union** of all domains' classes (future ones included, no
task id): ``label_space = "all"``. ``mtil`` (ZSCL, MoE-Adapters): 11 domains in Order I or II,
full or few-shot training sets, and each test set scored within its own domain's classes
(``protocol = "task"``). Both train the cross-entropy over the current domain's classes
(``train_classes = "current"``), as the references do. The data spec is MULTIDOMAIN.md.

Each domain (``scenarios.domains``) finds its own layout under ``root`` (or ``roots[domain]``),
lists its files and labels, and names its classes by the benchmark's rules; this module draws
the few-shot subsets (deterministic from ``shot_seed``, per domain, written beside the record
as ``shots/<domain>.json`` and replayable with ``shots_file``), decodes every image once into
the on-disk cache (:mod:`cl_bench.image_cache`, CLIP's eval preprocessing at ``image_size``),
puts the domains' labels side by side in the union label space (each domain keeps its own
indices: equal names in two domains never merge) and gives the head each class's prompts from
its domain's templates.
"""

from __future__ import annotations

import json
import os
import random
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
import torch

from cl_bench.errors import ConfigError, DataError
from cl_bench.registry import SCENARIOS
from cl_bench.scenario import ImageSource, Scenario, ShardedImages
from scenarios.common import make_domain_scenario
from scenarios.domains import DOMAINS, Benchmark, DomainData, DomainSpec, ReadOptions, Split, lookup
from scenarios.domains.base import missing_files

MTIL_ORDER_I = (
    "Aircraft",
    "Caltech101",
    "CIFAR100",
    "DTD",
    "EuroSAT",
    "Flowers102",
    "Food101",
    "MNIST",
    "OxfordPet",
    "StanfordCars",
    "SUN397",
)
# RAIL's order: MTIL's Order I without CIFAR100 (MULTIDOMAIN.md §1)
XTAIL_ORDER = tuple(domain for domain in MTIL_ORDER_I if domain != "CIFAR100")
# ZSCL results.ipynb's permutation [9, 6, 7, 8, 5, 10, 0, 1, 3, 4, 2] of Order I (MULTIDOMAIN.md §5)
MTIL_ORDER_II = tuple(MTIL_ORDER_I[i] for i in (9, 6, 7, 8, 5, 10, 0, 1, 3, 4, 2))
SHOTS_FORMAT = "cl-bench-shots/1"


def default_cache_dir() -> Path:
    """``$CL_BENCH_CACHE``, else ``$XDG_CACHE_HOME/cl-bench/images``, else ``~/.cache/cl-bench/images``
    (beside, not inside, the data root: shared dataset folders are often read-only)."""
    if os.environ.get("CL_BENCH_CACHE"):
        return Path(os.environ["CL_BENCH_CACHE"])
    base = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
    return base / "cl-bench" / "images"


# ----------------------------------------------------------------------------- few-shot draws


def xtail_shots(labels: np.ndarray, shots: int, seed: int, domain: str) -> list[int]:
    """X-TAIL's draw (MULTIDOMAIN.md §2, ``DatasetBase.generate_fewshot_dataset``): labels in
    order of first appearance; per label ``random.sample(items, shots)`` when it has enough
    items, else ``random.choices(items, k=shots)`` (with replacement). The generator is Python's
    ``random``, seeded per domain with ``"<seed>/<domain>"``, so a domain's shots do not depend
    on which other domains run or in which order (MoRAM's draws do: it redraws on every rebuild)."""
    rng = random.Random(f"{seed}/{domain}")
    by_label: dict[int, list[int]] = {}
    for index, label in enumerate(labels.tolist()):
        by_label.setdefault(int(label), []).append(index)
    out: list[int] = []
    for items in by_label.values():
        out.extend(rng.sample(items, shots) if len(items) >= shots else rng.choices(items, k=shots))
    return out


def mnist_shots(labels: np.ndarray, shots: int, seed: int) -> list[int]:
    """MoRAM's MNIST draw (``FewShotDataset``): per class in sorted order, ``np.random.choice``
    of ``shots`` indices, without replacement when the class has enough (a fresh
    ``RandomState(seed)``)."""
    rng = np.random.RandomState(seed)
    out: list[int] = []
    for label in sorted(set(labels.tolist())):
        items = np.flatnonzero(labels == label)
        out.extend(int(i) for i in rng.choice(items, shots, replace=len(items) < shots))
    return out


def mtil_shots(labels: np.ndarray, shots: int, seed: int) -> list[int]:
    """MoE-Adapters' few-shot MTIL (``finetune.py``): walk the train set in a shuffled order
    (torch generator seeded with ``seed``) and keep the first ``shots`` samples of each label."""
    order = torch.randperm(len(labels), generator=torch.Generator().manual_seed(seed)).tolist()
    taken: dict[int, int] = {}
    out: list[int] = []
    for index in order:
        label = int(labels[index])
        if taken.get(label, 0) < shots:
            taken[label] = taken.get(label, 0) + 1
            out.append(index)
    return out


def draw_shots(data: DomainData, shots: int, seed: int) -> tuple[list[int], str]:
    """The training indices of ``data`` for ``shots`` per class, and the rule's name."""
    if data.benchmark == "mtil":
        return mtil_shots(data.train.labels, shots, seed), "mtil-first-k-of-shuffled"
    if data.domain == "MNIST":
        return mnist_shots(data.train.labels, shots, seed), "xtail-mnist-np-choice"
    return xtail_shots(data.train.labels, shots, seed, data.domain), "xtail-random-sample"


def shots_record(
    data: DomainData, indices: Sequence[int], shots: int, seed: int, rule: str
) -> dict[str, Any]:
    """The ``shots/<domain>.json`` file: enough to check and replay the draw exactly."""
    return {
        "format": SHOTS_FORMAT,
        "domain": data.domain,
        "benchmark": data.benchmark,
        "shots": shots,
        "seed": seed,
        "rule": rule,
        "n_train": len(data.train),
        "indices": [int(i) for i in indices],
    }


def read_shots_file(path: Path) -> dict[str, dict[str, Any]]:
    """Shots to replay, by domain: ``path`` is one ``<domain>.json`` a run wrote, or the run's
    ``shots/`` directory of them."""
    files = sorted(path.glob("*.json")) if path.is_dir() else [path]
    if not files or not files[0].is_file():
        raise DataError(f"shots_file {path}: no such file (or no .json files in that directory)")
    out: dict[str, dict[str, Any]] = {}
    for file in files:
        try:
            entry = json.loads(file.read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
            raise DataError(f"shots_file {file}: not readable JSON ({err})") from None
        ok = (
            isinstance(entry, dict)
            and entry.get("format") == SHOTS_FORMAT
            and isinstance(entry.get("domain"), str)
            and isinstance(entry.get("n_train"), int)
            and isinstance(entry.get("indices"), list)
            and all(isinstance(i, int) and not isinstance(i, bool) for i in entry["indices"])
        )
        if not ok:
            raise DataError(f"shots_file {file}: not a {SHOTS_FORMAT} file (domain, n_train, indices)")
        out[lookup(entry["domain"]).name] = entry
    return out


def replay_shots(data: DomainData, entry: dict[str, Any], where: str) -> list[int]:
    """The indices of ``entry`` after checking they fit this domain's train split."""
    indices = list(entry["indices"])
    if entry["n_train"] != len(data.train):
        raise DataError(
            f"shots_file {where}: {data.domain} had {entry['n_train']} training images when the shots "
            f"were drawn, this root has {len(data.train)} (another split or dataset version)"
        )
    if indices and (min(indices) < 0 or max(indices) >= len(data.train)):
        raise DataError(f"shots_file {where}: {data.domain} indices outside 0..{len(data.train) - 1}")
    return indices


# ----------------------------------------------------------------------------- the scenarios


def write_fixture(scenario: _MultiDomain, root: Path, *, layout: int = 0, seed: int = 0) -> Path:
    """A tiny copy of every domain of ``scenario`` under ``root``, each in its ``layout``-th
    accepted layout (the last one where a domain has fewer; the first where the benchmark does
    not read that one), in the real on-disk formats: what the tests and ``cl-bench data
    fixture`` run on."""
    rng = np.random.default_rng(seed)
    options = ReadOptions(verify_checksums=False)
    for spec in scenario.specs():
        spec.write_fixture(root, spec.layouts[min(layout, len(spec.layouts) - 1)], rng)
        try:
            spec.read(root, scenario.benchmark, options)
        except DataError:  # a layout the other benchmark reads (MTIL's Flowers102 is torchvision's only)
            spec.write_fixture(root, spec.layouts[0], rng)
    return root


@dataclass(frozen=True)
class CheckRow:
    """One line of ``cl-bench data check``: a domain as found under the root."""

    domain: str
    layout: str
    folder: str
    classes: int
    train: int
    test: int
    published: str
    missing: int
    error: str = ""


@dataclass(frozen=True)
class _MultiDomain:
    """Options shared by ``x-tail`` and ``mtil``.

    ``root``: the data root holding one folder per domain; ``roots``: per-domain overrides
    (``{Aircraft = "/data/fgvc"}``); ``domains``: a subset and order (names or aliases; empty:
    the benchmark's order); ``shots``: training images per class (0: the full train split);
    ``shot_seed``: the seed of the draw; ``shots_file``: replay the shots a run wrote
    (``runs/<id>/shots`` or one file of it); ``image_size``: the side of the cached images (the
    backbone's input size; others are resized on the device); ``cache_dir``: where decoded
    images are kept (empty: :func:`default_cache_dir`); ``skip_bad_images``: drop corrupt image
    files (named in a warning and the record) instead of failing; ``workers``: decoding
    processes (0: every CPU); ``verify_checksums``: md5-check the files torchvision checks.
    """

    benchmark: ClassVar[Benchmark]
    default_order: ClassVar[tuple[str, ...]]
    default_backbone: ClassVar[str] = "clip-vit-b-16"
    root: str = ""
    roots: dict[str, str] = field(default_factory=dict)
    domains: tuple[str, ...] = ()
    shots: int = 0
    shot_seed: int = 42
    shots_file: str = ""
    image_size: int = 224
    cache_dir: str = ""
    skip_bad_images: bool = False
    workers: int = 0
    verify_checksums: bool = True

    def __post_init__(self) -> None:
        if self.shots < 0:
            raise ConfigError(f"scenario.shots must be >= 0, got {self.shots}")
        if self.image_size < 8:
            raise ConfigError(f"scenario.image_size must be >= 8, got {self.image_size}")
        if self.workers < 0:
            raise ConfigError(f"scenario.workers must be >= 0, got {self.workers}")

    # -- which domains, where

    def stream_order(self) -> tuple[str, ...]:
        """The domains when ``domains`` is empty."""
        return self.default_order

    def specs(self) -> list[DomainSpec]:
        """The domains of this run, in stream order (DataError for an unknown or repeated name,
        ConfigError for a domain that is not part of the benchmark)."""
        import scenarios.domains.all  # noqa: F401  (registers every domain)

        names = self.domains or self.stream_order()
        specs = [lookup(name) for name in names]
        seen: set[str] = set()
        for spec in specs:
            if self.benchmark not in spec.benchmarks:
                raise ConfigError(f"scenario.domains: {spec.name} is not part of {self.benchmark}")
            if spec.name in seen:
                raise ConfigError(f"scenario.domains: {spec.name} appears twice")
            seen.add(spec.name)
        unknown = [key for key in self.roots if lookup(key).name not in seen]
        if unknown:
            raise ConfigError(f"scenario.roots: {', '.join(unknown)} not among this run's domains")
        return specs

    def root_of(self, spec: DomainSpec) -> Path:
        for key, value in self.roots.items():
            if lookup(key).name == spec.name:
                return Path(value).expanduser()
        if not self.root:
            raise DataError(
                f"{self.benchmark}: set scenario.root to the folder that holds the domain folders "
                f"(e.g. --set scenario.root=/data), or scenario.roots for single domains"
            )
        return Path(self.root).expanduser()

    def read(self, spec: DomainSpec) -> DomainData:
        root = self.root_of(spec)
        if not root.is_dir():
            raise DataError(f"{spec.name}: data root {root} does not exist")
        return spec.read(root, self.benchmark, ReadOptions(verify_checksums=self.verify_checksums))

    # -- cl-bench data check

    def check(self) -> list[CheckRow]:
        """Every domain as found (or why not): the rows of ``cl-bench data check``. No root at
        all, or a root that does not exist, is one error, not one per domain."""
        specs = self.specs()
        if not self.roots:
            self.root_of(specs[0])  # DataError: set scenario.root
            if not Path(self.root).expanduser().is_dir():
                raise DataError(f"{self.benchmark}: data root {self.root} does not exist")
        rows = []
        for spec in specs:
            sizes = spec.sizes.get(self.benchmark)
            published = f"{sizes.train}/{sizes.test}" if sizes else "-"
            try:
                data = self.read(spec)
                lost = missing_files(data)
            except DataError as err:
                rows.append(CheckRow(spec.name, "-", "-", 0, 0, 0, published, 0, str(err)))
                continue
            error = f"{len(lost)} image files missing, e.g. {lost[0]}" if lost else ""
            rows.append(
                CheckRow(
                    spec.name,
                    data.layout,
                    str(data.folder),
                    len(data.class_names),
                    len(data.train),
                    len(data.test),
                    published,
                    len(lost),
                    error,
                )
            )
        return rows

    # -- the scenario

    def build(self, order_seed: int) -> Scenario:
        """Read, draw, cache and join the domains (``order_seed`` is unused: the order is the
        benchmark's or ``domains``)."""
        from cl_bench.image_cache import cached_images

        del order_seed
        specs = self.specs()
        datas = [self.read(spec) for spec in specs]  # every domain's layout before any decoding
        for data in datas:
            lost = missing_files(data, limit=1)
            if lost:
                raise DataError(
                    f"{data.domain}: image file {lost[0]} listed by its split ({data.layout}) is missing"
                )
        replay = read_shots_file(Path(self.shots_file).expanduser()) if self.shots_file else {}
        cache_dir = Path(self.cache_dir).expanduser() if self.cache_dir else default_cache_dir()
        train_shards, test_shards, train_targets, test_targets = [], [], [], []
        names: list[str] = []
        prompts: list[tuple[str, ...]] = []
        train_prompts: list[str] = []
        files: dict[str, Any] = {}
        per_domain: list[dict[str, Any]] = []
        for spec, data in zip(specs, datas, strict=True):
            train = data.train
            shots_rule = ""
            if spec.name in replay:
                indices = replay_shots(data, replay[spec.name], self.shots_file)
                shots_rule = "replayed from " + self.shots_file
                files[f"shots/{spec.name}.json"] = {**replay[spec.name], "replayed_from": self.shots_file}
                train = train.subset(indices)
            elif self.shots:
                indices, shots_rule = draw_shots(data, self.shots, self.shot_seed)
                files[f"shots/{spec.name}.json"] = shots_record(
                    data, indices, self.shots, self.shot_seed, shots_rule
                )
                train = train.subset(indices)
            offset = len(names)
            cached = {}
            for split_name, split in (("train", train), ("test", data.test)):
                cached[split_name] = cached_images(
                    split,
                    self.image_size,
                    cache_dir,
                    workers=self.workers,
                    skip_bad=self.skip_bad_images,
                    label=f"{spec.name} {split_name}",
                )
                if not len(cached[split_name].kept):
                    raise DataError(f"{spec.name}: no {split_name} images left (all skipped or none listed)")
            kept_train, kept_test = cached["train"].kept, cached["test"].kept
            train_shards.append(cached["train"].images)
            test_shards.append(cached["test"].images)
            train_targets.append(torch.from_numpy(train.labels[kept_train] + offset))
            test_targets.append(torch.from_numpy(data.test.labels[kept_test] + offset))
            templates = spec.templates(self.benchmark)
            for name in data.class_names:
                names.append(name)
                prompts.append(tuple(t.format(name) for t in templates))
                train_prompts.append(spec.train_template(self.benchmark).format(name))
            per_domain.append(
                {
                    "domain": spec.name,
                    "layout": data.layout,
                    "folder": str(data.folder),
                    "offset": offset,
                    "n_classes": len(data.class_names),
                    "n_train": len(kept_train),
                    "n_test": len(kept_test),
                    "n_train_full": len(data.train),
                    "shots": shots_rule,
                    "skipped_images": int(len(train) - len(kept_train) + len(data.test) - len(kept_test)),
                    "cache": {"train": cached["train"].hit, "test": cached["test"].hit},
                    "templates": list(templates),
                    "notes": list(data.notes),
                }
            )
        scenario = make_domain_scenario(
            self.benchmark,
            train=ImageSource(ShardedImages(train_shards), torch.cat(train_targets)),
            test=ImageSource(ShardedImages(test_shards), torch.cat(test_targets)),
            class_names=names,
            classes_per_domain=[d["n_classes"] for d in per_domain],
            protocol="task" if self.benchmark == "mtil" else "class",
            default_backbone=self.default_backbone,
            metadata={
                "benchmark": self.benchmark,
                "domains": [spec.name for spec in specs],
                "per_domain": per_domain,
                "shots": self.shots,
                "shot_seed": self.shot_seed,
                "image_size": self.image_size,
                "cache_dir": str(cache_dir),
                "preprocessing": "PIL RGB, bicubic resize of the shorter side, centre crop (CLIP eval)",
            },
        )
        scenario.prompts, scenario.train_prompts, scenario.files = prompts, train_prompts, files
        return scenario


@SCENARIOS.register(
    "x-tail",
    description="X-TAIL: 10 image domains, 16-shot, scored over the union of all 1100 classes",
)
@dataclass(frozen=True)
class XTail(_MultiDomain):
    """X-TAIL (MULTIDOMAIN.md): the 10 domains in RAIL's order, 16 shots per class."""

    benchmark: ClassVar[Benchmark] = "x-tail"
    default_order: ClassVar[tuple[str, ...]] = XTAIL_ORDER
    # MoRAM's runner: 500 steps of batch 64 per domain, lr 5e-4; every cell over all classes
    run_defaults: ClassVar[dict[str, object]] = {
        "label_space": "all",
        "train_classes": "current",
        "steps_per_experience": 500,
        "batch_size": 64,
    }
    shots: int = 16


@SCENARIOS.register(
    "mtil",
    description="MTIL: 11 image domains (Order I or II), each scored within its own classes",
)
@dataclass(frozen=True)
class Mtil(_MultiDomain):
    """MTIL (MULTIDOMAIN.md): 11 domains, ``order`` "I" or "II" or an explicit list of domains
    (``domains`` also selects a subset), full train sets unless ``shots`` is set (MoE-Adapters'
    few-shot variant uses 5)."""

    benchmark: ClassVar[Benchmark] = "mtil"
    default_order: ClassVar[tuple[str, ...]] = MTIL_ORDER_I
    # ZSCL: 1000 steps of batch 64 per domain
    run_defaults: ClassVar[dict[str, object]] = {
        "train_classes": "current",
        "steps_per_experience": 1000,
        "batch_size": 64,
    }
    order: str | tuple[str, ...] = "I"

    def __post_init__(self) -> None:
        super().__post_init__()
        if isinstance(self.order, str) and self.order not in ("I", "II"):
            raise ConfigError(f"scenario.order must be 'I', 'II' or a list of domains, got {self.order!r}")
        if not isinstance(self.order, str) and self.domains:
            raise ConfigError("scenario.order (a list) and scenario.domains both give the domains: set one")

    def stream_order(self) -> tuple[str, ...]:
        if not isinstance(self.order, str):
            return self.order
        return MTIL_ORDER_I if self.order == "I" else MTIL_ORDER_II


__all__ = ["DOMAINS", "MTIL_ORDER_I", "MTIL_ORDER_II", "XTAIL_ORDER", "Mtil", "Split", "XTail"]
