"""Which client holds which training sample of an experience, and which clients train a round.

``iid``: a seeded permutation cut into K near-equal parts. ``dirichlet``: per class, the class's
samples are shared out in proportions drawn from Dir(alpha·1_K) (Hsu et al. 2019, arXiv
1909.06335; the label-skew partition of NIID-Bench, arXiv 2102.02079 §4.1), drawn again while a
client holds fewer than ``min_samples``. Each experience has its own draw, seeded by
(``seed``, experience); a client's indices are sorted, so its data keeps the experience's order.
"""

from __future__ import annotations

import numpy as np

from cl_bench.errors import FederationError

MAX_DRAWS = 1000  # Dirichlet redraws before giving up on min_samples


def partition(
    labels: np.ndarray,
    k: int,
    kind: str,
    *,
    alpha: float = 0.5,
    seed: int = 0,
    experience: int = 0,
    min_samples: int = 1,
) -> list[np.ndarray]:
    """The sample indices (into ``labels``) of each of ``k`` clients: every sample in exactly one."""
    n = len(labels)
    if k > n or k * min_samples > n:
        raise FederationError(
            f"federation.clients = {k} is more than experience {experience}'s {n} training samples "
            f"allow ({min_samples} each at least); use fewer clients"
        )
    rng = np.random.default_rng([seed, experience])
    if kind == "iid":
        return [np.sort(part) for part in np.array_split(rng.permutation(n), k)]
    if kind != "dirichlet":
        raise FederationError(f"unknown federation.partition {kind!r}; valid: 'iid', 'dirichlet'")
    for _ in range(MAX_DRAWS):
        parts = _dirichlet_draw(labels, k, alpha, rng)
        if min(len(p) for p in parts) >= min_samples:
            return parts
    raise FederationError(
        f"no Dirichlet(alpha={alpha}) partition of experience {experience} in {MAX_DRAWS} draws gives "
        f"all {k} clients at least {min_samples} samples; raise federation.alpha or lower clients"
    )


def _dirichlet_draw(labels: np.ndarray, k: int, alpha: float, rng: np.random.Generator) -> list[np.ndarray]:
    """One label-skewed draw: class by class (sorted), cut the shuffled samples at the cumulative
    Dir(alpha) proportions."""
    owned: list[list[np.ndarray]] = [[] for _ in range(k)]
    for c in np.unique(labels):
        members = rng.permutation(np.flatnonzero(labels == c))
        shares = rng.dirichlet(np.full(k, alpha))
        cuts = (np.cumsum(shares)[:-1] * len(members)).astype(np.int64)
        for client, part in enumerate(np.split(members, cuts)):
            owned[client].append(part)
    return [np.sort(np.concatenate(parts)) for parts in owned]


def sample_clients(k: int, per_round: int, *, seed: int, experience: int, round_: int) -> list[int]:
    """The clients of one round: ``per_round`` of ``k`` without replacement, sorted (all when equal)."""
    if per_round >= k:
        return list(range(k))
    rng = np.random.default_rng([seed, experience, round_])
    return sorted(int(c) for c in rng.choice(k, size=per_round, replace=False))


def client_seed(seed: int, experience: int, round_: int, client: int) -> int:
    """The seed of one client's local round (its batches, augmentations, the strategy's draws)."""
    return int(
        np.random.SeedSequence([seed, experience, round_, client]).generate_state(1, np.uint64)[0] >> 1
    )
