"""Two toy domains in CoOp's split-file layout, for the tests of the multi-domain scenarios.

``ToyA`` (classes "cat", "pizza", "car_side") and ``ToyB`` ("pizza", "dog") share the class name
"pizza", so the union label space must keep two separate columns for it. Each image is a flat
colour per class with a little noise, so a tiny CLIP can learn the classes in a few steps.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

import numpy as np

from scenarios.domains import base
from scenarios.domains.base import Benchmark, DomainData, DomainSpec, ReadOptions, Sizes, Split
from scenarios.domains.files import read_coop_split, write_coop_split

CLASSES = {"ToyA": ("cat", "pizza", "car_side"), "ToyB": ("pizza", "dog")}
COLOURS = {"cat": (200, 30, 30), "pizza": (30, 200, 30), "car_side": (30, 30, 200), "dog": (200, 200, 30)}
PER_CLASS = {"train": 6, "val": 1, "test": 3}


def _writer(domain: str) -> Callable[[Path, str, np.random.Generator], None]:
    def write(root: Path, layout: str, rng: np.random.Generator) -> None:
        from PIL import Image

        folder = root / domain.lower()
        items: dict[str, list[tuple[str, int, str]]] = {}
        for split, n in PER_CLASS.items():
            items[split] = []
            for label, name in enumerate(CLASSES[domain]):
                for i in range(n):
                    rel = f"{name}/{split}_{i:03d}.png"
                    pixels = np.clip(
                        np.array(COLOURS[name]) + rng.integers(-20, 21, size=(40 + i, 36, 3)), 0, 255
                    ).astype(np.uint8)
                    (folder / "images" / name).mkdir(parents=True, exist_ok=True)
                    Image.fromarray(pixels).save(folder / "images" / rel)
                    items[split].append((rel, label, name))
        write_coop_split(folder / f"split_{domain}.json", items)

    return write


def _reader(domain: str) -> Callable[[Path, Benchmark, ReadOptions], DomainData]:
    def read(root: Path, benchmark: Benchmark, options: ReadOptions) -> DomainData:
        del options
        folder = root / domain.lower()
        if not folder.is_dir():
            raise base.no_layout(domain, root, [("toy", folder)])
        split = read_coop_split(folder / f"split_{domain}.json", folder / "images", domain)
        return DomainData(
            domain=domain,
            benchmark=benchmark,
            layout="toy (CoOp json)",
            folder=folder,
            class_names=split.class_names,
            train=Split(split.labels["train"], files=split.files["train"]),
            test=Split(split.labels["test"], files=split.files["test"]),
        )

    return read


def spec(domain: str) -> DomainSpec:
    return DomainSpec(
        name=domain,
        aliases=(domain.lower() + "-alias",),
        benchmarks=("x-tail", "mtil"),
        layouts=("toy",),
        xtail_template="a photo of a {}, a toy " + domain + ".",
        mtil_train_template="a {} (" + domain + ").",
        mtil_eval_templates=("a {} (" + domain + ").", "the {} (" + domain + ")."),
        sizes={"x-tail": Sizes(18, 9), "mtil": Sizes(18, 9)},
        read=_reader(domain),
        write_fixture=_writer(domain),
    )


@contextmanager
def registered() -> Iterator[tuple[DomainSpec, DomainSpec]]:
    """ToyA and ToyB in the domain registry for the duration of a test."""
    specs = (spec("ToyA"), spec("ToyB"))
    for s in specs:
        base.register(s)
    try:
        yield specs
    finally:
        for s in specs:
            base.DOMAINS.pop(s.name, None)
