"""CUDA-graph replay of the forward and backward pass of training steps (``cuda_graphs = true``).

An eager training step launches thousands of small kernels from Python (a CLIP ViT-B/16 with
adapters on both towers: ~150 adapted layers), and on a fast GPU the host cannot launch them as
fast as the GPU runs them: the step is bound by the CPU, not by the GPU. A CUDA graph records
the kernels of one forward + loss + backward once and replays them with a single launch.

What is captured: ``strategy.forward``, ``strategy.loss`` and ``loss.backward()``, on static
input buffers. Everything else of the step stays eager and unchanged: the hooks
(``before_step``, ``after_backward``, ``after_step``), gradient clipping, the optimizer and the
scheduler. So a strategy may keep any host-side logic in its hooks; what it must guarantee is
declared by :meth:`cl_bench.strategy.Strategy.graph_key`: two steps with the same key run the same
kernels on the same tensors, and everything the forward reads that changes between steps is a
parameter or a buffer updated in place.

One graph is captured per key and input shape (the short last batch of an epoch gets its own),
the third time the pair is seen: the first ``WARMUP_STEPS`` steps run eagerly and warm up lazy
initialisation (a layer's cached casts, cuBLAS workspaces, and torch.compile, which may compile a
second time on the second call: compiling inside a capture invalidates it). All graphs of one
runner share one memory pool: they are replayed one at a time on one stream, and nothing a
graph allocates outlives its replay except its loss and its gradients, which the runner keeps.
After a replay the parameters' ``.grad`` point at that graph's gradient buffers, as after an
eager ``backward``.

A strategy whose key changes every few steps (LISA: a new set of trained blocks every K steps,
never seen again) would hold one graph per key for the whole run and warm each one up eagerly.
Two knobs serve it (:attr:`cl_bench.strategy.Strategy.graph_cache_size` and
``graph_rewarmup_steps``): ``max_graphs`` keeps only the most recently used graphs (the oldest is
reset and its buffers freed back into the shared pool before a new capture), and ``rewarmup_steps``
is the number of eager steps of a *new key* at an input shape this runner has captured before: the
lazy initialisation the warm-up exists for (cuBLAS workspaces, cached casts) was done by the first
key, so such a key may be captured at its first step (0), and its capture replaces an eager step.

A runner may span experiences (``Strategy.graphs_span_experiences``; the loop's ``step_graphs``
decides): it is kept when the next experience trains the same parameters (the same objects, in
the same order) and its step reads the same other tensors (``reads``: the loop's static
``logit_classes`` buffer and the head's cached text features, updated in place), so its graphs,
the short batch's included, are replayed there without a new warm-up or capture. Otherwise the
old runner is released (:meth:`StepGraphs.release`) and a new one is built.
"""

from __future__ import annotations

from collections.abc import Callable, Hashable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

WARMUP_STEPS = 2  # eager steps of a key and shape before its graph is captured

# Forward, loss and backward of one step on the given inputs; returns the (undetached) loss.
Body = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


@dataclass
class _Captured:
    graph: torch.cuda.CUDAGraph
    x: torch.Tensor
    y: torch.Tensor
    loss: torch.Tensor
    grads: list[torch.Tensor | None]


