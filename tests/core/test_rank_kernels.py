"""The gate kernels of SMoRA and FlyLoRA (cl_bench/rank_kernels.py through cl_bench/rank_gates.py)
against the torch gates of strategies/smora.py and strategies/flylora.py (autograd of their route
code): in Triton's interpreter on the CPU, and on a GPU."""

from __future__ import annotations

import json
from collections.abc import Iterator

import pytest
import torch
from torch import nn

from cl_bench import rank_gates, routed
from strategies.flylora import FlyLoRALinear
from strategies.smora import SMoRALinear
from tests.helpers import run_interpreted

# SMoRA (r, k, P, gate_bias, N): P = 1 and 2, include and exclude, r not a power of 2, k = r (no
# selection); N not a multiple of the rows per tile (r = 64: 16 rows, r = 24: 32) nor of the tiles
# per forward program (4: the last program has empty tiles), and below one tile
SMORA_CASES = [
    (64, 8, 1, "include", 300),
    (64, 8, 1, "exclude", 300),
    (64, 8, 2, "include", 300),
    (64, 8, 2, "exclude", 77),
    (24, 5, 1, "include", 300),
    (24, 5, 1, "exclude", 7),
    (24, 24, 1, "include", 100),
]
# FlyLoRA (r, k, topk_score, N)
FLYLORA_CASES = [(32, 8, "signed", 300), (32, 8, "abs", 300), (32, 8, "signed", 5), (24, 24, "abs", 100)]
MODES = ["grad", "no_grad", "eval"]  # train with gradients (step counted), train without, eval

# Triton's interpreter (3.x) casts float32 to bf16 by truncation; compiled kernels round to nearest
# even (cvt.rn.bf16.f32), as torch does. Every script below first makes the interpreter round, so
# that bf16 results compare with the torch gates as they would on a GPU.
ROUND_BF16 = """
import numpy as np, torch, triton.language as tl
from triton.runtime import interpreter

assert hasattr(interpreter, "_convert_float"), "Triton's interpreter changed: revisit ROUND_BF16"
_truncating = interpreter._convert_float

def _convert_float(data, src, dst, rounding):
    if src == tl.float32 and dst == tl.bfloat16:
        rounded = torch.from_numpy(np.ascontiguousarray(data, dtype=np.float32)).bfloat16()
        return rounded.view(torch.int16).numpy().view(np.uint16)
    return _truncating(data, src, dst, rounding)

interpreter._convert_float = _convert_float
"""

