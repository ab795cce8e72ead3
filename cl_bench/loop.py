"""``run(cfg) -> RunResult``: the one explicit training loop of cl-bench.

Read top to bottom in :func:`run`: build the components, evaluate the untrained model (row b),
then for every experience train with the strategy's hooks and evaluate a full row of the
accuracy matrix (future experiences included). The run record is written when the run starts
(``running``) and when it ends (``ok``; ``failed`` or ``interrupted`` with the reason).
"""

from __future__ import annotations

import json
import logging
import math
import random
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field, replace
from datetime import datetime
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.profiler import record_function

from cl_bench import (
    checkpoint,
    cpu_time,
    interrupts,
    memory,
    metrics,
    results,
    resume,
    run_lock,
    threads,
    tracking,
)
from cl_bench import progress as progress_
from cl_bench.config import RunConfig, build, to_dict
from cl_bench.data import BatchCursor, ExperienceData, Preprocess, sample_ids
from cl_bench.errors import ClBenchError, ConfigError, DivergenceError, RecordWriteError, RunInterrupted
from cl_bench.evaluate import allowed_classes, autocast, n_correct, test_logits
from cl_bench.federation import rounds as federated
from cl_bench.federation.config import FederationConfig
from cl_bench.graphs import StepGraphs
from cl_bench.heads import make_head
from cl_bench.registry import BACKBONES, SCENARIOS, STRATEGIES
from cl_bench.results import ExperienceRecord, RunResult
from cl_bench.resume import Checkpointer, ExperienceProgress, Resumed
from cl_bench.scenario import Scenario
from cl_bench.strategy import ExperienceInfo, Strategy, StrategyContext, nothing

log = logging.getLogger("cl_bench")


@dataclass(frozen=True)
class Plan:
    """A validated, fully resolved run: component configs built, device and defaults decided."""

    cfg: RunConfig
    strategy_cls: type[Strategy]
    strategy_cfg: Any
    scenario_cfg: Any
    backbone_cfg: Any
    device: torch.device
    precision: str
    run_dir: Path
    lr: float
    weight_decay: float
    record_file: str = results.RESULT_FILE  # PARTIAL_FILE while an --overwrite run is unfinished
    federation: FederationConfig | None = None  # None: not federated (no [federation] table, K = 0)


def plan(cfg: RunConfig) -> Plan:
    """Resolve names, component configs, device and defaults; fails fast on any config error."""
    if not cfg.strategy:
        raise ConfigError(f"no strategy given; valid: {', '.join(STRATEGIES.names())}")
    if not cfg.scenario:
        raise ConfigError(f"no scenario given; valid: {', '.join(SCENARIOS.names())}")
    strategy_name = STRATEGIES.canonical(cfg.strategy)
    scenario_name = SCENARIOS.canonical(cfg.scenario)
    strategy_cls = STRATEGIES.get(strategy_name)
    strategy_cfg = build(strategy_cls.Config, cfg.strategy_args, f"strategy '{strategy_name}' config")
    scenario_cfg = build(
        SCENARIOS.get(scenario_name), cfg.scenario_args, f"scenario '{scenario_name}' config"
    )
    federation = build(FederationConfig, cfg.federation_args, "federation config")
    if federation.enabled and not strategy_cls.trains:
        raise ConfigError(
            f"strategy '{strategy_name}' trains nothing: there is nothing to federate "
            "(drop the [federation] table)"
        )
    backbone_name = BACKBONES.canonical(cfg.backbone or scenario_cfg.default_backbone)
    backbone_cfg = build(
        BACKBONES.get(backbone_name), cfg.backbone_args, f"backbone '{backbone_name}' config"
    )

    if cfg.device == "cuda" and not torch.cuda.is_available():
        raise ConfigError("device=cuda requested but no CUDA device is available")
    device = torch.device("cuda" if cfg.device in ("auto", "cuda") and torch.cuda.is_available() else "cpu")
    precision = cfg.precision if cfg.precision != "auto" else ("bf16" if device.type == "cuda" else "fp32")
    if federation.enabled:
        federation.check_for(device.type)
    lr = cfg.lr if cfg.lr is not None else strategy_cls.default_lr
    weight_decay = cfg.weight_decay if cfg.weight_decay is not None else strategy_cls.default_weight_decay
    resolved = replace(
        cfg,
        strategy=strategy_name,
        scenario=scenario_name,
        backbone=backbone_name,
        lr=lr,
        weight_decay=weight_decay,
        device="cuda" if device.type == "cuda" else "cpu",
        precision="bf16" if precision == "bf16" else "fp32",
        run_id=cfg.run_id or f"{datetime.now():%Y%m%d-%H%M%S}-{strategy_name}-{scenario_name}-s{cfg.seed}",
    )
    run_dir = Path(resolved.out) / resolved.run_id
    try:
        run_dir.parent.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise ConfigError(f"cannot use --out {resolved.out} as the runs directory: {err.strerror}") from None
    _refuse_completed(run_dir, cfg.overwrite)
    return Plan(
        resolved,
        strategy_cls,
        strategy_cfg,
        scenario_cfg,
        backbone_cfg,
        device,
        precision,
        run_dir,
        lr,
        weight_decay,
        federation=federation if federation.enabled else None,
    )


