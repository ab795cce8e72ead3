"""A federated experience: R rounds of sampled clients training locally, then the server's rule.

:func:`train_experience` stands in for :func:`cl_bench.loop.train_experience` when the run has a
``[federation]`` table (FLoRA, arXiv 2404.15182, Algorithm 1, with the strategy's own update):

1. ``before_experience`` on the global model (MoRA's new block, SoRA's schedule...);
2. each round r: sample ``per_round`` clients (seeded by experience and round); send each the
   global :meth:`~cl_bench.strategy.Strategy.communicated_state` (the download); each trains
   ``L`` local steps on its share of the experience (:func:`~cl_bench.federation.client.train_client`)
   and uploads its communicated state; the server aggregates them, weighted by the clients' sample
   counts (:meth:`~cl_bench.strategy.Strategy.aggregate`), loads the result and scores the
   seen test experiences (the per-round curve);
3. ``after_experience`` on the global model; the loop evaluates the accuracy-matrix row.

Clients run through a :class:`Backend`: :class:`SequentialBackend` (one process, one model,
deterministic) or Flower's simulation engine (:mod:`cl_bench.federation.flower`). Every byte of
every download and upload is counted in the record's ``federation`` section.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, Protocol

import numpy as np
import torch

from cl_bench import progress as progress_
from cl_bench import tracking
from cl_bench.config import to_dict
from cl_bench.federation.aggregate import state_bytes
from cl_bench.federation.client import ClientResult, ClientTask, train_client
from cl_bench.federation.config import FederationConfig
from cl_bench.federation.partition import client_seed, partition, sample_clients
from cl_bench.strategy import ExperienceInfo

if TYPE_CHECKING:
    from cl_bench.loop import Session, TrainedExperience
    from cl_bench.results import RunResult


class Backend(Protocol):
    """Runs one round's client tasks and returns their results in the tasks' order."""

    def start_experience(self, index: int) -> None: ...

    def run_round(self, tasks: list[ClientTask], info: ExperienceInfo) -> list[ClientResult]: ...

    def end_experience(self, index: int, state: dict[str, torch.Tensor]) -> None:
        """The experience's final aggregated state, before ``after_experience``: the live tensors,
        valid only during the call (a backend that keeps them copies them)."""

    def close(self) -> None: ...


@dataclass
class SequentialBackend:
    """Every client in turn on the server's own model, restored between clients (a single client's
    model is the global model: nothing to restore, and the run is the centralised one exactly)."""

    session: Session
    restore: bool
    graphs_ready: bool = False

    def start_experience(self, index: int) -> None:
        self.graphs_ready = False

    def run_round(self, tasks: list[ClientTask], info: ExperienceInfo) -> list[ClientResult]:
        out = []
        for task in tasks:
            out.append(
                train_client(self.session, task, info, restore=self.restore, graphs_ready=self.graphs_ready)
            )
            self.graphs_ready = True
        return out

    def end_experience(self, index: int, state: dict[str, torch.Tensor]) -> None:
        """Nothing: the server's model is the clients' model."""

    def close(self) -> None:
        """Nothing to stop."""


@dataclass
class FederatedRun:
    """A run's federation: its config, every experience's partition and its backend."""

    cfg: FederationConfig
    partitions: list[list[np.ndarray]]  # [experience][client] -> sample positions in the experience
    local_steps: list[int]  # L of each experience
    backend: Backend | None = None

    @classmethod
    def build(cls, cfg: FederationConfig, train_targets: list[torch.Tensor], batch_size: int) -> FederatedRun:
        """Partition every experience (a one-line error when the data cannot give K clients)."""
        parts = [
            partition(
                t.cpu().numpy(),
                cfg.clients,
                cfg.partition,
                alpha=cfg.alpha,
                seed=cfg.partition_seed,
                experience=i,
                min_samples=cfg.min_client_samples,
            )
            for i, t in enumerate(train_targets)
        ]
        steps = [cfg.local_steps_for(len(t), batch_size) for t in train_targets]
        return cls(cfg, parts, steps)

    def experience_steps(self) -> tuple[int, ...]:
        """Each experience's steps on the hooks' clock: R rounds of L local steps."""
        return tuple(self.cfg.rounds * n for n in self.local_steps)


def make_backend(session: Session) -> Backend:
    """The configured backend; Flower's is imported only when asked for."""
    fed = session.federation
    assert fed is not None
    if fed.cfg.backend == "flower":
        from cl_bench.federation.flower import FlowerBackend

        return FlowerBackend(session)
    return SequentialBackend(session, restore=fed.cfg.clients > 1)


def start_record(session: Session, record: RunResult) -> None:
    """The record's ``federation`` section (kept as it is when a resumed run has one)."""
    fed = session.federation
    assert fed is not None
    if record.federation is None:
        record.federation = {
            "config": to_dict(fed.cfg),
            "partition": [[len(c) for c in parts] for parts in fed.partitions],
            "local_steps": fed.local_steps,
            "rounds": [],
            "upload_bytes_total": 0,
            "download_bytes_total": 0,
            "communication_bytes": 0,
            "bytes_per_round": 0.0,
            "backend": fed.cfg.backend,
            "wall_s": 0.0,
            # the strategy's own figures (report(), final_report()) come from the server's model:
            # with K > 1 every client's strategy state is restored after its round (a known gap)
            "strategy_figures": "clients"
            if fed.cfg.clients == 1
            else "server model (clients' not collected)",
        }


