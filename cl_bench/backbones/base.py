"""The Backbone abstraction shared by every loader.

A backbone is an ``nn.Module`` holding the model, with:
- ``encode_image`` (and for CLIP ``encode_text`` / ``tokenize``),
- the preprocessing constants (image size, mean, std),
- ``blocks``: every transformer block per tower, with its head count, head size and the paths of
  its adaptable linear layers by role (q, k, v, out, fc1, fc2), so strategies adapt plain
  ``nn.Linear`` layers without knowing the model's naming,
- ``embedding_names`` / ``head_names``: parameter-name prefixes outside the blocks that LISA
  always trains; ``text_prefixes``: every parameter-name prefix of the text encoder,
- ``pretrained``: whether real weights were loaded (reported loudly when not).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

import torch
from torch import nn

ROLES = ("q", "k", "v", "out", "fc1", "fc2")
# Graphs torch.compile may build per block code object under ``compile=true`` (torch's default: 8).
RECOMPILE_LIMIT = 64
Tower = Literal["vision", "text"]


def error_summary(err: BaseException, limit: int = 200) -> str:
    """One line for a loading error: its first line plus its first detail line, cut at ``limit``.

    torch's ``load_state_dict`` error reads "Error(s) in loading state_dict for CLIP:" and names
    the offending keys only on the lines after it ("size mismatch for X: ...", "Missing key(s) in
    state_dict: ...", "Unexpected key(s) in state_dict: ..."): the first of those is kept.
    """
    lines = [line.strip() for line in str(err).splitlines() if line.strip()]
    if not lines:
        return ""
    if len(lines) == 1:
        return lines[0]
    detail = lines[1] if len(lines[1]) <= limit else lines[1][: limit - 3].rstrip() + "..."
    return f"{lines[0]} {detail}"


@dataclass(frozen=True)
class Block:
    """One transformer block: where it is and what can be adapted in it."""

    tower: Tower
    index: int
    path: str  # qualified name of the block module inside ``Backbone.model``
    n_heads: int
    head_dim: int
    linears: dict[str, str]  # role -> path relative to the block, e.g. {"q": "attn.q_proj"}

    @property
    def name(self) -> str:
        """Short stable name used in reports, e.g. ``vision.3``."""
        return f"{self.tower}.{self.index}"


@dataclass(frozen=True)
class BackboneInfo:
    """What the run record stores about the backbone."""

    name: str
    kind: Literal["clip", "vision"]
    source: str  # e.g. "open_clip:ViT-B-16", "transformers:/path", "tiny"
    pretrained: bool
    weights: str | None
    image_size: int
    feature_dim: int
    n_parameters: int
    details: dict[str, object] = field(default_factory=dict)


class Backbone(nn.Module):
    """Base class of all loaders. Subclasses set the attributes and implement the encoders."""

    kind: Literal["clip", "vision"] = "vision"

    def __init__(
        self,
        *,
        name: str,
        model: nn.Module,
        source: str,
        blocks: Sequence[Block],
        feature_dim: int,
        image_size: int,
        mean: Sequence[float],
        std: Sequence[float],
        embedding_names: Sequence[str],
        head_names: Sequence[str],
        pretrained: bool,
        weights: str | None,
        text_prefixes: Sequence[str] = (),
    ) -> None:
        super().__init__()
        self.name = name
        self.model: Any = model  # Any: loaders reach into model-specific attributes
        self.source = source
        self.blocks = list(blocks)
        self.feature_dim = feature_dim
        self.image_size = image_size
        self.mean = tuple(float(m) for m in mean)
        self.std = tuple(float(s) for s in std)
        self.embedding_names = tuple(embedding_names)
        self.head_names = tuple(head_names)
        self.text_prefixes = tuple(text_prefixes)
        self.pretrained = pretrained
        self.weights = weights

    # -- encoders -------------------------------------------------------------------------
    def encode_image(self, images: torch.Tensor) -> torch.Tensor:
        """Normalized-pixel images [B, 3, H, W] -> features [B, feature_dim] (not L2-normalized)."""
        raise NotImplementedError

    def encode_text(self, tokens: torch.Tensor) -> torch.Tensor:
        """Token ids [N, context] -> text features [N, feature_dim] (CLIP backbones only)."""
        raise NotImplementedError(f"backbone {self.name} has no text tower")

    def tokenize(self, texts: Sequence[str]) -> torch.Tensor:
        """Texts -> token ids [N, context] for :meth:`encode_text` (CLIP backbones only)."""
        raise NotImplementedError(f"backbone {self.name} has no tokenizer")

    @property
    def logit_scale(self) -> torch.Tensor | None:
        """CLIP's (frozen) temperature as exp(logit_scale); None for non-CLIP backbones."""
        return None

    # -- structure ------------------------------------------------------------------------
    def towers(self) -> list[Tower]:
        """The towers that have blocks, vision first."""
        return sorted({b.tower for b in self.blocks}, key=lambda t: ("vision", "text").index(t))

    def blocks_of(self, tower: Tower) -> list[Block]:
        """The blocks of ``tower``, in depth order."""
        return [b for b in self.blocks if b.tower == tower]

    def block_module(self, block: Block) -> nn.Module:
        """The module of ``block`` inside :attr:`model`."""
        return self.model.get_submodule(block.path)

    def linear(self, block: Block, role: str) -> nn.Module:
        """The module currently at ``role`` in ``block`` (an nn.Linear or an adapter wrapping one)."""
        return self.model.get_submodule(f"{block.path}.{block.linears[role]}")

    def text_parameters(self) -> list[nn.Parameter]:
        """Every parameter that influences ``encode_text`` (empty for vision-only backbones)."""
        if not self.text_prefixes:
            return []
        return [p for n, p in self.model.named_parameters() if n.startswith(self.text_prefixes)]

    def compile_towers(self, backend: str = "inductor") -> None:
        """Compile every block in place with ``torch.compile`` (``--set compile=true``).

        ``nn.Module.compile`` keeps module names and parameters, so block paths stay valid. Some
        strategies change, between steps, state that dynamo specialises on: LISA which blocks
        train, DyLoRA the sampled rank (a slice length), MoRA the bank size at each experience.
        Each distinct state compiles one graph; torch's default limit of 8 graphs per code object
        would make such a run silently fall back to eager after a few steps, so it is raised to
        :data:`RECOMPILE_LIMIT` (tests/strategies/test_contract.py checks every strategy stays below
        it). ``backend`` exists for tests (``"eager"``: dynamo's tracing without inductor).
        """
        dynamo = torch._dynamo.config
        dynamo.recompile_limit = max(dynamo.recompile_limit, RECOMPILE_LIMIT)
        dynamo.accumulated_recompile_limit = max(dynamo.accumulated_recompile_limit, 4 * RECOMPILE_LIMIT)
        for block in self.blocks:
            self.block_module(block).compile(backend=backend)

    def info(self) -> BackboneInfo:
        """What the run record stores about this backbone (parameters counted now)."""
        return BackboneInfo(
            name=self.name,
            kind=self.kind,
            source=self.source,
            pretrained=self.pretrained,
            weights=self.weights,
            image_size=self.image_size,
            feature_dim=self.feature_dim,
            n_parameters=sum(p.numel() for p in self.model.parameters()),
            details={
                "towers": {t: len(self.blocks_of(t)) for t in self.towers()},
                "heads": {t: self.blocks_of(t)[0].n_heads for t in self.towers()},
                "head_dim": {t: self.blocks_of(t)[0].head_dim for t in self.towers()},
            },
        )


def trim_padding(tokens: torch.Tensor, eos_id: int | None) -> torch.Tensor:
    """``tokens`` [N, context] cut after the last row's pooled end token: the first ``eos_id`` of
    each row, or with ``None`` its largest id (OpenAI CLIP's end token is the largest of the vocabulary).

    Exact for a causal text tower that pools that position: no pooled output sees a later
    position, so columns that are padding in every row never change a text feature.
    """
    if tokens.shape[0] == 0:
        return tokens
    ends = tokens.argmax(dim=-1) if eos_id is None else (tokens == eos_id).int().argmax(dim=-1)
    return tokens[:, : int(ends.max()) + 1].contiguous()