def _refuse_completed(run_dir: Path, overwrite: bool) -> str | None:
    """The status of the record already in ``run_dir``; a ConfigError if it is complete and
    ``overwrite`` is off."""
    status = results.existing_status(run_dir)
    if status == "ok" and not overwrite:
        raise ConfigError(f"{run_dir} already holds a completed run; pass --overwrite to replace it")
    return status


def claim(p: Plan, held: run_lock.Held) -> Plan:
    """Decide, holding the run's lock, where this run writes its record.

    The record's status is read again under the lock (a concurrent run may have completed since
    :func:`plan`). A ``running`` record whose owner is gone (the lock was free) is a dead run and
    is started over, saying whose it was; stale temporary files of killed writes are removed. An
    ``--overwrite`` of a completed record writes ``result.json.partial`` until the new run is
    ``ok``, so a new run that fails or is killed never loses the completed one.
    """
    status = _refuse_completed(p.run_dir, p.cfg.overwrite)
    if status == "running":
        log.warning(
            "%s: the previous run (%s) died without finishing; resuming it from its checkpoint, "
            "or starting it over if it left none",
            p.run_dir,
            run_lock.describe(held.previous_owner),
        )
    for tmp in results.remove_stale_temporaries(p.run_dir):
        log.info("removed %s, left by a killed write", tmp)
    return replace(p, record_file=results.PARTIAL_FILE if status == "ok" else results.RESULT_FILE)


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def run(cfg: RunConfig, *, progress: bool | progress_.Mode = True, handle_signals: bool = False) -> RunResult:
    """Train ``cfg.strategy`` through ``cfg.scenario`` and write ``<out>/<run_id>/result.json``.

    The data-flow of ARCHITECTURE.md, one named step each: plan, build the session, evaluate row b,
    train and evaluate every experience, finish the record. A run that fails before it started
    (unknown name, missing data, a backbone that does not load) leaves no record; once started, the
    record says ``running`` after every row and ``ok`` or ``failed`` (with the reason) at the end.
    ``progress``: True shows a bar on a terminal and plain lines otherwise; False nothing.
    A training run writes checkpoints (:mod:`cl_bench.resume`); a re-run of a run id that stopped
    continues from its last one, bit-identically on the CPU (``restart`` starts it over).
    One process writes a run at a time (:mod:`cl_bench.run_lock`). ``handle_signals`` (the CLI):
    SIGTERM and SIGHUP, like Ctrl-C, end the run ``interrupted`` (:mod:`cl_bench.interrupts`).
    """
    p = plan(cfg)
    tracking.check(p.cfg.log)
    mode = progress_.choose(progress)
    with (
        interrupts.raising(handle_signals),
        run_lock.hold(p.run_dir, results.utc_now()) as held,
        threads.using(p.cfg.threads),
    ):
        p = claim(p, held)
        session = build_session(p)
        write_scenario_files(session.scenario, p.run_dir)
        saved = resume.find(session, record_config(p))
        resumed = None
        if saved is None:
            record = start_record(session)
        else:
            record, resumed = resume.restore(session, saved)
        with recorded(record, p) as tracker:
            initial = None
            if resumed is None:
                initial = evaluate_row(session, -1, mode)
                record_initial_row(session, record, initial, tracker)
            train_all_experiences(session, record, initial, mode, tracker, resumed)
            finish_record(session, record, tracker)
        if not p.cfg.keep_checkpoints:
            checkpoint.remove(p.run_dir)
    return record


def write_scenario_files(scenario: Scenario, run_dir: Path) -> None:
    """The scenario's files beside the record (e.g. ``shots/<domain>.json``: the few-shot draw,
    replayable with ``scenario.shots_file``), each written atomically."""
    for name, content in scenario.files.items():
        results.write_bytes_atomic(run_dir / name, (json.dumps(content, indent=1) + "\n").encode())


@contextmanager
def recorded(record: RunResult, p: Plan) -> Iterator[tracking.Tracker]:
    """The started run's trackers (``cfg.log``); the record ends ``ok``, or ``failed`` (an error)
    or ``interrupted`` (a signal) with the reason of whatever escaped, saved either way, trackers
    closed with the same status. A record that cannot be saved any more (the disk is full) is
    logged and the original error is the one that propagates."""
    tracker = tracking.open_trackers(
        record.config["log"], run_dir=p.run_dir, run_id=record.run_id, config=record.config
    )
    try:
        yield tracker
    except BaseException as err:
        _end(record, p, tracker, err)
        raise
    record.status, record.finished = "ok", results.utc_now()
    try:
        results.save(record, p.run_dir, p.record_file)
        results.promote(p.run_dir, p.record_file)
    except RecordWriteError:
        tracker.close("failed")
        raise
    tracker.close("ok")


