"""The command line: exit codes, one-line errors, fast commands, the final table."""

from __future__ import annotations

import io
import logging
import subprocess
import sys

import pytest

from cl_bench.cli import _configure_logging, main


def run_cli(capsys, *args: str) -> tuple[int, str, str]:
    code = main(list(args))
    out, err = capsys.readouterr()
    return code, out, err


def error_line(err: str) -> str:
    lines = [line for line in err.splitlines() if line.startswith("error:")]
    assert len(lines) == 1, err
    return lines[0]


@pytest.mark.parametrize(
    ("args", "expected"),
    [
        (
            ["--strategy", "lorra", "--scenario", "synthetic"],
            "unknown strategy 'lorra' (did you mean 'lora'?)",
        ),
        (
            ["--strategy", "lora", "--scenario", "synthetc"],
            "unknown scenario 'synthetc' (did you mean 'synthetic'?)",
        ),
        (
            ["--strategy", "lora", "--scenario", "synthetic", "--set", "strategy.rank=4"],
            "unknown key 'rank' in strategy 'lora' config",
        ),
        (
            ["--strategy", "lora", "--scenario", "synthetic", "--set", "batch_size=big"],
            "run config.batch_size: expected an integer, got 'big'",
        ),
        (
            ["--strategy", "lora", "--scenario", "synthetic", "--set", "strategy.r=0"],
            "strategy.r must be >= 1",
        ),
        (
            ["--strategy", "lora", "--scenario", "split-cifar", "--set", "scenario.root=/nonexistent"],
            "CIFAR-100 not found: expected /nonexistent/cifar-100-python/",
        ),
        (
            ["--strategy", "lora", "--scenario", "synthetic", "--set", "backbone.weights=/nonexistent.pt"],
            "weights file not found: /nonexistent.pt",
        ),
        (["--scenario", "synthetic"], "no strategy given"),
    ],
)
def test_bad_input_gives_one_error_line_and_a_non_zero_exit(capsys, tmp_path, args, expected) -> None:
    code, _, err = run_cli(capsys, "run", "--no-progress", "--out", str(tmp_path), *args)
    assert code == 2
    assert expected in error_line(err)


def test_unreadable_data_fails_before_the_run_starts_and_leaves_no_record(capsys, tmp_path) -> None:
    """Files that pass the early check but cannot be read fail while the session is built: one
    error line, exit 2, and no record at all (a run that never started has nothing to report)."""
    folder = tmp_path / "data" / "cifar-100-python"
    folder.mkdir(parents=True)
    for name in ("train", "test", "meta"):
        (folder / name).write_bytes(b"not a CIFAR pickle")
    args = ["run", "--no-progress", "--out", str(tmp_path / "runs"), "--run-id", "x", "--strategy", "lora"]
    args += ["--scenario", "split-cifar", "--set", f"scenario.root={tmp_path / 'data'}"]
    args += ["--set", "scenario.verify_checksums=false"]
    code, _, err = run_cli(capsys, *args)
    assert code == 2
    assert err.startswith(f"error: {folder / 'meta'}: not a readable CIFAR pickle")
    assert not (tmp_path / "runs" / "x").exists()


def test_a_missing_data_root_fails_before_any_record(capsys, tmp_path) -> None:
    code, _, err = run_cli(
        capsys, "run", "--out", str(tmp_path / "runs"), "--strategy", "lora", "--scenario", "split-cifar",
        "--set", "scenario.root=/nonexistent",
    )  # fmt: skip
    assert code == 2
    assert err.startswith("error: CIFAR-100 not found: expected /nonexistent/cifar-100-python/")
    assert not (tmp_path / "runs").exists()


