"""Optimizers and their conventions: torch AdamW, transformers' AdamW, SoRA's SparseAdamW, and the
weight-decay groups that exempt norms and biases.

Two AdamW conventions (``Convention``), which differ only in where eps sits and when the decay
applies; with g the gradient, t the parameter's step count, lr the learning rate, wd the decay:

    m <- beta1 m + (1 - beta1) g,   v <- beta2 v + (1 - beta2) g^2        (both)

- ``torch-adamw`` (``torch.optim.AdamW``): decay first, eps after the bias correction::

      p <- p (1 - lr wd)
      p <- p - (lr / (1 - beta1^t)) m / (sqrt(v) / sqrt(1 - beta2^t) + eps)

- ``hf-adamw`` (transformers' old ``transformers.AdamW``, ``correct_bias=True``, the optimizer
  of HF Trainer up to v4 and so of the official SoRA and DyLoRA scripts): eps added to sqrt(v)
  *before* the bias correction, which is folded into the step size, and the decay applied *after*
  the Adam update, to the already-updated parameter::

      p <- p - (lr sqrt(1 - beta2^t) / (1 - beta1^t)) m / (sqrt(v) + eps)
      p <- p - lr wd p

  :class:`HFAdamW` implements it, with transformers' own order of floating-point operations.

The two differ in eps and in the decay term only: placed before the correction, hf's eps acts as
``eps / sqrt(1 - beta2^t)`` in torch's form (about 32 eps at t = 1 with beta2 = 0.999, falling to
eps as t grows), and hf's decay is ``lr wd`` times the updated weight instead of the old one.

:class:`SparseAdamW` is the Adam part of SoRA's gate optimizer (TsinghuaC3I/SoRA
``src/sparse_optimizer.py``): the hf arithmetic with eps 1e-6 (``transformers.AdamW``'s default,
which the official script does not override for the gates), the update formed as
``(m / (sqrt(v) + eps)) * -step_size`` plus ``-lr wd p`` on the *old* p, added in one go, and no
weight decay in SoRA's use. The official step then soft-thresholds the gates; here SoRA does that
itself after :meth:`SparseAdamW.step` (``strategies/sora.py``), in its configured threshold mode.

Weight-decay groups (:func:`decay_groups`), the HF Trainer rule (``Trainer.get_decay_parameter_names``:
no decay inside ``nn.LayerNorm`` modules and for every name containing ``bias``): a parameter
gets no decay when

1. it is registered directly on a normalisation module, identified by the module's type
   (``nn.LayerNorm`` and subclasses such as open_clip's, ``nn.RMSNorm``, ``nn.GroupNorm``, batch
   and instance norms, and any class whose name ends in ``Norm``, e.g. ``LlamaRMSNorm``), or
2. its attribute name contains ``bias`` (``bias``, ``nn.MultiheadAttention``'s ``in_proj_bias``).

Everything else decays, 1-D or not: CLIP's ``class_embedding`` and positional embeddings decay, as
under HF Trainer. timm's rule (no decay for every ``ndim <= 1`` tensor, plus each model's
``no_weight_decay()`` list, typically positional and class embeddings) is not taken: the official
code of every method here that uses weight decay (SoRA, DyLoRA, and LISA through LMFlow) runs
under HF Trainer, and on CLIP the two rules differ only on the class and positional embeddings.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Collection, Iterable, Sequence
from typing import Any, Literal

import torch
from torch import nn

Convention = Literal["torch-adamw", "hf-adamw"]
CONVENTIONS: tuple[str, ...] = ("torch-adamw", "hf-adamw")

HF_TRAINER_EPS = 1e-8  # HF TrainingArguments.adam_epsilon: what Trainer passes to the main AdamW
SPARSE_ADAMW_EPS = 1e-6  # transformers.AdamW's default eps: SoRA's gate optimizer

NORM_TYPES: tuple[type[nn.Module], ...] = (
    nn.LayerNorm,
    nn.GroupNorm,
    nn.modules.batchnorm._NormBase,  # batch and instance norms
    *((nn.RMSNorm,) if hasattr(nn, "RMSNorm") else ()),
)


def is_norm(module: nn.Module) -> bool:
    """Whether ``module`` is a normalisation layer (by type; by class name for foreign norms)."""
    return isinstance(module, NORM_TYPES) or type(module).__name__.endswith("Norm")


def no_decay_ids(modules: Iterable[nn.Module]) -> set[int]:
    """``id`` of every parameter of ``modules`` exempt from weight decay (the rule of the module
    docstring: owned by a norm module, or named ``*bias*``)."""
    exempt: set[int] = set()
    for root in modules:
        for module in root.modules():
            norm = is_norm(module)
            for name, p in module.named_parameters(recurse=False):
                if norm or "bias" in name.lower():
                    exempt.add(id(p))
    return exempt


def decay_groups(
    params: Iterable[nn.Parameter], modules: Iterable[nn.Module]
) -> tuple[list[nn.Parameter], list[nn.Parameter]]:
    """``(decay, no_decay)``: ``params`` split by the no-decay rule, each in the given order.

    ``modules`` are searched for the owners of ``params`` (a parameter found in none decays).
    """
    exempt = no_decay_ids(modules)
    params = list(params)
    return [p for p in params if id(p) not in exempt], [p for p in params if id(p) in exempt]


def param_groups(
    params: Sequence[nn.Parameter], weight_decay: float, no_decay: Collection[int]
) -> list[dict[str, Any]]:
    """Optimizer groups: ``weight_decay`` for ``params`` not in ``no_decay`` (ids), 0 for the rest;
    a single group when nothing is exempt or the decay is 0 (empty groups are left out)."""
    exempt = [p for p in params if id(p) in no_decay]
    if weight_decay == 0 or not exempt:
        return [{"params": list(params), "weight_decay": weight_decay}]
    decay = [p for p in params if id(p) not in no_decay]
    groups = [{"params": decay, "weight_decay": weight_decay}] if decay else []
    return [*groups, {"params": exempt, "weight_decay": 0.0}]


# ----------------------------------------------------------------------------- the arithmetic


def torch_adamw_update(
    params: list[torch.Tensor],
    grads: list[torch.Tensor],
    exp_avgs: list[torch.Tensor],
    exp_avg_sqs: list[torch.Tensor],
    step: int,
    lr: float,
    betas: tuple[float, float],
    eps: float,
    weight_decay: float,
) -> None:
    """One ``torch.optim.AdamW`` step (its foreach arithmetic, bitwise) on tensors at step ``step``."""
    beta1, beta2 = betas
    if weight_decay != 0:
        torch._foreach_mul_(params, 1 - lr * weight_decay)
    torch._foreach_lerp_(exp_avgs, grads, 1 - beta1)
    torch._foreach_mul_(exp_avg_sqs, beta2)
    torch._foreach_addcmul_(exp_avg_sqs, grads, grads, 1 - beta2)
    step_size = (lr / (1 - beta1**step)) * -1
    denom = torch._foreach_sqrt(exp_avg_sqs)
    torch._foreach_div_(denom, (1 - beta2**step) ** 0.5)
    torch._foreach_add_(denom, eps)
    torch._foreach_addcdiv_(params, exp_avgs, denom, step_size)


def _hf_moments(
    grads: list[torch.Tensor],
    exp_avgs: list[torch.Tensor],
    exp_avg_sqs: list[torch.Tensor],
    step: int,
    lr: float,
    betas: tuple[float, float],
    eps: float,
) -> tuple[list[torch.Tensor], float]:
    """transformers.AdamW's moment updates; returns ``sqrt(v) + eps`` and the corrected step size."""
    beta1, beta2 = betas
    torch._foreach_mul_(exp_avgs, beta1)
    torch._foreach_add_(exp_avgs, grads, alpha=1.0 - beta1)
    torch._foreach_mul_(exp_avg_sqs, beta2)
    torch._foreach_addcmul_(exp_avg_sqs, grads, grads, 1.0 - beta2)
    denom = list(torch._foreach_sqrt(exp_avg_sqs))
    torch._foreach_add_(denom, eps)
    step_size = lr * math.sqrt(1.0 - beta2**step) / (1.0 - beta1**step)
    return denom, step_size


