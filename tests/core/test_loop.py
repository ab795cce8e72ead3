"""The loop: accuracy-matrix rules, run-record life cycle, failures."""

from __future__ import annotations

import pytest
import torch

from cl_bench import results
from cl_bench.errors import ConfigError, DivergenceError
from strategies.lora import LoRA
from tests.helpers import QUICK_SCENARIO, quick_run


def test_matrix_has_future_columns_b_row_and_seen_accuracy(tmp_path) -> None:
    rec = quick_run(
        tmp_path,
        "lora",
        scenario_args={"n_classes": 6, "n_experiences": 3, "train_per_class": 4, "test_per_class": 3},
    )
    acc = rec.accuracy
    assert len(acc["matrix"]) == 3
    assert all(len(row) == 3 for row in acc["matrix"])
    assert len(acc["initial"]) == 3
    assert acc["n_test"] == [6, 6, 6]
    for i, row in enumerate(acc["correct"]):
        assert acc["seen"][i] == pytest.approx(sum(row[: i + 1]) / (6 * (i + 1)))
        assert acc["matrix"][i] == [c / 6 for c in row]
    assert rec.metrics["acc_final"] == pytest.approx(sum(acc["matrix"][-1]) / 3)


def test_zero_shot_rows_follow_the_label_space_rule(tmp_path) -> None:
    seen = quick_run(tmp_path / "seen", "zero-shot")
    everything = quick_run(tmp_path / "all", "zero-shot", label_space="all")
    task = quick_run(
        tmp_path / "task",
        "zero-shot",
        scenario_args={
            "n_classes": 4,
            "n_experiences": 2,
            "train_per_class": 8,
            "test_per_class": 4,
            "protocol": "task",
        },
    )
    # one untrained model: with every class competing, every row equals the before-training row
    assert all(row == everything.accuracy["initial"] for row in everything.accuracy["matrix"])
    assert all(row == task.accuracy["initial"] for row in task.accuracy["matrix"])
    # "seen": the last row scores against all classes, like label space "all"
    assert seen.accuracy["matrix"][-1] == everything.accuracy["initial"]
    assert seen.accuracy["matrix"][0][0] == seen.accuracy["initial"][0]  # both: classes of experience 0
    assert seen.experiences[0].steps == 0


def test_record_is_running_then_ok_and_never_silently_overwritten(tmp_path) -> None:
    rec = quick_run(tmp_path, "lora")
    path = tmp_path / "runs" / "lora-test"
    assert results.load(path)["status"] == "ok"
    assert rec.config["lr"] == LoRA.default_lr  # resolved defaults are stored
    assert rec.config["backbone"] == "tiny-clip"
    assert rec.backbone["pretrained"] is False
    with pytest.raises(ConfigError, match="already holds a completed run; pass --overwrite"):
        quick_run(tmp_path, "lora")
    again = quick_run(tmp_path, "lora", overwrite=True)
    assert again.accuracy["correct"] == rec.accuracy["correct"]


def test_nan_loss_fails_the_run_and_marks_the_record(tmp_path, monkeypatch) -> None:
    monkeypatch.setattr(LoRA, "loss", lambda self, logits, y, exp: logits.sum() * float("nan"))
    with pytest.raises(DivergenceError, match="non-finite loss"):
        quick_run(tmp_path, "lora")
    data = results.load(tmp_path / "runs" / "lora-test")
    assert data["status"] == "failed"
    assert data["failure"]["type"] == "DivergenceError"
    assert "non-finite loss" in data["failure"]["reason"]
    monkeypatch.undo()
    assert quick_run(tmp_path, "lora").status == "ok"  # a failed record may be replaced without --overwrite


def test_weights_diverged_on_the_last_step_fail_the_run(tmp_path) -> None:
    """One huge step leaves NaN weights but no NaN loss was ever seen: the evaluation catches it."""
    with pytest.raises(DivergenceError, match="non-finite logits"):
        quick_run(
            tmp_path, "finetune", steps=1, lr=1e30, scenario_args={**QUICK_SCENARIO, "n_experiences": 1}
        )
    data = results.load(tmp_path / "runs" / "finetune-test")
    assert data["status"] == "failed"
    assert "after experience 0" in data["failure"]["reason"]


def test_out_that_is_a_file_is_a_config_error(tmp_path) -> None:
    (tmp_path / "afile").write_text("")
    with pytest.raises(ConfigError, match="cannot use --out"):
        quick_run(tmp_path, "lora", out=str(tmp_path / "afile"))


def test_unexpected_exceptions_also_leave_a_failed_record(tmp_path, monkeypatch) -> None:
    def explode(self, exp):
        raise RuntimeError("boom in experience")

    monkeypatch.setattr(LoRA, "after_experience", explode)
    with pytest.raises(RuntimeError):
        quick_run(tmp_path, "lora")
    data = results.load(tmp_path / "runs" / "lora-test")
    assert data["status"] == "failed"
    assert data["failure"]["reason"] == "RuntimeError: boom in experience"


def test_per_experience_figures(tmp_path) -> None:
    rec = quick_run(tmp_path, "lora", steps=4)
    for e in rec.experiences:
        assert e.steps == 4
        assert e.train_samples_per_s > 0
        assert e.eval_samples_per_s > 0
        assert e.peak_memory_train_bytes > 0
        assert e.memory_kind == "cpu_peak_rss"
        assert (
            e.n_trainable == e.n_added > 0
        )  # LoRA trains exactly what it adds (CLIP head has no parameters)
        assert e.adapter_bytes == 4 * e.n_added
        assert e.loss_first is not None
    assert rec.parameters["trainable"] == rec.experiences[-1].n_trainable
    assert 0 < rec.parameters["trainable_fraction"] < 0.1


def test_train_classes_current_masks_the_loss(tmp_path, monkeypatch) -> None:
    seen_logits = []
    original = LoRA.loss

    def spy(self, logits, y, exp):
        seen_logits.append((exp.index, torch.isfinite(logits[0]).nonzero().flatten().tolist(), exp.classes))
        return original(self, logits, y, exp)

    monkeypatch.setattr(LoRA, "loss", spy)
    quick_run(tmp_path, "lora", train_classes="current", steps=1)
    assert [(i, finite) for i, finite, _ in seen_logits] == [(i, sorted(c)) for i, _, c in seen_logits]
    seen_logits.clear()
    quick_run(tmp_path / "b", "lora", steps=1)
    first, second = seen_logits
    assert second[1] == sorted(first[2] + second[2])  # "seen": earlier and current classes compete


def test_training_logit_classes_live_in_one_buffer_per_length(tmp_path, monkeypatch) -> None:
    """A CUDA graph captured on ``exp.logit_classes`` reads the next experience's classes: the loop
    writes them into one tensor per number of classes."""
    seen = []
    original = LoRA.loss

    def spy(self, logits, y, exp):
        seen.append((exp.logit_classes, exp.logit_classes.tolist()))
        return original(self, logits, y, exp)

    monkeypatch.setattr(LoRA, "loss", spy)
    quick_run(tmp_path, "lora", train_classes="current", steps=1)
    (first, first_classes), (second, second_classes) = seen
    assert second is first  # same length: the same buffer, rewritten
    assert first_classes != second_classes
    seen.clear()
    quick_run(tmp_path / "b", "lora", steps=1)
    assert seen[0][0] is not seen[1][0]  # "seen": a longer list, another buffer
