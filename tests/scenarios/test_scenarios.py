"""Scenarios: digits and synthetic streams, and CIFAR read from torchvision's on-disk format."""

from __future__ import annotations

import os
import pickle
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from cl_bench import config
from cl_bench.cifar_layout import LAYOUTS, layout
from cl_bench.data import sample_ids
from cl_bench.errors import ConfigError, DataError, MissingDataError
from cl_bench.registry import SCENARIOS
from scenarios.cifar_files import write_cifar
from scenarios.split_cifar import load_cifar
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
    with pytest.raises(MissingDataError, match="set scenario.root=DIR, the directory that holds cifar-10"):
        build("split-cifar10")


@pytest.mark.parametrize("variant", ["cifar10", "cifar100"])
def test_cifar_file_names_and_md5s_are_torchvisions(variant: str) -> None:
    from torchvision.datasets import CIFAR10, CIFAR100

    cls = CIFAR100 if variant == "cifar100" else CIFAR10
    lay = layout(variant)
    assert lay.folder == cls.base_folder
    assert [list(f) for f in lay.train_files] == cls.train_list
    assert [list(f) for f in lay.test_files] == cls.test_list
    assert lay.meta_file == (cls.meta["filename"], cls.meta["md5"])
    assert lay.names_key == cls.meta["key"]
    assert set(LAYOUTS) == {"cifar10", "cifar100"}


def test_checking_a_cifar_root_imports_no_torchvision(tmp_path) -> None:
    """The 2-second promise rests on this: torchvision (2-3 s to import) stays out of the check."""
    code = (
        "import sys\n"
        "from cl_bench.errors import DataError\n"
        "from scenarios.split_cifar import load_cifar\n"
        "try:\n"
        f"    load_cifar({str(tmp_path)!r}, 'cifar100')\n"
        "except DataError:\n"
        "    pass\n"
        "print(sorted(m for m in sys.modules if m.split('.')[0] in ('torchvision', 'avalanche')))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


def test_the_cli_checks_a_cifar_root_before_importing_torch(tmp_path) -> None:
    """`cl-bench run` resolves the config and checks the root with the torch-free precheck first."""
    argv = ["run", "--strategy", "lora", "--scenario", "split-cifar", "--set", f"scenario.root={tmp_path}"]
    code = (
        "import sys\n"
        "from cl_bench.cli import main\n"
        f"rc = main({argv!r})\n"
        "print(rc, sorted({m.split('.')[0] for m in sys.modules} & {'torch', 'avalanche', 'open_clip'}))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "2 []"
    assert "CIFAR-100 not found" in out.stderr


def test_a_verified_root_is_not_hashed_twice_unless_a_file_changes(tmp_path, monkeypatch) -> None:
    from cl_bench import cifar_layout

    write_cifar(tmp_path, "cifar10", n_train=20, n_test=10)
    lay = layout("cifar10")
    files = [*lay.train_files, *lay.test_files, lay.meta_file]
    hashed = []
    expected = {name: digest for name, digest in files}
    monkeypatch.setattr(cifar_layout, "md5", lambda path: hashed.append(path.name) or expected[path.name])
    monkeypatch.setattr(cifar_layout, "_VERIFIED", set())
    cifar_layout.check_root(tmp_path, "cifar10")
    cifar_layout.check_root(tmp_path, "cifar10")
    assert hashed == [name for name, _ in files]  # once
    (tmp_path / lay.folder / "test_batch").write_bytes(b"changed")
    expected["test_batch"] = "0"  # the changed file is hashed again, and no longer matches
    with pytest.raises(DataError, match="test_batch: md5 mismatch"):
        cifar_layout.check_root(tmp_path, "cifar10")


def _cli() -> list[str]:
    script = Path(sys.executable).with_name("cl-bench")
    return [str(script)] if script.is_file() else [sys.executable, "-m", "cl_bench.cli"]


@pytest.mark.parametrize("root", ["missing", "corrupt"])
def test_cli_fails_on_a_missing_or_corrupt_cifar_root_within_2_seconds(tmp_path, root: str) -> None:
    """End to end, `cl-bench run` process start to exit: 0.1 s on a 2-core machine, as the root is
    checked before torch is imported (2.6 s after it, with this machine's CUDA build of torch).
    The best of up to three attempts must stay under the 2 s of the spec: the slack is for a
    loaded CI machine, not for a slower check."""
    data = tmp_path / "data"
    if root == "corrupt":  # every file present, none the original: the md5 check fails
        folder = data / "cifar-100-python"
        folder.mkdir(parents=True)
        for name in ("train", "test", "meta"):
            (folder / name).write_bytes(b"not a CIFAR pickle")
    command = [*_cli(), "run", "--strategy", "lora", "--scenario", "split-cifar", "--no-progress"]
    command += ["--set", f"scenario.root={data}", "--out", str(tmp_path / "runs")]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "WANDB_MODE": "disabled"}
    seconds = []
    for _ in range(3):
        start = time.perf_counter()
        out = subprocess.run(command, capture_output=True, text=True, env=env, timeout=60)
        seconds.append(time.perf_counter() - start)
        assert out.returncode == 2, out.stderr
        lines = out.stderr.strip().splitlines()
        assert lines[0].startswith("error: ")
        if root == "missing":  # the one error line, then where the data comes from and the command
            assert f"expected {data / 'cifar-100-python'}/ with train, test, meta" in lines[0]
            rerun = "cl-bench run --strategy lora --scenario split-cifar --no-progress --out "
            assert f"    {rerun}{tmp_path / 'runs'} --set scenario.root={data}" in lines, out.stderr
        else:
            assert len(lines) == 1, out.stderr
            assert f"{data / 'cifar-100-python' / 'train'}: md5 mismatch" in lines[0]
        if seconds[-1] < 2.0:
            break
    assert min(seconds) < 2.0, f"{root} CIFAR root took {', '.join(f'{t:.2f}' for t in seconds)} s"
    assert not (tmp_path / "runs").exists()  # checked before anything is written


@pytest.mark.parametrize(
    ("labels", "message"),
    [
        (
            ["cat"] * 100,
            "'fine_labels' must be a list of integer class indices, got str values such as 'cat'",
        ),
        ([0.5] * 100, "'fine_labels' must be a list of integer class indices, got float values such as 0.5"),
        ([[0, 1]] * 100, "'fine_labels' must be a list of integer class indices, got shape (100, 2)"),
        ([0] * 99, "99 labels for 100 images"),
        ([100] * 100, "labels outside 0..99 (min 100, max 100)"),
        (7, "'fine_labels' must be a list of integer class indices, got shape ()"),
    ],
)
def test_cifar_labels_of_the_wrong_type_are_one_line_data_errors(tmp_path, labels, message: str) -> None:
    folder = write_cifar(tmp_path, "cifar100", n_train=100, n_test=100)
    target = folder / "train"
    with target.open("rb") as fh:
        entry = pickle.load(fh, encoding="latin1")
    entry["fine_labels"] = labels
    with target.open("wb") as fh:
        pickle.dump(entry, fh)
    with pytest.raises(DataError) as err:
        load_cifar(tmp_path, "cifar100", verify_checksums=False)
    assert str(err.value).startswith(f"{target}: {message}")
    assert "\n" not in str(err.value)


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