def _end(record: RunResult, p: Plan, tracker: tracking.Tracker, err: BaseException) -> None:
    """Save the record of a run that ``err`` stopped: ``interrupted`` or ``failed``, with why."""
    if isinstance(err, KeyboardInterrupt):
        interrupted = err if isinstance(err, RunInterrupted) else RunInterrupted("SIGINT", 130)
        record.status = "interrupted"
        record.failure = {"type": interrupted.signal_name, "reason": interrupted.reason}
    else:
        reason = str(err) if isinstance(err, ClBenchError) else f"{type(err).__name__}: {err}"
        record.status = "failed"
        record.failure = {"type": type(err).__name__, "reason": reason or type(err).__name__}
    record.finished = results.utc_now()
    try:
        path = results.save(record, p.run_dir, p.record_file)
    except RecordWriteError as save_err:
        log.error("%s (the record on disk still says running)", save_err)
    else:
        if p.record_file != results.RESULT_FILE:
            log.warning(
                "the completed run in %s is kept; this attempt's record, %s, is %s",
                p.run_dir / results.RESULT_FILE,
                record.status,
                path,
            )
    tracker.close(record.status)


def train_all_experiences(
    session: Session,
    record: RunResult,
    initial: Row | None,
    mode: progress_.Mode,
    tracker: tracking.Tracker,
    resumed: Resumed | None = None,
) -> None:
    """Train experience ``i`` and evaluate row ``i``, for every experience, recording each and
    checkpointing after each; a ``resumed`` run starts where its checkpoint was taken."""
    n = session.scenario.n_experiences
    first = resumed.experience if resumed is not None else 0
    bar = progress_.Phase(mode, total=sum(session.steps), desc="train", unit="step")
    bar.update(session.step)
    try:
        for i in range(first, n):
            saved = resumed.training if resumed is not None and i == first else None
            if session.federation is not None:
                info = training_info(session, i)
                trained = federated.train_experience(session, record, i, bar, tracker, info)
            else:
                trained = train_experience(session, record, i, bar, tracker, saved)
            row = evaluate_row(session, i, mode, cached=None if session.strategy.trains else initial)
            record_experience(session, record, trained, row, tracker)
            session.checkpointer.save(session, record, None, i + 1)
            bar.write(
                f"exp {i + 1}/{n}: acc on seen {record.accuracy['seen'][-1]:.3f}, "
                f"train {trained.seconds:.1f}s, eval {row.seconds:.1f}s"
            )
    finally:
        bar.close()
        session.release_graphs()
        if session.federation is not None and session.federation.backend is not None:
            session.federation.backend.close()


@dataclass
class Session:
    """Everything a run builds once (data on the device, the model) and the loop's running state."""

    plan: Plan
    scenario: Scenario
    backbone_info: dict[str, Any]  # of the backbone before any adapter
    head: Any
    strategy: Strategy
    preprocess: Preprocess
    generator: torch.Generator
    train_data: list[ExperienceData]
    test_data: list[ExperienceData]
    steps: tuple[int, ...]  # optimizer steps of each experience
    started: float  # perf_counter at the start of the build
    step: int = 0  # global optimizer step
    graphs: StepGraphs | None = None  # kept across experiences where valid (step_graphs)
    frozen_ids: frozenset[int] = frozenset()  # the backbone's own parameters (a checkpoint skips them)
    checkpointer: Checkpointer = field(default_factory=lambda: Checkpointer(Path(), 0, 0.0, False))
    elapsed_before: float = 0.0  # run seconds of earlier segments (a resumed run)
    logit_buffers: dict[int, torch.Tensor] = field(default_factory=dict)  # one per class count
    federation: federated.FederatedRun | None = None  # a federated run's partitions and backend

    @property
    def n_test(self) -> list[int]:
        return [len(d) for d in self.test_data]

    def info(self, index: int, logit_classes: torch.Tensor, training: bool) -> ExperienceInfo:
        """The :class:`ExperienceInfo` of experience ``index`` (train or test side)."""
        data = self.train_data[index] if training else self.test_data[index]
        return _info(
            index,
            self.scenario.classes_per_experience,
            logit_classes,
            len(data),
            self.steps[index] if training else 0,
            training,
            self.scenario,
        )

    def release_graphs(self) -> None:
        if self.graphs is not None:
            self.graphs.release()
            self.graphs = None


