"""MoRA's routing (strategies/mora/routing.py): the closed-form backward against autograd on the
CPU, and the Triton kernels against the torch reference on a GPU."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from torch import nn

from strategies.mora import MoRALinear
from strategies.mora.routing import (
    order_keys,
    route,
    route_backward,
    route_reference,
    select,
    selection_mask,
    use_triton,
)
from tests.helpers import run_interpreted

SHAPES = [(64, 16, 16), (300, 48, 16), (1000, 160, 16), (50, 300, 2), (7, 5, 16)]  # (N, R, k)


def scores(n: int, R: int, dtype: torch.dtype, device: str, seed: int = 0) -> torch.Tensor:
    return torch.randn(n, R, generator=torch.Generator().manual_seed(seed)).to(device=device, dtype=dtype)


def reference_selection(z: torch.Tensor, k: int) -> torch.Tensor | None:
    return route(z, k, 0.05, fused=False).selection


@pytest.mark.parametrize(("n", "R", "k"), SHAPES)
def test_closed_form_backward_equals_autograd_of_the_reference(n: int, R: int, k: int) -> None:
    z = scores(n, R, torch.float64, "cpu").requires_grad_(True)
    g = scores(n, R, torch.float64, "cpu", seed=1)
    h, _ = route_reference(z, k, 0.05)
    (expected,) = torch.autograd.grad(h, z, g)
    got = route_backward(z.detach(), g, reference_selection(z.detach(), k), 0.05)
    torch.testing.assert_close(got, expected, rtol=1e-10, atol=1e-12)


def test_zero_keys_take_no_norm_gradient() -> None:
    """A token whose key matches are all 0: the clamped norm passes no gradient (as autograd)."""
    z = torch.zeros(3, 8, dtype=torch.float64, requires_grad=True)
    g = torch.randn(3, 8, dtype=torch.float64)
    h, _ = route_reference(z, 4, 0.1)
    (expected,) = torch.autograd.grad(h, z, g)
    got = route_backward(z.detach(), g, reference_selection(z.detach(), 4), 0.1)
    torch.testing.assert_close(got, expected, rtol=0, atol=0)


def test_counts_are_the_non_zero_weights_per_token() -> None:
    z = scores(200, 40, torch.float32, "cpu")
    h, counts = route_reference(z, 16, 0.01, threshold=0.2)
    assert counts.dtype == torch.int32
    assert torch.equal(counts, (h != 0).sum(-1).to(torch.int32))
    assert int(counts.max()) <= 16
    assert int(counts.min()) < 16  # the gate and the softmax underflow drop some


def tied(n: int, R: int, dtype: torch.dtype, seed: int = 0) -> torch.Tensor:
    """Scores with many exact ties: integers in [-3, 3], each 0 a -0.0 or a +0.0 at random."""
    gen = torch.Generator().manual_seed(seed)
    z = torch.randint(-3, 4, (n, R), generator=gen).to(torch.float64)
    z[(z == 0) & (torch.rand(n, R, generator=gen, dtype=torch.float64) < 0.5)] = -0.0
    return z.to(dtype)


def lowest_index_top_k(z: torch.Tensor, k: int) -> np.ndarray:
    """The top k of each row by value, the lowest index first among equal values (-0.0 == +0.0)."""
    values = z.double().numpy() + 0.0  # -0.0 + 0.0 = +0.0
    cols = np.broadcast_to(np.arange(values.shape[-1]), values.shape)
    return np.lexsort((cols, -values), axis=-1)[..., :k]


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32, torch.float64])
@pytest.mark.parametrize(("R", "k"), [(160, 16), (40, 2), (17, 16), (17, 17)])
def test_reference_selection_takes_the_lowest_index_among_ties(dtype: torch.dtype, R: int, k: int) -> None:
    z = tied(300, R, dtype)
    signs = torch.signbit(z[z == 0])
    assert 0 < int(signs.sum()) < len(signs)  # -0.0 and +0.0 both present
    selection = route(z, k, 0.01).selection  # CPU: the reference
    if k >= R:
        assert selection is None
        return
    assert selection is not None
    np.testing.assert_array_equal(selection.numpy(), lowest_index_top_k(z, k))
    assert torch.equal(selection, select(z, k)[1])  # type: ignore[index]


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
def test_order_keys_order_by_value_then_lowest_column(dtype: torch.dtype) -> None:
    """The kernels' keys (torch twin): unique per row, sorted as the reference selection; -0.0 and
    +0.0 tie (their keys differ by the columns alone); the k-th largest key gives the same mask."""
    for z in (tied(200, 160, dtype, seed=3), scores(200, 160, dtype, "cpu", seed=3)):
        keys = order_keys(z)
        assert keys.dtype == (torch.int64 if dtype == torch.float32 else torch.int32)
        assert keys.sort(dim=-1).values.diff(dim=-1).gt(0).all()  # unique in each row
        np.testing.assert_array_equal(
            keys.argsort(dim=-1, descending=True).numpy(), lowest_index_top_k(z, 160)
        )
        for k in (2, 16, 159):
            kth = keys.topk(k, dim=-1).values[:, -1]
            assert torch.equal(selection_mask(z, kth), selection_mask(z, reference_selection(z, k)))
    signed = torch.tensor([[-0.0, 0.0, -0.0, 1.0, -1.0]], dtype=dtype)
    keys = order_keys(signed)[0]
    assert int(keys[0] - keys[1]) == 1  # equal values: the lower column first
    assert int(keys[1] - keys[2]) == 1
    assert keys[3] > keys[0] > keys[4]
    assert torch.equal(
        selection_mask(signed, reference_selection(signed, 2)),
        torch.tensor([[True, False, False, True, False]]),
    )


def test_route_backward_uses_the_given_selection() -> None:
    """The backward takes the selection it is given (it never selects again): with the selection
    of another k it gives the gradient for that k."""
    z = scores(64, 48, torch.float64, "cpu").requires_grad_(True)
    g = scores(64, 48, torch.float64, "cpu", seed=1)
    h4, _ = route_reference(z, 4, 0.05)
    (expected4,) = torch.autograd.grad(h4, z, g)
    h16, _ = route_reference(z, 16, 0.05)
    (expected16,) = torch.autograd.grad(h16, z, g)
    selection4 = reference_selection(z.detach(), 4)
    torch.testing.assert_close(
        route_backward(z.detach(), g, selection4, 0.05), expected4, rtol=1e-10, atol=1e-12
    )
    selection16 = reference_selection(z.detach(), 16)
    torch.testing.assert_close(
        route_backward(z.detach(), g, selection16, 0.05), expected16, rtol=1e-10, atol=1e-12
    )
    # the kernels' form of the selection (k-th order key per row) gives the same gradient
    z32 = z.detach().float()
    kth = order_keys(z32).topk(4, dim=-1).values[:, -1]
    torch.testing.assert_close(
        route_backward(z32, g.float(), kth, 0.05),
        route_backward(z32, g.float(), selection4, 0.05),
        rtol=0,
        atol=0,
    )


def test_route_returns_the_tail_of_h() -> None:
    z = scores(30, 48, torch.float32, "cpu")
    routed = route(z, 16, 0.01, tail=16)
    assert routed.tail is not None
    assert routed.tail.is_contiguous()
    assert torch.equal(routed.tail, routed.h[:, -16:])
    assert route(z, 16, 0.01).tail is None
    with pytest.raises(ValueError, match="tail"):
        route(z, 16, 0.01, tail=49)


# (N, R, k, tail): R not a power of 2; N not a multiple of the rows per program (8, 32, 64 rows)
KERNEL_SHAPES = [
    (300, 160, 16, 16),
    (77, 160, 2, 0),
    (50, 160, 160, 16),
    (133, 40, 16, 8),
    (61, 40, 2, 0),
    (45, 40, 40, 40),
    (99, 17, 16, 1),
    (70, 17, 2, 0),
    (29, 17, 17, 0),
]

INTERPRETED = """
import json, sys, torch
from strategies.mora import routing

