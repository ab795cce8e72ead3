"""Write CIFAR-format directories (torchvision's exact pickle layout) filled with generated images.

Used by the tests and the benchmarks: the files go through the very same loader as the real
datasets (with ``verify_checksums=false``, since their md5s cannot match the originals). The
images are learnable class prototypes plus noise (see :mod:`scenarios.synthetic`).
"""

from __future__ import annotations

import pickle
from pathlib import Path

import numpy as np
import torch

from scenarios.split_cifar import layout
from scenarios.synthetic import generate

CIFAR10_NAMES = ("airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck")


def _dump(path: Path, obj: dict) -> None:
    with path.open("wb") as fh:
        pickle.dump(obj, fh, protocol=2)


def write_cifar(
    root: str | Path, variant: str = "cifar100", *, n_train: int = 500, n_test: int = 100, seed: int = 0
) -> Path:
    """Create ``root/<cifar folder>`` with ``n_train``/``n_test`` images (multiples of the class count)."""
    lay = layout(variant)
    folder = Path(root) / lay.folder
    folder.mkdir(parents=True, exist_ok=True)
    c = lay.n_classes
    if n_train % c or n_test % c:
        raise ValueError(f"n_train and n_test must be multiples of {c}")
    splits = {}
    for split, n in ((0, n_train), (1, n_test)):
        source = generate(c, n // c, 32, 0.2, seed, split)
        assert isinstance(source.images, torch.Tensor)  # generated in memory, not sharded
        order = np.random.default_rng(seed + split).permutation(n)
        splits[split] = (source.images.numpy().reshape(n, -1)[order], source.targets.numpy()[order])
    if variant == "cifar100":
        names = [f"class_{i:03d}" for i in range(c)]
        for (name, _), split in ((lay.train_files[0], 0), (lay.test_files[0], 1)):
            data, labels = splits[split]
            _dump(
                folder / name,
                {
                    "filenames": [f"{i}.png" for i in range(len(labels))],
                    "batch_label": name,
                    "fine_labels": labels.tolist(),
                    "coarse_labels": (labels // 5).tolist(),
                    "data": data,
                },
            )
        _dump(
            folder / lay.meta_file[0],
            {"fine_label_names": names, "coarse_label_names": [f"super_{i:02d}" for i in range(20)]},
        )
    else:
        data, labels = splits[0]
        for k, (name, _) in enumerate(lay.train_files):
            part = slice(k * n_train // 5, (k + 1) * n_train // 5)
            _dump(
                folder / name,
                {"batch_label": name, "labels": labels[part].tolist(), "data": data[part], "filenames": []},
            )
        data, labels = splits[1]
        _dump(
            folder / lay.test_files[0][0],
            {"batch_label": "test", "labels": labels.tolist(), "data": data, "filenames": []},
        )
        _dump(
            folder / lay.meta_file[0],
            {"label_names": list(CIFAR10_NAMES), "num_cases_per_batch": n_train // 5, "num_vis": 3072},
        )
    return folder