def gather_all(
    scenario: Scenario, device: torch.device, budget: int
) -> tuple[list[ExperienceData], list[ExperienceData]]:
    """Every train and test experience, copied to memory while the copies fit ``budget`` bytes
    together (``host_memory_gb``), streamed from the (memory-mapped) source after that: X-TAIL's
    test sets are 13.5 GB at 224 px, each domain alone well under the budget."""
    out: tuple[list[ExperienceData], list[ExperienceData]] = ([], [])
    for split, source, stream in (
        (out[0], scenario.train_source, scenario.train_stream),
        (out[1], scenario.test_source, scenario.test_stream),
    ):
        for experience in stream:
            data = ExperienceData.gather(source, sample_ids(experience), device, budget_bytes=budget)
            if isinstance(data.images, torch.Tensor):  # copied, not streamed
                budget -= data.images.numel() * data.images.element_size()
            split.append(data)
    return out


def build_session(p: Plan) -> Session:
    """Seed, then build scenario, backbone, head and strategy and put the data on the device.

    The order is part of the numbers: every random draw (class order, init, adapters) happens
    here in the same sequence on every run of the same config.
    """
    cfg, device, precision = p.cfg, p.device, p.precision
    started = time.perf_counter()
    seed_everything(cfg.seed)
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True

    scenario: Scenario = p.scenario_cfg.build(order_seed=cfg.order_seed)
    backbone = p.backbone_cfg.build()
    frozen_ids = frozenset(id(t) for t in backbone.parameters())
    if not backbone.pretrained:
        log.warning(
            "backbone '%s' has NO PRETRAINED WEIGHTS (random init): accuracies measure the "
            "method's mechanics, not its behaviour on a real CLIP",
            backbone.name,
        )
    head = make_head(
        backbone, scenario.class_names, prompts=scenario.prompts, train_prompts=scenario.train_prompts
    )
    train_data, test_data = gather_all(scenario, device, int(cfg.host_memory_gb * 2**30))
    steps = tuple(cfg.steps_per_experience or cfg.epochs * d.n_batches(cfg.batch_size) for d in train_data)
    federation = None
    if p.federation is not None:
        federation = federated.FederatedRun.build(
            p.federation, [d.targets for d in train_data], cfg.batch_size
        )
        steps = federation.experience_steps()
    ctx = StrategyContext(
        device=device,
        precision=precision,
        seed=cfg.seed,
        n_experiences=scenario.n_experiences,
        n_classes=scenario.n_classes,
        steps_per_experience=steps,
        batch_size=cfg.batch_size,
    )
    backbone_info = {**vars(backbone.info()), "n_classes": scenario.n_classes}
    cpu_time.warn_if_long(
        backbone,
        name=backbone.name,
        image_size=backbone.image_size,
        n_parameters=backbone_info["n_parameters"],
        device=device,
        eval_images=sum(len(d) for d in test_data) * (scenario.n_experiences + 1),
        train_images=sum(steps) * cfg.batch_size if p.strategy_cls.trains else 0,
    )
    strategy = p.strategy_cls(p.strategy_cfg, backbone, head, ctx)
    if p.federation is not None:
        strategy.check_aggregation(p.federation.aggregation)
    place(strategy, device, precision, compile_towers=cfg.compile)
    augment = scenario.augmentations if cfg.augment else ()
    preprocess = Preprocess(backbone.image_size, backbone.mean, backbone.std, device, augment)
    generator = torch.Generator(device=device).manual_seed(cfg.seed)
    return Session(
        p,
        scenario,
        backbone_info,
        head,
        strategy,
        preprocess,
        generator,
        train_data,
        test_data,
        steps,
        started,
        frozen_ids=frozen_ids,
        checkpointer=Checkpointer(
            p.run_dir, cfg.checkpoint_every, cfg.checkpoint_minutes, enabled=p.strategy_cls.trains
        ),
        federation=federation,
    )


def record_config(p: Plan) -> dict[str, Any]:
    """The ``config`` of the run's record: the run config and each component's, resolved."""
    return {
        **to_dict(p.cfg),
        "strategy_args": to_dict(p.strategy_cfg),
        "scenario_args": to_dict(p.scenario_cfg),
        "backbone_args": to_dict(p.backbone_cfg),
        "federation_args": to_dict(p.federation) if p.federation is not None else {},
    }


def start_record(session: Session) -> RunResult:
    """The ``running`` record of a run that has started, written to disk."""
    p = session.plan
    cfg = p.cfg
    record = RunResult(
        run_id=cfg.run_id,
        status="running",
        created=results.utc_now(),
        config=record_config(p),
        strategy={"name": cfg.strategy, "class": p.strategy_cls.__name__, "paper": p.strategy_cls.paper},
        scenario=session.scenario.describe(),
        backbone=session.backbone_info,
        environment=results.environment(p.device.type, _device_name(p.device), p.precision),
    )
    if session.federation is not None:
        federated.start_record(session, record)
    results.save(record, p.run_dir, p.record_file)
    return record


