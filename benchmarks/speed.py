"""GPU speed benchmark (``cl-bench bench``): every strategy side by side with HF peft, one process.

For each registered strategy on open_clip ViT-B-16 (random weights, 224 px, batch 128, bf16
autocast, AdamW) it times the loop's own step function (:func:`cl_bench.loop.train_step`, every
hook included) and an evaluation forward, and records peak memory. The references run in the
same process: a forward-only pass of the image tower, and HF peft LoRA (r=8, alpha=16, the same
q/k/v/out/fc1/fc2 layers of both towers) driven by the same step. The training step of a CLIP
strategy encodes the images and the 10 class prompts of one CIFAR-100 experience (text tower
adapted where the method adapts it), as a split-CIFAR-100 run with ``train_classes=current``.

Drift: the rows run one after another for minutes, and an H200's speed drifts by a few percent
meanwhile. So a ``lora`` step is kept alive through the strategy rows (and peft's), and each row
alternates its timed windows with lora's: its ``vs lora`` train ratio compares the same minutes.

Extra rows: MoRA after 10 experiences (160 ranks per layer), ``lora`` measured again after the
strategies (``lora (repeat)``: how far the reference drifted over the run), ``lora`` under ``torch.compile``,
LoRAPrune's physically sliced model at 50% sparsity against the dense model, and an end-to-end
``cl-bench run`` of ``lora`` on split-CIFAR-100-shaped data (50,000/10,000 images at 32 px, written
in torchvision's on-disk format, resized on the GPU) for 10 experiences with every evaluation.

The table is printed last and written as JSON (``--out``). ``--quick`` runs the same code on a
tiny CLIP on the CPU (for the unit test), where the numbers mean nothing.
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import json
import math
import statistics
import sys
import tempfile
import time
import traceback
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

import torch

from cl_bench import config, loop
from cl_bench.backbones.base import ROLES, Backbone
from cl_bench.evaluate import autocast
from cl_bench.heads import Head, make_head
from cl_bench.registry import BACKBONES, STRATEGIES
from cl_bench.strategy import ExperienceInfo, Strategy, StrategyContext

GiB = 2**30
PEFT_TARGETS = r".*resblocks\.\d+\.(attn\.(q_proj|k_proj|v_proj|out_proj)|mlp\.(c_fc|c_proj))"


@dataclass(frozen=True)
class Setting:
    """What every row shares."""

    backbone: str = "clip-vit-b-16"
    batch: int = 128
    eval_batch: int = 512
    n_classes: int = 100  # CIFAR-100: 10 experiences of 10 classes
    n_experiences: int = 10
    warmup: int = 10
    steps: int = 30  # timed steps per window
    windows: int = 3  # the median window is reported
    device: str = "cuda"
    precision: str = "bf16"
    lr: float = 1e-4
    eager_rows: bool = True  # every graph-safe strategy also measured eagerly (else: the references only)


@dataclass
class Row:
    name: str
    train_samples_per_s: float | None = None
    eval_samples_per_s: float | None = None
    peak_train_bytes: int | None = None
    peak_eval_bytes: int | None = None
    note: str = ""
    error: str | None = None
    extra: dict[str, Any] = field(default_factory=dict)
    mode: str = (
        ""  # "graphs" (cl-bench run's default on CUDA), "eager", "compiled"; ratios compare within a mode
    )
    strategy: str = ""  # registry name of the strategy the row trains ("" for reference rows)


class PeftLoRA(Strategy):
    """The reference: HF peft's LoRA layers injected into the same model, trained by the same step."""

    graph_safe = True  # its forward reads parameters only: the graph runner applies as to ours

    def __init__(self, cfg: Any, backbone: Backbone, head: Head, ctx: StrategyContext) -> None:
        super().__init__(cfg, backbone, head, ctx)
        from peft import LoraConfig, inject_adapter_in_model

        self.backbone.requires_grad_(False)
        peft_cfg = LoraConfig(r=8, lora_alpha=16, lora_dropout=0.0, target_modules=PEFT_TARGETS)
        inject_adapter_in_model(peft_cfg, self.backbone.model)
        for name, param in self.backbone.model.named_parameters():
            param.requires_grad_("lora_" in name)