def make(n, R, dtype, kind, seed):
    gen = torch.Generator().manual_seed(seed)
    if kind == "normal":
        return torch.randn(n, R, generator=gen).to(dtype)
    z = torch.randint(-3, 4, (n, R), generator=gen).double()  # many exact ties, -0.0 next to +0.0
    z[(z == 0) & (torch.rand(n, R, generator=gen, dtype=torch.float64) < 0.5)] = -0.0
    return z.to(dtype)

def excess(got, expected, eps):
    # the largest error beyond one rounding of the output dtype, relative to the largest value
    got, expected = got.double(), expected.double()
    scale = float(expected.abs().max()) or 1.0  # all 0: e.g. ties in [-3, 3] are all gated at 0.2
    return float(((got - expected).abs() - eps * expected.abs()).max()) / scale

out = []
for n, R, k, tail in json.loads(sys.argv[1]):
    for name in ("bfloat16", "float16", "float32"):
        dtype = getattr(torch, name)
        eps = torch.finfo(dtype).eps
        for kind in ("normal", "ties"):
            for threshold in (0.0, 0.2):
                z = make(n, R, dtype, kind, n + R + k)
                totals = (torch.zeros((), dtype=torch.int64), torch.full((), 5, dtype=torch.int64))
                got = routing._route_triton(z, k, 0.01, threshold, tail, totals)
                ref = routing._route_torch(z, k, 0.01, threshold, tail)
                K = min(k, R)
                if K < R:
                    kth = routing.order_keys(z).topk(K, dim=-1).values[:, -1]
                    same_kth = torch.equal(got.selection, kth)
                else:
                    same_kth = got.selection is None
                got_mask = routing.selection_mask(z, got.selection)
                row = {
                    "case": [n, R, k, tail, name, kind, threshold],
                    "mask": torch.equal(got_mask, routing.selection_mask(z, ref.selection)),
                    "kth": same_kth,
                    "counts": torch.equal(got.counts, ref.counts),
                    "totals": [int(t) for t in totals] == [int(ref.counts.sum()), 5 + n],
                    "h": excess(got.h, ref.h, eps),
                    "tail": torch.equal(got.tail, got.h[:, R - tail :]) if tail else got.tail is None,
                    "dz": 0.0,
                }
                if threshold == 0.0:
                    g = torch.randn(n, R, generator=torch.Generator().manual_seed(7)).to(dtype)
                    dz = routing._route_backward_triton(z, g, got.selection, 0.01)
                    dz_ref = routing.route_backward(z, g, ref.selection, 0.01, fused=False)
                    row["dz"] = excess(dz, dz_ref, eps)
                out.append(row)
