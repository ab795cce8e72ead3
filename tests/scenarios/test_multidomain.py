"""x-tail and mtil on two toy domains: few-shot draws and their replay, the union label space,
per-domain prompts, the data check and a run through the CLI."""

from __future__ import annotations

import json
import random
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from cl_bench import cli, config, evaluate
from cl_bench.backbones.tiny import TinyClip
from cl_bench.errors import ConfigError, DataError
from cl_bench.heads import TextPrototypeHead
from scenarios.multidomain import (
    MTIL_ORDER_I,
    MTIL_ORDER_II,
    Mtil,
    XTail,
    mnist_shots,
    mtil_shots,
    xtail_shots,
)
from tests.scenarios import toy_domains

TOYS = ("ToyA", "ToyB")


@pytest.fixture
def root(tmp_path: Path) -> Iterator[Path]:
    with toy_domains.registered() as specs:
        data = tmp_path / "data"
        for spec in specs:
            spec.write_fixture(data, "toy", np.random.default_rng(0))
        yield data


def _xtail(root: Path, **kw: Any) -> XTail:
    kw.setdefault("domains", TOYS)
    return XTail(root=str(root), cache_dir=str(root.parent / "cache"), image_size=32, workers=1, **kw)


# ----------------------------------------------------------------------------- few-shot draws


def test_the_xtail_draw_takes_k_per_label_without_repeats_when_it_can() -> None:
    labels = np.array([2, 0, 2, 1, 0, 2, 0, 2, 1, 0])
    shots = xtail_shots(labels, 2, 42, "ToyA")
    assert [int(labels[i]) for i in shots] == [2, 2, 0, 0, 1, 1]  # first-appearance order of labels
    for label in (0, 1, 2):
        picked = [i for i in shots if labels[i] == label]
        assert len(set(picked)) == 2
    # the rule of MULTIDOMAIN.md §2, replayed by hand with the same generator
    rng = random.Random("42/ToyA")
    expected = rng.sample([0, 2, 5, 7], 2) + rng.sample([1, 4, 6, 9], 2) + rng.sample([3, 8], 2)
    assert shots == expected
    assert xtail_shots(labels, 2, 42, "ToyA") == shots
    assert xtail_shots(labels, 2, 43, "ToyA") != shots or xtail_shots(labels, 2, 44, "ToyA") != shots


def test_a_label_with_fewer_images_than_shots_is_drawn_with_replacement() -> None:
    labels = np.array([0, 0, 1, 1, 1, 1, 1])
    shots = xtail_shots(labels, 4, 42, "ToyA")
    zeros = [i for i in shots if labels[i] == 0]
    assert len(zeros) == 4
    assert set(zeros) <= {0, 1}
    ones = [i for i in shots if labels[i] == 1]
    assert len(set(ones)) == 4


def test_mnist_and_mtil_draws() -> None:
    labels = np.array([1, 0, 1, 0, 1, 0, 2, 2])
    rng = np.random.RandomState(7)
    expected = [int(i) for c in (0, 1, 2) for i in rng.choice(np.flatnonzero(labels == c), 2, replace=False)]
    assert mnist_shots(labels, 2, 7) == expected
    order = torch.randperm(8, generator=torch.Generator().manual_seed(42)).tolist()
    first: dict[int, list[int]] = {}
    for i in order:
        if len(first.setdefault(int(labels[i]), [])) < 1:
            first[int(labels[i])].append(i)
    assert sorted(mtil_shots(labels, 1, 42)) == sorted(v[0] for v in first.values())


# ----------------------------------------------------------------------------- the scenario