def train_experience(
    session: Session,
    record: RunResult,
    i: int,
    bar: progress_.Phase,
    tracker: tracking.Tracker,
    info: ExperienceInfo,
) -> TrainedExperience:
    """Experience ``i`` trained by federated clients; its figures go into ``record.federation``."""
    from cl_bench import memory
    from cl_bench.loop import TrainedExperience

    fed, strategy, p = session.federation, session.strategy, session.plan
    assert fed is not None
    assert record.federation is not None
    if fed.backend is None:
        fed.backend = make_backend(session)
    cfg, L = fed.cfg, fed.local_steps[i]
    memory.reset_peak(p.device)
    tic = time.perf_counter()
    bar.describe(f"exp {i + 1}/{session.scenario.n_experiences}")
    strategy.train()
    strategy.before_experience(info)
    session.head.invalidate()
    fed.backend.start_experience(i)
    first = session.step
    losses: list[float] = []
    peak, train_s = 0, 0.0
    for r in range(cfg.rounds):
        round_tic = time.perf_counter()
        clients = sample_clients(
            cfg.clients, cfg.per_round, seed=cfg.participation_seed, experience=i, round_=r
        )
        download = {k: v.detach().clone() for k, v in strategy.communicated_state().items()}
        tasks = [
            ClientTask(
                experience=i,
                round=r,
                client=c,
                indices=None if cfg.clients == 1 else fed.partitions[i][c],
                seed=None if cfg.clients == 1 else client_seed(p.cfg.seed, i, r, c),
                state=download,
                n_steps=L,
                first_step=first + r * L,
                schedule_start=r * L,
                schedule_steps=cfg.rounds * L,
            )
            for c in clients
        ]
        done = fed.backend.run_round(tasks, info)
        uploads = [res.state for res in done]
        strategy.load_communicated_state(
            strategy.aggregate(uploads, [float(res.n_samples) for res in done], cfg.aggregation)
        )
        train_s += time.perf_counter() - round_tic
        round_loss = float(np.mean([res.losses[-1] for res in done]))
        losses.append(round_loss)
        peak = max(peak, *(res.peak_bytes for res in done))
        session.step = first + (r + 1) * L
        seen = seen_accuracy(session, i)
        _record_round(record, i, r, download, done, seen, strategy.aggregation_residuals)
        tracker.log_losses(session.step, i, round_loss, 0.0)
        bar.update(L, loss=f"{round_loss:.4f}", seen=f"{seen:.3f}")
    # the replicas of the Flower backend replay after_experience on this state themselves
    fed.backend.end_experience(i, strategy.communicated_state())
    strategy.after_experience(info)
    record.federation["wall_s"] += time.perf_counter() - tic
    if p.device.type == "cuda":
        torch.cuda.synchronize(p.device)
    return TrainedExperience(i, losses, train_s, max(peak, memory.peak_bytes(p.device)))


def _record_round(
    record: RunResult,
    i: int,
    r: int,
    download: dict[str, torch.Tensor],
    done: list[ClientResult],
    seen: float,
    residuals: dict[str, float],
) -> None:
    """One round's entry; with ``aggregation = "product"`` also the relative residual the rank-r
    refactoring discarded (largest and mean over the adapters; 0 when the clients' products
    averaged to rank r)."""
    fed = record.federation
    assert fed is not None
    down = state_bytes(download)
    up = [state_bytes(res.state) for res in done]
    fed["rounds"].append(
        {
            "experience": i,
            "round": r,
            "clients": [res.client for res in done],
            "seen_accuracy": seen,
            "upload_bytes": up,
            "download_bytes": [down] * len(done),
            "client_train_s": [res.seconds for res in done],
            "client_peak_bytes": [res.peak_bytes for res in done],
            "client_samples": [res.n_samples for res in done],
            "loss_mean": [float(np.mean(res.losses)) for res in done],
        }
    )
    if residuals:
        fed["rounds"][-1]["product_residual_max"] = max(residuals.values())
        fed["rounds"][-1]["product_residual_mean"] = float(np.mean(list(residuals.values())))
    fed["upload_bytes_total"] += sum(up)
    fed["download_bytes_total"] += down * len(done)
    fed["communication_bytes"] = fed["upload_bytes_total"] + fed["download_bytes_total"]
    fed["bytes_per_round"] = fed["communication_bytes"] / len(fed["rounds"])


def seen_accuracy(session: Session, i: int) -> float:
    """Accuracy of the global model on test experiences 0..``i`` (row ``i``'s label space): the
    per-round curve. After the last round it is the accuracy matrix's ``seen[i]``."""
    from cl_bench.loop import cell_correct, experience_logits

    session.strategy.eval()
    session.head.invalidate()
    correct = sum(cell_correct(session, i, j, experience_logits(session, j)) for j in range(i + 1))
    total = sum(len(session.test_data[j]) for j in range(i + 1))
    session.strategy.train()
    return correct / total