@dataclass(frozen=True)
class Row:
    """One evaluated row of the accuracy matrix: correct counts per test experience."""

    index: int  # -1: row b, before training
    correct: list[int]
    logits: list[torch.Tensor]
    seconds: float
    peak_bytes: int


def experience_logits(
    session: Session, j: int, on_batch: Callable[[int], None] | None = None
) -> torch.Tensor:
    """Logits over every class of test experience ``j`` (the strategy already in eval mode)."""
    all_classes = torch.arange(session.scenario.n_classes, device=session.plan.device)
    return test_logits(
        session.strategy,
        session.test_data[j],
        session.info(j, all_classes, training=False),
        session.preprocess,
        session.plan.cfg.eval_batch_size,
        session.plan.precision,
        on_batch=on_batch,
    )


def cell_correct(session: Session, row: int, j: int, logits: torch.Tensor) -> int:
    """Correct predictions among test experience ``j``'s ``logits`` in row ``row``'s label space."""
    scenario = session.scenario
    allowed = allowed_classes(
        scenario.n_classes,
        scenario.classes_per_experience,
        row,
        j,
        label_space=session.plan.cfg.label_space,
        protocol=scenario.protocol,
        device=session.plan.device,
    )
    return n_correct(logits, session.test_data[j].targets, allowed)


def evaluate_row(session: Session, row: int, mode: progress_.Mode = "off", cached: Row | None = None) -> Row:
    """Row ``row`` of the accuracy matrix (-1: row b): every test experience, future ones included.

    ``cached``: a row whose logits are reused (a strategy that never trains has one model).
    """
    device, scenario = session.plan.device, session.scenario
    session.strategy.eval()
    session.head.invalidate()
    memory.reset_peak(device)
    tic = time.perf_counter()
    if cached is not None:
        logits = cached.logits
    else:
        desc = "eval before training" if row < 0 else f"eval after exp {row + 1}/{scenario.n_experiences}"
        shown = progress_.Phase(mode, total=sum(session.n_test), desc=desc, unit="image", leave=False)
        try:
            logits = [
                experience_logits(session, j, on_batch=shown.update) for j in range(len(session.test_data))
            ]
        finally:
            shown.close()
        if bool(torch.stack([(t.isnan() | t.isposinf()).any() for t in logits]).any()):
            after = "before training" if row < 0 else f"after experience {row}"
            raise DivergenceError(
                f"non-finite logits (NaN or +inf) in the evaluation {after}: the weights diverged; "
                "lower lr, enable max_grad_norm, or use precision=fp32"
            )
    correct = [cell_correct(session, row, j, logits[j]) for j in range(len(session.test_data))]
    return Row(row, correct, logits, time.perf_counter() - tic, memory.peak_bytes(device))


def record_initial_row(session: Session, record: RunResult, initial: Row, tracker: tracking.Tracker) -> None:
    """Row b and the setup time into the record (saved: a reader sees the run has started)."""
    cfg, n_test = session.plan.cfg, session.n_test
    record.accuracy = {
        "label_space": cfg.label_space,
        "protocol": session.scenario.protocol,
        "n_test": n_test,
        "initial": [c / n for c, n in zip(initial.correct, n_test, strict=True)],
        "initial_correct": initial.correct,
        "matrix": [],
        "correct": [],
        "seen": [],
    }
    record.timing = {
        "setup_s": time.perf_counter() - session.started - initial.seconds,
        "initial_eval_s": initial.seconds,
    }
    results.save(record, session.plan.run_dir, session.plan.record_file)
    tracker.log_row(-1, record.accuracy["initial"], None, 0)


@dataclass(frozen=True)
class TrainedExperience:
    """What training one experience left behind for its record."""

    index: int
    losses: list[float]  # mean loss of each window of log_every steps
    seconds: float
    peak_bytes: int


def training_info(session: Session, i: int) -> ExperienceInfo:
    """The :class:`ExperienceInfo` experience ``i`` trains with: its logit classes are the current
    experience's (``train_classes = "current"`` or the task protocol) or every class seen so far."""
    scenario = session.scenario
    per_exp = scenario.classes_per_experience
    train_classes = (
        per_exp[i]
        if (session.plan.cfg.train_classes == "current" or scenario.protocol == "task")
        else [c for exp in per_exp[: i + 1] for c in exp]
    )
    classes = static_classes(session.logit_buffers, sorted(train_classes), session.plan.device)
    return session.info(i, classes, training=True)


