"""The regression gate (regression/gate.py) catches a real change and names what moved.

In the default unit run: the grid and its committed goldens are consistent, the comparison rules
hold on edited copies of a golden, one unperturbed run passes against its committed golden, the
gate run as a command in a temporary copy of the tree fails naming the moved metrics once the copy's
LoRA scaling is changed (and passes unchanged), and a strategy without a golden fails with the
exact command that adds it, which then makes it pass (in a temporary golden directory: the tests
never write the committed goldens). The full grid is ``tox -e regression`` (or ``pytest -m
regression``).
"""

from __future__ import annotations

import copy
import csv
import os
import shutil
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from cl_bench import results
from cl_bench.errors import ConfigError
from cl_bench.registry import STRATEGIES, Entry
from regression import gate

SUBSET = ("--strategy", "lora", "--scenario", "synthetic", "--seed", "0")
REFERENCE = "lora__synthetic__s0"


def run_gate(tmp_path: Path, *args: str) -> int:
    """The gate in this process, its records and report in ``tmp_path``."""
    return gate.main([*args, "--runs", str(tmp_path / "runs"), "--out", str(tmp_path / "report.html")])


def golden(run_id: str = REFERENCE) -> dict[str, Any]:
    return results.load(gate.GOLDEN_DIR / f"{run_id}.json")


# ----------------------------------------------------------------------------- the grid and its goldens


def test_grid_is_every_registered_strategy_on_both_scenarios_and_two_seeds() -> None:
    grid = gate.load_grid()
    specs = grid.specs()  # the strategies are the registry's (a new one joins: test_new_strategy_...)
    crossed = [s for s in specs if s.scenario != "x-tail"]
    assert {s.scenario for s in crossed} == {"split-digits", "synthetic"}
    assert {s.seed for s in crossed} == {0, 1}
    assert len(crossed) == len({s.run_id for s in crossed}) == len(STRATEGIES.names()) * 2 * 2
    # the [[cells]] beside the grid: X-TAIL on the fixture the gate generates
    assert [s.run_id for s in specs if s.scenario == "x-tail"] == ["lora__x-tail__s0", "mora__x-tail__s0"]
    assert grid.scenario_args["x-tail"]["root"] == gate.FIXTURE
    for spec in specs:
        assert spec.layer["backbone"] == "tiny-clip"
        assert spec.layer["device"] == "cpu"
        assert spec.layer["steps_per_experience"] > 0
    assert grid.threads >= 1


def test_every_run_of_the_grid_has_a_committed_golden_and_none_is_stale() -> None:
    specs = gate.load_grid().specs()
    missing = [s.run_id for s in specs if not s.golden_path(gate.GOLDEN_DIR).is_file()]
    assert not missing, f"no golden for {missing}: run `{gate.UPDATE_COMMAND} --strategy <name>`"
    assert gate.stale_goldens(gate.GOLDEN_DIR, specs) == []
    records, problems = results.find_records([gate.GOLDEN_DIR])  # what the reporter reads
    assert problems == []
    assert len(records) == len(specs)
    assert all(r["status"] == "ok" for r in records)


def test_goldens_exercise_each_strategys_mechanism() -> None:
    """The grid settings make the methods do their thing in 16 steps, or the gate would miss it."""
    for scenario in ("synthetic", "split-digits"):
        for seed in (0, 1):
            suffix = f"__{scenario}__s{seed}"
            prune = golden(f"loraprune{suffix}")["strategy_report"]["scalars"]
            assert prune["pruning_rounds"] >= 5
            assert prune["achieved_sparsity"] > 0.3
            assert set(golden(f"loraprune{suffix}")["accuracy"]["variants"]) == {"main", "merged", "sliced"}
            lisa = golden(f"lisa{suffix}")["strategy_report"]["scalars"]
            assert lisa["intervals"] >= 4 * 5  # several resamplings within every experience
            sora = golden(f"sora{suffix}")["strategy_report"]["scalars"]
            assert 0 < sora["live_gates"] < sora["total_gates"]  # some gates died, not all
            dylora = golden(f"dylora{suffix}")
            assert sum(y > 0 for y in dylora["strategy_report"]["curves"]["sampled_ranks"]["y"]) >= 6
            assert set(dylora["accuracy"]["variants"]) == {"main", "rank=1", "rank=2", "rank=4", "rank=8"}
            mora = [e["strategy"]["ranks_per_layer"] for e in golden(f"mora{suffix}")["experiences"]]
            assert mora == [16, 32, 48, 64, 80]  # the bank grows by one block per experience


# ----------------------------------------------------------------------------- comparison rules