INTERPRETED = """
import json, sys, torch
from torch import nn
from cl_bench import rank_gates
from strategies.flylora import FlyLoRALinear
from strategies.smora import SMoRALinear

def excess(got, expected, eps):
    # the largest error beyond one rounding of the dtype, relative to the largest value
    got, expected = got.double(), expected.double()
    scale = float(expected.abs().max()) or 1.0
    return float(((got - expected).abs() - eps * expected.abs()).max()) / scale

def nonzero_normal(gen, *shape):
    z = torch.randn(*shape, generator=gen)
    return torch.where(z == 0, 1.0, z)  # h != 0 is then the selection

def counters(layer):
    return [layer.usage.step.clone(), layer.usage.usage.clone(), layer.usage.tokens.clone()]

def gate(layer, leaves, mode, kernels):
    # (h, counters, gradients): the layer's route on the leaves, once through the kernels or not
    rank_gates.KERNELS = kernels
    layer.usage.reset()
    layer.usage.tokens.fill_(3)  # counts add to what is there
    layer.train(mode != "eval")
    leaves = [t.detach().requires_grad_(mode == "grad") for t in leaves]
    with torch.set_grad_enabled(mode == "grad"):
        h = layer.route(*leaves) if len(leaves) == 2 else layer.route(leaves[0], layer.d)
    grads = []
    if mode == "grad":
        dh = torch.randn(h.shape, generator=torch.Generator().manual_seed(9)).to(h.dtype)
        grads = list(torch.autograd.grad(h, leaves, dh))
    return h.detach(), counters(layer), grads

out = []
smora_cases, flylora_cases, modes = json.loads(sys.argv[1])
for (r, k, P, gate_bias, n), dtype_name, mode in [
    (c, d, m) for c in smora_cases for d in ("float32", "bfloat16") for m in modes
]:
    dtype = getattr(torch, dtype_name)
    gen = torch.Generator().manual_seed(r + k + P + n)
    layer = SMoRALinear(nn.Linear(4, 4), r, k, 8.0, rank_partition=P, gate_bias=gate_bias)
    layer.balance_bias.copy_(torch.randn(r, generator=gen) * 0.05)  # no ties between P copies
    # z and l as column slices of one [N, r + r / P + 3] tensor, as the fused path hands them
    zl = torch.cat([nonzero_normal(gen, n, r), 2 * torch.randn(n, r // P + 3, generator=gen)], 1).to(dtype)
    leaves = [zl[:, :r], zl[:, r : r + r // P]]
    h, c, g = gate(layer, leaves, mode, True)
    h_ref, c_ref, g_ref = gate(layer, leaves, mode, False)
    eps = torch.finfo(dtype).eps
    out.append({
        "case": ["smora", r, k, P, gate_bias, n, dtype_name, mode],
        "dtype": h.dtype == dtype and all(a.dtype == b.dtype for a, b in zip(g, g_ref)),
        "mask": torch.equal(h != 0, h_ref != 0) and int((h != 0).sum()) == n * k,
        "counters": all(torch.equal(a, b) for a, b in zip(c, c_ref)),
        "h": excess(h, h_ref, eps),
        "dz": excess(g[0], g_ref[0], eps) if g else 0.0,
        "dl": excess(g[1], g_ref[1], eps) if g else 0.0,
    })
for (r, k, score, n), dtype_name, mode in [
    (c, d, m) for c in flylora_cases for d in ("float32", "bfloat16") for m in modes
]:
    dtype = getattr(torch, dtype_name)
    gen = torch.Generator().manual_seed(r + k + n)
    layer = FlyLoRALinear(nn.Linear(4, 4), r, k, 8.0, seed=0, topk_score=score)
    layer.d.copy_(torch.randn(r, generator=gen) * 0.3)
    z = nonzero_normal(gen, n, r + 5).to(dtype)[:, 2 : 2 + r]
    h, c, g = gate(layer, [z], mode, True)
    h_ref, c_ref, g_ref = gate(layer, [z], mode, False)
    out.append({
        "case": ["flylora", r, k, score, n, dtype_name, mode],
        "dtype": h.dtype == dtype and all(a.dtype == b.dtype for a, b in zip(g, g_ref)),
        "mask": torch.equal(h != 0, h_ref != 0) and int((h != 0).sum()) == n * k,
        "counters": all(torch.equal(a, b) for a, b in zip(c, c_ref)),
        "h": 0.0 if torch.equal(h, h_ref) else 1.0,  # exact: a product by 0 or 1
        "dz": 0.0 if all(torch.equal(a, b) for a, b in zip(g, g_ref)) else 1.0,
        "dl": 0.0,
    })
print(json.dumps(out))
"""

TIES = """
import json, numpy as np, torch
from torch import nn
from cl_bench import rank_gates
from strategies.flylora import FlyLoRALinear
from strategies.smora import SMoRALinear

rank_gates.KERNELS = True

def lowest_index_top_k(scores, k):
    # the top k of each row by value, the lowest index first among equal values (-0.0 == +0.0)
    values = scores.double().numpy() + 0.0
    cols = np.broadcast_to(np.arange(values.shape[-1]), values.shape)
    mask = np.zeros(values.shape, dtype=bool)
    np.put_along_axis(mask, np.lexsort((cols, -values), axis=-1)[..., :k], True, axis=-1)
    return mask

out = []
gen = torch.Generator().manual_seed(0)
for r, k, P in [(24, 5, 1), (24, 5, 2), (64, 8, 1)]:
    n = 300
    layer = SMoRALinear(nn.Linear(4, 4), r, k, 8.0, rank_partition=P).train()
    logits = torch.randint(-3, 4, (n, r // P), generator=gen).float()  # many exact ties; beta = 0
    z = torch.ones(n, r, requires_grad=True)
    h = layer.route(z, logits.requires_grad_())
    (dz,) = torch.autograd.grad(h, z, torch.ones(n, r))
    want = lowest_index_top_k(logits.detach().repeat_interleave(P, dim=-1), k)
    out.append({
        "case": ["smora", r, k, P],
        "ties": bool((logits[:, None, :] == logits[:, :, None]).sum() > n * (r // P)),
        "mask": bool(np.array_equal((h != 0).numpy(), want)),
        "backward": bool(np.array_equal((dz != 0).numpy(), want)),
        "counts": torch.equal(layer.usage.usage[0], torch.from_numpy(want.sum(0))),
    })
for score in ("signed", "abs"):
    n, r, k = 300, 32, 8
    layer = FlyLoRALinear(nn.Linear(4, 4), r, k, 8.0, seed=0, topk_score=score).train()
    z = torch.randint(-3, 4, (n, r), generator=gen).float()  # d = 0
    z[(z == 0) & (torch.rand(n, r, generator=gen) < 0.5)] = -0.0
    z.requires_grad_()
    h = layer.route(z, layer.d)
    (dz,) = torch.autograd.grad(h, z, torch.ones(n, r))
    want = lowest_index_top_k(z.detach() if score == "signed" else z.detach().abs(), k)
    out.append({
        "case": ["flylora", r, k, score],
        "ties": True,
        "mask": bool(np.array_equal((h != 0).numpy(), want & (z.detach() != 0).numpy())),
        "backward": bool(np.array_equal(dz.numpy(), want.astype(np.float32))),
        "counts": torch.equal(layer.usage.usage[0], torch.from_numpy(want.sum(0))),
    })
print(json.dumps(out))
"""

