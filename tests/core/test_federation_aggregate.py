"""The server's aggregation rules (cl_bench.federation.aggregate): FedAvg, the product average, bytes."""

from __future__ import annotations

import pytest
import torch

from cl_bench.errors import FederationError
from cl_bench.federation.aggregate import fedavg, product_average, state_bytes


def _randn(*shape: int, seed: int) -> torch.Tensor:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


# -- fedavg ------------------------------------------------------------------------------------
def test_fedavg_is_the_hand_computed_weighted_mean() -> None:
    states = [
        {"a": torch.tensor([1.0, 2.0]), "b": torch.tensor([[0.0, 4.0]])},
        {"a": torch.tensor([5.0, 6.0]), "b": torch.tensor([[8.0, 0.0]])},
    ]
    out = fedavg(states, [1.0, 3.0])
    assert list(out) == ["a", "b"]
    # (1 * 1 + 3 * 5) / 4 = 4, (1 * 2 + 3 * 6) / 4 = 5; (3 * 8) / 4 = 6, (1 * 4) / 4 = 1
    assert torch.equal(out["a"], torch.tensor([4.0, 5.0]))
    assert torch.equal(out["b"], torch.tensor([[6.0, 1.0]]))


def test_fedavg_of_one_client_is_a_bitwise_clone() -> None:
    state = {"x": _randn(5, 7, seed=0), "y": _randn(3, seed=1).to(torch.bfloat16)}
    out = fedavg([state], [17.0])
    for key, value in state.items():
        assert torch.equal(out[key], value)
        assert out[key].dtype == value.dtype
        assert out[key].data_ptr() != value.data_ptr()  # a copy: the caller may modify it


def test_fedavg_renormalises_the_weights_over_the_clients_that_sent_a_key() -> None:
    states = [
        {"a": torch.tensor([2.0]), "only0": torch.tensor([7.0])},
        {"a": torch.tensor([6.0]), "c": torch.tensor([1.0])},
        {"c": torch.tensor([9.0])},
    ]
    out = fedavg(states, [1.0, 3.0, 1.0])
    assert torch.equal(out["a"], torch.tensor([5.0]))  # (2 + 18) / 4
    assert torch.equal(out["only0"], torch.tensor([7.0]))  # one holder: its value, not 7 / 5
    assert torch.equal(out["c"], torch.tensor([3.0]))  # (3 * 1 + 1 * 9) / 4
    assert list(out) == ["a", "only0", "c"]


def test_fedavg_returns_values_every_client_sent_alike_bit_for_bit() -> None:
    x = _randn(64, 33, seed=2)
    out = fedavg([{"x": x.clone()} for _ in range(3)], [0.1, 0.7, 0.2])
    assert torch.equal(out["x"], x)


def test_fedavg_accumulates_in_float32_and_keeps_the_dtype() -> None:
    a = torch.tensor([1.0, 256.0], dtype=torch.bfloat16)
    b = torch.tensor([1.0 + 2**-7, 257.0], dtype=torch.bfloat16)  # bf16 has 8 bits of mantissa
    out = fedavg([{"t": a}, {"t": b}], [1.0, 1.0])["t"]
    assert out.dtype == torch.bfloat16
    expected = ((a.float() + b.float()) / 2).to(torch.bfloat16)
    assert torch.equal(out, expected)


def test_fedavg_keeps_float64_in_float64() -> None:
    a = torch.tensor([1.0], dtype=torch.float64)
    b = torch.tensor([1.0 + 2**-40], dtype=torch.float64)  # below float32's resolution
    out = fedavg([{"t": a}, {"t": b}], [1.0, 1.0])["t"]
    assert out.dtype == torch.float64
    assert out.item() == 1.0 + 2**-41


def test_fedavg_names_the_key_whose_shapes_differ() -> None:
    states = [
        {"ok": torch.zeros(2), "bad": torch.zeros(2, 3)},
        {"ok": torch.zeros(2), "bad": torch.zeros(3, 2)},
    ]
    with pytest.raises(FederationError, match="'bad'"):
        fedavg(states, [1.0, 1.0])


@pytest.mark.parametrize(
    ("weights", "match"),
    [([1.0], "2 client states with 1 weights"), ([1.0, -1.0], ">= 0"), ([0.0, 0.0], "total weight of 0")],
)
def test_fedavg_rejects_bad_weights(weights: list[float], match: str) -> None:
    with pytest.raises(FederationError, match=match):
        fedavg([{"a": torch.zeros(1)}, {"a": torch.ones(1)}], weights)


def test_fedavg_rejects_integer_tensors_it_cannot_average() -> None:
    with pytest.raises(FederationError, match="'n'.*int64"):
        fedavg([{"n": torch.tensor([1])}, {"n": torch.tensor([2])}], [1.0, 1.0])


