"""The ``[federation]`` table of a run: K clients, R rounds per experience, how data is split.

Off by default (``clients = 0``): the run is the ordinary centralised one. With ``clients = K``
every experience's training data is partitioned over K clients; each of R rounds samples
``participation`` of them, each trains ``local_steps`` steps from the global adapter state, and
the server aggregates what they send (:mod:`cl_bench.federation.rounds`, docs/federation.md).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

from cl_bench.errors import ConfigError, FederationError

Partition = Literal["iid", "dirichlet"]
Aggregation = Literal["fedavg", "product"]
Backend = Literal["sequential", "flower"]


@dataclass(frozen=True)
class FederationConfig:
    """How one experience is trained by federated clients (FLoRA, arXiv 2404.15182, §3)."""

    clients: int = 0  # K; 0: no federation
    rounds: int = 1  # R communication rounds per experience
    local_steps: int = 0  # optimizer steps per client per round; 0: local_epochs
    local_epochs: int = 1  # with local_steps = 0: passes over an average client's data per round
    participation: float = 1.0  # fraction of the K clients sampled each round (at least one)
    participation_seed: int = 0
    partition: Partition = "iid"
    alpha: float = 0.5  # Dirichlet concentration (partition = "dirichlet"): small is more skewed
    partition_seed: int = 0
    min_client_samples: int = 1  # a Dirichlet draw that gives a client fewer is drawn again
    aggregation: Aggregation = "fedavg"  # "product": average B·A exactly, refactor to rank r
    backend: Backend = "sequential"  # "flower": Flower's simulation engine, clients in parallel
    client_cpus: float = 1.0  # Flower: CPUs per client (Ray resources)
    client_gpus: float = 0.0  # Flower: GPU share per client (e.g. 0.25: four clients per GPU)

    def __post_init__(self) -> None:
        if self.clients < 0:
            raise ConfigError(f"federation.clients must be >= 0 (0: no federation), got {self.clients}")
        for name in ("rounds", "local_epochs", "min_client_samples"):
            if getattr(self, name) < 1:
                raise ConfigError(f"federation.{name} must be >= 1, got {getattr(self, name)}")
        if self.local_steps < 0:
            raise ConfigError(f"federation.local_steps must be >= 0, got {self.local_steps}")
        if not (0 < self.participation <= 1):
            raise ConfigError(
                f"federation.participation must be in (0, 1] (a fraction of the clients), "
                f"got {self.participation}"
            )
        if not (self.alpha > 0 and math.isfinite(self.alpha)):
            raise ConfigError(f"federation.alpha must be > 0 (Dirichlet concentration), got {self.alpha}")
        if self.client_cpus <= 0 or self.client_gpus < 0:
            raise ConfigError(
                f"federation.client_cpus must be > 0 and client_gpus >= 0, "
                f"got {self.client_cpus} and {self.client_gpus}"
            )

    def check_for(self, device_type: str) -> None:
        """What depends on the run's device and the backend, checked when the run is planned."""
        if self.backend != "flower":
            return
        if self.clients < 2:
            raise FederationError(
                "federation.backend = 'flower' needs clients >= 2: one client is the centralised run "
                "(use backend = 'sequential')"
            )
        if device_type == "cuda" and self.client_gpus <= 0:
            raise FederationError(
                "federation.client_gpus = 0 but the run is on CUDA: Flower clients would see no GPU; "
                "give each a share (e.g. client_gpus = 0.25 for four clients per GPU)"
            )

    @property
    def enabled(self) -> bool:
        return self.clients > 0

    @property
    def per_round(self) -> int:
        """Clients sampled in each round: ``round(participation * K)``, at least one."""
        return max(1, round(self.participation * self.clients))

    def local_steps_for(self, n_samples: int, batch_size: int) -> int:
        """Steps every client takes per round on an experience of ``n_samples`` training samples."""
        if self.local_steps:
            return self.local_steps
        per_client = math.ceil(n_samples / self.clients)
        return self.local_epochs * math.ceil(per_client / batch_size)