INTERPRETED_LAYERS = """
import json, torch
from tests.core.test_rank_kernels import layer_gradients, relative_error

out = []
for name in ("smora", "smora-P2-exclude", "flylora", "flylora-abs"):
    for autocast in (False, True):
        got = layer_gradients(name, "cpu", kernels=True, autocast=autocast)
        want = layer_gradients(name, "cpu", kernels=False, autocast=autocast)
        out.append({
            "case": [name, autocast],
            "errors": [relative_error(a, b, autocast) for a, b in zip(got[0], want[0])],
            "counters": all(torch.equal(a, b) for a, b in zip(got[1], want[1])),
        })
print(json.dumps(out))
"""


def interpret(script: str, *args: str) -> list[dict]:
    """Run ``script`` under Triton's interpreter (:func:`tests.helpers.run_interpreted`)."""
    result: list[dict] = run_interpreted(ROUND_BF16 + script, *args)
    return result


@pytest.mark.slow
def test_gate_kernels_equal_the_torch_gates_in_the_interpreter() -> None:
    """Random scores without ties, float32 and bf16 z and logits (read in place as column slices),
    in the three counting modes. The selection (every token's k ranks) and the counters (step,
    usage, tokens) are exact; FlyLoRA's h and dz are bitwise equal; SMoRA's h and dz are within one
    rounding of their dtype plus 1e-6 of the largest value, dl plus 2e-6 (float32 sums in another
    order and the sigmoid's last bit: a bf16 gate may round the other way)."""
    cases = interpret(INTERPRETED, json.dumps([SMORA_CASES, FLYLORA_CASES, MODES]))
    assert len(cases) == (len(SMORA_CASES) + len(FLYLORA_CASES)) * 2 * len(MODES)
    for result in cases:
        case = result["case"]
        assert result["dtype"], case
        assert result["mask"], case
        assert result["counters"], case
        assert result["h"] < 1e-6, case
        assert result["dz"] < 1e-6, case
        assert result["dl"] < 2e-6, case


@pytest.mark.slow
def test_ties_select_the_lowest_rank_in_the_interpreter() -> None:
    """Many exact ties (SMoRA: integer logits and beta = 0, with P = 2 an odd k splitting a pair of
    copies; FlyLoRA: integer z with -0.0 next to +0.0, d = 0): the kernels select the k largest
    scores, the lowest rank first among equal ones, in the forward, the backward and the counts."""
    for result in interpret(TIES):
        assert result["ties"], result["case"]
        assert result["mask"], result["case"]
        assert result["backward"], result["case"]
        assert result["counts"], result["case"]


def _make(name: str, base: nn.Linear) -> SMoRALinear | FlyLoRALinear:
    r, k = (64, 8) if name.startswith("smora") else (32, 8)
    if name == "smora":
        layer: SMoRALinear | FlyLoRALinear = SMoRALinear(base, r, k, 16.0)
    elif name == "smora-P2-exclude":
        layer = SMoRALinear(base, r, k, 16.0, rank_partition=2, gate_bias="exclude")
    else:
        layer = FlyLoRALinear(
            base, r, k, 64.0, seed=3, topk_score="abs" if name.endswith("abs") else "signed"
        )
    with torch.no_grad():
        layer.B.normal_()
        bias = layer.balance_bias if isinstance(layer, SMoRALinear) else layer.d
        bias.copy_(torch.randn_like(bias) * 0.01)
    return layer