def test_xtail_joins_the_domains_in_one_label_space_and_keeps_equal_names_apart(root: Path) -> None:
    scenario = _xtail(root, shots=2).build(0)
    assert scenario.class_names == ["cat", "pizza", "car_side", "pizza", "dog"]
    assert scenario.classes_per_experience == [[0, 1, 2], [3, 4]]
    assert scenario.protocol == "class"
    assert scenario.metadata["domains"] == ["ToyA", "ToyB"]
    assert [d["offset"] for d in scenario.metadata["per_domain"]] == [0, 3]
    assert scenario.train_source.targets.tolist() == [0, 0, 1, 1, 2, 2, 3, 3, 4, 4]
    assert scenario.test_source.targets.tolist() == [0] * 3 + [1] * 3 + [2] * 3 + [3] * 3 + [4] * 3
    assert tuple(scenario.test_source.images.shape) == (15, 3, 32, 32)
    assert scenario.prompts is not None
    assert scenario.prompts[1] == ("a photo of a pizza, a toy ToyA.",)
    assert scenario.prompts[3] == ("a photo of a pizza, a toy ToyB.",)
    assert scenario.train_prompts == [
        "a photo of a cat, a toy ToyA.",
        "a photo of a pizza, a toy ToyA.",
        "a photo of a car_side, a toy ToyA.",
        "a photo of a pizza, a toy ToyB.",
        "a photo of a dog, a toy ToyB.",
    ]
    shots = scenario.files["shots/ToyA.json"]
    assert shots["n_train"] == 18
    assert shots["shots"] == 2
    assert len(shots["indices"]) == 6


def test_mtil_uses_the_ensemble_and_scores_each_domain_alone(root: Path) -> None:
    scenario = Mtil(
        root=str(root), domains=TOYS, cache_dir=str(root.parent / "cache"), image_size=32, workers=1
    ).build(0)
    assert scenario.protocol == "task"
    assert scenario.prompts is not None
    assert scenario.prompts[4] == ("a dog (ToyB).", "the dog (ToyB).")
    assert scenario.train_prompts is not None
    assert scenario.train_prompts[4] == "a dog (ToyB)."
    assert len(scenario.train_source) == 30  # no shots: the full train split
    assert scenario.files == {}


def test_the_union_label_space_and_the_per_domain_one_on_a_hand_checked_matrix() -> None:
    """Cell (after ToyB, ToyA's test set) of one 'pizza' image of ToyA whose ToyB-pizza logit is
    the highest: wrong in X-TAIL (every class competes), right in MTIL (only ToyA's classes)."""
    per_exp = [[0, 1, 2], [3, 4]]
    logits = torch.tensor([[0.1, 0.8, 0.0, 0.9, 0.2], [0.9, 0.1, 0.0, 0.3, 0.2]])
    targets = torch.tensor([1, 0])
    kinds = {"x-tail": ("all", "class"), "mtil": ("seen", "task")}
    correct = {}
    for name, (label_space, protocol) in kinds.items():
        allowed = evaluate.allowed_classes(
            5, per_exp, 1, 0, label_space=label_space, protocol=protocol, device=torch.device("cpu")
        )
        correct[name] = (allowed.tolist(), evaluate.n_correct(logits, targets, allowed))
    assert correct["x-tail"] == ([True] * 5, 1)
    assert correct["mtil"] == ([True, True, True, False, False], 2)


def test_the_ensemble_head_averages_normalized_prompt_features() -> None:
    torch.manual_seed(0)
    backbone = TinyClip().build()
    prompts = [("a cat.", "the cat."), ("a dog.",)]
    head = TextPrototypeHead(backbone, ["cat", "dog"], prompts=prompts, train_prompts=["a cat.", "a dog."])
    head.eval()
    with torch.no_grad():
        each = F.normalize(backbone.encode_text(backbone.tokenize(["a cat.", "the cat.", "a dog."])), dim=-1)
        expected = F.normalize(torch.stack([each[0] + each[1], each[2]]), dim=-1)
        assert torch.allclose(head.text_features(torch.tensor([0, 1])), expected, atol=1e-6)
        head.train()
        trained = F.normalize(backbone.encode_text(backbone.tokenize(["a cat.", "a dog."])), dim=-1)
        assert torch.allclose(head.text_features(torch.tensor([0, 1])), trained, atol=1e-6)