def hf_adamw_update(
    params: list[torch.Tensor],
    grads: list[torch.Tensor],
    exp_avgs: list[torch.Tensor],
    exp_avg_sqs: list[torch.Tensor],
    step: int,
    lr: float,
    betas: tuple[float, float],
    eps: float,
    weight_decay: float,
) -> None:
    """One ``transformers.AdamW`` step (``correct_bias=True``) on tensors at step ``step``: eps
    before the bias correction, decay after the update (see the module docstring)."""
    denom, step_size = _hf_moments(grads, exp_avgs, exp_avg_sqs, step, lr, betas, eps)
    torch._foreach_addcdiv_(params, exp_avgs, denom, -step_size)
    if weight_decay > 0.0:
        torch._foreach_add_(params, params, alpha=-lr * weight_decay)


def sparse_adamw_update(
    params: list[torch.Tensor],
    grads: list[torch.Tensor],
    exp_avgs: list[torch.Tensor],
    exp_avg_sqs: list[torch.Tensor],
    step: int,
    lr: float,
    betas: tuple[float, float],
    eps: float,
    weight_decay: float,
) -> None:
    """The Adam part of SoRA's ``SparseAdamW.step`` (before its threshold): the hf moments and step
    size, the update ``(m / (sqrt(v) + eps)) * -step_size`` plus ``-lr wd p`` on the old p."""
    denom, step_size = _hf_moments(grads, exp_avgs, exp_avg_sqs, step, lr, betas, eps)
    to_add = torch._foreach_div(exp_avgs, denom)
    torch._foreach_mul_(to_add, -step_size)
    if weight_decay > 0.0:
        torch._foreach_add_(to_add, torch._foreach_mul(params, -lr * weight_decay))
    torch._foreach_add_(params, to_add)