def layer_gradients(
    name: str, device: str, *, kernels: bool, autocast: bool
) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """A 64 -> 48 layer's training forward and backward on the fused path (cl_bench.routed), the
    gate through the kernels or the torch code: ([y, eval y, x.grad, grads of A, B, router (the
    trained ones)], [the counters])."""
    routed.FUSED, rank_gates.KERNELS = True, kernels
    torch.manual_seed(0)
    layer = _make(name, nn.Linear(64, 48)).to(device)
    x = torch.randn(4, 50, 64, generator=torch.Generator().manual_seed(1)).to(device).requires_grad_(True)
    with torch.autocast(device, dtype=torch.bfloat16, enabled=autocast):
        y = layer.train()(x)
        with torch.no_grad():
            evaluated = layer.eval()(x)
    y.float().square().sum().backward()
    assert x.grad is not None
    grads = [
        p.grad
        for p in (layer.A, layer.B, getattr(layer, "router", None))
        if p is not None and p.requires_grad
    ]
    assert all(g is not None for g in grads)
    out = [t.detach().double() for t in (y, evaluated, x.grad, *grads)]
    return out, [t.clone() for t in (layer.usage.step, layer.usage.usage, layer.usage.tokens)]


def relative_error(got: torch.Tensor, want: torch.Tensor, bf16: bool) -> float:
    """float32: the largest error relative to the largest value; bf16: the error's norm relative
    to the value's (roundings fall elsewhere when a gate rounds the other way)."""
    if bf16:
        return float((got - want).norm() / want.norm())
    return float((got - want).abs().max() / want.abs().max())


@pytest.mark.slow
def test_layers_on_the_fused_path_equal_the_torch_gates_in_the_interpreter() -> None:
    """A whole SMoRA / FlyLoRA layer on the fused path of cl_bench.routed (its autograd.grad over
    the gate reaches the kernels' backward), float32 and bf16 autocast: output, eval output and
    the gradients of x, A, B and the router within 1e-5 of the largest value in float32 (float32
    sums in another order), within 1e-3 in norm under bf16 autocast (a gate that rounds the other
    way), and the counters exact."""
    for result in interpret(INTERPRETED_LAYERS):
        bf16 = result["case"][1]
        assert max(result["errors"]) < (1e-3 if bf16 else 1e-5), result
        assert result["counters"], result["case"]


@pytest.fixture
def restore_flags() -> Iterator[None]:
    previous = routed.FUSED, rank_gates.KERNELS
    yield
    routed.FUSED, rank_gates.KERNELS = previous


def test_the_cpu_and_what_the_kernels_do_not_take_run_the_torch_gates(restore_flags: None) -> None:
    """By default the CPU runs the torch gates (the regression goldens' numbers); forced on, the
    kernels still leave float64, a rank partition that is not a power of 2, and a non-float32 bias
    to the torch code."""
    z, logits, beta = torch.randn(5, 12), torch.randn(5, 4), torch.zeros(12)
    rank_gates.KERNELS = None
    assert not rank_gates.smora_serves(z, logits[:, :3], beta, 4)
    assert not rank_gates.flylora_serves(z, beta)
    assert not rank_gates.kernels_enabled(z)
    pytest.importorskip("triton")
    rank_gates.KERNELS = True
    assert rank_gates.smora_serves(z, logits[:, :3], beta, 4)
    assert rank_gates.flylora_serves(z, beta)
    assert not rank_gates.smora_serves(z, logits, beta, 3)  # P = 3
    assert not rank_gates.smora_serves(z.double(), logits[:, :3].double(), beta, 4)
    assert not rank_gates.flylora_serves(z, beta.double())
    rank_gates.KERNELS = False
    assert not rank_gates.flylora_serves(z, beta)


needs_cuda_triton = pytest.mark.skipif(
    not (torch.cuda.is_available() and rank_gates.kernels_enabled(torch.zeros(1, device="cuda"))),
    reason="needs CUDA and Triton",
)


@pytest.mark.gpu
@needs_cuda_triton
@pytest.mark.parametrize("name", ["smora", "smora-P2-exclude", "flylora", "flylora-abs"])
@pytest.mark.parametrize("autocast", [False, True], ids=["fp32", "bf16"])
def test_kernel_gates_on_cuda_equal_the_torch_gates(name: str, autocast: bool, restore_flags: None) -> None:
    """Compiled kernels, a whole layer forward and backward on the fused path: output, eval output
    and the gradients of x, A (SMoRA), B and the router (SMoRA) against the torch gates on CUDA
    within 1e-4 of the largest value in float32 (TF32 off; float32 sums in another order, the
    sigmoid's and the division's last bits), 2e-2 under bf16 autocast; the counters exactly."""
    torch.backends.cuda.matmul.allow_tf32 = False  # other GPU tests (the loop) switch TF32 on
    got = layer_gradients(name, "cuda", kernels=True, autocast=autocast)
    want = layer_gradients(name, "cuda", kernels=False, autocast=autocast)
    for a, b in zip(got[0], want[0], strict=True):
        assert float((a - b).abs().max() / b.abs().max()) < (2e-2 if autocast else 1e-4)
    for a, b in zip(got[1], want[1], strict=True):
        assert torch.equal(a, b)
