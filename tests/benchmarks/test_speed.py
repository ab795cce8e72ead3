"""The GPU benchmark's code path, exercised on the CPU with a tiny CLIP (its numbers mean nothing)."""

from __future__ import annotations

import pytest

from benchmarks import speed
from benchmarks.speed import COMPILED_ROWS, SPECIAL_ROWS, Row, Setting, run, strategy_rows, table
from cl_bench.registry import STRATEGIES, Registry
from strategies.lora import LoRA

QUICK = Setting(
    backbone="tiny-clip", batch=4, eval_batch=8, warmup=1, steps=1, windows=1, device="cpu", precision="fp32"
)


@pytest.fixture
def throwaway(monkeypatch: pytest.MonkeyPatch) -> str:
    """A strategy registered for one test only (a copy of the registry with one more entry)."""
    registry: Registry = Registry("strategy")
    for entry in STRATEGIES:
        registry.register(entry.name, description=entry.description, aliases=entry.aliases)(entry.obj)
    registry.register("throwaway", description="a LoRA registered by a test")(type("Throwaway", (LoRA,), {}))
    monkeypatch.setattr(speed, "STRATEGIES", registry)
    return "throwaway"


def test_every_registered_strategy_that_trains_has_a_row_and_special_rows_name_registered_ones() -> None:
    rows = strategy_rows()
    trains = {name for name in STRATEGIES.names() if STRATEGIES.get(name).trains}
    assert {strategy for _, strategy, _, _ in rows} == trains
    assert "zero-shot" not in trains
    assert rows[0][:2] == ("lora", "lora")  # the reference first
    assert len({name for name, _, _, _ in rows}) == len(rows)
    assert set(SPECIAL_ROWS) <= trains
    assert all(strategy == name for name, specials in SPECIAL_ROWS.items() for _, strategy, _, _ in specials)
    assert {strategy for _, strategy, _, _ in COMPILED_ROWS} <= trains
    assert [row for row in rows if row[1] == "mora"] == list(SPECIAL_ROWS["mora"])


def test_a_newly_registered_strategy_gets_a_row_with_no_edit_to_the_bench(throwaway: str) -> None:
    assert (throwaway, throwaway, {}, 1) in strategy_rows()


def test_rows_run_with_the_loop_step_and_the_peft_reference(throwaway: str) -> None:
    rows = {
        r.name: r
        for r in run(
            QUICK,
            quick=True,
            only={
                "lora",
                "peft-lora",
                "mora (10 exps, 160 ranks)",
                "loraprune sliced 50%",
                "forward-only",
                "lora (repeat)",
                "limit",
                "limit (image tower)",
                throwaway,
            },
        )
    }
    assert not [r.error for r in rows.values() if r.error]
    for name in ("lora", "peft-lora", "mora (10 exps, 160 ranks)", "limit", "limit (image tower)", throwaway):
        assert rows[name].train_samples_per_s > 0
        assert rows[name].eval_samples_per_s > 0
    assert rows[throwaway].strategy == throwaway
    assert rows["forward-only"].eval_samples_per_s > 0
    assert rows["loraprune sliced 50%"].extra["sparsity"] > 0.4
    for name in ("lora", "peft-lora", "mora (10 exps, 160 ranks)"):  # timed beside the lora reference
        assert rows[name].extra["lora_interleaved_samples_per_s"] > 0
    assert "lora_interleaved_samples_per_s" not in rows["lora (repeat)"].extra  # after it is released
    repeat = rows["lora (repeat)"]
    drift = repeat.extra["drift_vs_first"]
    assert drift == repeat.train_samples_per_s / rows["lora"].train_samples_per_s
    assert f"{drift:.3f}x the first" in repeat.note


def test_the_peft_reference_trains_what_lora_trains() -> None:
    """HF peft's LoRA (r=8) on the layers of PEFT_TARGETS: as many trained parameters as our lora."""
    peft = speed.build("peft-lora", QUICK, cls=speed.PeftLoRA)
    lora = speed.build("lora", QUICK)
    n_peft_layers = sum(1 for name, _ in peft.backbone.model.named_modules() if name.endswith("lora_A"))
    assert n_peft_layers == len(lora.adapters())
    assert peft.n_trainable() == lora.n_trainable() > 0