TOL = gate.load_grid().tolerances


def _set(path: tuple[Any, ...], value: Any) -> Callable[[dict[str, Any]], None]:
    def edit(record: dict[str, Any]) -> None:
        target = record
        for key in path[:-1]:
            target = target[key]
        target[path[-1]] = value(target[path[-1]]) if callable(value) else value

    return edit


MUTATIONS = {
    # edit -> the breached metric, or None when the gate must not care
    "nothing": (lambda r: None, None),
    "timing": (_set(("timing", "total_s"), lambda v: v * 3), None),
    "throughput": (_set(("experiences", 0, "train_samples_per_s"), lambda v: v / 2), None),
    "memory": (_set(("experiences", 0, "peak_memory_train_bytes"), lambda v: v * 2), None),
    "environment": (_set(("environment", "hostname"), "elsewhere"), None),
    "run id and output": (_set(("config", "out"), "/elsewhere"), None),
    "loss within tolerance": (_set(("experiences", 2, "loss_last"), lambda v: v + 0.5 * TOL.loss), None),
    "loss beyond tolerance": (
        _set(("experiences", 2, "loss_last"), lambda v: v + 2 * TOL.loss),
        "experiences[2].loss_last",
    ),
    "first loss": (
        _set(("experiences", 0, "loss_first"), lambda v: v - 2 * TOL.loss),
        "experiences[0].loss_first",
    ),
    "accuracy cell": (
        _set(("accuracy", "matrix", 3, 1), lambda v: v + 2 * TOL.accuracy),
        "accuracy.matrix[3][1]",
    ),
    "metric": (_set(("metrics", "bwt"), lambda v: v - 2 * TOL.metrics["bwt"]), "metrics.bwt"),
    "metric undefined": (_set(("metrics", "fwt"), None), "metrics.fwt"),
    "parameter count": (_set(("parameters", "trainable"), lambda v: v + 1), "parameters.trainable"),
    "experience parameters": (_set(("experiences", 1, "n_added"), lambda v: v + 1), "experiences[1].n_added"),
    "matrix shape": (_set(("accuracy", "matrix"), lambda v: v[:-1]), "shape(accuracy.matrix)"),
    "experience count": (_set(("experiences",), lambda v: v[:-1]), "len(experiences)"),
    "class order": (_set(("scenario", "class_order"), lambda v: v[::-1]), "scenario.class_order"),
    "config value": (_set(("config", "lr"), lambda v: v * 2), "config.lr"),
    "strategy config": (_set(("config", "strategy_args", "r"), 4), "config.strategy_args.r"),
    "status": (_set(("status",), "failed"), "status"),
}


@pytest.mark.parametrize("name", sorted(MUTATIONS))
def test_comparison_gates_numbers_counts_and_shapes_but_not_the_machine(name: str) -> None:
    edit, expected = MUTATIONS[name]
    reference = golden()
    now = copy.deepcopy(reference)
    edit(now)
    compared = gate.compare(REFERENCE, reference, now, TOL)
    breached = [c.metric for c in compared.checks if not c.ok]
    assert breached == ([expected] if expected else [])
    assert len(compared.checks) > 100  # matrix, metrics, losses, counts... all compared


def test_a_config_key_added_by_a_change_is_noted_not_gated() -> None:
    reference = golden()
    now = copy.deepcopy(reference)
    now["config"]["strategy_args"]["new_option"] = True
    compared = gate.compare(REFERENCE, reference, now, TOL)
    assert all(c.ok for c in compared.checks)
    assert compared.notes == [f"{REFERENCE}: config.strategy_args.new_option exists only in this run"]


def test_breach_table_lists_run_metric_golden_now_delta_tolerance() -> None:
    checks = [
        gate.Check("r", "experiences[1].loss_last", 0.5, 0.75, 0.01),
        gate.Check("r", "status", "ok", "x"),
    ]
    lines = gate.breach_table(checks).splitlines()
    assert lines[0].split() == ["run", "metric", "golden", "now", "delta", "tolerance"]
    assert lines[2].split() == ["r", "status", "ok", "x", "-", "exact"]  # exact breaches first
    assert lines[3].split() == ["r", "experiences[1].loss_last", "0.5", "0.75", "+0.25", "0.01"]