class AdapterFreeLimit(Strategy):
    """The adapter-free limit: the frozen backbone, no adapter, gradients flowing back through
    every block of both towers to their inputs. What trains is each tower's positional embedding
    (a [tokens, width] tensor added to the input of the first block): its gradient needs the
    input gradient of every block, and nothing else, so this step is the floor that any adapter
    method's step sits on (the forward, the activation gradients and the optimizer call), with
    torch's own kernels. ``towers = ("image",)``: the image tower only, the floor of strategies
    that leave the text tower frozen (its features are then cached, as theirs are)."""

    graph_safe = True
    graphs_span_experiences = True
    towers: ClassVar[tuple[str, ...]] = ("image", "text")

    def __init__(self, cfg: Any, backbone: Backbone, head: Head, ctx: StrategyContext) -> None:
        super().__init__(cfg, backbone, head, ctx)
        wanted = {"image": "visual.positional_embedding", "text": "positional_embedding"}
        names = {wanted[t] for t in self.towers}
        found = set()
        for name, param in self.backbone.model.named_parameters():
            param.requires_grad_(name in names)
            found.update({name} & names)
        if found != names:
            raise ValueError(f"{backbone.name} has no {sorted(names - found)} (not an open_clip CLIP?)")


class ImageTowerLimit(AdapterFreeLimit):
    """:class:`AdapterFreeLimit` on the image tower alone."""

    towers: ClassVar[tuple[str, ...]] = ("image",)


LIMITS: dict[str, type[Strategy]] = {"limit": AdapterFreeLimit, "limit (image tower)": ImageTowerLimit}


# ----------------------------------------------------------------------------- helpers


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _reset_peak(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)


def _peak(device: torch.device, resident: int = 0) -> int | None:
    """Peak bytes since the last reset, less ``resident`` (a live reference's bytes)."""
    return int(torch.cuda.max_memory_allocated(device)) - resident if device.type == "cuda" else None


def _window(fn: Callable[[], None], n_items: int, s: Setting, device: torch.device) -> float:
    """Items/s of one window of ``s.steps`` calls."""
    _sync(device)
    tic = time.perf_counter()
    for _ in range(s.steps):
        fn()
    _sync(device)
    return s.steps * n_items / (time.perf_counter() - tic)


def _rate(fn: Callable[[], None], n_items: int, s: Setting, device: torch.device) -> float:
    """Median items/s over ``s.windows`` windows of ``s.steps`` calls (after the caller's warm-up)."""
    return statistics.median(_window(fn, n_items, s, device) for _ in range(s.windows))


def _paired_rate(
    fn: Callable[[], None], reference: Callable[[], None], n_items: int, s: Setting, device: torch.device
) -> tuple[float, float]:
    """Median items/s of ``fn`` and of ``reference`` over ``s.windows`` windows each, alternating
    (reference, fn, reference, fn, ...): both are measured over the same minutes, so a drift of the
    GPU's speed over the run (a few percent on an H200) does not enter their ratio."""
    ours, theirs = [], []
    for _ in range(s.windows):
        theirs.append(_window(reference, n_items, s, device))
        ours.append(_window(fn, n_items, s, device))
    return statistics.median(ours), statistics.median(theirs)


@dataclass
class Reference:
    """``lora``'s training step in the default mode, kept alive while the strategy rows run: each
    row alternates its timed windows with windows of this step (:func:`_paired_rate`), and its
    ``vs lora`` ratio is taken against the lora windows of the same minutes."""

    strategy: Strategy
    step: Callable[[], None]
    runner: Any
    mode: str
    resident: int  # bytes it holds between steps, subtracted from the peaks measured meanwhile

    def release(self) -> None:
        if self.runner is not None:
            self.runner.release()
        self.strategy = self.step = self.runner = None  # type: ignore[assignment]


def make_reference(s: Setting) -> Reference:
    """A warmed-up ``lora`` step (graphs on CUDA, as ``cl-bench run``; eager on the CPU)."""
    device = torch.device(s.device)
    strategy = build("lora", s)
    info, optimizer, x, y = prepare_training(strategy, s, 1)
    step, runner = step_function(strategy, optimizer, x, y, info, s, graphs=True)
    warm_up(step, runner, s, s.warmup)
    _sync(device)
    resident = int(torch.cuda.memory_allocated(device)) if device.type == "cuda" else 0
    return Reference(strategy, step, runner, "graphs" if runner is not None else "eager", resident)