def test_table_gives_ratios_within_a_mode_and_to_eager_peft_and_shows_errors() -> None:
    rows = [
        Row("peft-lora", 120.0, 200.0, 2 * 2**30, strategy="peft-lora", mode="graphs"),
        Row("peft-lora (eager)", 100.0, 200.0, 2 * 2**30, strategy="peft-lora", mode="eager"),
        Row("lora", 300.0, 300.0, 2**30, strategy="lora", mode="graphs"),
        Row("lora (eager)", 150.0, 300.0, 2**30, strategy="lora", mode="eager"),
        Row("sora", error="RuntimeError: boom", strategy="sora", mode="graphs"),
    ]
    lines = {line.split("  ")[0].strip(): line for line in table(rows).splitlines()}
    assert "2.50x" in lines["lora"]  # graphs vs graphed peft
    assert "3.00x" in lines["lora"]  # vs peft as people run it (eager)
    assert "1.50x" in lines["lora (eager)"]  # eager vs eager peft
    assert "2.00x" not in lines["lora (eager)"]  # never compared with the graphed lora
    assert "ERROR" in lines["sora"]
    assert "RuntimeError: boom" in lines["sora"]


def test_vs_lora_uses_the_interleaved_lora_windows_when_a_row_has_them() -> None:
    rows = [
        Row("lora", 300.0, 300.0, 2**30, strategy="lora", mode="graphs"),
        Row("sora", 285.0, 300.0, 2**30, strategy="sora", mode="graphs"),
        Row("allora", 285.0, 300.0, 2**30, strategy="allora", mode="graphs"),
    ]
    rows[1].extra["lora_interleaved_samples_per_s"] = 290.0
    lines = {line.split("  ")[0].strip(): line for line in table(rows).splitlines()}
    assert f"{285.0 / 290.0:.2f}x" in lines["sora"].split()  # 0.98x: same minutes as its lora windows
    assert f"{285.0 / 300.0:.2f}x" in lines["allora"].split()  # 0.95x: the lora row, measured before


def test_the_limit_trains_no_adapter_yet_back_propagates_through_every_block_of_its_towers() -> None:
    import torch

    from benchmarks.speed import AdapterFreeLimit, ImageTowerLimit, prepare_training

    for cls, towers in ((AdapterFreeLimit, ("visual.", "transformer.")), (ImageTowerLimit, ("visual.",))):
        limit = speed.build("lora", QUICK, cls=cls)
        trained = [n for n, p in limit.backbone.model.named_parameters() if p.requires_grad]
        wanted = {"visual.positional_embedding", "positional_embedding"} if len(towers) == 2 else None
        assert set(trained) == (wanted or {"visual.positional_embedding"})
        info, _, x, y = prepare_training(limit, QUICK, 1)
        grads: dict[str, bool] = {}
        blocks = [
            (n, m)
            for n, m in limit.backbone.model.named_modules()
            if n.endswith(".resblocks.0") or n.endswith(".resblocks.3")
        ]
        for name, module in blocks:
            module.register_full_backward_hook(
                lambda m, gi, go, name=name, seen=grads: seen.__setitem__(name, True)
            )
        loss = torch.nn.functional.cross_entropy(limit.forward(x.float() / 255, info), y)
        loss.backward()
        reached = set(grads)
        expected = {
            n
            for n, _ in blocks
            if n.startswith(towers) or (towers == ("visual.", "transformer.") and not n.startswith("visual."))
        }
        assert reached == expected, (cls.__name__, reached, expected)


def test_the_table_has_a_vs_limit_column_against_the_limit_row() -> None:
    rows = [
        Row("limit", 2000.0, mode="graphs"),
        Row("lora", 1800.0, mode="graphs"),
    ]
    rows[0].strategy, rows[1].strategy = "limit", "lora"
    lines = table(rows).splitlines()
    assert "vs limit" in lines[0]
    assert "0.90x" in lines[2]
