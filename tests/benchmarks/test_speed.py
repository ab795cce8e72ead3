"""The GPU benchmark's code path, exercised on the CPU with a tiny CLIP (its numbers mean nothing)."""

from __future__ import annotations

from benchmarks.speed import Row, Setting, run, table

QUICK = Setting(
    backbone="tiny-clip", batch=4, eval_batch=8, warmup=1, steps=1, windows=1, device="cpu", precision="fp32"
)


def test_rows_run_with_the_loop_step_and_the_peft_reference() -> None:
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
            },
        )
    }
    assert not [r.error for r in rows.values() if r.error]
    for name in ("lora", "peft-lora", "mora (10 exps, 160 ranks)"):
        assert rows[name].train_samples_per_s > 0
        assert rows[name].eval_samples_per_s > 0
    assert rows["forward-only"].eval_samples_per_s > 0
    assert rows["loraprune sliced 50%"].extra["sparsity"] > 0.4
    for name in ("lora", "peft-lora", "mora (10 exps, 160 ranks)"):  # timed beside the lora reference
        assert rows[name].extra["lora_interleaved_samples_per_s"] > 0
    assert "lora_interleaved_samples_per_s" not in rows["lora (repeat)"].extra  # after it is released
    repeat = rows["lora (repeat)"]
    drift = repeat.extra["drift_vs_first"]
    assert drift == repeat.train_samples_per_s / rows["lora"].train_samples_per_s
    assert f"{drift:.3f}x the first" in repeat.note


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