# -- product_average ---------------------------------------------------------------------------
def _weighted_product(Bs: list[torch.Tensor], As: list[torch.Tensor], w: list[float]) -> torch.Tensor:
    return sum(wk * (B @ A) for B, A, wk in zip(Bs, As, w, strict=True)) / sum(w)


def test_product_average_is_exact_when_the_clients_share_their_a() -> None:
    A = _randn(3, 10, seed=0)
    Bs = [_randn(8, 3, seed=1), _randn(8, 3, seed=2)]
    states = [{"l.B": B, "l.A": A.clone(), "head": torch.full((2,), float(i))} for i, B in enumerate(Bs)]
    out, residuals = product_average(states, [1.0, 3.0], [("l.B", "l.A")])
    expected = _weighted_product(Bs, [A, A], [1.0, 3.0])  # = (mean B) A: rank 3
    assert out["l.B"].shape == (8, 3)
    assert out["l.A"].shape == (3, 10)
    torch.testing.assert_close(out["l.B"] @ out["l.A"], expected, rtol=1e-5, atol=1e-5)
    assert residuals == {"l.B": 0.0}
    assert torch.equal(out["head"], torch.tensor([0.75, 0.75]))  # keys in no pair: fedavg
    assert list(out) == ["l.B", "l.A", "head"]


def test_product_average_is_the_best_rank_r_approximation_otherwise() -> None:
    r = 2
    Bs = [_randn(6, r, seed=10 + k) for k in range(3)]
    As = [_randn(r, 5, seed=20 + k) for k in range(3)]
    w = [1.0, 2.0, 5.0]
    states = [{"B": B, "A": A} for B, A in zip(Bs, As, strict=True)]
    out, residuals = product_average(states, w, [("B", "A")])
    mean = _weighted_product(Bs, As, w)
    U, S, Vh = torch.linalg.svd(mean, full_matrices=False)
    best = U[:, :r] @ torch.diag(S[:r]) @ Vh[:r]
    torch.testing.assert_close(out["B"] @ out["A"], best, rtol=1e-5, atol=1e-5)
    expected_residual = float(torch.linalg.vector_norm(S[r:]) / torch.linalg.vector_norm(S))
    assert residuals["B"] > 0.05
    assert residuals["B"] == pytest.approx(expected_residual, rel=1e-5)
    discarded = float(torch.linalg.matrix_norm(mean - out["B"] @ out["A"]) / torch.linalg.matrix_norm(mean))
    assert residuals["B"] == pytest.approx(discarded, rel=1e-4)
    # the balanced split: B' = U_r sqrt(S_r), A' = sqrt(S_r) V_r^T, so the factors have equal norms
    torch.testing.assert_close(
        torch.linalg.vector_norm(out["B"], dim=0), torch.linalg.vector_norm(out["A"], dim=1)
    )


def test_product_average_of_one_client_gives_its_factors_back() -> None:
    state = {"B": _randn(4, 2, seed=3), "A": _randn(2, 6, seed=4)}
    out, residuals = product_average([state], [3.0], [("B", "A")])
    assert torch.equal(out["B"], state["B"])
    assert torch.equal(out["A"], state["A"])
    assert residuals == {"B": 0.0}


def test_product_average_of_zero_products_keeps_the_a_factor_alive() -> None:
    """All B = 0 (an untrained layer): the mean product is 0 and so is B', but A' keeps rows of the
    clients' mean row norm, so the rank can still learn (sqrt(0) on both sides would freeze it)."""
    As = [_randn(3, 7, seed=5), _randn(3, 7, seed=6)]
    states = [{"B": torch.zeros(4, 3), "A": A} for A in As]
    out, residuals = product_average(states, [1.0, 1.0], [("B", "A")])
    assert torch.equal(out["B"], torch.zeros(4, 3))
    row_norm = sum(float(torch.linalg.vector_norm(A, dim=1).mean()) for A in As) / 2
    torch.testing.assert_close(torch.linalg.vector_norm(out["A"], dim=1), torch.full((3,), row_norm))
    assert residuals == {"B": 0.0}


def test_product_average_rejects_half_a_pair() -> None:
    states = [{"B": torch.zeros(2, 1), "A": torch.zeros(1, 2)}, {"B": torch.zeros(2, 1)}]
    with pytest.raises(FederationError, match="only one of the low-rank pair"):
        product_average(states, [1.0, 1.0], [("B", "A")])


# -- bytes -------------------------------------------------------------------------------------
def test_state_bytes_counts_numel_times_element_size() -> None:
    state = {"a": torch.zeros(3, 4), "b": torch.zeros(10, dtype=torch.bfloat16), "c": torch.zeros(())}
    assert state_bytes(state) == 3 * 4 * 4 + 10 * 2 + 4
    assert state_bytes({}) == 0
