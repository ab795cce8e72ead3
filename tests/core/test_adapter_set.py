"""AdapterSet: injection by role and tower, the name -> adapter mapping, counting, storage, merging."""

from __future__ import annotations

import pytest
import torch

from cl_bench.adapter_set import AdapterSet
from cl_bench.adapters import LoRALinear
from cl_bench.backbones.base import Backbone
from tests.helpers import tiny_backbone


def lora_set(backbone: Backbone, **kwargs) -> AdapterSet[LoRALinear]:
    return AdapterSet.inject(backbone, lambda linear, block, role: LoRALinear(linear, 4, 8.0), **kwargs)


def test_inject_freezes_the_backbone_and_names_adapters_in_model_order() -> None:
    backbone = tiny_backbone("tiny-clip")
    adapters = lora_set(backbone, roles=("q", "fc2"))
    expected = [f"{b.name}.{role}" for b in backbone.blocks for role in ("q", "fc2")]
    assert list(adapters) == expected
    assert all(backbone.linear(b, "q") is adapters[f"{b.name}.q"] for b in backbone.blocks)
    trainable = {id(p) for p in backbone.parameters() if p.requires_grad}
    assert trainable == {id(p) for a in adapters.values() for p in (a.A, a.B)}


def test_a_vision_only_backbone_drops_the_text_tower() -> None:
    backbone = tiny_backbone("tiny-vit")
    adapters = lora_set(backbone, towers=("vision", "text"))
    assert adapters
    assert {name.split(".")[0] for name in adapters} == {"vision"}


def test_counts_and_bytes_of_what_was_added() -> None:
    adapters = lora_set(tiny_backbone("tiny-clip"))
    n = sum(4 * (a.in_features + a.out_features) for a in adapters.values())
    assert adapters.n_added() == n
    assert adapters.nbytes() == 4 * n  # float32
    assert AdapterSet().n_added() == AdapterSet().nbytes() == 0


@pytest.mark.parametrize("merge", [False, True])
def test_frozen_weights_stay_fp32_when_the_set_merges_into_them(merge: bool) -> None:
    adapters = lora_set(tiny_backbone("tiny-clip"), merge_each_experience=merge)
    adapters.store_frozen(torch.bfloat16)
    dtype = torch.float32 if merge else torch.bfloat16
    assert all(a.base.weight.dtype == dtype for a in adapters.values())
    assert all(a.A.dtype == torch.float32 for a in adapters.values())


def test_end_experience_merges_and_resets_only_when_asked() -> None:
    for merge in (False, True):
        adapters = lora_set(tiny_backbone("tiny-clip"), merge_each_experience=merge)
        with torch.no_grad():
            for adapter in adapters.values():
                adapter.B.normal_()
        weights = {name: a.base.weight + a.delta_weight().detach() for name, a in adapters.items()}
        adapters.end_experience()
        for name, adapter in adapters.items():
            assert bool(adapter.B.any()) != merge
            if merge:
                torch.testing.assert_close(adapter.base.weight, weights[name], rtol=0, atol=1e-6)


def test_merge_and_reset_folds_the_given_update() -> None:
    adapters = lora_set(tiny_backbone("tiny-clip"))
    before = {name: a.base.weight.clone() for name, a in adapters.items()}
    adapters.merge_and_reset(lambda adapter: torch.ones_like(adapter.base.weight))
    assert all(torch.equal(a.base.weight, before[n] + 1) for n, a in adapters.items())
