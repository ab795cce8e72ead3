from __future__ import annotations

import torch
import torch.nn.functional as F

from cl_bench.heads import LinearHead, TextPrototypeHead
from tests.helpers import tiny_backbone


def test_text_head_scores_only_requested_classes_with_clip_logits() -> None:
    backbone = tiny_backbone("tiny-clip")
    head = TextPrototypeHead(backbone, ["cat", "dog", "bird"])
    features = torch.randn(4, backbone.feature_dim)
    logits = head(features, torch.tensor([0, 2]))
    text = F.normalize(
        backbone.encode_text(backbone.tokenize(["a photo of a cat.", "a photo of a bird."])), dim=-1
    )
    expected = backbone.logit_scale * F.normalize(features, dim=-1) @ text.t()
    torch.testing.assert_close(logits[:, [0, 2]], expected)
    assert torch.isneginf(logits[:, 1]).all()


def test_text_features_track_gradient_and_cache_when_frozen() -> None:
    backbone = tiny_backbone("tiny-clip")
    head = TextPrototypeHead(backbone, ["cat", "dog"])
    classes = torch.tensor([0, 1])
    assert head.text_features(classes).requires_grad  # text tower trainable: recomputed with grad
    backbone.requires_grad_(False)
    first = head.text_features(classes)
    assert not first.requires_grad
    with torch.no_grad():
        backbone.model.ln_final.bias.add_(1.0)  # a change the frozen cache does not see...
    torch.testing.assert_close(head.text_features(classes), first)
    head.invalidate()  # ...until the loop invalidates it (experience boundaries, evaluation)
    assert not torch.allclose(head.text_features(classes), first)


def test_frozen_text_cache_is_refreshed_in_place() -> None:
    """A CUDA graph captured on the cached features keeps reading them: after ``invalidate`` the
    cache is recomputed into the same tensor (``refresh``), in training and in evaluation."""
    backbone = tiny_backbone("tiny-clip")
    head = TextPrototypeHead(backbone, ["cat", "dog"])
    assert head.refresh() == ()  # text tower trainable: the forward computes the features itself
    backbone.requires_grad_(False)
    (cache,) = head.refresh()
    first = cache.clone()
    with torch.no_grad():
        backbone.model.ln_final.bias.add_(1.0)
    head.invalidate()
    (again,) = head.refresh()
    assert again is cache
    assert not torch.allclose(again, first)
    expected = F.normalize(backbone.encode_text(head.tokens), dim=-1)
    torch.testing.assert_close(again, expected)
    with torch.inference_mode():  # evaluation recomputes into the same tensor too
        backbone.model.ln_final.bias.add_(1.0)
        head.invalidate()
        head.text_features(torch.tensor([0, 1]))
    assert head._cache is cache
    assert not torch.allclose(cache, expected)


def test_a_cache_made_in_inference_mode_is_replaced_in_training() -> None:
    """An inference tensor (row b is evaluated first) cannot be written outside inference mode."""
    backbone = tiny_backbone("tiny-clip")
    backbone.requires_grad_(False)
    head = TextPrototypeHead(backbone, ["cat", "dog"])
    with torch.inference_mode():
        made = head.text_features(torch.tensor([0, 1]))
    assert head._cache is not None
    assert head._cache.is_inference()
    head.invalidate()
    (cache,) = head.refresh()
    assert not cache.is_inference()
    torch.testing.assert_close(cache, made)


def test_linear_head_scatters_selected_columns() -> None:
    head = LinearHead(5, 4)
    features = torch.randn(3, 5)
    logits = head(features, torch.tensor([1, 3]))
    full = head.linear(features)
    torch.testing.assert_close(logits[:, [1, 3]], full[:, [1, 3]])
    assert torch.isneginf(logits[:, [0, 2]]).all()
