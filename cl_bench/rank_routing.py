"""Rank-wise routing shared by the rank-1 mixtures (SMoRA, FlyLoRA), whose experts are single ranks
chosen per token by a top-k: the selection mask, the per-rank counters, the sign-rule balancing
step, and the routing history with its figures (STRATEGIES-rankwise.md Part A).
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import torch
from torch import nn


def topk_mask(scores: torch.Tensor, k: int) -> torch.Tensor:
    """0/1 mask (``scores``' dtype, no gradient) of the ``k`` largest entries along the last dim.

    Fixed shapes and no host sync (a CUDA graph can replay it); ties follow ``torch.topk``. The
    torch gates' selection (the CPU path); on CUDA the gate kernels of :mod:`cl_bench.rank_gates`
    select instead, the lowest index first among ties."""
    scores = scores.detach()
    return torch.zeros_like(scores).scatter_(-1, scores.topk(k, dim=-1).indices, 1.0)


class RankUsage(nn.Module):
    """Device counters of how often each of ``r`` ranks is selected (never trained; not in
    ``state_dict``: checkpoints carry them through :meth:`state`, via the strategy).

    - ``step`` [r]: selections by the training forwards (train mode, gradients on) since the last
      :func:`balance_biases`, i.e. of one optimizer step;
    - ``usage`` [2, r]: selections in the current experience, [train, eval] (module mode);
    - ``tokens`` [2]: tokens counted, [train, eval].
    All int64 and updated in place, so counting never syncs with the host.
    """

    step: torch.Tensor
    usage: torch.Tensor
    tokens: torch.Tensor

    def __init__(self, r: int, device: torch.device | None = None) -> None:
        super().__init__()
        for name, shape in (("step", (r,)), ("usage", (2, r)), ("tokens", (2,))):
            self.register_buffer(name, torch.zeros(shape, dtype=torch.long, device=device), persistent=False)

    def record(self, mask: torch.Tensor, training: bool) -> None:
        """Count one forward's selections: ``mask`` [tokens, ..., r] of 0/1 (extra dims: branches)."""
        counts = torch.count_nonzero(mask.reshape(-1, mask.shape[-1]), dim=0)
        mode = 0 if training else 1
        self.usage[mode].add_(counts)
        self.tokens[mode].add_(mask.shape[0])
        if training and torch.is_grad_enabled():
            self.step.add_(counts)

    def targets(self, training: bool) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
        """Where a gate kernel adds one forward's selections itself (:mod:`cl_bench.rank_gates`), by
        the rule of :meth:`record`: ``usage[mode]`` [r], ``tokens[mode]`` [1] and ``step`` [r], the
        last only for a training forward with gradients on (else None). Views of the buffers, read
        at the call (gradient mode included)."""
        mode = 0 if training else 1
        step = self.step if training and torch.is_grad_enabled() else None
        return self.usage[mode], self.tokens[mode : mode + 1], step

    def reset(self) -> None:
        self.step.zero_()
        self.usage.zero_()
        self.tokens.zero_()

    # -- checkpoint ------------------------------------------------------------------------------
    def state(self) -> dict[str, torch.Tensor]:
        """The counters as CPU copies, for a checkpoint. They are non-persistent buffers (not in
        ``state_dict``, so adding them changed no saved model), yet a run resumed inside an
        experience needs the counts of its steps before the checkpoint: the experience's load
        figures and active ranks per token are built on ``usage`` and ``tokens``, and ``step``
        feeds the next balancing step (zero between steps, saved all the same)."""
        return {name: getattr(self, name).detach().cpu().clone() for name in ("step", "usage", "tokens")}

    @torch.no_grad()
    def load_state(self, state: Mapping[str, torch.Tensor]) -> None:
        """Restore :meth:`state` in place (the buffers keep their device and address)."""
        for name in ("step", "usage", "tokens"):
            buffer, saved = getattr(self, name), state[name]
            if saved.shape != buffer.shape:
                raise ValueError(
                    f"RankUsage.{name}: saved shape {tuple(saved.shape)} != {tuple(buffer.shape)}"
                )
            buffer.copy_(saved)


@torch.no_grad()
def balance_biases(usages: Sequence[RankUsage], biases: Sequence[torch.Tensor], rate: float) -> None:
    """The loss-free balancing step of every layer at once: ``b += rate * sign(mean(c) - c)`` with
    ``c`` the layer's ``step`` counts, which then restart from 0 (a step without tokens moves nothing).

    ``sign`` is invariant to scaling c, so a step whose forwards ran twice on the same inputs (a
    recompute) moves the biases as once. A handful of kernels for all layers (no host sync)."""
    if not usages:
        return
    steps = [u.step for u in usages]
    if rate != 0:
        c = torch.stack(steps).double()
        moves = torch.sign(c.mean(dim=1, keepdim=True) - c).to(biases[0].dtype)
        torch._foreach_add_(list(biases), list(moves.unbind(0)), alpha=rate)
    torch._foreach_zero_(steps)


def usage_figures(counts: Sequence[int]) -> tuple[float, float, float]:
    """(max / mean, min / mean, fraction of ranks never selected) of one layer's selection counts
    (NaN, NaN, NaN when nothing was counted)."""
    total = sum(counts)
    if not counts or total == 0:
        return math.nan, math.nan, math.nan
    mean = total / len(counts)
    return max(counts) / mean, min(counts) / mean, sum(1 for c in counts if c == 0) / len(counts)


def most_used(counts: Sequence[int], k: int) -> frozenset[int]:
    """The ``k`` most selected ranks that were selected at all (ties: the lower index)."""
    order = sorted(range(len(counts)), key=lambda i: (-counts[i], i))
    return frozenset(i for i in order[:k] if counts[i] > 0)


def jaccard(a: frozenset[int], b: frozenset[int]) -> float:
    """``|a & b| / |a | b|`` (NaN when both are empty)."""
    union = len(a | b)
    return len(a & b) / union if union else math.nan


def _nanmean(values: Iterable[float]) -> float:
    finite = [v for v in values if not math.isnan(v)]
    return sum(finite) / len(finite) if finite else math.nan


class RoutingHistory:
    """The routing state of a strategy's routed layers and the figures built on it
    (STRATEGIES-rankwise.md Part A).

    ``layers`` maps names to adapters that hold a :class:`RankUsage` as ``usage`` and a balancing
    bias buffer named ``bias`` (looked up at each use: moving a module replaces its buffers).
    Per experience it keeps each layer's training selection counts and the drift of the biases;
    the figures are the selected ranks per token (train, eval), the per-layer load max/mean and
    min/mean, the fraction of ranks never selected in the experience, the Jaccard overlap of each
    experience's ``k`` most used ranks per layer with those of every earlier experience (the "task
    decoupling" view), and mean and max |bias|.
    """

    def __init__(self, layers: Mapping[str, nn.Module], k: int, bias: str) -> None:
        self.layers = layers
        self.k = k
        self.bias = bias
        self.counts: list[dict[str, list[int]]] = []  # one {layer: counts [r]} per experience
        self.drift: list[tuple[float, float]] = []  # (mean, max) |bias| after each experience

    # -- state ---------------------------------------------------------------------------------
    def usages(self) -> list[RankUsage]:
        usages = [layer.usage for layer in self.layers.values()]
        assert all(isinstance(u, RankUsage) for u in usages)
        return usages  # type: ignore[return-value]

    def biases(self) -> list[torch.Tensor]:
        biases = [getattr(layer, self.bias) for layer in self.layers.values()]
        assert all(isinstance(b, torch.Tensor) for b in biases)
        return biases

    def start_experience(self) -> None:
        """The counters of a new experience start from 0."""
        for usage in self.usages():
            usage.reset()

    def balance(self, rate: float) -> None:
        """One balancing step of every layer from the counts of the step (:func:`balance_biases`)."""
        balance_biases(self.usages(), self.biases(), rate)

    def end_experience(self) -> None:
        """Keep this experience's training counts and the bias drift (two host syncs)."""
        rows = torch.stack([u.usage[0] for u in self.usages()]).tolist()
        self.counts.append(dict(zip(self.layers, rows, strict=True)))
        self.drift.append(self._bias_figures())

    # -- checkpoint ------------------------------------------------------------------------------
    def state(self) -> dict[str, Any]:
        """What a checkpoint needs beyond the module tensors (the biases are persistent buffers of
        the layers, saved with them): the kept history, i.e. each finished experience's training
        counts per layer (``counts``, the load, never-used and Jaccard figures) and the bias drift
        after it (``drift``), and the device counters of every layer (:meth:`RankUsage.state`,
        the figures of the experience in progress). Plain lists, dicts, floats and CPU tensors."""
        return {
            "counts": [{name: list(c) for name, c in layers.items()} for layers in self.counts],
            "drift": [[float(mean), float(top)] for mean, top in self.drift],
            "usage": {name: u.state() for name, u in zip(self.layers, self.usages(), strict=True)},
        }

    def load_state(self, state: Mapping[str, Any]) -> None:
        """Restore :meth:`state` (the same layers, by name) on a freshly built history."""
        usage = state["usage"]
        if set(usage) != set(self.layers):
            raise ValueError(
                f"routing state of layers {sorted(set(usage) ^ set(self.layers))[:3]} does not fit the model"
            )
        for name, counters in zip(self.layers, self.usages(), strict=True):
            counters.load_state(usage[name])
        self.counts = [
            {name: [int(v) for v in c] for name, c in layers.items()} for layers in state["counts"]
        ]
        self.drift = [(float(mean), float(top)) for mean, top in state["drift"]]

    # -- figures -------------------------------------------------------------------------------
    def _bias_figures(self) -> tuple[float, float]:
        flat = torch.cat([b.detach().reshape(-1).float() for b in self.biases()]).abs()
        mean, top = torch.stack([flat.mean(), flat.max()]).tolist()
        return mean, top

    def _jaccards(self, t: int) -> list[float]:
        """Mean over layers of the overlap of experience ``t``'s most used ranks with each earlier one."""
        now = {name: most_used(c, self.k) for name, c in self.counts[t].items()}
        return [
            _nanmean(jaccard(now[name], most_used(c, self.k)) for name, c in self.counts[j].items())
            for j in range(t)
        ]

    def active_per_token(self) -> tuple[float, float]:
        """Selected ranks per token, (train, eval), mean over layers of this experience (NaN: none ran)."""
        rows = torch.stack([torch.stack([u.usage.sum(dim=1), u.tokens]) for u in self.usages()]).tolist()
        return (
            _nanmean(s[0] / n[0] if n[0] else math.nan for s, n in rows),
            _nanmean(s[1] / n[1] if n[1] else math.nan for s, n in rows),
        )

    def figures(self) -> dict[str, float]:
        """Scalar figures now: active ranks of the current counters, load and overlap of the last
        kept experience (means over layers), and the bias drift."""
        train, evaluation = self.active_per_token()
        figures = {"active_ranks_train": train, "active_ranks_eval": evaluation}
        if self.counts:
            per_layer = [usage_figures(c) for c in self.counts[-1].values()]
            figures |= {
                "load_max_mean": _nanmean(f[0] for f in per_layer),
                "load_min_mean": _nanmean(f[1] for f in per_layer),
                "never_used_fraction": _nanmean(f[2] for f in per_layer),
                "jaccard_earlier": _nanmean(self._jaccards(len(self.counts) - 1)),
            }
        mean, top = self.drift[-1] if self.drift else self._bias_figures()
        return figures | {"bias_abs_mean": mean, "bias_abs_max": top}

    def sections(self) -> dict[str, dict[str, Any]]:
        """``curves``, ``per_layer`` and ``events`` of a final report."""
        x = list(range(len(self.counts)))
        per_exp = [{n: usage_figures(c) for n, c in layers.items()} for layers in self.counts]
        mean = [[_nanmean(f[i] for f in layers.values()) for layers in per_exp] for i in range(3)]
        sorted_load = {}
        for t, layers in enumerate(self.counts):
            profiles = [
                [c / (sum(counts) / len(counts)) for c in sorted(counts, reverse=True)]
                for counts in layers.values()
                if sum(counts)
            ]
            if profiles:
                sorted_load[f"experience {t}"] = [
                    _nanmean(p[i] for p in profiles) for i in range(len(profiles[0]))
                ]
        curves: dict[str, Any] = {
            "load": {
                "x": x,
                "y": {"max/mean": mean[0], "min/mean": mean[1]},
                "x_label": "experience",
                "y_label": "rank load / mean (layer mean)",
            },
            "never_used_fraction": {
                "x": x,
                "y": mean[2],
                "x_label": "experience",
                "y_label": "ranks never selected",
            },
            "jaccard_earlier": {
                "x": x,
                "y": [_nanmean(self._jaccards(t)) for t in x],
                "x_label": "experience",
                "y_label": f"Jaccard of top-{self.k} ranks vs earlier",
            },
            "bias_drift": {
                "x": list(range(len(self.drift))),
                "y": {"mean |bias|": [m for m, _ in self.drift], "max |bias|": [t for _, t in self.drift]},
                "x_label": "experience",
                "y_label": f"balancing bias ({self.bias})",
            },
        }
        if sorted_load:
            r = len(next(iter(sorted_load.values())))
            curves["load_sorted"] = {
                "x": list(range(1, r + 1)),
                "y": sorted_load,
                "x_label": "rank, most selected first",
                "y_label": "load / mean (layer mean)",
            }
        last = per_exp[-1] if per_exp else {}
        top = torch.stack([b.detach().abs().max() for b in self.biases()]).tolist()
        return {
            "curves": curves,
            "per_layer": {
                "load_max_mean": {n: f[0] for n, f in last.items()},
                "load_min_mean": {n: f[1] for n, f in last.items()},
                "never_used_fraction": {n: f[2] for n, f in last.items()},
                "bias_abs_max": dict(zip(self.layers, top, strict=True)),
            },
            "events": {
                "load_per_layer": {
                    "fields": ["experience", "layer", "max_mean", "min_mean", "never_used"],
                    "entries": [[t, n, *f] for t, layers in enumerate(per_exp) for n, f in layers.items()],
                },
                "jaccard": {
                    "fields": ["experience", "earlier", "mean_jaccard"],
                    "entries": [[t, j, v] for t in x for j, v in enumerate(self._jaccards(t))],
                },
            },
        }
