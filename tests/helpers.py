"""Test helpers: registries filled once, tiny models, tiny scenarios, and a quick-run helper."""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("WANDB_MODE", "disabled")

from cl_bench.cli import load_components

load_components()

from cl_bench import config, loop  # noqa: E402
from cl_bench.backbones.base import Backbone  # noqa: E402
from cl_bench.heads import make_head  # noqa: E402
from cl_bench.registry import BACKBONES  # noqa: E402
from cl_bench.results import RunResult  # noqa: E402
from cl_bench.strategy import ExperienceInfo, StrategyContext  # noqa: E402

# Two threads in a single process; one per pytest-xdist worker (the default run has two workers
# on a 2-core machine: more threads than cores slows the tiny models' many small ops).
torch.set_num_threads(1 if os.environ.get("PYTEST_XDIST_WORKER") else 2)


def tiny_backbone(name: str = "tiny-clip", seed: int = 0, **args: Any) -> Backbone:
    """A freshly built registered tiny backbone with deterministic random weights."""
    torch.manual_seed(seed)
    return config.build(BACKBONES.get(name), args, name).build()


def tiny_context(steps: tuple[int, ...] = (4, 4), n_classes: int = 4, seed: int = 0) -> StrategyContext:
    return StrategyContext(
        device=torch.device("cpu"),
        precision="fp32",
        seed=seed,
        n_experiences=len(steps),
        n_classes=n_classes,
        steps_per_experience=steps,
        batch_size=8,
    )


def experience_info(
    index: int, classes: tuple[int, ...], n_classes: int, *, training: bool = True, n_steps: int = 4
) -> ExperienceInfo:
    """An ExperienceInfo scoring every class (as in evaluation) for direct strategy tests."""
    return ExperienceInfo(
        index=index,
        classes=classes,
        seen_classes=classes,
        logit_classes=torch.arange(n_classes),
        task_label=0,
        n_samples=8,
        n_steps=n_steps,
        training=training,
    )


def head_for(backbone: Backbone, n_classes: int) -> torch.nn.Module:
    return make_head(backbone, [f"class {i}" for i in range(n_classes)])


QUICK_SCENARIO = {"n_classes": 4, "n_experiences": 2, "train_per_class": 8, "test_per_class": 4}


def quick_run(
    tmp_path: Path,
    strategy: str,
    *,
    scenario: str = "synthetic",
    steps: int = 3,
    strategy_args: dict[str, Any] | None = None,
    scenario_args: dict[str, Any] | None = None,
    handle_signals: bool = False,
    **run: Any,
) -> RunResult:
    """A complete loop.run on CPU with a few steps per experience (seconds)."""
    scenario_args = (
        QUICK_SCENARIO if scenario_args is None and scenario == "synthetic" else (scenario_args or {})
    )
    layers = [
        {
            "strategy": {"name": strategy, **(strategy_args or {})},
            "scenario": {"name": scenario, **scenario_args},
            "steps_per_experience": steps,
            "batch_size": 8,
            "eval_batch_size": 64,
            "device": "cpu",
            "out": str(tmp_path / "runs"),
            "run_id": f"{strategy}-test",
            **run,
        }
    ]
    return loop.run(config.resolve(layers), progress=False, handle_signals=handle_signals)


class CrashError(RuntimeError):
    """The error :func:`crash_before_steps` raises."""


def crash_before_steps(monkeypatch: Any, steps: set[int]) -> None:
    """Make ``loop.train_step`` raise :class:`CrashError` before its calls numbered in ``steps``
    (1-based, counted from now): a run that fails mid-experience, for the resume tests."""
    original, calls = loop.train_step, [0]

    def train_step(*args: Any, **kwargs: Any) -> torch.Tensor:
        calls[0] += 1
        if calls[0] in steps:
            raise CrashError(f"crash before step {calls[0]}")
        return original(*args, **kwargs)

    monkeypatch.setattr(loop, "train_step", train_step)


def run_interpreted(script: str, *args: str) -> Any:
    """Run ``script`` (with ``args``) in a fresh Python with Triton's interpreter on, so its kernels
    run on the CPU (CI has no GPU); the JSON of its last output line. Skips without Triton."""
    import json
    import subprocess
    import sys

    import pytest

    pytest.importorskip("triton")
    done = subprocess.run(
        [sys.executable, "-c", script, *args],
        capture_output=True,
        text=True,
        env={**os.environ, "TRITON_INTERPRET": "1"},
        cwd=Path(__file__).resolve().parents[1],
        timeout=600,
        check=False,
    )
    assert done.returncode == 0, done.stderr[-2000:]
    return json.loads(done.stdout.strip().splitlines()[-1])


CUT_PROMPTS = ("a cat.", "a photo of a small bird, a type of animal.")  # ends: token 3 and 13 of 16


def assert_cut_tokens_encode_as_full_rows(
    backbone: Backbone, full: torch.Tensor, reference: Callable[[torch.Tensor], torch.Tensor]
) -> None:
    """``backbone.tokenize(CUT_PROMPTS)`` is ``full`` (the tokenizer's 16-token rows of them) cut
    after the longest prompt's end token, and in float64 ``backbone.encode_text`` on it gives
    ``reference(full)``'s features and every text parameter's gradient (a backbone in float64)."""
    tokens = backbone.tokenize(list(CUT_PROMPTS))
    assert full.shape == (2, 16)
    assert tokens.shape == (2, 14)
    assert torch.equal(tokens, full[:, :14])
    assert (full[:, 14:] == 0).all()

    def features_and_grads(
        encode: Callable[[torch.Tensor], torch.Tensor], ids: torch.Tensor
    ) -> list[torch.Tensor]:
        backbone.model.zero_grad()
        out = encode(ids)
        (out * torch.linspace(-1, 1, out.numel(), dtype=out.dtype).view_as(out)).sum().backward()
        return [out.detach()] + [p.grad.clone() for p in backbone.text_parameters() if p.grad is not None]

    cut = features_and_grads(backbone.encode_text, tokens)
    whole = features_and_grads(reference, full)
    assert len(cut) == len(whole) > 10
    for a, b in zip(cut, whole, strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-12)