def _info(
    index: int, classes: list[int], n_classes: int, device: torch.device, training: bool
) -> ExperienceInfo:
    logit = classes if training else list(range(n_classes))
    return ExperienceInfo(
        index=index,
        classes=tuple(classes),
        seen_classes=tuple(range(classes[-1] + 1)),
        logit_classes=torch.tensor(logit, device=device),
        task_label=0,
        n_samples=5000,
        n_steps=1000,
        training=training,
    )


def _experience_classes(index: int, s: Setting) -> list[int]:
    per = s.n_classes // s.n_experiences
    return list(range(index * per, (index + 1) * per))


def build(
    name: str, s: Setting, args: dict[str, Any] | None = None, cls: type[Strategy] | None = None
) -> Strategy:
    """A fresh backbone (random weights) with the named strategy on the device."""
    device = torch.device(s.device)
    torch.manual_seed(0)
    backbone = BACKBONES.get(s.backbone)().build()
    head = make_head(backbone, [f"class {i}" for i in range(s.n_classes)])
    strategy_cls = cls or STRATEGIES.get(name)
    cfg = config.build(strategy_cls.Config, args or {}, name)
    ctx = StrategyContext(
        device=device,
        precision=s.precision,
        seed=0,
        n_experiences=s.n_experiences,
        n_classes=s.n_classes,
        steps_per_experience=(1000,) * s.n_experiences,
        batch_size=s.batch,
    )
    strategy = strategy_cls(cfg, backbone, head, ctx)
    loop.place(strategy, device, s.precision)
    return strategy


