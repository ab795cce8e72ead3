"""Metrics against a hand-computed 3x3 matrix, plus the cross-checks of METRICS.md."""

from __future__ import annotations

import numpy as np
import pytest

from cl_bench import metrics

# R[i][j]: accuracy on test experience j after training experience i (future columns included).
R = [
    [0.90, 0.20, 0.10],
    [0.95, 0.80, 0.30],
    [0.50, 0.70, 0.95],
]
B = [0.30, 0.25, 0.20]
A_SEEN = [0.90, 0.70, 0.70]

# Hand computations (see METRICS.md for the formulas):
EXPECTED = {
    "acc_final": (0.50 + 0.70 + 0.95) / 3,
    "acc_last_seen": 0.70,
    "acc_avg_incremental": (0.90 + 0.70 + 0.70) / 3,
    # j=0: max(R00, R10) - R20 = 0.95 - 0.50 = 0.45; j=1: R11 - R21 = 0.10
    "forgetting": (0.45 + 0.10) / 2,
    # j=0: R00 - R20 = 0.40; j=1: R11 - R21 = 0.10
    "forgetting_first_last": (0.40 + 0.10) / 2,
    "bwt": (-0.40 - 0.10) / 2,
    # (R01 - b1) + (R12 - b2) = -0.05 + 0.10
    "fwt": (-0.05 + 0.10) / 2,
    # j=1: R01 = 0.2; j=2: mean(R02, R12) = 0.2
    "transfer": 0.20,
    "avg": 5.40 / 9,
    "last": (0.50 + 0.70 + 0.95) / 3,
    "plasticity": (0.90 + 0.80 + 0.95) / 3,
}


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_hand_computed_values(name: str) -> None:
    assert metrics.derive(R, B, A_SEEN)[name] == pytest.approx(EXPECTED[name], abs=1e-12)


# A 4x4 matrix whose columns pin the forgetting window max_{l∈[j,T-2]} (R[l][j] - R[T-1][j]):
# column 0 ends ABOVE its earlier values (negative forgetting: the last row must not be a
# candidate of the max, as in a window m[j:T, j]); column 1 peaks after it was learned (R21 > R11:
# the max is over rows, not the diagonal); column 2 was higher before it was learned (R12 > R22:
# the window starts at row j, not row 0).
R4 = [
    [0.60, 0.10, 0.05, 0.00],
    [0.50, 0.70, 0.85, 0.10],
    [0.40, 0.75, 0.80, 0.15],
    [0.70, 0.65, 0.60, 0.90],
]
EXPECTED_R4 = {
    # j=0: max(R00, R10, R20) - R30 = 0.60 - 0.70 = -0.10; j=1: max(R11, R21) - R31 = 0.75 - 0.65 = 0.10;
    # j=2: R22 - R32 = 0.80 - 0.60 = 0.20
    "forgetting": (-0.10 + 0.10 + 0.20) / 3,
    # j=0: R00 - R30 = -0.10; j=1: R11 - R31 = 0.05; j=2: R22 - R32 = 0.20
    "forgetting_first_last": (-0.10 + 0.05 + 0.20) / 3,
    "bwt": (0.10 - 0.05 - 0.20) / 3,
}


@pytest.mark.parametrize("name", sorted(EXPECTED_R4))
def test_hand_computed_forgetting_window_with_negative_forgetting(name: str) -> None:
    assert getattr(metrics, name)(R4) == pytest.approx(EXPECTED_R4[name], abs=1e-12)


def test_wrong_forgetting_windows_give_other_values_on_r4() -> None:
    """The matrix tells the window of METRICS.md from the two likely mistakes."""
    m = np.asarray(R4)
    last_row_included = np.mean([m[j:4, j].max() - m[3, j] for j in range(3)])  # 0.10
    from_row_zero = np.mean([m[0:3, j].max() - m[3, j] for j in range(3)])  # 0.0833
    for wrong in (last_row_included, from_row_zero):
        assert abs(wrong - EXPECTED_R4["forgetting"]) > 0.01


def test_every_public_metric_function_documents_its_formula() -> None:
    for name, formula in metrics.FORMULAS.items():
        doc = getattr(metrics, name).__doc__
        assert doc is not None, name
        assert formula in doc, name


def test_every_metric_has_a_formula_and_a_source() -> None:
    derived = metrics.derive(R, B, A_SEEN)
    assert set(metrics.FORMULAS) == set(metrics.SOURCES) == set(EXPECTED) | {"transfer_xtail_masked"}
    assert set(derived) == set(EXPECTED)