def test_replaying_a_shots_file_gives_the_same_training_set(root: Path, tmp_path: Path) -> None:
    first = _xtail(root, shots=2, shot_seed=1).build(0)
    shots_dir = tmp_path / "shots"
    shots_dir.mkdir()
    for name, content in first.files.items():
        (tmp_path / name).write_text(json.dumps(content))
    again = _xtail(root, shots=2, shot_seed=999, shots_file=str(shots_dir)).build(0)
    ids = torch.arange(len(first.train_source))
    assert torch.equal(again.train_source.images[ids], first.train_source.images[ids])
    assert again.files["shots/ToyA.json"]["indices"] == first.files["shots/ToyA.json"]["indices"]
    other = _xtail(root, shots=2, shot_seed=999).build(0)
    assert other.files["shots/ToyA.json"]["indices"] != first.files["shots/ToyA.json"]["indices"]


def test_a_shots_file_of_another_split_is_refused(root: Path, tmp_path: Path) -> None:
    bad = tmp_path / "ToyA.json"
    bad.write_text(
        json.dumps({"format": "cl-bench-shots/1", "domain": "ToyA", "n_train": 5, "indices": [0, 1]})
    )
    with pytest.raises(DataError, match="had 5 training images"):
        _xtail(root, shots=2, shots_file=str(bad)).build(0)
    bad.write_text("{not json")
    with pytest.raises(DataError, match="not readable JSON"):
        _xtail(root, shots=2, shots_file=str(bad)).build(0)


def test_domain_selection_and_orders() -> None:
    assert MTIL_ORDER_II[:3] == ("StanfordCars", "Food101", "MNIST")
    assert sorted(MTIL_ORDER_II) == sorted(MTIL_ORDER_I)
    with toy_domains.registered():
        specs = XTail(domains=("toyb-alias", "ToyA")).specs()
        assert [s.name for s in specs] == ["ToyB", "ToyA"]
        with pytest.raises(ConfigError, match="appears twice"):
            XTail(domains=("ToyA", "toya-alias")).specs()
        with pytest.raises(DataError, match="unknown domain 'Nope'"):
            XTail(domains=("Nope",)).specs()
    with pytest.raises(ConfigError, match="scenario.order must be"):
        Mtil(order="III")


def test_missing_data_fails_with_the_path(root: Path) -> None:
    (root / "toyb" / "split_ToyB.json").unlink()
    with pytest.raises(DataError, match=r"ToyB: missing split file .*split_ToyB\.json"):
        _xtail(root).build(0)
    next((root / "toya" / "images" / "cat").iterdir()).unlink()
    rows = {r.domain: r for r in _xtail(root).check()}
    assert rows["ToyA"].missing == 1
    assert "missing" in rows["ToyA"].error
    with pytest.raises(DataError, match=r"ToyA: image file .*cat.* listed by its split .* is missing"):
        _xtail(root, domains=("ToyA",)).build(0)
    with pytest.raises(DataError, match="set scenario.root"):
        XTail(domains=TOYS).build(0)
    with pytest.raises(DataError, match="set scenario.root"):  # one line, not one per domain
        XTail(domains=TOYS).check()
    with pytest.raises(DataError, match=r"^x-tail: data root /no/such/dir does not exist$"):
        XTail(domains=TOYS, root="/no/such/dir").check()


# ----------------------------------------------------------------------------- the CLI


def _sets(root: Path) -> list[str]:
    return [
        "--set",
        f"scenario.root={root}",
        "--set",
        'scenario.domains=["ToyA", "ToyB"]',
        "--set",
        f"scenario.cache_dir={root.parent / 'cache'}",
        "--set",
        "scenario.image_size=32",
        "--set",
        "scenario.workers=1",
    ]


