"""Classification heads: CLIP text prototypes (zero-shot capable) and a linear head.

Both return logits over *all* classes of the scenario, ``[batch, n_classes]``; only the columns in
``classes`` are computed, the others are ``-inf``. Labels therefore stay global everywhere, and the
loss and the evaluator restrict the competing classes by choosing ``classes``.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from cl_bench.backbones.base import Backbone

DEFAULT_TEMPLATE = "a photo of a {}."


class Head(nn.Module):
    n_classes: int

    def forward(self, features: torch.Tensor, classes: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def invalidate(self) -> None:
        """Forget any cached computation (called at experience boundaries and before evaluation)."""

    def refresh(self) -> tuple[torch.Tensor, ...]:
        """Recompute now what the training forward reads from a cache; return those tensors.

        The loop calls it after :meth:`invalidate` when CUDA graphs may span experiences, in the
        step's autocast and grad mode. A cached tensor is recomputed in place when its shape and
        dtype allow, so a graph captured in an earlier experience reads the new values; a graph
        captured on other tensors must not be replayed (the loop compares them by identity).
        Nothing by default.
        """
        return ()


def _scatter(columns: torch.Tensor, classes: torch.Tensor, n_classes: int) -> torch.Tensor:
    out = columns.new_full((columns.shape[0], n_classes), float("-inf"))
    return out.index_copy(1, classes, columns)


class TextPrototypeHead(Head):
    """CLIP head: ``logits = scale * normalize(image) @ normalize(text(prompt_c))^T``.

    Class prompts ("a photo of a {name}.") are tokenized once. Text features are recomputed with
    the current (possibly adapted) text tower whenever any text-tower parameter is trainable, so
    gradients reach it; when the text tower is frozen they are computed once without gradient and
    cached until :meth:`invalidate` (the loop calls it after every ``before_experience`` hook and
    before every evaluation, so parameters a strategy adds are seen) or until the set of
    trainable text parameters changes. The cache is recomputed into the same tensor whenever its
    shape and dtype allow (a CUDA graph captured on it keeps reading the current features).

    Per-class prompts (the multi-domain benchmarks): ``train_prompts`` gives each class the one
    prompt training encodes (its domain's first template), ``prompts`` the prompts of its
    evaluation ensemble; in eval mode a class's feature is the renormalized mean of its
    prompts' normalized features (ZSCL's ``zeroshot_classifier``), computed without gradient
    and cached like the training features. Classes of different domains with equal names stay
    separate columns.
    """

    tokens: torch.Tensor
    eval_tokens: torch.Tensor
    eval_owner: torch.Tensor

    def __init__(
        self,
        backbone: Backbone,
        class_names: Sequence[str],
        template: str = DEFAULT_TEMPLATE,
        *,
        prompts: Sequence[Sequence[str]] | None = None,
        train_prompts: Sequence[str] | None = None,
    ) -> None:
        super().__init__()
        if backbone.kind != "clip":
            raise ValueError(f"backbone {backbone.name} has no text tower for a text-prototype head")
        self.backbone = [backbone]  # a list, so the backbone is not registered twice as a submodule
        self.n_classes = len(class_names)
        self.prompts = list(train_prompts) if train_prompts else [template.format(n) for n in class_names]
        if len(self.prompts) != self.n_classes:
            raise ValueError(f"{len(self.prompts)} training prompts for {self.n_classes} classes")
        self.register_buffer("tokens", backbone.tokenize(self.prompts), persistent=False)
        # the evaluation ensemble, when it differs from the training prompts
        self.eval_prompts = [list(p) for p in prompts] if prompts is not None else None
        if self.eval_prompts is not None:
            if len(self.eval_prompts) != self.n_classes or not all(self.eval_prompts):
                raise ValueError(f"every one of the {self.n_classes} classes needs at least one prompt")
            if self.eval_prompts == [[p] for p in self.prompts]:
                self.eval_prompts = None
        if self.eval_prompts is not None:
            flat = [p for group in self.eval_prompts for p in group]
            owner = [c for c, group in enumerate(self.eval_prompts) for _ in group]
            self.register_buffer("eval_tokens", backbone.tokenize(flat), persistent=False)
            self.register_buffer("eval_owner", torch.tensor(owner), persistent=False)
        self._text_params: list[nn.Parameter] | None = None
        self._cache: torch.Tensor | None = None  # features of every class, [n_classes, dim]
        self._cache_key: tuple[bool, ...] | None = None  # None: stale (recomputed at the next use)
        self._eval_cache: torch.Tensor | None = None  # the ensemble features, [n_classes, dim]

    def _key(self) -> tuple[bool, ...]:
        """Which text parameters train now (looked up lazily: strategies add adapters later)."""
        if self._text_params is None:
            self._text_params = self.backbone[0].text_parameters()
        return tuple(p.requires_grad for p in self._text_params)

    def _cached(self, key: tuple[bool, ...]) -> torch.Tensor:
        """The features of every class without gradient, recomputed when stale (in place if it can)."""
        cache = self._cache
        if cache is None or key != self._cache_key:
            with torch.no_grad():
                fresh = F.normalize(self.backbone[0].encode_text(self.tokens), dim=-1)
                in_place = (
                    cache is not None
                    and (cache.shape, cache.dtype, cache.device) == (fresh.shape, fresh.dtype, fresh.device)
                    and (torch.is_inference_mode_enabled() or not cache.is_inference())
                )
                if in_place:
                    assert cache is not None
                    cache.copy_(fresh)
                else:
                    self._cache = cache = fresh
            self._cache_key = key
        assert cache is not None
        return cache

    def _ensemble(self) -> torch.Tensor:
        """The evaluation features of every class: the renormalized mean of the normalized
        features of its prompts (computed once per :meth:`invalidate`)."""
        if self._eval_cache is None:
            with torch.no_grad():
                each = F.normalize(self.backbone[0].encode_text(self.eval_tokens).float(), dim=-1)
                total = each.new_zeros(self.n_classes, each.shape[1]).index_add_(0, self.eval_owner, each)
                self._eval_cache = F.normalize(total, dim=-1)
        return self._eval_cache

    def text_features(self, classes: torch.Tensor) -> torch.Tensor:
        """L2-normalized text features of ``classes`` [len(classes), dim]."""
        if self.eval_prompts is not None and not self.training:
            return self._ensemble()[classes]
        key = self._key()
        if any(key) and torch.is_grad_enabled():
            return F.normalize(self.backbone[0].encode_text(self.tokens[classes]), dim=-1)
        return self._cached(key)[classes]

    def invalidate(self) -> None:
        self._cache_key = None  # the tensor stays, to be recomputed in place
        self._text_params = None
        self._eval_cache = None

    def refresh(self) -> tuple[torch.Tensor, ...]:
        """The cached features, recomputed now, when the forward would use them (frozen text tower)."""
        key = self._key()
        if any(key) and torch.is_grad_enabled():
            return ()  # the forward computes the features itself, with gradient
        return (self._cached(key),)

    def forward(self, features: torch.Tensor, classes: torch.Tensor) -> torch.Tensor:
        text = self.text_features(classes)
        image = F.normalize(features, dim=-1)
        scale = self.backbone[0].logit_scale
        assert scale is not None, "CLIP backbones define logit_scale"
        columns = scale * image @ text.to(image.dtype).t()
        return _scatter(columns, classes, self.n_classes)


class LinearHead(Head):
    """A trainable linear classifier over all classes, for backbones without a text tower."""

    def __init__(self, feature_dim: int, n_classes: int) -> None:
        super().__init__()
        self.n_classes = n_classes
        self.linear = nn.Linear(feature_dim, n_classes)

    def forward(self, features: torch.Tensor, classes: torch.Tensor) -> torch.Tensor:
        columns = F.linear(features, self.linear.weight[classes], self.linear.bias[classes])
        return _scatter(columns, classes, self.n_classes)


def make_head(
    backbone: Backbone,
    class_names: Sequence[str],
    *,
    prompts: Sequence[Sequence[str]] | None = None,
    train_prompts: Sequence[str] | None = None,
) -> Head:
    """The text-prototype head for CLIP backbones (with the scenario's per-class prompts when it
    has them), a linear head otherwise."""
    if backbone.kind == "clip":
        return TextPrototypeHead(backbone, class_names, prompts=prompts, train_prompts=train_prompts)
    return LinearHead(backbone.feature_dim, len(class_names))
