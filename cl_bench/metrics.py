"""Continual-learning metrics as pure, named functions of the accuracy matrix (METRICS.md).

Notation: ``R[i][j]`` is the accuracy on test experience j after training experience i (future
columns included), ``b[j]`` the accuracy of the model before any training, ``A_seen[i]`` the
sample-weighted accuracy on the union of test experiences 0..i after training experience i.
Functions that need at least two experiences return ``None`` for T = 1: an undefined value is
absent, never 0. Accuracies are fractions in [0, 1].
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import numpy as np

Matrix = Sequence[Sequence[float]]

FORMULAS: dict[str, str] = {
    "acc_final": "(1/T) Σ_j R[T-1][j]",
    "acc_last_seen": "A_seen[T-1]",
    "acc_avg_incremental": "(1/T) Σ_i A_seen[i]",
    "forgetting": "(1/(T-1)) Σ_{j<T-1} max_{l∈[j,T-2]} (R[l][j] - R[T-1][j])",
    "forgetting_first_last": "(1/(T-1)) Σ_{j<T-1} (R[j][j] - R[T-1][j])",
    "bwt": "(1/(T-1)) Σ_{j<T-1} (R[T-1][j] - R[j][j])",
    "fwt": "(1/(T-1)) Σ_{j≥1} (R[j-1][j] - b[j])",
    "transfer": "mean_{j≥1} mean_{i<j} R[i][j]",
    "avg": "mean of all T×T entries of R",
    "last": "(1/T) Σ_j R[T-1][j]",
    "plasticity": "(1/T) Σ_j R[j][j]",
}

SOURCES: dict[str, str] = {
    "acc_final": "GEM 'ACC' (Lopez-Paz & Ranzato 2017)",
    "acc_last_seen": "sample-weighted accuracy on all seen test data",
    "acc_avg_incremental": "iCaRL average incremental accuracy (Rebuffi et al. 2017)",
    "forgetting": "Chaudhry et al. 2018, max over previous steps",
    "forgetting_first_last": "Avalanche: first minus last",
    "bwt": "Lopez-Paz & Ranzato 2017",
    "fwt": "GEM forward transfer, with the before-training baseline b",
    "transfer": "X-TAIL / MTIL: zero-shot on domains not yet learned",
    "avg": "X-TAIL / MTIL",
    "last": "X-TAIL / MTIL",
    "plasticity": "mean accuracy on each experience right after learning it",
}


def _square(R: Matrix) -> np.ndarray:
    m = np.asarray(R, dtype=np.float64)
    if m.ndim != 2 or m.shape[0] != m.shape[1] or m.shape[0] == 0:
        raise ValueError(f"the accuracy matrix must be square and non-empty, got shape {m.shape}")
    return m


def acc_final(R: Matrix) -> float:
    """GEM "ACC": (1/T) Σ_j R[T-1][j], the mean of the last row."""
    m = _square(R)
    return float(m[-1].mean())


def acc_last_seen(A_seen: Sequence[float]) -> float:
    """A_seen[T-1]: sample-weighted accuracy on all test data seen, after the last experience."""
    return float(A_seen[-1])


def acc_avg_incremental(A_seen: Sequence[float]) -> float:
    """iCaRL average incremental accuracy: (1/T) Σ_i A_seen[i]."""
    return float(np.mean(np.asarray(A_seen, dtype=np.float64)))


def forgetting(R: Matrix) -> float | None:
    """Chaudhry et al. 2018: (1/(T-1)) Σ_{j<T-1} max_{l∈[j,T-2]} (R[l][j] - R[T-1][j]).

    The max runs over the rows from the one that learned j up to the one before the last (the
    final row is what is compared, not a candidate): a column that ends at its best gives a
    negative term. None for T = 1.
    """
    m = _square(R)
    T = m.shape[0]
    if T < 2:
        return None
    drops = [m[j : T - 1, j].max() - m[T - 1, j] for j in range(T - 1)]
    return float(np.mean(drops))


def forgetting_first_last(R: Matrix) -> float | None:
    """Avalanche's forgetting: (1/(T-1)) Σ_{j<T-1} (R[j][j] - R[T-1][j]); equals -bwt. None for T = 1."""
    m = _square(R)
    T = m.shape[0]
    if T < 2:
        return None
    return float(np.mean([m[j, j] - m[T - 1, j] for j in range(T - 1)]))


def bwt(R: Matrix) -> float | None:
    """Backward transfer (Lopez-Paz & Ranzato 2017): (1/(T-1)) Σ_{j<T-1} (R[T-1][j] - R[j][j]).

    None for T = 1.
    """
    m = _square(R)
    T = m.shape[0]
    if T < 2:
        return None
    return float(np.mean([m[T - 1, j] - m[j, j] for j in range(T - 1)]))


def fwt(R: Matrix, b: Sequence[float]) -> float | None:
    """Forward transfer (GEM, with the before-training row b): (1/(T-1)) Σ_{j≥1} (R[j-1][j] - b[j]).

    None for T = 1; a ValueError when ``b`` does not have one entry per column.
    """
    m = _square(R)
    T = m.shape[0]
    if len(b) != T:
        raise ValueError(f"baseline row has {len(b)} entries, the matrix has {T} columns")
    if T < 2:
        return None
    return float(np.mean([m[j - 1, j] - b[j] for j in range(1, T)]))


def transfer(R: Matrix) -> float | None:
    """X-TAIL / MTIL transfer: mean_{j≥1} mean_{i<j} R[i][j] (accuracy on j before learning it).

    None for T = 1.
    """
    m = _square(R)
    T = m.shape[0]
    if T < 2:
        return None
    return float(np.mean([m[:j, j].mean() for j in range(1, T)]))


def avg(R: Matrix) -> float:
    """X-TAIL / MTIL "Avg": the mean of all T×T entries of R."""
    return float(_square(R).mean())


def last(R: Matrix) -> float:
    """X-TAIL / MTIL "Last": (1/T) Σ_j R[T-1][j] (the same number as acc_final)."""
    return float(_square(R)[-1].mean())


def plasticity(R: Matrix) -> float:
    """(1/T) Σ_j R[j][j]: accuracy on each experience right after learning it."""
    return float(np.diag(_square(R)).mean())


def derive(R: Matrix, b: Sequence[float], A_seen: Sequence[float]) -> dict[str, float | None]:
    """Every metric of METRICS.md, by name (``None`` where undefined)."""
    table: dict[str, Callable[[], float | None]] = {
        "acc_final": lambda: acc_final(R),
        "acc_last_seen": lambda: acc_last_seen(A_seen),
        "acc_avg_incremental": lambda: acc_avg_incremental(A_seen),
        "forgetting": lambda: forgetting(R),
        "forgetting_first_last": lambda: forgetting_first_last(R),
        "bwt": lambda: bwt(R),
        "fwt": lambda: fwt(R, b),
        "transfer": lambda: transfer(R),
        "avg": lambda: avg(R),
        "last": lambda: last(R),
        "plasticity": lambda: plasticity(R),
    }
    assert set(table) == set(FORMULAS)
    return {name: fn() for name, fn in table.items()}
