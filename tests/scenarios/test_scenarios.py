"""Scenarios: digits and synthetic streams, and CIFAR read from torchvision's on-disk format."""

from __future__ import annotations

import pickle
import time

import pytest
import torch

from cl_bench import config
from cl_bench.data import sample_ids
from cl_bench.errors import ConfigError, DataError
from cl_bench.registry import SCENARIOS
from scenarios.cifar_files import write_cifar
from scenarios.split_cifar import layout, load_cifar
from tests.helpers import quick_run


def build(name: str, order_seed: int = 0, **args):
    return config.build(SCENARIOS.get(name), args, name).build(order_seed=order_seed)


def test_split_digits_streams_real_digits_in_five_experiences() -> None:
    sc = build("split-digits")
    assert sc.n_experiences == 5
    assert len(sc.train_source) + len(sc.test_source) == 1797
    assert len(sc.test_source) == 360
    assert sorted(c for exp in sc.classes_per_experience for c in exp) == list(range(10))
    assert all(len(exp) == 2 for exp in sc.classes_per_experience)
    assert sc.train_source.images.shape[1:] == (3, 8, 8)
    assert sc.class_names[3] == "three"
    for exp, classes in zip(sc.train_stream, sc.classes_per_experience, strict=True):
        labels = sc.train_source.targets[sample_ids(exp)]
        assert set(labels.tolist()) == set(classes)


def test_order_seed_sets_the_class_order_deterministically() -> None:
    a, b, c = build("synthetic"), build("synthetic"), build("synthetic", order_seed=1)
    assert a.classes_per_experience == b.classes_per_experience
    assert a.classes_per_experience != c.classes_per_experience
    natural = build("synthetic", shuffle=False)
    assert natural.classes_per_experience == [[0, 1], [2, 3], [4, 5], [6, 7], [8, 9]]
    explicit = build("synthetic", class_order=[9, 8, 7, 6, 5, 4, 3, 2, 1, 0])
    assert explicit.metadata["class_order"] == [9, 8, 7, 6, 5, 4, 3, 2, 1, 0]


def test_synthetic_data_are_deterministic_and_task_protocol_labels_tasks() -> None:
    a, b = build("synthetic"), build("synthetic")
    assert torch.equal(a.train_source.images, b.train_source.images)
    task = build("synthetic", protocol="task")
    assert task.protocol == "task"
    assert [e.task_label for e in task.train_stream] == list(range(5))


@pytest.mark.parametrize("args", [{"n_experiences": 3}, {"class_order": [0, 1]}, {"n_classes": 30}])
def test_bad_stream_config_is_a_config_error(args: dict) -> None:
    with pytest.raises(ConfigError):
        build("synthetic", **args)


@pytest.mark.parametrize("variant", ["cifar100", "cifar10"])
def test_generated_cifar_goes_through_the_real_loader(tmp_path, variant: str) -> None:
    write_cifar(tmp_path, variant, n_train=500 if variant == "cifar100" else 100, n_test=100)
    train, test, names = load_cifar(tmp_path, variant, verify_checksums=False)
    n_classes = 100 if variant == "cifar100" else 10
    assert len(names) == n_classes
    assert train.images.shape[1:] == (3, 32, 32)
    assert set(train.targets.tolist()) == set(range(n_classes))
    assert len(test) == 100
    with pytest.raises(DataError, match="md5 mismatch"):
        load_cifar(tmp_path, variant, verify_checksums=True)


def test_cifar_pixels_and_labels_are_read_in_torchvision_layout(tmp_path) -> None:
    folder = write_cifar(tmp_path, "cifar100", n_train=100, n_test=100)
    with (folder / "train").open("rb") as fh:
        raw = pickle.load(fh, encoding="latin1")
    train, _, _ = load_cifar(tmp_path, "cifar100", verify_checksums=False)
    first = torch.as_tensor(raw["data"][0]).view(3, 32, 32)  # rows of 3072 bytes: R plane, G plane, B plane
    assert torch.equal(train.images[0], first)
    assert train.targets[:10].tolist() == raw["fine_labels"][:10]


def test_missing_cifar_root_fails_fast_naming_path_and_files(tmp_path) -> None:
    start = time.perf_counter()
    with pytest.raises(DataError) as err:
        build("split-cifar", root=str(tmp_path / "nowhere"))
    assert time.perf_counter() - start < 2.0
    message = str(err.value)
    assert str(tmp_path / "nowhere" / "cifar-100-python") in message
    assert "train, test, meta" in message
    with pytest.raises(ConfigError, match="set scenario.root=DIR"):
        build("split-cifar10")


@pytest.mark.parametrize("damage", ["truncate", "garbage", "wrong_shape"])
def test_corrupt_cifar_files_are_data_errors(tmp_path, damage: str) -> None:
    folder = write_cifar(tmp_path, "cifar100", n_train=100, n_test=100)
    target = folder / layout("cifar100").train_files[0][0]
    if damage == "truncate":
        target.write_bytes(target.read_bytes()[:1000])
    elif damage == "garbage":
        target.write_bytes(b"\x00\x01garbage")
    else:
        with target.open("wb") as fh:
            pickle.dump({"data": [[1, 2, 3]], "fine_labels": [0]}, fh)
    with pytest.raises(DataError, match=str(target)):
        load_cifar(tmp_path, "cifar100", verify_checksums=False)


def test_split_cifar100_runs_end_to_end_on_generated_files(tmp_path) -> None:
    write_cifar(tmp_path / "data", "cifar100", n_train=500, n_test=100)
    rec = quick_run(
        tmp_path,
        "lora",
        scenario="split-cifar",
        steps=2,
        backbone="tiny-clip",
        scenario_args={"root": str(tmp_path / "data"), "verify_checksums": False},
    )
    assert rec.status == "ok"
    assert rec.scenario["name"] == "split-cifar100"
    assert rec.scenario["n_experiences"] == 10
    assert len(rec.accuracy["matrix"]) == 10
    assert rec.scenario["augmentations"] == ["crop", "flip"]