print(json.dumps(out))
"""


def interpret(script: str, *args: str) -> list[dict]:
    """Run ``script`` under Triton's interpreter (:func:`tests.helpers.run_interpreted`)."""
    result: list[dict] = run_interpreted(script, *args)
    return result


@pytest.mark.slow
def test_triton_kernels_equal_the_reference_in_the_interpreter() -> None:
    """The kernels' code runs on the CPU in Triton's interpreter (CI has no GPU): bf16, fp16 and
    fp32 scores, random or with many exact ties (and -0.0 next to +0.0). The selection (mask and
    saved k-th key) and the counts are exact; h and dz (the backward from the saved selection)
    are within one rounding of their dtype plus 1e-5 of the largest value."""
    results = interpret(INTERPRETED, json.dumps(KERNEL_SHAPES))
    assert len(results) == 3 * 2 * 2 * len(KERNEL_SHAPES)
    for result in results:
        case = result["case"]
        assert result["mask"], case
        assert result["kth"], case
        assert result["counts"], case
        assert result["totals"], case
        assert result["tail"], case
        assert result["h"] < 1e-5, case
        assert result["dz"] < 1e-5, case


def trained_layer(fused: bool, device: str) -> MoRALinear:
    """A 64 -> 48 layer after 9 increments (R = 160 ranks), every block with a random B."""
    torch.manual_seed(0)
    layer = MoRALinear(nn.Linear(64, 48), 16, 16, 0.01, 0.2, capacity=160, fused=fused).to(device)
    for _ in range(9):
        with torch.no_grad():
            layer.B.normal_()
        layer.increment()
    with torch.no_grad():
        layer.B.normal_()
    return layer


INTERPRETED_LAYER = """
import json, torch
from strategies.mora import routing
from tests.strategies.test_mora_routing import trained_layer

routing.use_triton = lambda z: z.dtype in (torch.float32, torch.bfloat16, torch.float16)  # CPU tensors
out = []
for dtype in (torch.float32, torch.bfloat16):
    results = []
    for fused in (True, False):
        layer = trained_layer(fused, "cpu")
        x = torch.randn(3, 41, 64, generator=torch.Generator().manual_seed(1)).requires_grad_(True)
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=dtype == torch.bfloat16):
            y = layer.train()(x)
            with torch.no_grad():
                evaluated = layer.eval()(x)
        y.float().square().sum().backward()
        results.append([t.detach().double() for t in (y, evaluated, x.grad, layer.A.grad, layer.B.grad)])
        results[-1].append(torch.cat([layer.active_sum, layer.n_tokens]).double())  # exact
    out.append([float((a - b).abs().max() / b.abs().max()) for a, b in zip(*results)])
print(json.dumps(out))
"""


