"""The adapters a strategy injected into its backbone, by name, and what is done to all of them.

A LoRA-family strategy builds one :class:`AdapterSet` in its constructor (:meth:`AdapterSet.inject`)
and returns it from ``Strategy.adapters()``. The set owns what every such method shares, so that a
strategy file holds only what differs:

- injection: the backbone is frozen, and the linear at each role of each block of the requested
  towers (those the backbone has) is replaced by ``factory(linear, block, role)``, an adapter;
- the mapping ``"<tower>.<block>.<role>" -> adapter`` in model order (a read-only ``Mapping``);
- the continual-learning protocol of the methods that have none of their own (STRATEGIES.md
  Part A): with ``merge_each_experience``, :meth:`end_experience` folds every adapter into its
  frozen base weight and starts a fresh one;
- counting what the method added (:meth:`n_added`, :meth:`nbytes`) and storing the frozen base
  weights in the compute dtype (:meth:`store_frozen`), which the loop asks for through the strategy.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import TypeVar

import torch
from torch import nn

from cl_bench.adapters import AdaptedLinear, available_towers, count, inject, merge_into_base, nbytes
from cl_bench.backbones.base import ROLES, Backbone, Block

AdapterT = TypeVar("AdapterT", bound=AdaptedLinear)
AdapterT_co = TypeVar("AdapterT_co", bound=AdaptedLinear, covariant=True)


class AdapterSet(Mapping[str, AdapterT_co]):
    """A strategy's adapters by ``<tower>.<block>.<role>`` name, in model order."""

    def __init__(
        self, adapters: Mapping[str, AdapterT_co] | None = None, *, merge_each_experience: bool = False
    ) -> None:
        self._adapters = dict(adapters or {})
        self.merge_each_experience = merge_each_experience

    @staticmethod
    def inject(
        backbone: Backbone,
        factory: Callable[[nn.Linear, Block, str], AdapterT],
        *,
        roles: Sequence[str] = ROLES,
        towers: Sequence[str] = ("vision", "text"),
        merge_each_experience: bool = False,
    ) -> AdapterSet[AdapterT]:
        """Freeze ``backbone`` and replace its linear at each of ``roles`` in every block of ``towers``
        (those it has: a vision-only backbone drops ``text``) by ``factory(linear, block, role)``.

        Adapters are built in model order (tower by tower, block by block, role by role), so
        their random initialisation draws from the global generator in that order.
        """
        backbone.requires_grad_(False)
        adapters = inject(backbone, factory, roles=roles, towers=available_towers(backbone, towers))
        return AdapterSet(adapters, merge_each_experience=merge_each_experience)

    # -- the mapping ---------------------------------------------------------------------------
    def __getitem__(self, name: str) -> AdapterT_co:
        return self._adapters[name]

    def __iter__(self) -> Iterator[str]:
        return iter(self._adapters)

    def __len__(self) -> int:
        return len(self._adapters)

    # -- the end of an experience --------------------------------------------------------------
    def end_experience(self, delta_weight: Callable[[AdapterT_co], torch.Tensor] | None = None) -> None:
        """With ``merge_each_experience``: :meth:`merge_and_reset`; otherwise nothing (one adapter set
        trains on through the whole stream)."""
        if self.merge_each_experience:
            self.merge_and_reset(delta_weight)

    @torch.no_grad()
    def merge_and_reset(self, delta_weight: Callable[[AdapterT_co], torch.Tensor] | None = None) -> None:
        """Fold each adapter's update into its frozen base weight, then reset the adapter, one layer
        after the other. ``delta_weight(adapter)`` gives the update (default: ``adapter.delta_weight()``;
        DyLoRA folds its evaluation rank)."""
        for adapter in self._adapters.values():
            merge_into_base(
                adapter, adapter.delta_weight() if delta_weight is None else delta_weight(adapter)
            )
            adapter.reset()

    # -- counting and storage ------------------------------------------------------------------
    def added_tensors(self) -> list[torch.Tensor]:
        """Every tensor the method added to the backbone (factors, gates, banks, masks, biases)."""
        return [t for adapter in self._adapters.values() for t in adapter.added_tensors()]

    def n_added(self) -> int:
        """Elements of the tensors the method added."""
        return count(self.added_tensors())

    def nbytes(self) -> int:
        """Bytes needed to store what the method added."""
        return nbytes(self.added_tensors())

    def store_frozen(self, dtype: torch.dtype) -> None:
        """Keep the frozen base layers in ``dtype`` (bf16 runs): half their memory, and no cast of
        every weight at every use; the maths is unchanged, since bf16 autocast casts them to bf16
        anyway. Skipped with ``merge_each_experience``, which writes into the base weights and
        needs them in fp32."""
        if self.merge_each_experience:
            return
        for adapter in self._adapters.values():
            adapter.base.to(dtype)
