"""What a new user meets first: progress, threads, the long-CPU-run warning, the Python API,
command suggestions and a missing-data message whose command runs as printed (issue 22)."""

from __future__ import annotations

import io
import logging
import shlex
from pathlib import Path

import pytest
import torch

import cl_bench
from cl_bench import cpu_time, progress, results, threads
from cl_bench.cli import main
from cl_bench.errors import ConfigError
from scenarios.cifar_files import write_cifar
from tests.helpers import tiny_backbone

QUICK = {
    "steps_per_experience": 2,
    "batch_size": 8,
    "backbone": "tiny-clip",
    "scenario.n_classes": 4,
    "scenario.n_experiences": 2,
    "scenario.train_per_class": 8,
    "scenario.test_per_class": 4,
}


class _Tty(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_progress_is_a_bar_on_a_terminal_and_lines_elsewhere() -> None:
    assert progress.choose(True, _Tty()) == "bar"
    assert progress.choose(True, io.StringIO()) == "lines"
    assert progress.choose(False) == "off"
    with pytest.raises(ValueError, match="progress must be"):
        progress.choose("loud")  # type: ignore[arg-type]


def test_plain_lines_say_count_share_and_time_left_and_close_a_long_phase(capsys, monkeypatch) -> None:
    clock = iter([0.0, 10.0, 31.0, 40.0, 70.0, 71.0])
    monkeypatch.setattr(progress.time, "monotonic", lambda: next(clock))
    phase = progress.Phase("lines", total=400, desc="eval before training", unit="image")  # started 0
    phase.update(100)  # t=10: too soon for a line
    phase.update(100)  # t=31: 200/400 after 31 s
    phase.update(100)  # t=40: 9 s after the last line
    phase.update(50, loss="0.5")  # t=70: 350/400
    phase.close()  # t=71: the closing line of a phase that printed lines
    assert capsys.readouterr().err.splitlines() == [
        "eval before training: 200/400 images (50%), 31 s, ~31 s left",
        "eval before training: 350/400 images (88%), 70 s, ~10 s left, loss 0.5",
        "eval before training: 350/400 images (88%), 71 s, ~10 s left, loss 0.5",
    ]


def test_a_short_phase_prints_nothing_and_off_prints_nothing(capsys) -> None:
    for mode in ("lines", "off"):
        phase = progress.Phase(mode, total=10, desc="eval", unit="image")  # type: ignore[arg-type]
        phase.update(10)
        phase.close()
    assert capsys.readouterr().err == ""


@pytest.mark.parametrize(
    ("text", "cpus"), [("200000 100000\n", 2), ("150000 100000", 2), ("max 100000", None), ("junk", None)]
)
def test_the_cgroup_quota_in_whole_cpus(tmp_path: Path, text: str, cpus: int | None) -> None:
    (tmp_path / "cpu.max").write_text(text)
    assert threads.cgroup_quota(tmp_path / "cpu.max") == cpus
    assert threads.cgroup_quota(tmp_path / "absent") is None


def test_available_cpus_is_the_affinity_within_the_quota(monkeypatch) -> None:
    monkeypatch.setattr(threads.os, "sched_getaffinity", lambda pid: {0, 1, 2, 3})
    monkeypatch.setattr(threads, "cgroup_quota", lambda: 2)
    assert threads.available_cpus() == 2
    monkeypatch.setattr(threads, "cgroup_quota", lambda: None)
    assert threads.available_cpus() == 4


def test_a_run_uses_its_threads_and_restores_the_process_setting(tmp_path: Path) -> None:
    before = torch.get_num_threads()
    with threads.using(before + 1) as inside:
        assert inside == torch.get_num_threads() == before + 1
    assert torch.get_num_threads() == before
    rec = cl_bench.run(
        "zero-shot", "synthetic", out=str(tmp_path), threads=before + 1, progress=False, **QUICK
    )
    assert rec.config["threads"] == before + 1
    assert torch.get_num_threads() == before


def test_the_cli_defaults_threads_to_the_usable_cpus(tmp_path: Path, monkeypatch, capsys) -> None:
    monkeypatch.setattr(threads, "available_cpus", lambda: 1)
    args = ["run", "--strategy", "zero-shot", "--scenario", "synthetic", "--backbone", "tiny-clip"]
    assert main([*args, "--out", str(tmp_path), "--run-id", "a", "--no-progress"]) == 0
    assert main([*args, "--out", str(tmp_path), "--run-id", "b", "--no-progress", "--threads", "2"]) == 0
    capsys.readouterr()
    assert results.load(tmp_path / "a")["config"]["threads"] == 1
    assert results.load(tmp_path / "b")["config"]["threads"] == 2


def test_a_long_cpu_run_warns_with_its_time_and_tiny_clip_and_changes_no_number(
    tmp_path: Path, monkeypatch, caplog
) -> None:
    """The warning times a forward of the backbone: it must leave every random draw as it was."""
    quiet = cl_bench.run("lora", "synthetic", out=str(tmp_path), run_id="quiet", progress=False, **QUICK)
    monkeypatch.setattr(cpu_time, "BIG_BACKBONE", 0)
    monkeypatch.setattr(cpu_time, "WARN_AFTER_S", 0.0)
    with caplog.at_level(logging.WARNING, logger="cl_bench"):
        warned = cl_bench.run("lora", "synthetic", out=str(tmp_path), run_id="w", progress=False, **QUICK)
    [message] = [r.getMessage() for r in caplog.records if "will take about" in r.getMessage()]
    assert "tiny-clip: " in message
    assert "--backbone tiny-clip" in message
    assert warned.accuracy["matrix"] == quiet.accuracy["matrix"]
    assert [e.loss_mean for e in warned.experiences] == [e.loss_mean for e in quiet.experiences]


def test_the_estimate_counts_every_evaluation_and_three_forwards_per_training_image() -> None:
    assert cpu_time.estimate_s(0.5, eval_images=600, train_images=100) == 0.5 * (600 + 300)
    backbone = tiny_backbone()
    backbone.train()
    assert cpu_time.seconds_per_image(backbone, backbone.image_size) > 0
    assert backbone.training


def test_the_python_api_runs_with_run_and_component_overrides(tmp_path: Path) -> None:
    rec = cl_bench.run(
        "lora",
        "synthetic",
        out=str(tmp_path),
        run_id="nb",
        progress=False,
        strategy_args={"r": 2},
        **QUICK,
    )
    assert rec.status == "ok"
    assert rec.config["strategy_args"]["r"] == 2
    assert len(rec.accuracy["matrix"]) == 2
    frame = cl_bench.load_results(tmp_path)
    assert frame.loc[0, "run_id"] == "nb"
    assert frame.loc[0, "acc_final"] == pytest.approx(rec.metrics["acc_final"])
    with pytest.raises(ConfigError, match="unknown key 'stepz' in run config"):
        cl_bench.run("lora", "synthetic", out=str(tmp_path), stepz=3)


def test_a_mistyped_command_gets_a_suggestion(capsys) -> None:
    assert main(["rnu", "--strategy", "lora"]) == 2
    assert capsys.readouterr().err == (
        "error: unknown command 'rnu' (did you mean 'run'?); "
        "commands: run, list, report, bench, sweep, data\n"
    )


def test_the_missing_data_command_runs_as_printed_once_the_data_is_there(
    tmp_path: Path, monkeypatch, capsys
) -> None:
    """No root given: the printed command, run once the data is where the download line puts it,
    succeeds; and the failed attempt left no record."""
    monkeypatch.chdir(tmp_path)
    first = ["run", "--strategy", "zero-shot", "--scenario", "split-cifar10", "--backbone", "tiny-clip"]
    first += ["--set", "scenario.verify_checksums=false", "--out", "runs", "--run-id", "c", "--no-progress"]
    assert main(first) == 2
    err = capsys.readouterr().err.splitlines()
    assert err[0].startswith("error: split-cifar10 reads CIFAR-10 from disk and nothing is downloaded")
    download, command = err[2], err[4]  # under "get the data" and "then run:"
    assert download.strip().startswith("mkdir -p data && curl -L https://www.cs.toronto.edu/~kriz/cifar-10")
    assert not (tmp_path / "runs" / "c").exists()
    write_cifar(tmp_path / "data", "cifar10", n_train=50, n_test=20)  # what the download line yields
    argv = shlex.split(command)
    assert argv[:2] == ["cl-bench", "run"]
    assert main(argv[1:]) == 0
    assert results.load(tmp_path / "runs" / "c")["status"] == "ok"