def train_experience(
    session: Session,
    record: RunResult,
    i: int,
    bar: progress_.Phase,
    tracker: tracking.Tracker,
    saved: dict[str, Any] | None = None,
) -> TrainedExperience:
    """The strategy's hooks around ``steps[i]`` optimizer steps on experience ``i``.

    Checkpoints are written after the steps :meth:`Checkpointer.due` names and after the step in
    which SIGTERM/SIGINT arrived (then the signal is raised: :mod:`cl_bench.interrupts`).
    ``saved``: the progress of a checkpoint taken inside this experience, continued from (its
    ``before_experience`` already ran before the checkpoint).
    """
    p, strategy, scenario = session.plan, session.strategy, session.scenario
    cfg, device, precision = p.cfg, p.device, p.precision
    info = training_info(session, i)
    bar.describe(f"exp {i + 1}/{scenario.n_experiences}")
    memory.reset_peak(device)
    tic = time.perf_counter()
    if not strategy.trains:
        return TrainedExperience(i, [], time.perf_counter() - tic, memory.peak_bytes(device))
    strategy.train()
    if saved is None:
        strategy.before_experience(info)
    session.head.invalidate()
    optimizer = strategy.make_optimizer(p.lr, p.weight_decay)
    progress = ExperienceProgress(
        i,
        optimizer,
        make_scheduler(optimizer, cfg, session.steps[i]),
        BatchCursor(session.train_data[i].images.device),
        torch.zeros((), device=device),
        session.step,
        started=tic,
    )
    if saved is not None:
        strategy.load_optimizer_state(saved["strategy"])
        resume.load_progress(progress, saved, device)
    if cfg.cuda_graphs:
        session.graphs = step_graphs(
            strategy, info, device=device, precision=precision, previous=session.graphs
        )
    last_step = sum(session.steps[: i + 1])
    window_tic = time.perf_counter()
    batches = session.train_data[i].batches(
        cfg.batch_size,
        shuffle=True,
        generator=session.generator,
        n_steps=session.steps[i],
        cursor=progress.cursor,
    )
    with interrupts.deferred():
        for x, y in batches:
            images = session.preprocess(x, train=True, generator=session.generator)
            loss = train_step(
                strategy,
                optimizer,
                progress.scheduler,
                images,
                y,
                info,
                session.step,
                device=device,
                precision=precision,
                max_grad_norm=cfg.max_grad_norm,
                graphs=session.graphs,
            )
            progress.window += loss.float()
            session.step += 1
            n = session.step - progress.window_start
            if n >= cfg.log_every or session.step == last_step:
                mean = _check_finite(progress.window.item() / n, i, progress.window_start, session.step)
                progress.losses.append(mean)
                rate = n * cfg.batch_size / (time.perf_counter() - window_tic)
                bar.update(1, loss=f"{mean:.4f}", samples_s=f"{rate:,.0f}")
                tracker.log_losses(session.step, i, mean, rate)
                progress.window.zero_()
                progress.window_start, window_tic = session.step, time.perf_counter()
            else:
                bar.update(1)
            if interrupts.pending() or session.checkpointer.due(session.step):
                session.checkpointer.save(session, record, progress, i)
                interrupts.raise_pending()
    strategy.after_experience(info)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return TrainedExperience(i, progress.losses, progress.seconds(), memory.peak_bytes(device))


def record_experience(
    session: Session, record: RunResult, trained: TrainedExperience, row: Row, tracker: tracking.Tracker
) -> None:
    """Row ``i`` of the accuracy matrix and experience ``i``'s figures into the record (saved)."""
    cfg, strategy, i = session.plan.cfg, session.strategy, trained.index
    n_test, accuracy = session.n_test, record.accuracy
    accuracy["correct"].append(row.correct)
    accuracy["matrix"].append([c / n for c, n in zip(row.correct, n_test, strict=True)])
    accuracy["seen"].append(sum(row.correct[: i + 1]) / sum(n_test[: i + 1]))
    n_train, steps = len(session.train_data[i]), session.steps[i]
    n_samples = _samples(steps, cfg.batch_size, n_train) if strategy.trains else 0
    losses = trained.losses
    record.experiences.append(
        ExperienceRecord(
            index=i,
            classes=list(session.scenario.classes_per_experience[i]),
            n_train=n_train,
            steps=steps if strategy.trains else 0,
            train_time_s=trained.seconds,
            eval_time_s=row.seconds,
            train_samples_per_s=n_samples / trained.seconds if n_samples else 0.0,
            eval_samples_per_s=sum(n_test) / row.seconds if row.seconds > 0 else 0.0,
            peak_memory_train_bytes=trained.peak_bytes,
            peak_memory_eval_bytes=row.peak_bytes,
            memory_kind=memory.kind(session.plan.device),
            n_trainable=strategy.n_trainable() if strategy.trains else 0,
            n_added=strategy.n_added(),
            n_active=strategy.n_active(),
            adapter_bytes=strategy.adapter_bytes(),
            loss_first=losses[0] if losses else None,
            loss_last=losses[-1] if losses else None,
            loss_mean=float(np.mean(losses)) if losses else None,
            strategy=results.jsonable(strategy.report()),
        )
    )
    results.save(record, session.plan.run_dir, session.plan.record_file)
    tracker.log_row(i, accuracy["matrix"][-1], accuracy["seen"][-1], session.step)


