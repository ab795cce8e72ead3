"""One client's local round: what the server sends, what comes back, and the training between.

Both backends run :func:`train_client`: the sequential one on the server's own model (taking a
:class:`Snapshot` first and restoring it after, so every client starts from the global model
whatever ran before it), the Flower one on a replica of it in a Ray actor
(:mod:`cl_bench.federation.flower`). The client trains exactly as the loop does one experience
(:func:`cl_bench.loop.train_step`: every strategy hook, a fresh optimizer, clipping, CUDA
graphs), for ``n_steps`` steps at positions ``schedule_start ..`` of the experience's learning-rate
schedule of ``schedule_steps`` steps, on its own samples only.
"""

from __future__ import annotations

import copy
import time
import warnings
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from cl_bench import memory
from cl_bench.strategy import ExperienceInfo, Strategy

if TYPE_CHECKING:
    from cl_bench.loop import Session


@dataclass(frozen=True)
class ClientTask:
    """What the server sends one client for one round (only ``state`` is communication)."""

    experience: int
    round: int
    client: int
    indices: np.ndarray | None  # the client's samples of the experience; None: all of them (K = 1)
    seed: int | None  # None: train with the run's own generator (K = 1, the centralised run)
    state: dict[str, torch.Tensor]  # the global communicated state: the download
    n_steps: int  # local steps of this round
    first_step: int  # the global step (the hooks' clock) of the round's first local step
    schedule_start: int  # position of the first local step in the experience's lr schedule
    schedule_steps: int  # length of that schedule: rounds x local steps


@dataclass
class ClientResult:
    """What one client's round produced: the upload and its figures."""

    client: int
    state: dict[str, torch.Tensor]  # client_upload() after local training: the upload
    n_samples: int  # the aggregation weight
    losses: list[float] = field(default_factory=list)  # mean loss of each window of log_every steps
    seconds: float = 0.0
    peak_bytes: int = 0


@dataclass
class Snapshot:
    """Everything local training may change in a strategy: every parameter and buffer of backbone
    and head that may train (copied back in place, so captured CUDA graphs stay valid) and the
    strategy's own state (:meth:`Strategy.extra_state`, restored with ``load_extra_state``)."""

    tensors: list[tuple[torch.Tensor, torch.Tensor]]  # (live tensor, its copy)
    requires_grad: list[tuple[torch.nn.Parameter, bool]]
    extra: dict[str, Any]

    @classmethod
    def take(cls, strategy: Strategy) -> Snapshot:
        """Buffers, and the parameters that may train: those that require grad now, or all of them
        when the strategy trains frozen weights too (LISA switches blocks on and off)."""
        every = strategy.changes_frozen_weights()
        params = [p for m in (strategy.backbone, strategy.head) for p in m.parameters()]
        live: list[torch.Tensor] = [p for p in params if every or p.requires_grad]
        live += [b for m in (strategy.backbone, strategy.head) for b in m.buffers()]
        unique = list({id(t): t for t in live}.values())
        return cls(
            [(t, t.detach().clone()) for t in unique],
            [(p, p.requires_grad) for p in params],
            copy.deepcopy(strategy.extra_state()),
        )

    def nbytes(self) -> int:
        return sum(saved.numel() * saved.element_size() for _, saved in self.tensors)

    @torch.no_grad()
    def restore(self, strategy: Strategy) -> None:
        strategy.load_extra_state(copy.deepcopy(self.extra))
        for live, saved in self.tensors:
            live.copy_(saved)
        for p, flag in self.requires_grad:
            p.requires_grad_(flag)


def train_client(
    session: Session, task: ClientTask, info: ExperienceInfo, *, restore: bool, graphs_ready: bool
) -> ClientResult:
    """Train one client's round on ``session``'s model and return its upload.

    ``restore``: put the model back as it was before (the server's model is shared by all the
    clients of the sequential backend); off with one client, whose model *is* the global one.
    ``graphs_ready``: ``session.graphs`` is already the runner of this experience (else it is
    built here, after the optimizer, as the loop does).
    """
    from cl_bench.loop import _check_finite, make_scheduler, step_graphs, train_step

    p, strategy = session.plan, session.strategy
    cfg, device, precision = p.cfg, p.device, p.precision
    snapshot = Snapshot.take(strategy) if restore else None
    streams = strategy.random_streams() if task.seed is not None else []
    saved_streams = [g.get_state() for g in streams]
    if task.seed is None:
        generator = session.generator
    else:  # the client's own streams, the strategy's given back after the round
        generator = torch.Generator(device=device).manual_seed(task.seed)
        for j, g in enumerate(streams):
            g.manual_seed(task.seed + j + 1)
    data = session.train_data[task.experience]
    if task.indices is not None:
        data = data.subset(torch.as_tensor(task.indices, dtype=torch.long))
    strategy.train()
    strategy.load_communicated_state(task.state)
    session.head.invalidate()
    optimizer = strategy.make_optimizer(p.lr, p.weight_decay)
    scheduler = make_scheduler(optimizer, cfg, task.schedule_steps)
    if scheduler is not None and task.schedule_start:
        with warnings.catch_warnings():  # stepping the schedule to this round's position
            warnings.simplefilter("ignore", UserWarning)
            for _ in range(task.schedule_start):
                scheduler.step()
    if cfg.cuda_graphs and not graphs_ready:
        session.graphs = step_graphs(
            strategy, info, device=device, precision=precision, previous=session.graphs
        )
    memory.reset_peak(device)
    tic = time.perf_counter()
    losses: list[float] = []
    window = torch.zeros((), device=device)
    window_start = 0
    batches = data.batches(cfg.batch_size, shuffle=True, generator=generator, n_steps=task.n_steps)
    for k, (x, y) in enumerate(batches):
        images = session.preprocess(x, train=True, generator=generator)
        step = task.first_step + k
        loss = train_step(
            strategy,
            optimizer,
            scheduler,
            images,
            y,
            info,
            step,
            device=device,
            precision=precision,
            max_grad_norm=cfg.max_grad_norm,
            graphs=session.graphs,
        )
        window += loss.float()
        n = k + 1 - window_start
        if n >= cfg.log_every or k + 1 == task.n_steps:
            losses.append(_check_finite(window.item() / n, task.experience, step + 1 - n, step + 1))
            window.zero_()
            window_start = k + 1
    upload = {name: t.detach().clone() for name, t in strategy.client_upload().items()}
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    seconds = time.perf_counter() - tic
    peak = memory.peak_bytes(device)
    if snapshot is not None and device.type == "cuda":  # the server's copy is not the client's memory
        peak -= snapshot.nbytes()
    for g, state in zip(streams, saved_streams, strict=True):
        g.set_state(state)
    if snapshot is not None:
        snapshot.restore(strategy)
    return ClientResult(task.client, upload, len(data), losses, seconds, peak)