def _inputs(
    s: Setting, batch: int, image_size: int, device: torch.device
) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator(device=device).manual_seed(0)
    x = torch.randn(batch, 3, image_size, image_size, device=device, generator=g)
    y = torch.randint(0, s.n_classes // s.n_experiences, (batch,), device=device, generator=g)
    return x, y


GRAPH_WARMUP_LIMIT = 200  # steps: a strategy with several graph keys warms up until each one replays


def measure(
    strategy: Strategy,
    s: Setting,
    *,
    experiences: int = 1,
    compile_towers: bool = False,
    modes: tuple[str, ...] = ("graphs", "eager"),
    reference: Reference | None = None,
) -> dict[str, Row]:
    """Train-step throughput and peak memory of ``strategy`` in each mode, then its eval throughput.

    ``graphs``: the step as ``cl-bench run`` takes it on CUDA (``cuda_graphs = true``): forward and
    backward replayed from CUDA graphs where the strategy allows it (warmed up until every key it
    uses has been captured, so captures are not timed); ``eager``: every kernel launched from
    Python. The peak is measured from before the warm-up: a graph's capture allocates its
    activations there, once. Both modes continue training the same model and optimizer. With a
    ``reference``, the mode it runs in alternates its windows with the reference's
    (``extra["lora_interleaved_samples_per_s"]``), and every peak leaves out the reference's bytes.
    """
    resident = reference.resident if reference is not None else 0
    device = torch.device(s.device)
    info, optimizer, x, y = prepare_training(strategy, s, experiences)
    if compile_towers:
        strategy.backbone.compile_towers()  # after the experience boundaries: MoRA grows its banks there
    counter = iter(range(10**9))
    rows: dict[str, Row] = {}
    for mode in modes:
        graphs = mode == "graphs" and strategy.graph_key() is not None and device.type == "cuda"
        if mode == "graphs" and not graphs:
            if "eager" in modes:
                continue
            mode = "eager"  # not graph-safe: its default path is the eager one
        step, runner = step_function(strategy, optimizer, x, y, info, s, graphs=graphs, counter=counter)
        _reset_peak(device)
        warm_up(step, runner, s, s.warmup * (3 if compile_towers else 1))
        paired = reference is not None and reference.mode == ("graphs" if graphs else "eager")
        if paired:
            assert reference is not None
            train, lora = _paired_rate(step, reference.step, s.batch, s, device)
        else:
            train = _rate(step, s.batch, s, device)
        row = Row(
            strategy.__class__.__name__,
            train,
            peak_train_bytes=_peak(device, resident),
            mode=("compiled+" if compile_towers else "") + ("graphs" if graphs else "eager"),
        )
        if paired:
            row.extra["lora_interleaved_samples_per_s"] = lora
        if runner is not None:
            row.extra.update(graphs_captured=runner.n_captured, eager_steps=runner.n_eager)
            runner.release()  # its graphs and memory pool (the step closure still references it)
        rows[mode] = row
        optimizer.zero_grad(set_to_none=True)
        gc.collect()
        if device.type == "cuda":
            torch.cuda.empty_cache()
    optimizer.state.clear()  # free the moments before the eval measurement
    eval_rate, eval_peak = measure_eval(strategy, s, resident)
    for row in rows.values():
        row.eval_samples_per_s, row.peak_eval_bytes = eval_rate, eval_peak
    return rows


def prepare_training(
    strategy: Strategy, s: Setting, experiences: int
) -> tuple[ExperienceInfo, torch.optim.Optimizer, torch.Tensor, torch.Tensor]:
    """Train mode after ``experiences`` experience boundaries: the last experience's info, a fresh
    optimizer and one batch of inputs with labels among that experience's classes."""
    device = torch.device(s.device)
    strategy.train()
    for index in range(experiences):
        info = _info(index, _experience_classes(index, s), s.n_classes, device, training=True)
        strategy.before_experience(info)
    strategy.head.invalidate()
    optimizer = strategy.make_optimizer(s.lr, 0.0)
    x, y = _inputs(s, s.batch, strategy.backbone.image_size, device)
    return info, optimizer, x, y + info.classes[0]


def step_function(
    strategy: Strategy,
    optimizer: torch.optim.Optimizer,
    x: torch.Tensor,
    y: torch.Tensor,
    info: ExperienceInfo,
    s: Setting,
    *,
    graphs: bool,
    counter: Iterator[int] | None = None,
) -> tuple[Callable[[], None], loop.StepGraphs | None]:
    """One call of the loop's own step (every hook included) on the fixed batch, and its graph
    runner: with ``graphs``, where the strategy allows them on CUDA (``cl-bench run``'s default)."""
    device = torch.device(s.device)
    runner = (
        loop.step_graphs(strategy, info, device=device, precision=s.precision)
        if graphs and strategy.graph_key() is not None
        else None
    )
    steps = iter(range(10**9)) if counter is None else counter

    def step() -> None:
        loop.train_step(
            strategy, optimizer, None, x, y, info, next(steps),
            device=device, precision=s.precision, graphs=runner,
        )  # fmt: skip

    return step, runner


def warm_up(step: Callable[[], None], runner: Any, s: Setting, n: int) -> None:
    """``n`` steps, then with a graph runner more, until the last ``s.warmup`` steps all replayed
    a captured graph (a strategy with several keys warms up each one), so captures are not timed."""
    for _ in range(n):
        step()
    if runner is None:
        return
    for _ in range(GRAPH_WARMUP_LIMIT):
        replays = runner.n_replays
        for _ in range(s.warmup):
            step()
        if runner.n_replays - replays == s.warmup:
            return


def eval_forward(strategy: Strategy, s: Setting) -> Callable[[], None]:
    """The evaluation forward of ``strategy`` on one batch of ``s.eval_batch`` (inference mode)."""
    device = torch.device(s.device)
    strategy.eval()
    strategy.head.invalidate()
    info = _info(0, _experience_classes(0, s), s.n_classes, device, training=False)
    x, _ = _inputs(s, s.eval_batch, strategy.backbone.image_size, device)

    @torch.inference_mode()
    def forward() -> None:
        with autocast(device, s.precision):
            strategy.forward(x, info)

    return forward


def measure_eval(strategy: Strategy, s: Setting, resident: int = 0) -> tuple[float, int | None]:
    """Eval samples/s and peak bytes (less ``resident``: a live reference's) of ``strategy``."""
    device = torch.device(s.device)
    forward = eval_forward(strategy, s)
    for _ in range(max(2, s.warmup // 2)):
        forward()
    _reset_peak(device)
    rate = _rate(forward, s.eval_batch, s, device)
    return rate, _peak(device, resident)


def measure_forward_only(s: Setting, *, compile_towers: bool = False) -> Row:
    """The image tower alone, batch ``s.batch``, under inference mode: the ceiling of a forward."""
    device = torch.device(s.device)
    torch.manual_seed(0)
    backbone = BACKBONES.get(s.backbone)().build().to(device).eval()
    if compile_towers:
        backbone.compile_towers()
    x, _ = _inputs(s, s.batch, backbone.image_size, device)

    @torch.inference_mode()
    def forward() -> None:
        with autocast(device, s.precision):
            backbone.encode_image(x)

    for _ in range(s.warmup * (3 if compile_towers else 1)):
        forward()
    _reset_peak(device)
    return Row(
        "forward-only" + (" (compiled)" if compile_towers else ""),
        eval_samples_per_s=_rate(forward, s.batch, s, device),
        peak_eval_bytes=_peak(device),
        note="image tower, inference mode, no training",
    )


def half_pruned_loraprune(s: Setting) -> Strategy:
    """LoRAPrune with exactly 50% of heads and MLP channels masked, masks merged into dense weights
    (``strategy.slice()`` then removes them physically)."""
    strategy = build("loraprune", s)
    for group in strategy.groups:  # type: ignore[attr-defined]
        group.prune_to(0.5)
    strategy.merge()  # type: ignore[attr-defined]
    return strategy


def measure_sliced(s: Setting) -> list[Row]:
    """LoRAPrune at exactly 50% of heads and MLP channels: dense (merged) vs physically sliced eval."""
    strategy = half_pruned_loraprune(s)
    dense, dense_peak = measure_eval(strategy, s)
    strategy.slice()  # type: ignore[attr-defined]
    sliced, sliced_peak = measure_eval(strategy, s)
    sparsity = strategy.report()["sparsity"]
    return [
        Row(
            "loraprune dense (merged)",
            eval_samples_per_s=dense,
            peak_eval_bytes=dense_peak,
            note="masks at 50% folded into dense weights",
        ),
        Row(
            "loraprune sliced 50%",
            eval_samples_per_s=sliced,
            peak_eval_bytes=sliced_peak,
            note=f"sliced/dense eval = {sliced / dense:.2f}x; weight sparsity {sparsity:.2f}",
            extra={"speedup_vs_dense": sliced / dense, "sparsity": sparsity},
        ),
    ]


def measure_end_to_end(s: Setting, workdir: Path, *, quick: bool) -> Row:
    """``cl-bench run --strategy lora --scenario split-cifar100`` on generated CIFAR-100-format files."""
    from scenarios.cifar_files import write_cifar

    n_train, n_test = (500, 100) if quick else (50_000, 10_000)
    tic = time.perf_counter()
    write_cifar(workdir / "cifar", "cifar100", n_train=n_train, n_test=n_test)
    written = time.perf_counter() - tic
    cfg = config.resolve(
        [
            {
                "strategy": "lora",
                "scenario": {
                    "name": "split-cifar100",
                    "root": str(workdir / "cifar"),
                    "verify_checksums": False,
                },
                "backbone": s.backbone,
                "batch_size": s.batch,
                "eval_batch_size": 1024 if not quick else 64,
                "epochs": 1,
                "device": s.device,
                "precision": s.precision if s.device == "cuda" else "fp32",
                "train_classes": "current",
                "log_every": 50,
                "out": str(workdir / "runs"),
                "run_id": "e2e",
            }
        ]
    )
    tic = time.perf_counter()
    record = loop.run(cfg, progress=False)
    wall = time.perf_counter() - tic
    train_samples = sum(e.n_train for e in record.experiences)
    train_time = record.timing["train_s"]
    steady = [e.train_samples_per_s for e in record.experiences[1:]] or [
        record.experiences[0].train_samples_per_s
    ]
    return Row(
        "e2e lora split-cifar100",
        train_samples_per_s=train_samples / train_time,
        eval_samples_per_s=sum(e.eval_samples_per_s for e in record.experiences) / len(record.experiences),
        peak_train_bytes=int(record.timing["peak_memory_train_bytes"]) if s.device == "cuda" else None,
        note=f"wall {wall:.1f}s for {record.scenario['n_experiences']} experiences ({n_train} train images, "
        f"{len(record.accuracy['matrix']) + 1} evaluations of {n_test}); data written in {written:.1f}s",
        extra={
            "wall_s": wall,
            "train_s": train_time,
            "eval_s": record.timing["eval_s"],
            "setup_s": record.timing["setup_s"],
            "steady_train_samples_per_s": statistics.median(steady),
            "per_experience_train_samples_per_s": [e.train_samples_per_s for e in record.experiences],
        },
    )


@contextlib.contextmanager
def _guard(rows: list[Row], name: str) -> Iterator[None]:
    """Record an error for one row and go on with the others (device time is scarce)."""
    try:
        yield
    except Exception as err:  # a broken row must not cost the rest of the table
        traceback.print_exc()
        rows.append(Row(name, error=f"{type(err).__name__}: {err}"))
    finally:
        gc.collect()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()


# ----------------------------------------------------------------------------- the run


RowSpec = tuple[str, str, dict[str, Any], int]  # (row name, strategy, args, experiences before timing)
# The rows that differ from a registered training strategy's default one (named as registered,
# timed after one experience), by strategy; every other strategy gets its default row.
SPECIAL_ROWS: dict[str, tuple[RowSpec, ...]] = {
    "mora": (("mora (1 exp, 16 ranks)", "mora", {}, 1), ("mora (10 exps, 160 ranks)", "mora", {}, 10)),
}


def strategy_rows() -> list[RowSpec]:
    """A row per registered strategy that trains (``Strategy.trains``), ``SPECIAL_ROWS`` where they
    are declared: ``lora`` first (the reference of the others), then in registry order."""
    names = [entry.name for entry in STRATEGIES if entry.obj.trains]
    names.sort(key=lambda name: name != "lora")
    return [row for name in names for row in SPECIAL_ROWS.get(name, ((name, name, {}, 1),))]


EAGER_REFERENCES = {"peft-lora", "lora", "finetune"}  # measured eagerly too even without --eager-rows
# The same rows with ``--set compile=true`` (skipped by --quick: inductor needs minutes on a CPU).
COMPILED_ROWS: tuple[RowSpec, ...] = (
    ("lora (compiled)", "lora", {}, 1),
    ("mora (10 exps, compiled)", "mora", {}, 10),
)


def _named(rows: dict[str, Row], name: str, strategy: str, note: str = "") -> list[Row]:
    """Name the rows of one strategy: ``name`` for ``cl-bench run``'s default path (graphs on CUDA
    where the strategy is graph-safe), ``name (eager)`` for the eager step beside it."""
    out = []
    for mode, row in rows.items():
        both = "graphs" in rows and "eager" in rows
        row.name = f"{name} (eager)" if both and mode == "eager" else name
        row.strategy, row.note = strategy, note
        out.append(row)
    return out


def run(s: Setting, *, quick: bool = False, only: set[str] | None = None) -> list[Row]:
    rows: list[Row] = []

    def wanted(name: str) -> bool:
        return only is None or name in only

    modes = ("eager",) if s.device != "cuda" else ("graphs", "eager")

    def modes_of(name: str) -> tuple[str, ...]:
        return modes if s.eager_rows or name in EAGER_REFERENCES else modes[:1]

    def emit(new: list[Row]) -> None:
        for r in new:  # as it goes: a run cut short still shows what it measured
            train = f"{r.train_samples_per_s:,.0f}" if r.train_samples_per_s else "-"
            peak = f"{r.peak_train_bytes / GiB:.2f}" if r.peak_train_bytes else "-"
            what = r.error or r.note
            mode = r.mode or "-"
            lora = r.extra.get("lora_interleaved_samples_per_s")
            versus = f" ({r.train_samples_per_s / lora:.3f}x interleaved lora)" if lora else ""
            print(f"[row] {r.name} | {mode} | train/s {train}{versus} | peak GiB {peak} | {what}", flush=True)

    if wanted("forward-only"):
        with _guard(rows, "forward-only"):
            rows.append(measure_forward_only(s))
        emit(rows[-1:])
    rows_of_strategies = strategy_rows()
    reference: Reference | None = None
    if "lora" in STRATEGIES and (wanted("peft-lora") or any(wanted(r[0]) for r in rows_of_strategies)):
        with _guard(rows, "lora (interleaved reference)"):
            reference = make_reference(s)
    if wanted("peft-lora"):
        before = len(rows)
        with _guard(rows, "peft-lora"):
            measured = measure(build("peft-lora", s, cls=PeftLoRA), s, modes=modes, reference=reference)
            rows.extend(_named(measured, "peft-lora", "peft-lora", "HF peft LoRA r=8 on the same layers"))
        emit(rows[before:])
    for name, cls in LIMITS.items():
        if not wanted(name):
            continue
        before = len(rows)
        with _guard(rows, name):
            measured = measure(build("lora", s, cls=cls), s, modes=modes, reference=reference)
            rows.extend(_named(measured, name, name, cls.__doc__.splitlines()[0] if cls.__doc__ else ""))
        emit(rows[before:])
    for name, strategy, args, experiences in rows_of_strategies:
        if not wanted(name):
            continue
        before = len(rows)
        with _guard(rows, name):
            measured = measure(
                build(strategy, s, args),
                s,
                experiences=experiences,
                modes=modes_of(name),
                reference=reference,
            )
            rows.extend(_named(measured, name, strategy))
        emit(rows[before:])
    if reference is not None:
        reference.release()
        del reference
        gc.collect()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
    if wanted("lora (repeat)") and "lora" in STRATEGIES:
        with _guard(rows, "lora (repeat)"):
            rows.append(_repeat_of_lora(rows, measure(build("lora", s), s, modes=modes[:1])))
        emit(rows[-1:])
    for name, strategy, args, experiences in COMPILED_ROWS:
        if quick or not wanted(name) or strategy not in STRATEGIES:
            continue
        before = len(rows)
        with _guard(rows, name):
            measured = measure(
                build(strategy, s, args), s, experiences=experiences, compile_towers=True, modes=("graphs",)
            )
            rows.extend(
                _named(measured, name, strategy, "--set compile=true: every block under torch.compile")
            )
        emit(rows[before:])
    if wanted("forward-only (compiled)") and not quick:
        with _guard(rows, "forward-only (compiled)"):
            rows.append(measure_forward_only(s, compile_towers=True))
    if wanted("e2e"):
        with _guard(rows, "e2e lora split-cifar100"), tempfile.TemporaryDirectory() as tmp:
            rows.append(measure_end_to_end(s, Path(tmp), quick=quick))
        emit(rows[-1:])
    if wanted("loraprune sliced 50%"):
        with _guard(rows, "loraprune sliced 50%"):
            rows.extend(measure_sliced(s))
        emit(rows[-2:])
    _note_lisa_memory(rows)
    return rows


def _repeat_of_lora(rows: list[Row], measured: dict[str, Row]) -> Row:
    """lora measured again after the other strategies: the rows run one after another for minutes,
    and a GPU's clock can drift meanwhile; this row shows by how much the reference moved."""
    row = next(iter(measured.values()))
    row.name, row.strategy = "lora (repeat)", "lora-repeat"
    first = next((r for r in rows if r.strategy == "lora" and r.mode == row.mode and not r.error), None)
    if first and first.train_samples_per_s and row.train_samples_per_s:
        drift = row.train_samples_per_s / first.train_samples_per_s
        row.note = f"the lora row measured again after the strategies: {drift:.3f}x the first"
        row.extra["drift_vs_first"] = drift
    return row


def _note_lisa_memory(rows: list[Row]) -> None:
    """LISA's targets (issue 21): its rate and its peak next to full fine-tuning's in the same mode
    (at least finetune's rate, at most half its peak memory)."""
    for lisa in (r for r in rows if r.strategy == "lisa" and not r.error):
        finetune = next(
            (r for r in rows if r.strategy == "finetune" and r.mode == lisa.mode and not r.error), None
        )
        if finetune and finetune.peak_train_bytes and lisa.peak_train_bytes:
            share = lisa.peak_train_bytes / finetune.peak_train_bytes
            rate = (lisa.train_samples_per_s or 0.0) / (finetune.train_samples_per_s or math.inf)
            lisa.note = (
                f"{rate:.2f}x finetune's rate, peak train memory {share:.2f}x finetune's ({lisa.mode})"
            )


def table(rows: list[Row]) -> str:
    """The printed table: throughput, ratios to lora and to peft in the same mode, memory, notes.

    ``vs peft eager`` compares with HF peft as people run it (an eager loop); ``vs lora``,
    ``vs limit`` (the adapter-free limit of both towers, :class:`AdapterFreeLimit`) and
    ``vs peft`` compare with the same mode (graphs with graphs, eager with eager). A row measured
    in windows interleaved with lora's (``lora_interleaved_samples_per_s``) takes its train
    ``vs lora`` against those lora windows, the same minutes; the lora row itself then shows the
    measurement's noise (its ratio to its own interleaved twin).
    """
    reference = {(r.strategy, r.mode): r for r in rows if not r.error}

    def same_mode(r: Row, strategy: str) -> Row | None:
        return reference.get((strategy, r.mode)) if r.mode else reference.get((strategy, "graphs"))

    def ratio(value: float | None, ref: Row | None, attr: str, base: float | None = None) -> str:
        """``value`` over ``base``, or over ``ref``'s ``attr`` when no base is given."""
        base = base or (getattr(ref, attr) if ref else None)
        return f"{value / base:.2f}x" if value and base else "-"

    def num(value: float | None) -> str:
        return f"{value:,.0f}" if value else "-"

    def gib(value: int | None) -> str:
        return f"{value / GiB:.2f}" if value else "-"

    header = (
        "row",
        "mode",
        "train/s",
        "vs lora",
        "vs limit",
        "vs peft",
        "vs peft eager",
        "eval/s",
        "eval vs lora",
        "peak train GiB",
        "vs lora",
        "peak eval GiB",
        "note",
    )
    lines = [header]
    peft_eager = reference.get(("peft-lora", "eager"))
    for r in rows:
        if r.error:
            lines.append((r.name, r.mode, "ERROR", "", "", "", "", "", "", "", "", "", r.error[:80]))
            continue
        lora, peft, limit = same_mode(r, "lora"), same_mode(r, "peft-lora"), same_mode(r, "limit")
        # against the lora windows interleaved with this row's, where it has them (the same minutes)
        interleaved = r.extra.get("lora_interleaved_samples_per_s")
        lines.append(
            (
                r.name,
                r.mode or "-",
                num(r.train_samples_per_s),
                ratio(r.train_samples_per_s, lora, "train_samples_per_s", interleaved),
                ratio(r.train_samples_per_s, limit, "train_samples_per_s"),
                ratio(r.train_samples_per_s, peft, "train_samples_per_s"),
                ratio(r.train_samples_per_s, peft_eager, "train_samples_per_s"),
                num(r.eval_samples_per_s),
                ratio(r.eval_samples_per_s, lora, "eval_samples_per_s"),
                gib(r.peak_train_bytes),
                ratio(r.peak_train_bytes, lora, "peak_train_bytes"),
                gib(r.peak_eval_bytes),
                r.note,
            )
        )
    widths = [max(len(str(line[i])) for line in lines) for i in range(len(header) - 1)]
    return "\n".join(
        "  ".join(str(cell).ljust(w) for cell, w in zip(line[:-1], widths, strict=True))
        + "  "
        + str(line[-1])
        for line in lines
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="cl-bench bench", description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="bench.json", help="JSON file for the table (default bench.json)")
    parser.add_argument("--quick", action="store_true", help="tiny CLIP on the CPU: exercises the code only")
    parser.add_argument("--only", nargs="*", help="row names to run (default: all)")
    parser.add_argument("--steps", type=int, help="timed steps per window")
    parser.add_argument(
        "--no-eager-rows",
        action="store_true",
        help="measure eager steps only for the references (peft-lora, lora, finetune): a shorter run",
    )
    args = parser.parse_args(argv)
    if args.quick:
        s = Setting(
            backbone="tiny-clip",
            batch=8,
            eval_batch=16,
            warmup=1,
            steps=2,
            windows=1,
            device="cpu",
            precision="fp32",
        )
    else:
        if not torch.cuda.is_available():
            print(
                "error: the speed benchmark needs a CUDA device (use --quick to exercise it on CPU)",
                file=sys.stderr,
            )
            return 2
        s = Setting()
    if args.steps:
        s = Setting(**{**s.__dict__, "steps": args.steps})
    if args.no_eager_rows:
        s = Setting(**{**s.__dict__, "eager_rows": False})
    torch.backends.cuda.matmul.allow_tf32 = True
    started = time.perf_counter()
    rows = run(s, quick=args.quick, only=set(args.only) if args.only else None)
    device_name = torch.cuda.get_device_name() if s.device == "cuda" else "cpu"
    payload = {
        "setting": s.__dict__,
        "device": device_name,
        "torch": torch.__version__,
        "seconds": time.perf_counter() - started,
        "rows": [r.__dict__ for r in rows],
    }
    Path(args.out).write_text(json.dumps(payload, indent=1))
    print(
        f"\n{device_name}, {s.backbone}, batch {s.batch} ({s.precision}), eval batch {s.eval_batch}; "
        f"adapted layers: {', '.join(ROLES)} of both towers\n"
    )
    print(table(rows))
    return 1 if any(r.error for r in rows) else 0


if __name__ == "__main__":
    from cl_bench.cli import load_components

    load_components()
    sys.exit(main())