def finish_record(session: Session, record: RunResult, tracker: tracking.Tracker) -> None:
    """The strategy's final variants, derived metrics, parameters and timing into the record."""
    strategy, n_test = session.strategy, session.n_test
    last_row = session.scenario.n_experiences - 1
    accuracy = record.accuracy
    variants: dict[str, Any] = {}
    final_variants = strategy.final_variants()
    if final_variants:  # the unchanged model again, first: the speed baseline of the variants
        final_variants = {"main": nothing, **final_variants}
    for label, make_context in final_variants.items():
        with make_context():
            row = evaluate_row(session, last_row)
            cells = [c / n for c, n in zip(row.correct, n_test, strict=True)]
            variants[label] = {
                "row": cells,
                "acc_final": float(np.mean(cells)),
                "eval_samples_per_s": sum(n_test) / row.seconds if row.seconds > 0 else 0.0,
                "peak_memory_eval_bytes": row.peak_bytes,
            }
    accuracy["variants"] = variants
    record.metrics = metrics.derive(
        accuracy["matrix"], accuracy["initial"], accuracy["seen"], record.scenario.get("name")
    )
    n_backbone = record.backbone["n_parameters"]
    experiences = record.experiences
    trainable = max(e.n_trainable for e in experiences)
    record.parameters = {
        "backbone": n_backbone,
        "trainable": trainable,
        "added": experiences[-1].n_added,
        "active": experiences[-1].n_active,
        "adapter_bytes": experiences[-1].adapter_bytes,
        "trainable_fraction": trainable / n_backbone,
    }
    record.timing.update(
        {
            "train_s": sum(e.train_time_s for e in experiences),
            "eval_s": record.timing["initial_eval_s"] + sum(e.eval_time_s for e in experiences),
            "total_s": session.elapsed_before + time.perf_counter() - session.started,
            "peak_memory_train_bytes": max(e.peak_memory_train_bytes for e in experiences),
            "peak_memory_eval_bytes": max(e.peak_memory_eval_bytes for e in experiences),
        }
    )
    record.timing.update(session.checkpointer.figures())
    record.strategy_report = strategy.final_report()
    tracker.log_final(record.metrics, record.parameters, record.timing)


def place(strategy: Strategy, device: torch.device, precision: str, *, compile_towers: bool = False) -> None:
    """Move a built strategy to the device; bf16 runs store frozen adapter bases in bf16."""
    strategy.to(device)
    if precision == "bf16":
        strategy.store_frozen_weights(torch.bfloat16)
    if compile_towers:
        strategy.backbone.compile_towers()


def forward_backward(
    strategy: Strategy,
    images: torch.Tensor,
    y: torch.Tensor,
    info: ExperienceInfo,
    *,
    device: torch.device,
    precision: str,
) -> torch.Tensor:
    """Forward, loss and backward of one training step (the part CUDA graphs capture); the loss."""
    with autocast(device, precision):
        logits = strategy.forward(images, info)
        loss = strategy.loss(logits, y, info)
    loss.backward()
    return loss