@pytest.mark.slow
def test_fused_layer_equals_the_reference_layer_in_the_interpreter() -> None:
    """A 160-rank layer through the kernels (run by the interpreter on the CPU), in float32 and
    under bf16 autocast: output, eval output and the gradients of x, A and B equal those through
    the torch routing (same selection: the same tie rule), and so do the active-rank counters."""
    fp32, bf16 = interpret(INTERPRETED_LAYER)
    assert max(fp32[:5]) < 1e-5, fp32
    assert max(bf16[:5]) < 2e-2, bf16  # bf16 GEMMs and roundings of h and dz
    assert fp32[5] == bf16[5] == 0  # active-rank counters (train, eval) and token counters


needs_triton = pytest.mark.skipif(
    not (torch.cuda.is_available() and use_triton(torch.zeros(1, device="cuda"))),
    reason="needs CUDA and Triton",
)


@pytest.mark.gpu
@needs_triton
@pytest.mark.parametrize(("n", "R", "k"), SHAPES)
@pytest.mark.parametrize("threshold", [0.0, 0.2])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("kind", ["normal", "ties"])
def test_triton_forward_equals_the_reference(
    n: int, R: int, k: int, threshold: float, dtype: torch.dtype, kind: str
) -> None:
    """Compiled kernels: the selection (mask and k-th key) and the counts exactly, h within one
    rounding of its dtype (plus 1e-5 of the largest value)."""
    z = scores(n, R, dtype, "cuda") if kind == "normal" else tied(n, R, dtype).cuda()
    got = route(z, k, 0.01, threshold, tail=min(R, 16))
    ref = route(z, k, 0.01, threshold, fused=False, tail=min(R, 16))
    assert got.h.dtype == dtype
    assert torch.equal(selection_mask(z, got.selection), selection_mask(z, ref.selection))
    if k < R:
        assert torch.equal(got.selection, order_keys(z).topk(k, dim=-1).values[:, -1])
    assert torch.equal(got.counts, ref.counts)
    assert got.tail is not None
    assert torch.equal(got.tail, got.h[:, -min(R, 16) :])
    eps = torch.finfo(dtype).eps
    h, h_ref = got.h.double(), ref.h.double()
    assert ((h - h_ref).abs() - eps * h_ref.abs()).max() <= 1e-5 * h_ref.abs().max()


@pytest.mark.gpu
@needs_triton
@pytest.mark.parametrize(("n", "R", "k"), SHAPES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("kind", ["normal", "ties"])
def test_triton_backward_equals_the_closed_form(
    n: int, R: int, k: int, dtype: torch.dtype, kind: str
) -> None:
    """The backward kernel from the forward's saved selection vs the torch closed form."""
    z = scores(n, R, dtype, "cuda") if kind == "normal" else tied(n, R, dtype).cuda()
    g = scores(n, R, dtype, "cuda", seed=1)
    fused = route_backward(z, g, route(z, k, 0.01).selection, 0.01).double()
    reference = route_backward(z, g, route(z, k, 0.01, fused=False).selection, 0.01, fused=False).double()
    eps = torch.finfo(dtype).eps
    assert ((fused - reference).abs() - eps * reference.abs()).max() <= 1e-5 * reference.abs().max()
    with pytest.raises(ValueError, match="k-th order key"):
        route_backward(z, g, route(z, min(k, R - 1), 0.01, fused=False).selection, 0.01)


@pytest.mark.gpu
@needs_triton
def test_fused_layer_on_cuda_equals_the_reference_layer() -> None:
    """Forward and gradients of a 160-rank layer: Triton routing vs the torch reference."""
    torch.backends.cuda.matmul.allow_tf32 = False  # other GPU tests (the loop) switch TF32 on
    layers = [trained_layer(fused, "cuda") for fused in (True, False)]
    x = torch.randn(4, 50, 64, device="cuda")
    grads = []
    for layer in layers:
        xi = x.clone().requires_grad_(True)
        y = layer.train()(xi)
        y.square().sum().backward()
        with torch.no_grad():
            evaluated = layer.eval()(x)
        grads.append((y.detach(), evaluated, xi.grad, layer.A.grad, layer.B.grad))
    for got, expected in zip(*grads, strict=True):
        torch.testing.assert_close(got, expected, rtol=1e-3, atol=2e-4)