class StepGraphs:
    """Runs ``body(x, y)`` (forward, loss, backward) eagerly or from a CUDA graph, by key.

    ``params`` are the tensors whose ``.grad`` the step produces (the optimizer's parameters).
    A graph is only valid for the parameters and the tensors it was captured with: ``reads``, when
    given, are the other tensors the step reads that must stay the same objects for the runner to
    be reused in a later experience (:meth:`matches`); None: the runner serves one experience.
    ``body`` may be replaced between experiences (it runs the eager and captured steps).
    """

    def __init__(
        self,
        body: Body,
        params: list[nn.Parameter],
        device: torch.device,
        *,
        reads: Sequence[torch.Tensor] | None = None,
        max_graphs: int | None = None,
        rewarmup_steps: int = WARMUP_STEPS,
    ) -> None:
        if device.type != "cuda":
            raise ValueError("CUDA graphs need a CUDA device")
        if (max_graphs is not None and max_graphs < 1) or rewarmup_steps < 0:
            raise ValueError(
                f"max_graphs must be >= 1 (or None) and rewarmup_steps >= 0, "
                f"got {max_graphs} and {rewarmup_steps}"
            )
        self.max_graphs = max_graphs
        self.rewarmup_steps = rewarmup_steps
        self.body = body
        self.params = params
        self.device = device
        self.reads = None if reads is None else tuple(reads)  # held: their identities stay unique
        self._graphs: dict[Hashable, _Captured] = {}
        self._warmups: dict[Hashable, int] = {}  # eager steps run so far per key and shape
        self._shapes: set[Hashable] = set()  # input shapes some key has been captured at
        self._pool: Any = None  # the memory pool handle of the first capture, shared by the others
        self.n_replays = 0
        self.n_eager = 0
        self.n_captures = 0  # graphs captured over the runner's life (n_captured: those held now)
        self.n_evictions = 0  # graphs dropped to stay within max_graphs

    @property
    def n_captured(self) -> int:
        """Graphs held now (one per key and input shape)."""
        return len(self._graphs)

    def matches(self, params: Sequence[torch.Tensor], reads: Sequence[torch.Tensor] | None) -> bool:
        """Whether this runner's graphs are valid for a step on ``params`` reading ``reads``: the
        same objects in the same order (never when either side declares no ``reads``)."""
        if self.reads is None or reads is None:
            return False
        return same_objects(self.params, params) and same_objects(self.reads, reads)

    def release(self) -> None:
        """Drop every captured graph, its static buffers and gradients, and the memory pool.

        Parameters whose ``.grad`` is a graph's gradient buffer lose it (None). The runner stays
        usable: later steps warm up and capture again.
        """
        buffers = {id(g) for c in self._graphs.values() for g in c.grads if g is not None}
        for p in self.params:
            if p.grad is not None and id(p.grad) in buffers:
                p.grad = None
        for captured in self._graphs.values():
            captured.graph.reset()
        self._graphs.clear()
        self._warmups.clear()
        self._shapes.clear()
        self._pool = None

    def __call__(self, key: Hashable | None, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """Forward + loss + backward of one step; returns the detached loss."""
        if key is None:
            return self._eager(x, y)
        shape = (tuple(x.shape), x.dtype, tuple(y.shape))
        full_key = (key, *shape)
        captured = self._graphs.pop(full_key, None)  # put back last: the dict's order is LRU
        if captured is None:
            done = self._warmups.get(full_key, 0)
            if done < (self.rewarmup_steps if shape in self._shapes else WARMUP_STEPS):
                self._warmups[full_key] = done + 1  # warm up eagerly (real steps)
                return self._eager(x, y)
            self._warmups.pop(full_key, None)
            if self.max_graphs is not None:
                while len(self._graphs) >= self.max_graphs:
                    self._evict(next(iter(self._graphs)))
            captured = self._capture(x, y)
            self._shapes.add(shape)
        self._graphs[full_key] = captured
        captured.x.copy_(x)
        captured.y.copy_(y)
        captured.graph.replay()
        for p, grad in zip(self.params, captured.grads, strict=True):
            p.grad = grad
        self.n_replays += 1
        return captured.loss

    def _evict(self, full_key: Hashable) -> None:
        """Drop the graph of ``full_key``: reset it and free its static buffers and gradients (a
        parameter whose ``.grad`` is one of them loses it: the optimizer has already stepped)."""
        captured = self._graphs.pop(full_key)
        buffers = {id(g) for g in captured.grads if g is not None}
        for p in self.params:
            if p.grad is not None and id(p.grad) in buffers:
                p.grad = None
        captured.graph.reset()
        self.n_evictions += 1

    def _eager(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        self.n_eager += 1
        loss = self.body(x, y)
        return loss.detach()

    def _capture(self, x: torch.Tensor, y: torch.Tensor) -> _Captured:
        """Record ``body`` on static copies of the inputs (capture runs nothing: the caller replays)."""
        static_x, static_y = x.clone(), y.clone()
        for p in self.params:  # so that backward assigns fresh gradient buffers inside the graph
            p.grad = None
        torch.cuda.synchronize(self.device)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, pool=self._pool):
            loss = self.body(static_x, static_y).detach()
        self._pool = graph.pool()
        self.n_captures += 1
        grads = [p.grad for p in self.params]
        return _Captured(graph, static_x, static_y, loss, grads)


def same_objects(a: Sequence[object], b: Sequence[object]) -> bool:
    """``a`` and ``b`` hold the same objects (identity, not equality) in the same order."""
    return len(a) == len(b) and all(x is y for x, y in zip(a, b, strict=True))