def step_graphs(
    strategy: Strategy,
    info: ExperienceInfo,
    *,
    device: torch.device,
    precision: str,
    previous: StepGraphs | None = None,
) -> StepGraphs | None:
    """A CUDA-graph runner for the steps of experience ``info`` (None on the CPU).

    Call it after ``before_experience``, ``head.invalidate()`` and ``make_optimizer``, in train
    mode. ``previous``, the runner of the previous experience, is returned again (its captured
    graphs replayed in this experience) when its graphs are still valid: the strategy declares
    ``graphs_span_experiences`` and the step trains the same parameters and reads the same tensors
    (:func:`graph_reads`). Otherwise it is released and a new runner is built.
    """
    if device.type != "cuda":
        return None
    params = graph_parameters(strategy)
    reads = graph_reads(strategy, info, device=device, precision=precision)

    def body(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return forward_backward(strategy, x, y, info, device=device, precision=precision)

    if previous is not None:
        if previous.matches(params, reads):
            previous.body = body  # eager and newly captured steps see this experience
            return previous
        previous.release()
    return StepGraphs(
        body,
        params,
        device,
        reads=reads,
        max_graphs=strategy.graph_cache_size,
        rewarmup_steps=strategy.graph_rewarmup_steps,
    )


def graph_parameters(strategy: Strategy) -> list[torch.nn.Parameter]:
    """The parameters whose gradients a training step produces, in a fixed order."""
    params = {id(p): p for p in strategy.trainable_parameters()}
    for module in (strategy.backbone, strategy.head):
        params.update((id(p), p) for p in module.parameters() if p.requires_grad)
    return list(params.values())


def graph_reads(
    strategy: Strategy, info: ExperienceInfo, *, device: torch.device, precision: str
) -> tuple[torch.Tensor, ...] | None:
    """The tensors besides parameters and module buffers that a captured step reads and that must be
    the same objects for its graph to be replayed in another experience: ``info.logit_classes``
    (one static buffer per length, :func:`static_classes`) and the head's cached features
    (recomputed now, in place: :meth:`~cl_bench.heads.Head.refresh`). None when the strategy's
    graphs do not span experiences (``Strategy.graphs_span_experiences`` false).
    """
    if not strategy.graphs_span_experiences:
        return None
    with autocast(device, precision):
        cached = strategy.head.refresh()
    return (info.logit_classes, *cached)


def static_classes(
    buffers: dict[int, torch.Tensor], classes: list[int], device: torch.device
) -> torch.Tensor:
    """``classes`` as a long tensor in the buffer kept for their number (created at first use),
    written in place: a CUDA graph captured on it reads the classes of a later experience."""
    buffer = buffers.get(len(classes))
    if buffer is None:
        buffer = buffers[len(classes)] = torch.empty(len(classes), dtype=torch.long, device=device)
    buffer.copy_(torch.tensor(classes, dtype=torch.long))
    return buffer


def train_step(
    strategy: Strategy,
    optimizer: torch.optim.Optimizer,
    scheduler: Any,
    images: torch.Tensor,
    y: torch.Tensor,
    info: ExperienceInfo,
    step: int,
    *,
    device: torch.device,
    precision: str,
    max_grad_norm: float = 0.0,
    graphs: StepGraphs | None = None,
) -> torch.Tensor:
    """One optimizer step with every hook, in the loop's order; returns the detached loss.

    With ``graphs`` (a runner from :func:`step_graphs`), forward, loss and backward are replayed
    from a CUDA graph when the strategy's :meth:`~cl_bench.strategy.Strategy.graph_key` allows it.
    Nothing here waits for the device: the loss stays a tensor (benchmarks time this function).
    Its phases are labelled for ``torch.profiler`` (``step.*``; ``benchmarks/profile_step.py``).
    """
    with record_function("step.before_step"):
        strategy.before_step(step)
    with record_function("step.forward_backward"):
        if graphs is not None:
            loss = graphs(strategy.graph_key(), images, y)
        else:
            loss = forward_backward(strategy, images, y, info, device=device, precision=precision)
    with record_function("step.optimizer"):
        if max_grad_norm > 0:
            torch.nn.utils.clip_grad_norm_(strategy.trainable_parameters(), max_grad_norm)
        strategy.after_backward(step)
        optimizer.step()
        if scheduler is not None:
            scheduler.step()
        optimizer.zero_grad(set_to_none=True)
    with record_function("step.after_step"):
        strategy.after_step(step)
    return loss.detach()


def _info(
    index: int,
    per_exp: list[list[int]],
    logit_classes: torch.Tensor,
    n: int,
    n_steps: int,
    training: bool,
    scenario: Scenario,
) -> ExperienceInfo:
    return ExperienceInfo(
        index=index,
        classes=tuple(per_exp[index]),
        seen_classes=tuple(c for exp in per_exp[: index + 1] for c in exp),
        logit_classes=logit_classes,
        task_label=index if scenario.protocol == "task" else 0,
        n_samples=n,
        n_steps=n_steps,
        training=training,
    )


def _samples(n_steps: int, batch_size: int, n: int) -> int:
    """Samples seen in ``n_steps`` batches over a dataset of ``n`` (the last batch of an epoch is short)."""
    per_epoch = math.ceil(n / batch_size)
    full, rest = divmod(n_steps, per_epoch)
    return full * n + min(rest * batch_size, n)


def make_scheduler(optimizer: torch.optim.Optimizer, cfg: RunConfig, n_steps: int) -> Any:
    """The per-experience learning-rate schedule of ``cfg`` (None: constant, no warm-up)."""
    if cfg.lr_schedule == "constant" and cfg.warmup_steps == 0:
        return None
    sched = torch.optim.lr_scheduler
    main = (
        sched.CosineAnnealingLR(optimizer, T_max=max(1, n_steps - cfg.warmup_steps))
        if cfg.lr_schedule == "cosine"
        else sched.ConstantLR(optimizer, factor=1.0)
    )
    if cfg.warmup_steps == 0:
        return main
    warm = sched.LinearLR(optimizer, start_factor=1.0 / (cfg.warmup_steps + 1), total_iters=cfg.warmup_steps)
    return sched.SequentialLR(optimizer, [warm, main], milestones=[cfg.warmup_steps])


def _check_finite(value: float, exp: int, first: int, last: int) -> float:
    if not math.isfinite(value):
        raise DivergenceError(
            f"non-finite loss ({value}) in experience {exp} between steps {first} and {last}; "
            "lower lr, enable max_grad_norm, or use precision=fp32"
        )
    return value


def _device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    import platform

    return platform.processor() or platform.machine()