Update = Callable[
    [
        list[torch.Tensor],
        list[torch.Tensor],
        list[torch.Tensor],
        list[torch.Tensor],
        int,
        float,
        tuple[float, float],
        float,
        float,
    ],
    None,
]
UPDATES: dict[str, Update] = {"torch-adamw": torch_adamw_update, "hf-adamw": hf_adamw_update}


class HFAdamW(torch.optim.Optimizer):
    """transformers' (deprecated) ``AdamW`` with ``correct_bias=True``, as a multi-tensor optimizer.

    Per parameter, with its own step count t::

        m <- beta1 m + (1 - beta1) g;  v <- beta2 v + (1 - beta2) g^2
        p <- p - (lr sqrt(1 - beta2^t) / (1 - beta1^t)) m / (sqrt(v) + eps)    (eps before the correction)
        p <- p - lr wd p                                                       (decay after the update)

    in transformers' order of operations. Parameters whose ``grad`` is None are skipped (no moment
    update, no decay). ``eps`` defaults to transformers' 1e-6; HF Trainer passes 1e-8
    (``adam_epsilon``), which :func:`make_adamw` uses. Steps are host integers (no device sync).
    """

    def __init__(
        self,
        params: Iterable[torch.Tensor] | Iterable[dict[str, Any]],
        lr: float = 1e-3,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-6,
        weight_decay: float = 0.0,
    ) -> None:
        if lr < 0 or eps < 0 or weight_decay < 0 or not all(0 <= b < 1 for b in betas):
            raise ValueError(f"invalid lr={lr}, betas={betas}, eps={eps} or weight_decay={weight_decay}")
        super().__init__(params, {"lr": lr, "betas": betas, "eps": eps, "weight_decay": weight_decay})

    @torch.no_grad()
    def step(self, closure: Callable[[], float] | None = None) -> float | None:  # type: ignore[override]
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            buckets: dict[int, tuple[list[torch.Tensor], ...]] = {}  # by step count
            for p in group["params"]:
                if p.grad is None:
                    continue
                if p.grad.is_sparse:
                    raise RuntimeError("HFAdamW does not support sparse gradients")
                state = self.state[p]
                if not state:
                    state["step"] = 0
                    state["exp_avg"] = torch.zeros_like(p, memory_format=torch.preserve_format)
                    state["exp_avg_sq"] = torch.zeros_like(p, memory_format=torch.preserve_format)
                state["step"] += 1
                bucket = buckets.setdefault(state["step"], ([], [], [], []))
                for lst, t in zip(bucket, (p, p.grad, state["exp_avg"], state["exp_avg_sq"]), strict=True):
                    lst.append(t)
            for t, (ps, grads, exp_avgs, exp_avg_sqs) in buckets.items():
                self._update(
                    ps,
                    grads,
                    exp_avgs,
                    exp_avg_sqs,
                    t,
                    group["lr"],
                    group["betas"],
                    group["eps"],
                    group["weight_decay"],
                )
        return loss

    def _update(self, *args: Any) -> None:
        hf_adamw_update(*args)


class SparseAdamW(HFAdamW):
    """The Adam part of SoRA's ``SparseAdamW`` (:func:`sparse_adamw_update`), eps 1e-6 by default.

    The official optimizer soft-thresholds every parameter after this update; the caller does it
    here (SoRA's ``proximal_step``), so the threshold's mode stays SoRA's.
    """

    def __init__(
        self,
        params: Iterable[torch.Tensor] | Iterable[dict[str, Any]],
        lr: float = 1e-3,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = SPARSE_ADAMW_EPS,
        weight_decay: float = 0.0,
    ) -> None:
        super().__init__(params, lr=lr, betas=betas, eps=eps, weight_decay=weight_decay)

    def _update(self, *args: Any) -> None:
        sparse_adamw_update(*args)


def make_adamw(
    params: Sequence[nn.Parameter],
    lr: float,
    weight_decay: float,
    convention: Convention = "torch-adamw",
    *,
    no_decay: Collection[int] = (),
    betas: tuple[float, float] = (0.9, 0.999),
    eps: float = HF_TRAINER_EPS,
) -> torch.optim.Optimizer:
    """AdamW in ``convention`` over ``params``, with no decay for the ids in ``no_decay``.

    ``torch-adamw``: ``torch.optim.AdamW``, fused on CUDA (one kernel for all parameters), foreach
    on the CPU. ``hf-adamw``: :class:`HFAdamW` (foreach on every device). eps 1e-8 in both (torch's
    default, HF Trainer's ``adam_epsilon``).
    """
    if not params:
        raise ValueError("no trainable parameters")
    groups = param_groups(params, weight_decay, no_decay)
    if convention == "hf-adamw":
        return HFAdamW(groups, lr=lr, betas=betas, eps=eps, weight_decay=weight_decay)
    if convention != "torch-adamw":
        raise ValueError(f"unknown optimizer convention {convention!r} (one of {', '.join(CONVENTIONS)})")
    on_cuda = params[0].is_cuda
    return torch.optim.AdamW(
        groups,
        lr=lr,
        weight_decay=weight_decay,
        betas=betas,
        eps=eps,
        fused=on_cuda or None,
        foreach=None if on_cuda else True,
    )