def test_run_prints_the_final_table_and_writes_the_record(capsys, tmp_path) -> None:
    code, out, _ = run_cli(
        capsys,
        "run",
        "--no-progress",
        "--out",
        str(tmp_path),
        "--run-id",
        "demo",
        "--strategy",
        "lora",
        "--scenario",
        "synthetic",
        "--seed",
        "3",
        "--set",
        "steps_per_experience=2",
        "--set",
        "scenario.n_classes=4",
        "--set",
        "scenario.n_experiences=2",
    )
    assert code == 0
    for label in (
        "acc_final",
        "acc_avg_incremental",
        "forgetting",
        "bwt",
        "fwt",
        "trainable params",
        "peak memory",
        "time",
    ):
        assert label in out
    assert (tmp_path / "demo" / "result.json").is_file()
    code, _, err = run_cli(
        capsys,
        "run",
        "--no-progress",
        "--out",
        str(tmp_path),
        "--run-id",
        "demo",
        "--strategy",
        "lora",
        "--scenario",
        "synthetic",
    )
    assert code == 2
    assert "--overwrite" in error_line(err)


def test_config_file_and_flags(capsys, tmp_path) -> None:
    toml = tmp_path / "run.toml"
    toml.write_text(
        'strategy = "lora"\nsteps_per_experience = 1\nseed = 5\n'
        '[scenario]\nname = "synthetic"\nn_classes = 4\nn_experiences = 2\n'
    )
    code, _, _ = run_cli(
        capsys,
        "run",
        "--no-progress",
        "--config",
        str(toml),
        "--out",
        str(tmp_path),
        "--run-id",
        "t",
        "--seed",
        "7",
    )
    assert code == 0
    from cl_bench import results

    cfg = results.load(tmp_path / "t")["config"]
    assert cfg["seed"] == 7  # the flag beats the file
    assert cfg["scenario_args"]["n_classes"] == 4
    assert cfg["steps_per_experience"] == 1


def test_list_shows_every_registry_with_descriptions(capsys) -> None:
    code, out, _ = run_cli(capsys, "list")
    assert code == 0
    for word in (
        "strategies:",
        "scenarios:",
        "backbones:",
        "lora",
        "split-cifar100 (split-cifar)",
        "tiny-clip",
        "plain LoRA",
    ):
        assert word in out
    code, out, _ = run_cli(capsys, "list", "backbones")
    assert "strategies:" not in out


def test_help_and_list_do_not_import_heavy_libraries() -> None:
    code = (
        "import sys\nfrom cl_bench.cli import main\n"
        "main(['list'])\n"
        "heavy = [m for m in ('avalanche', 'open_clip', 'transformers', 'wandb') if m in sys.modules]\n"
        "assert not heavy, heavy\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True, capture_output=True, timeout=120)
    out = subprocess.run(
        [sys.executable, "-m", "cl_bench.cli", "--help"],
        check=True,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert "run" in out.stdout


def test_bench_passes_its_options_through(capsys) -> None:
    """Leading options reach the benchmark's own parser (argparse.REMAINDER alone drops them)."""
    with pytest.raises(SystemExit) as exit_info:
        main(["bench", "--help"])
    assert exit_info.value.code == 0
    out, _ = capsys.readouterr()
    assert out.startswith("usage: cl-bench bench")
    assert "--quick" in out
    assert "--only" in out


def test_other_commands_reject_unknown_options(capsys) -> None:
    with pytest.raises(SystemExit) as exit_info:
        main(["list", "--bogus"])
    assert exit_info.value.code == 2
    assert "unrecognized arguments: --bogus" in capsys.readouterr().err


def test_log_records_go_to_the_stderr_of_the_moment(monkeypatch: pytest.MonkeyPatch) -> None:
    """A handler bound to the stderr of setup time fails once that stream is closed (pytest's
    capture of an earlier test): every later warning printed "--- Logging error ---"."""
    root = logging.getLogger()
    monkeypatch.setattr(root, "handlers", list(root.handlers))
    monkeypatch.setattr(root, "level", root.level)
    at_setup = io.StringIO()
    monkeypatch.setattr(sys, "stderr", at_setup)
    _configure_logging()
    at_setup.close()
    later = io.StringIO()
    monkeypatch.setattr(sys, "stderr", later)
    logging.getLogger("cl_bench.loop").warning("backbone %r has no weights", "tiny-clip")
    logging.getLogger("open_clip").info("not ours, below ERROR: filtered")
    assert later.getvalue() == "WARNING: backbone 'tiny-clip' has no weights\n"
