"""The federated and X-TAIL-shaped GPU benchmarks, run end to end on the CPU with a tiny CLIP.

Their numbers mean nothing here; what is checked is that a device call (minutes of a lent GPU)
cannot fail on a code path the CPU never ran, and that the printed figures are consistent.
"""

from __future__ import annotations

import argparse
import re
from pathlib import Path

import pytest

from benchmarks import federated, multidomain


def figure(out: str, label: str) -> float:
    """The number after ``label`` on its line of the printed table."""
    match = re.search(rf"^{re.escape(label)}\s+([\d,.]+)", out, flags=re.MULTILINE)
    assert match, f"no line {label!r} in:\n{out}"
    return float(match.group(1).replace(",", ""))


def test_federated_benchmark_prints_both_runs_and_consistent_ratios(
    capsys: pytest.CaptureFixture[str],
) -> None:
    argv = ["--device", "cpu", "--backbone", "tiny-clip", "--clients", "2", "--rounds", "1"]
    argv += ["--local-steps", "1", "--experiences", "1", "--runs", "lora/sequential", "finetune/sequential"]
    assert federated.main(argv) == 0
    out = capsys.readouterr().out
    rows = {line.split()[0] for line in out.splitlines() if line.strip().startswith(("lora/", "finetune/"))}
    assert rows == {"lora/sequential", "finetune/sequential"}
    assert figure(out, "finetune / lora bytes per round:") > 10.0


def test_federated_benchmark_figures_follow_from_the_record(tmp_path: Path) -> None:
    args = argparse.Namespace(
        experiences=1, clients=2, rounds=1, local_steps=1, batch_size=8, backbone="tiny-clip", device="cpu"
    )
    args.client_gpus = 0.0
    lora = federated.run_one(tmp_path, "lora", "sequential", args)
    full = federated.run_one(tmp_path, "finetune", "sequential", args)
    for record in (lora, full):
        fed = record.federation
        assert fed is not None
        first = fed["rounds"][0]
        # full participation: each of the K clients downloads the global state and uploads its own
        assert fed["bytes_per_round"] == sum(first["upload_bytes"]) + sum(first["download_bytes"])
        assert first["upload_bytes"] == [first["upload_bytes"][0]] * args.clients
        assert federated.figures(record)["upload_mib_per_client_round"] == first["upload_bytes"][0] / 2**20
    ratio = federated.figures(full)["mib_per_round"] / federated.figures(lora)["mib_per_round"]
    assert ratio > 10.0


@pytest.mark.slow
def test_xtail_benchmark_runs_every_domain_through_the_cache(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    argv = ["--device", "cpu", "--backbone", "tiny-clip", "--scale", "0.005", "--steps", "1", "--shots", "1"]
    argv += ["--batch-size", "8", "--eval-batch-size", "64", "--skip-reference", "--workdir", str(tmp_path)]
    assert multidomain.main(argv) == 0
    out = capsys.readouterr().out
    tests = sum(max(classes, int(n * 0.005)) for _, classes, n in multidomain.XTAIL_SHAPE)
    trains = sum(classes for _, classes, _ in multidomain.XTAIL_SHAPE)
    assert figure(out, "images (train+test, JPEG)") == tests + trains
    assert figure(out, "test images per row") == tests
    assert figure(out, "train samples/s (median, exp 2..)") > 0
    assert figure(out, "second start-up (cache hit) s") < 10.0
