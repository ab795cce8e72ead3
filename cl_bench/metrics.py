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

MULTIDOMAIN_BENCHMARKS: frozenset[str] = frozenset({"x-tail", "mtil"})
"""Scenario names (``record["scenario"]["name"]``) whose records also carry :data:`MULTIDOMAIN_METRICS`."""
MULTIDOMAIN_METRICS: tuple[str, ...] = ("transfer_xtail_masked",)
"""Metrics derived only for the multi-domain benchmarks: adding them to every record would change
the committed regression goldens, whose metric keys the gate compares one for one."""

FORMULAS: dict[str, str] = {
    "acc_final": "(1/T) Σ_j R[T-1][j]",
    "acc_last_seen": "A_seen[T-1]",
    "acc_avg_incremental": "(1/T) Σ_i A_seen[i]",
    "forgetting": "(1/(T-1)) Σ_{j<T-1} max_{l∈[j,T-2]} (R[l][j] - R[T-1][j])",
    "forgetting_first_last": "(1/(T-1)) Σ_{j<T-1} (R[j][j] - R[T-1][j])",
    "bwt": "(1/(T-1)) Σ_{j<T-1} (R[T-1][j] - R[j][j])",
    "fwt": "(1/(T-1)) Σ_{j≥1} (R[j-1][j] - b[j])",
    "transfer": "mean_{j≥1} mean_{i<j} R[i][j]",
    "transfer_xtail_masked": "mean_{j≥1 kept} mean_{i<j, R[i][j]≠0} R[i][j]",
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
    "transfer_xtail_masked": "X-TAIL scripts (MoRAM, RAIL): transfer with exact zeros masked",
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


def transfer_xtail_masked(R: Matrix) -> float | None:
    """The X-TAIL scripts' transfer: mean_{j≥1 kept} mean_{i<j, R[i][j]≠0} R[i][j].

    MoRAM and RAIL mask the exact zeros of the upper triangle (``np.ma.masked_equal(np.triu(M, 1), 0)``)
    before the column means, because their loop leaves a cell it skipped at 0: a true 0.0 accuracy
    above the diagonal is dropped too, and a column whose cells above the diagonal are all 0 is not
    kept. Equal to :func:`transfer` when no such cell is 0. None for T = 1 or when no column is kept.
    """
    m = _square(R)
    T = m.shape[0]
    column_means = [float(np.mean(kept)) for j in range(1, T) if (kept := m[:j, j][m[:j, j] != 0]).size]
    return float(np.mean(column_means)) if column_means else None


def avg(R: Matrix) -> float:
    """X-TAIL / MTIL "Avg": the mean of all T×T entries of R."""
    return float(_square(R).mean())


def last(R: Matrix) -> float:
    """X-TAIL / MTIL "Last": (1/T) Σ_j R[T-1][j] (the same number as acc_final)."""
    return float(_square(R)[-1].mean())


def plasticity(R: Matrix) -> float:
    """(1/T) Σ_j R[j][j]: accuracy on each experience right after learning it."""
    return float(np.diag(_square(R)).mean())


def derive(
    R: Matrix, b: Sequence[float], A_seen: Sequence[float], scenario: str | None = None
) -> dict[str, float | None]:
    """Every metric of METRICS.md, by name (``None`` where undefined).

    :data:`MULTIDOMAIN_METRICS` are included only when ``scenario`` (the record's scenario name) is
    one of :data:`MULTIDOMAIN_BENCHMARKS`, so that the records of every other scenario keep their keys.
    """
    table: dict[str, Callable[[], float | None]] = {
        "acc_final": lambda: acc_final(R),
        "acc_last_seen": lambda: acc_last_seen(A_seen),
        "acc_avg_incremental": lambda: acc_avg_incremental(A_seen),
        "forgetting": lambda: forgetting(R),
        "forgetting_first_last": lambda: forgetting_first_last(R),
        "bwt": lambda: bwt(R),
        "fwt": lambda: fwt(R, b),
        "transfer": lambda: transfer(R),
        "transfer_xtail_masked": lambda: transfer_xtail_masked(R),
        "avg": lambda: avg(R),
        "last": lambda: last(R),
        "plasticity": lambda: plasticity(R),
    }
    assert set(table) == set(FORMULAS)
    skipped = () if scenario in MULTIDOMAIN_BENCHMARKS else MULTIDOMAIN_METRICS
    return {name: fn() for name, fn in table.items() if name not in skipped}