def test_stale_golden_is_found(tmp_path: Path) -> None:
    specs = gate.load_grid().specs(["lora"], ["synthetic"], [0])
    (tmp_path / f"{REFERENCE}.json").write_text("{}")
    (tmp_path / "removed__synthetic__s0.json").write_text("{}")
    assert gate.stale_goldens(tmp_path, specs) == [tmp_path / "removed__synthetic__s0.json"]


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("[grid]\nscenarios = ['synthetic']\nseeds = [0]\nthread = 1\n", "unknown key 'thread'"),
        ("[grid]\nscenarios = ['synthetic']\nseeds = [0]\n[tolerance]\naccuracy = 0.1\n", "needs"),
    ],
)
def test_malformed_grid_file_fails_naming_the_problem(
    tmp_path: Path, text: str, message: str, capsys
) -> None:
    path = tmp_path / "grid.toml"
    path.write_text(text)
    with pytest.raises(gate.GridError, match=message):
        gate.load_grid(path)
    assert gate.main(["--grid", str(path), "--list"]) == 2
    assert message in capsys.readouterr().err


def test_grid_naming_an_unknown_strategy_fails_with_the_closest_name(tmp_path: Path) -> None:
    text = gate.GRID_FILE.read_text().replace("[strategies.lisa.args]", "[strategies.lisaa.args]")
    path = tmp_path / "grid.toml"
    path.write_text(text)
    with pytest.raises(ConfigError, match="did you mean 'lisa'"):
        gate.load_grid(path)


def test_grid_without_a_tolerance_for_a_metric_fails(tmp_path: Path) -> None:
    text = gate.GRID_FILE.read_text()
    path = tmp_path / "grid.toml"
    path.write_text("\n".join(line for line in text.splitlines() if not line.startswith("plasticity")))
    with pytest.raises(gate.GridError, match="lacks plasticity"):
        gate.load_grid(path)


# ----------------------------------------------------------------------------- the gate end to end


def test_unperturbed_run_passes_against_its_committed_golden(tmp_path: Path, capsys) -> None:
    assert run_gate(tmp_path, *SUBSET) == 0
    out = capsys.readouterr().out
    assert "summary: PASS: 1 runs, 0 breaches" in out
    assert (tmp_path / "report.html").is_file()
    assert f"report: {(tmp_path / 'report.html').resolve()}" in out
    with (tmp_path / "report_regression.csv").open() as fh:
        rows = list(csv.DictReader(fh))
    assert rows
    assert all(r["ok"] == "True" for r in rows)
    assert {"experiences[4].loss_last", "accuracy.matrix[4][4]", "metrics.acc_final"} <= {
        r["metric"] for r in rows
    }


ROOT = Path(__file__).resolve().parents[2]
# What the gate needs to run from a copy of the tree (the goldens stay behind: the copy writes its own).
TREE = ("cl_bench", "strategies", "scenarios", "reports", "pyproject.toml")
GATE_FILES = ("__init__.py", "gate.py", "grid.toml")
LORA_SCALING = "self.scaling = alpha / r\n"
# 5% off: moves lora__synthetic__s0's losses by up to 0.025 (17 values beyond tolerance, 25x the
# 0.001 loss tolerance); 0.5% already moves five losses beyond it (docs/regression.md).
WRONG_SCALING = "self.scaling = alpha / r * 1.05\n"


def copy_tree(dst: Path) -> Path:
    """The packages, pyproject and the gate (not its goldens) copied to ``dst``."""
    ignore = shutil.ignore_patterns("__pycache__", "*.pyc")
    for name in TREE:
        src = ROOT / name
        if src.is_dir():
            shutil.copytree(src, dst / name, ignore=ignore)
        else:
            shutil.copy2(src, dst / name)
    (dst / "regression").mkdir(parents=True)
    for name in GATE_FILES:
        shutil.copy2(ROOT / "regression" / name, dst / "regression" / name)
    return dst


def gate_in(tree: Path, goldens: Path, *args: str) -> subprocess.CompletedProcess[str]:
    """``python -m regression.gate`` on the lora/synthetic/seed-0 run, in ``tree``."""
    env = {**os.environ, "PYTHONPATH": str(tree), "HF_HUB_OFFLINE": "1", "WANDB_MODE": "disabled"}
    command = [sys.executable, "-m", "regression.gate", *SUBSET, "--golden-dir", str(goldens)]
    command += ["--runs", str(tree / "runs"), *args]
    return subprocess.run(command, cwd=tree, env=env, capture_output=True, text=True, timeout=300)