def test_data_check_prints_a_row_per_domain_and_fails_on_a_missing_one(
    root: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert cli.main(["data", "check", "--scenario", "x-tail", *_sets(root)]) == 0
    out = capsys.readouterr().out
    assert "ToyA    toy (CoOp json)  3        18     9     18/9       0" in out
    assert "ok: 2 domains" in out
    import shutil

    shutil.rmtree(root / "toyb")
    assert cli.main(["data", "check", "--scenario", "x-tail", *_sets(root)]) == 1
    err = capsys.readouterr().err
    assert f"ToyB: no accepted layout under {root} (tried toy: {root / 'toyb'})" in err


def test_an_xtail_run_through_the_cli_writes_its_shots_beside_the_record(root: Path, tmp_path: Path) -> None:
    args = ["run", "--strategy", "lora", "--scenario", "x-tail", "--backbone", "tiny-clip", "--device", "cpu"]
    args += ["--out", str(tmp_path / "runs"), "--run-id", "xt", "--no-progress", *_sets(root)]
    args += ["--set", "steps_per_experience=2", "--set", "batch_size=4", "--set", "scenario.shots=2"]
    assert cli.main(args) == 0
    run_dir = tmp_path / "runs" / "xt"
    record = json.loads((run_dir / "result.json").read_text())
    assert record["status"] == "ok"
    assert record["accuracy"]["label_space"] == "all"
    assert record["scenario"]["domains"] == ["ToyA", "ToyB"]
    assert len(record["accuracy"]["matrix"]) == 2
    shots = json.loads((run_dir / "shots" / "ToyB.json").read_text())
    assert shots["domain"] == "ToyB"
    assert len(shots["indices"]) == 4
    assert record["config"]["train_classes"] == "current"


def test_run_defaults_follow_the_references() -> None:
    with toy_domains.registered():
        cfg = config.resolve([{"strategy": "lora", "scenario": "x-tail"}])
        assert (cfg.label_space, cfg.train_classes, cfg.steps_per_experience, cfg.batch_size) == (
            "all",
            "current",
            500,
            64,
        )
        assert config.resolve([{"strategy": "lora", "scenario": "mtil"}]).steps_per_experience == 1000


@pytest.mark.parametrize(("name", "layout"), [("x-tail", 0), ("x-tail", 1), ("mtil", 0), ("mtil", 2)])
def test_data_fixture_writes_every_real_domain_readably(
    name: str, layout: int, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """``cl-bench data fixture`` then ``data check``: every domain found (a layout the benchmark
    does not read, such as MTIL's Flowers102 in CoOp's folder, falls back to the first one)."""
    out = tmp_path / name
    assert cli.main(["data", "fixture", "--scenario", name, "--out", str(out), "--layout", str(layout)]) == 0
    args = ["data", "check", "--scenario", name, "--set", f"scenario.root={out}"]
    assert cli.main([*args, "--set", "scenario.verify_checksums=false"]) == 0
    assert f"ok: {11 if name == 'mtil' else 10} domains" in capsys.readouterr().out


def test_the_report_does_not_take_a_runs_shots_files_for_records(tmp_path: Path) -> None:
    from cl_bench import results

    run = tmp_path / "runs" / "xt"
    (run / "shots").mkdir(parents=True)
    (run / "shots" / "ToyA.json").write_text('{"format": "cl-bench-shots/1"}')
    (run / "result.json").write_text("{}")
    stray = tmp_path / "runs" / "stray.json"
    stray.write_text("{}")
    assert results._candidate_files(tmp_path / "runs") == [stray, run / "result.json"]


def test_a_domain_whose_images_were_all_skipped_is_an_error(root: Path) -> None:
    for path in (root / "toyb" / "images").rglob("test_*.png"):
        path.write_bytes(b"not a png")
    with pytest.raises(DataError, match=r"^ToyB: no test images left \(all skipped or none listed\)$"):
        _xtail(root, skip_bad_images=True).build(0)