@pytest.mark.parametrize("scenario", ["x-tail", "mtil"])
def test_multidomain_records_also_carry_the_masked_transfer(scenario: str) -> None:
    derived = metrics.derive(R, B, A_SEEN, scenario)
    assert set(derived) == set(metrics.FORMULAS)
    assert derived["transfer_xtail_masked"] == pytest.approx(0.20, abs=1e-12)  # no zero above the diagonal


@pytest.mark.parametrize("scenario", [None, "synthetic", "split-digits", "X-TAIL"])
def test_other_scenarios_keep_their_metric_keys(scenario: str | None) -> None:
    assert "transfer_xtail_masked" not in metrics.derive(R, B, A_SEEN, scenario)


# Upper triangle with a true 0.0 in column 2 (R02) and an all-zero column 3 (R03 = R13 = R23 = 0).
R_ZEROS = [
    [0.90, 0.40, 0.00, 0.00],
    [0.80, 0.85, 0.30, 0.00],
    [0.70, 0.75, 0.90, 0.00],
    [0.60, 0.70, 0.80, 0.95],
]


def test_masked_transfer_drops_a_true_zero_and_an_all_zero_column() -> None:
    # column 1: R01 = 0.4; column 2: R02 = 0 is masked, R12 = 0.3; column 3: all zero, dropped
    assert metrics.transfer_xtail_masked(R_ZEROS) == pytest.approx((0.40 + 0.30) / 2, abs=1e-12)


def test_unmasked_transfer_counts_the_zeros() -> None:
    # column 1: 0.4; column 2: (0 + 0.3) / 2 = 0.15; column 3: (0 + 0 + 0) / 3 = 0
    assert metrics.transfer(R_ZEROS) == pytest.approx((0.40 + 0.15 + 0.0) / 3, abs=1e-12)


def test_masked_transfer_equals_the_x_tail_scripts_numpy_masking() -> None:
    """The X-TAIL scripts' expression (MULTIDOMAIN.md §7), with cells in percent as they store them."""
    m = 100 * np.asarray(R_ZEROS)
    scripts = np.ma.masked_equal(np.triu(m, 1), 0).mean(axis=0)[1:].mean()
    masked = metrics.transfer_xtail_masked(R_ZEROS)
    assert masked is not None
    assert 100 * masked == pytest.approx(float(scripts), abs=1e-9)


def test_masked_transfer_is_undefined_for_one_experience_or_when_every_column_is_zero() -> None:
    assert metrics.transfer_xtail_masked([[0.8]]) is None
    assert metrics.transfer_xtail_masked([[0.9, 0.0, 0.0], [0.8, 0.9, 0.0], [0.7, 0.8, 0.9]]) is None
    assert metrics.transfer([[0.9, 0.0, 0.0], [0.8, 0.9, 0.0], [0.7, 0.8, 0.9]]) == 0.0
    assert metrics.derive([[0.8]], [0.1], [0.8], "x-tail")["transfer_xtail_masked"] is None


def test_single_experience_leaves_transfer_metrics_absent() -> None:
    derived = metrics.derive([[0.8]], [0.1], [0.8])
    for name in ("forgetting", "forgetting_first_last", "bwt", "fwt", "transfer"):
        assert derived[name] is None
    assert "transfer_xtail_masked" not in derived
    assert derived["acc_final"] == pytest.approx(0.8)
    assert derived["plasticity"] == pytest.approx(0.8)


def test_forgetting_max_differs_from_first_minus_last_when_accuracy_rises_later() -> None:
    max_window, first_last = metrics.forgetting(R), metrics.forgetting_first_last(R)
    assert max_window is not None
    assert first_last is not None
    assert max_window > first_last


@pytest.mark.parametrize("seed", range(5))
def test_first_last_forgetting_is_minus_bwt_on_any_matrix(seed: int) -> None:
    rng = np.random.default_rng(seed)
    m = rng.random((seed + 2, seed + 2)).tolist()
    backward = metrics.bwt(m)
    assert backward is not None
    assert metrics.forgetting_first_last(m) == pytest.approx(-backward, abs=1e-12)


@pytest.mark.parametrize("seed", range(5))
def test_avalanche_functional_forgetting_agrees_with_first_last(seed: int) -> None:
    from avalanche.evaluation.functional import forgetting as avalanche_forgetting

    rng = np.random.default_rng(seed)
    m = rng.random((seed + 2, seed + 2))
    per_experience = avalanche_forgetting(m)[-1, :-1]  # last row: forgetting of each earlier experience
    assert float(np.mean(per_experience)) == pytest.approx(
        metrics.forgetting_first_last(m.tolist()), abs=1e-12
    )


def test_rejects_non_square_matrix_and_wrong_baseline_length() -> None:
    with pytest.raises(ValueError, match="square"):
        metrics.acc_final([[0.1, 0.2]])
    with pytest.raises(ValueError, match="baseline"):
        metrics.fwt(R, [0.1])