@pytest.mark.slow
def test_a_wrong_lora_scaling_in_a_copy_of_the_tree_fails_the_gate_naming_the_metrics(tmp_path: Path) -> None:
    """Issue 5's test: the gate, run as a command in a temporary copy of the tree, passes the
    unchanged copy and fails once the copy's LoRA scaling is off by 5%, naming what moved.

    The golden is written by the unchanged copy itself, so the test holds whatever the committed
    goldens say (they may lag an intended change elsewhere); ~25 s (three gate processes)."""
    tree = copy_tree(tmp_path / "tree")
    goldens = tmp_path / "golden"
    env = {**os.environ, "PYTHONPATH": str(tree)}
    where = subprocess.run(
        [sys.executable, "-c", "import cl_bench, strategies; print(cl_bench.__file__, strategies.__file__)"],
        cwd=tree,
        env=env,
        capture_output=True,
        text=True,
        check=True,
    )
    assert where.stdout.split() == [
        str(tree / "cl_bench" / "__init__.py"),
        str(tree / "strategies" / "__init__.py"),
    ]

    written = gate_in(tree, goldens, "--update-golden")
    assert written.returncode == 0, written.stdout + written.stderr
    assert (goldens / f"{REFERENCE}.json").is_file()
    unchanged = gate_in(tree, goldens)
    assert unchanged.returncode == 0, unchanged.stdout + unchanged.stderr
    assert "summary: PASS: 1 runs, 0 breaches" in unchanged.stdout

    adapters = tree / "cl_bench" / "adapters.py"
    source = adapters.read_text()
    assert source.count(LORA_SCALING) == 1  # the perturbation below really lands in LoRALinear
    adapters.write_text(source.replace(LORA_SCALING, WRONG_SCALING))
    perturbed = gate_in(tree, goldens)
    assert perturbed.returncode == 1, perturbed.stdout + perturbed.stderr
    out = perturbed.stdout
    assert "what moved" in out
    assert "summary: FAIL: 1 runs," in out
    table = [line.split() for line in out.splitlines() if line.startswith(REFERENCE)]
    moved = {row[1] for row in table}
    assert any(m.startswith("experiences[") and ".loss_" in m for m in moved), out
    row = next(r for r in table if ".loss_" in r[1])
    golden_value, now, delta, tolerance = (float(v) for v in row[2:6])
    assert abs(delta) > tolerance
    assert delta == pytest.approx(now - golden_value, abs=1e-5)


@pytest.fixture
def toy_strategy(monkeypatch) -> str:
    """A newly registered strategy (a linear probe under another name: fast), unregistered afterwards."""
    base = STRATEGIES.get("linear-probe")
    toy = type("ToyProbe", (base,), {"__doc__": "a strategy added after the goldens"})
    monkeypatch.setitem(STRATEGIES._entries, "toy-probe", Entry("toy-probe", toy, "test strategy"))
    return "toy-probe"


@pytest.mark.slow
def test_new_strategy_fails_with_the_command_and_update_golden_makes_it_pass(
    toy_strategy: str, tmp_path: Path, capsys
) -> None:
    assert toy_strategy in {s.strategy for s in gate.load_grid().specs()}  # joins the grid by registering
    subset = ("--strategy", toy_strategy, "--scenario", "synthetic", "--seed", "0")

    assert run_gate(tmp_path, *subset) == 1  # against the committed goldens, which it has none of
    out = capsys.readouterr().out
    assert "toy-probe__synthetic__s0: no golden record" in out
    assert f"\n    tox -e regression -- --update-golden --strategy {toy_strategy}\n" in out
    assert "1 missing goldens" in out
    assert not (gate.GOLDEN_DIR / "toy-probe__synthetic__s0.json").exists()

    goldens = tmp_path / "golden"
    assert run_gate(tmp_path, *subset, "--golden-dir", str(goldens), "--update-golden") == 0
    written = goldens / "toy-probe__synthetic__s0.json"
    assert results.load(written)["status"] == "ok"
    assert "GOLDENS WRITTEN" in capsys.readouterr().out

    assert run_gate(tmp_path, *subset, "--golden-dir", str(goldens)) == 0
    assert "summary: PASS" in capsys.readouterr().out


@pytest.mark.regression
def test_full_grid_matches_the_committed_goldens(tmp_path: Path) -> None:
    """The whole gate (minutes): what ``tox -e regression`` runs."""
    assert run_gate(tmp_path) == 0


def test_a_cell_must_name_strategy_scenario_and_seed(tmp_path: Path) -> None:
    text = gate.GRID_FILE.read_text().replace('strategy = "lora"\nscenario = "x-tail"', 'strategy = "lora"')
    bad = tmp_path / "grid.toml"
    bad.write_text(text)
    with pytest.raises(
        gate.GridError, match=r"\[\[cells\]\] #1: a cell is a table of strategy, scenario and seed"
    ):
        gate.load_grid(bad)
