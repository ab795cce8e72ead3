"""CIFAR-100 (MTIL only), MULTIDOMAIN.md §3.3.

torchvision's ``cifar-100-python/{train,test,meta}`` pickles, read (and md5-checked unless
``verify_checksums`` is off) by :func:`scenarios.split_cifar.load_cifar`; class names are
``fine_label_names`` with ``_`` replaced by a space (ZSCL's ``process_labels``). The images stay
in memory as uint8 [N, 32, 32, 3].
"""

from __future__ import annotations

import pickle
from pathlib import Path

import numpy as np
import torch

from cl_bench.cifar_layout import layout as cifar_layout
from cl_bench.errors import ConfigError, DataError
from scenarios.cifar_files import write_cifar
from scenarios.domains import base
from scenarios.domains.base import Benchmark, DomainData, DomainSpec, ReadOptions, Sizes, Split
from scenarios.split_cifar import load_cifar

NAME = "CIFAR100"
TV_LAYOUT = "cifar-100-python (torchvision)"
FOLDER = "cifar-100-python"
# CIFAR-100's ``fine_label_names`` in label order (the ``meta`` pickle of the real archive).
FINE_LABEL_NAMES = (
    "apple", "aquarium_fish", "baby", "bear", "beaver", "bed", "bee", "beetle", "bicycle", "bottle",
    "bowl", "boy", "bridge", "bus", "butterfly", "camel", "can", "castle", "caterpillar", "cattle",
    "chair", "chimpanzee", "clock", "cloud", "cockroach", "couch", "crab", "crocodile", "cup",
    "dinosaur", "dolphin", "elephant", "flatfish", "forest", "fox", "girl", "hamster", "house",
    "kangaroo", "keyboard", "lamp", "lawn_mower", "leopard", "lion", "lizard", "lobster", "man",
    "maple_tree", "motorcycle", "mountain", "mouse", "mushroom", "oak_tree", "orange", "orchid",
    "otter", "palm_tree", "pear", "pickup_truck", "pine_tree", "plain", "plate", "poppy", "porcupine",
    "possum", "rabbit", "raccoon", "ray", "road", "rocket", "rose", "sea", "seal", "shark", "shrew",
    "skunk", "skyscraper", "snail", "snake", "spider", "squirrel", "streetcar", "sunflower",
    "sweet_pepper", "table", "tank", "telephone", "television", "tiger", "tractor", "train", "trout",
    "tulip", "turtle", "wardrobe", "whale", "willow_tree", "wolf", "woman", "worm",
)  # fmt: skip
COARSE_LABEL_NAMES = (
    "aquatic_mammals", "fish", "flowers", "food_containers", "fruit_and_vegetables",
    "household_electrical_devices", "household_furniture", "insects", "large_carnivores",
    "large_man-made_outdoor_things", "large_natural_outdoor_scenes", "large_omnivores_and_herbivores",
    "medium_mammals", "non-insect_invertebrates", "people", "reptiles", "small_mammals", "trees",
    "vehicles_1", "vehicles_2",
)  # fmt: skip
TEMPLATES = (
    "a photo of a {}.",
    "a blurry photo of a {}.",
    "a black and white photo of a {}.",
    "a low contrast photo of a {}.",
    "a high contrast photo of a {}.",
    "a bad photo of a {}.",
    "a good photo of a {}.",
    "a photo of a small {}.",
    "a photo of a big {}.",
    "a photo of the {}.",
    "a blurry photo of the {}.",
    "a black and white photo of the {}.",
    "a low contrast photo of the {}.",
    "a high contrast photo of the {}.",
    "a bad photo of the {}.",
    "a good photo of the {}.",
    "a photo of the small {}.",
    "a photo of the big {}.",
)


def _as_split(images: torch.Tensor, targets: torch.Tensor) -> Split:
    """[N, 3, 32, 32] tensors to a Split of [N, 32, 32, 3] uint8 arrays."""
    arrays = np.ascontiguousarray(images.numpy().transpose(0, 2, 3, 1))
    return Split(targets.numpy().astype(np.int64), arrays=arrays)


def read(root: Path, benchmark: Benchmark, options: ReadOptions) -> DomainData:
    """The official train (50000) and test (10000) sets; MTIL only."""
    if benchmark != "mtil":
        raise DataError(f"{NAME} is not part of {benchmark} (MTIL only)")
    _, folder = base.find_layout(NAME, root, [(TV_LAYOUT, FOLDER)])
    lay = cifar_layout("cifar100")
    for name, _ in (*lay.train_files, *lay.test_files, lay.meta_file):
        if not (folder / name).is_file():
            raise base.missing(NAME, folder / name, "pickle", TV_LAYOUT)
    train, test, names = load_cifar(root, "cifar100", verify_checksums=options.verify_checksums)
    if not isinstance(train.images, torch.Tensor) or not isinstance(test.images, torch.Tensor):
        raise DataError(f"{NAME}: {folder} did not load into memory")  # load_cifar never shards
    return DomainData(
        domain=NAME,
        benchmark=benchmark,
        layout=TV_LAYOUT,
        folder=folder,
        class_names=tuple(names),
        train=_as_split(train.images, train.targets),
        test=_as_split(test.images, test.targets),
        notes=("official train / test pickles",),
    )


def write_fixture(root: Path, layout: str, rng: np.random.Generator) -> None:
    """torchvision's three pickles with two train and one test image per class and the real
    ``fine_label_names`` and ``coarse_label_names`` (the loader needs all 100 names, so this
    fixture keeps every class; ``meta`` is rewritten over :func:`write_cifar`'s placeholder names)."""
    if layout != TV_LAYOUT:
        raise ConfigError(f"{NAME}: unknown layout {layout!r}; known: {TV_LAYOUT}")
    folder = write_cifar(root, "cifar100", n_train=200, n_test=100, seed=int(rng.integers(2**31)))
    meta = {"fine_label_names": list(FINE_LABEL_NAMES), "coarse_label_names": list(COARSE_LABEL_NAMES)}
    with (folder / cifar_layout("cifar100").meta_file[0]).open("wb") as fh:
        pickle.dump(meta, fh, protocol=2)


SPEC = base.register(
    DomainSpec(
        name=NAME,
        aliases=("cifar-100", "cifar_100", "cifar-100-python"),
        benchmarks=("mtil",),
        layouts=(TV_LAYOUT,),
        xtail_template="",
        mtil_train_template="a photo of a {}.",
        mtil_eval_templates=TEMPLATES,
        sizes={"mtil": Sizes(50000, 10000)},
        read=read,
        write_fixture=write_fixture,
        folder_names=(FOLDER,),
    )
)
