"""open_clip CLIP backbones (the only module that imports open_clip).

Models are created by name, with weights from a local file (``.pt``/``.bin``/``.safetensors``) or
``local-dir:<dir>``; nothing is downloaded. Every ``nn.MultiheadAttention`` is replaced by an
equivalent :class:`~cl_bench.backbones.attention.UnfusedAttention` so strategies adapt plain linears, and
the patch embedding runs as one GEMM (:class:`PatchConv2d`). Prompts are tokenized only up to the
longest prompt's end token (:func:`trim_padding`), which the causal text tower makes exact.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from cl_bench.backbones.attention import UnfusedAttention
from cl_bench.backbones.base import Backbone, Block, Tower, error_summary, trim_padding
from cl_bench.errors import ConfigError, WeightsError
from cl_bench.registry import BACKBONES

log = logging.getLogger(__name__)

OPENAI_MEAN = (0.48145466, 0.4578275, 0.40821073)
OPENAI_STD = (0.26862954, 0.26130258, 0.27577711)
_LINEARS = {
    "q": "attn.q_proj",
    "k": "attn.k_proj",
    "v": "attn.v_proj",
    "out": "attn.out_proj",
    "fc1": "mlp.c_fc",
    "fc2": "mlp.c_proj",
}


class OpenCLIPBackbone(Backbone):
    """An open_clip ``CLIP`` model with unfused attention in both towers."""

    kind = "clip"

    def __init__(
        self,
        *,
        name: str,
        model: Any,
        tokenizer: Any,
        source: str,
        pretrained: bool,
        weights: str | None,
    ) -> None:
        if not hasattr(model, "transformer") or not hasattr(model.visual, "transformer"):
            raise ConfigError(f"{source}: only open_clip CLIP models with ViT towers are supported")
        causal = getattr(model, "attn_mask", None) is not None
        unfuse_attention(model.visual.transformer.resblocks, causal=False)
        unfuse_attention(model.transformer.resblocks, causal=causal)
        model.visual.conv1 = PatchConv2d.from_conv(model.visual.conv1)
        use_autocast_layer_norms(model)
        blocks = [
            *(
                _block("vision", i, f"visual.transformer.resblocks.{i}", r)
                for i, r in enumerate(model.visual.transformer.resblocks)
            ),
            *(
                _block("text", i, f"transformer.resblocks.{i}", r)
                for i, r in enumerate(model.transformer.resblocks)
            ),
        ]
        cfg = getattr(model.visual, "preprocess_cfg", {}) or {}
        size = model.visual.image_size
        super().__init__(
            name=name,
            model=model,
            source=source,
            blocks=blocks,
            feature_dim=int(model.text_projection.shape[-1])
            if isinstance(model.text_projection, torch.Tensor)
            else int(model.text_projection.out_features),
            image_size=int(size[0] if isinstance(size, tuple | list) else size),
            mean=cfg.get("mean", OPENAI_MEAN),
            std=cfg.get("std", OPENAI_STD),
            embedding_names=(
                "visual.conv1",
                "visual.class_embedding",
                "visual.positional_embedding",
                "visual.ln_pre",
                "token_embedding",
                "positional_embedding",
            ),
            head_names=("visual.ln_post", "visual.proj", "ln_final", "text_projection"),
            pretrained=pretrained,
            weights=weights,
            text_prefixes=(
                "transformer.",
                "token_embedding",
                "positional_embedding",
                "ln_final",
                "text_projection",
            ),
        )
        self.tokenizer = tokenizer
        # the pooled position's output sees only the positions before it, so the padding after the
        # longest prompt's end token can be left out exactly
        self.trims_text = causal and model.text_pool_type in ("argmax", "eos")
        model.logit_scale.requires_grad_(False)

    def encode_image(self, images: torch.Tensor) -> torch.Tensor:
        return self.model.encode_image(images)

    def encode_text(self, tokens: torch.Tensor) -> torch.Tensor:
        """open_clip's ``CLIP.encode_text`` for token rows of any length up to the context.

        The same steps as open_clip's (embedding, positions, the transformer, ``ln_final``, the
        pooled token, the projection), except that the positional embedding and the causal mask
        are cut to ``tokens.shape[1]``: open_clip adds all ``context_length`` positions and so
        accepts only full-length rows.
        """
        from open_clip.transformer import text_global_pool

        m = self.model
        n = tokens.shape[1]
        cast_dtype = m.transformer.get_cast_dtype()
        x = m.token_embedding(tokens).to(cast_dtype) + m.positional_embedding[:n].to(cast_dtype)
        mask = m.attn_mask[:n, :n] if m.attn_mask is not None else None
        x = m.ln_final(m.transformer(x, attn_mask=mask))
        x = text_global_pool(x, tokens, m.text_pool_type, eos_token_id=getattr(m, "text_eos_id", None))
        if m.text_projection is None:
            return x
        return m.text_projection(x) if isinstance(m.text_projection, nn.Linear) else x @ m.text_projection

    def tokenize(self, texts: Sequence[str]) -> torch.Tensor:
        """Token ids [N, L]: the context cut after the longest prompt's end token when exact.

        CLIP pads every prompt to 77 tokens while "a photo of a {}." ends by token ~10, and the text
        tower's cost grows with the row length (its attention with its square). With a causal mask
        and an end-token pool (OpenAI CLIP's), the pooled feature never sees the positions after the
        end token, so dropping the padding that every row has changes no result.
        """
        tokens = self.tokenizer(list(texts))
        if not self.trims_text:
            return tokens
        argmax = self.model.text_pool_type == "argmax"
        return trim_padding(tokens, None if argmax else self.model.text_eos_id)

    @property
    def logit_scale(self) -> torch.Tensor:
        return self.model.logit_scale.exp()


def _block(tower: Tower, index: int, path: str, module: Any) -> Block:
    attn = module.attn
    return Block(
        tower=tower,
        index=index,
        path=path,
        n_heads=attn.n_heads,
        head_dim=attn.head_dim,
        linears=dict(_LINEARS),
    )


class PatchConv2d(nn.Conv2d):
    """The patch embedding of a ViT (a convolution with kernel == stride, no padding) as one GEMM.

    Same parameters and state-dict keys as the ``nn.Conv2d`` it replaces, same function: the image
    is cut into patches (one copy) and multiplied with the flattened kernel. On an H200 the
    convolution of a bf16 batch of 512 ran as an fp32-path ``precomputed_convolve_sgemm`` taking
    ~3.8 ms, 7% of a ViT-B/16 forward; the GEMM takes a fraction of that. The output is an NCHW
    view of a channels-last result, which open_clip flattens into tokens without a copy.
    """

    @classmethod
    def from_conv(cls, conv: nn.Conv2d) -> nn.Conv2d:
        """A PatchConv2d with ``conv``'s parameters, or ``conv`` itself when it is not a patch embedding."""
        patch = (
            conv.kernel_size == conv.stride
            and conv.padding in ((0, 0), 0)
            and conv.dilation == (1, 1)
            and conv.groups == 1
            and conv.padding_mode == "zeros"
        )
        if not patch or isinstance(conv, cls):
            return conv
        new = torch.nn.utils.skip_init(  # no random init: the seeded stream of later draws is unchanged
            cls,
            conv.in_channels,
            conv.out_channels,
            conv.kernel_size,
            stride=conv.stride,
            bias=conv.bias is not None,
            device=conv.weight.device,
            dtype=conv.weight.dtype,
        )
        new.load_state_dict(conv.state_dict())
        new.requires_grad_(conv.weight.requires_grad)
        return new

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        kh, kw = self.kernel_size
        if x.shape[-2] % kh or x.shape[-1] % kw:  # a convolution crops the remainder: leave it that
            return super().forward(x)
        return self.gemm(x)

    def gemm(self, x: torch.Tensor) -> torch.Tensor:
        """The convolution as one GEMM over the patches (height and width divisible by the kernel)."""
        kh, kw = self.kernel_size
        batch, channels, height, width = x.shape
        nh, nw = height // kh, width // kw
        patches = x.reshape(batch, channels, nh, kh, nw, kw).permute(0, 2, 4, 1, 3, 5)
        out = F.linear(
            patches.reshape(batch * nh * nw, -1), self.weight.reshape(self.out_channels, -1), self.bias
        )
        return out.view(batch, nh, nw, self.out_channels).permute(0, 3, 1, 2)


class AutocastLayerNorm(nn.LayerNorm):
    """open_clip's ``LayerNorm`` (normalise, then cast back to the input dtype) without the round
    trip through float32 under autocast.

    Under bf16 autocast open_clip's version casts the bf16 residual stream to float32 (autocast
    runs ``layer_norm`` in float32), normalises in float32 and casts the result back: three passes
    over the activations where one suffices. Here a bf16 input is normalised by the bf16 kernel,
    which accumulates in float32, with gamma and beta cast to bf16 as autocast casts a linear
    layer's weight; on an H200 this took ~9 ms off a 51 ms batch-512 ViT-B/16 forward. Without
    autocast (the CPU runs, fp32) it is open_clip's function unchanged.
    """

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        device = x.device.type
        if torch.is_autocast_enabled(device) and x.dtype == torch.get_autocast_dtype(device):
            dtype = x.dtype
            weight = None if self.weight is None else self.weight.to(dtype)
            bias = None if self.bias is None else self.bias.to(dtype)
            with torch.autocast(device, enabled=False):
                return F.layer_norm(x, self.normalized_shape, weight, bias, self.eps)
        return F.layer_norm(x, self.normalized_shape, self.weight, self.bias, self.eps).to(x.dtype)


def use_autocast_layer_norms(model: nn.Module) -> None:
    """Turn every open_clip ``LayerNorm`` of ``model`` into an :class:`AutocastLayerNorm` in place
    (same parameters; ``LayerNormFp32``, which asks for float32 on purpose, is left alone)."""
    from open_clip.transformer import LayerNorm

    for module in model.modules():
        if type(module) is LayerNorm:
            module.__class__ = AutocastLayerNorm


def unfuse_attention(resblocks: Any, *, causal: bool) -> None:
    """Replace each block's ``nn.MultiheadAttention`` by an output-identical UnfusedAttention."""
    for block in resblocks:
        if isinstance(block.attn, nn.MultiheadAttention):
            block.attn = UnfusedAttention.from_multihead(block.attn, causal=causal)


def _check_weights(weights: str) -> str:
    """Fail fast, before open_clip is involved, when the weights location does not exist."""
    if weights.startswith("local-dir:"):
        directory = Path(weights.removeprefix("local-dir:"))
        if not (directory / "open_clip_config.json").is_file():
            raise WeightsError(
                f"weights directory {directory} has no open_clip_config.json (expected an "
                "open_clip local-dir: config plus a weights file)"
            )
        return weights
    path = Path(weights)
    if not path.is_file():
        raise WeightsError(f"weights file not found: {path}")
    return str(path)


def load_open_clip(
    model_name: str, weights: str, *, name: str, image_size: int = 0, config_dir: Path | None = None
) -> OpenCLIPBackbone:
    """Create an open_clip model and wrap it.

    ``weights``: empty (random init, reported loudly by the loop), a checkpoint file loaded into
    ``model_name`` (strictly: mismatched keys or shapes are a WeightsError), or
    ``local-dir:<dir>``, a directory with ``open_clip_config.json`` and a weights file, which then
    defines the architecture itself.
    """
    import open_clip

    if config_dir is not None and model_name not in open_clip.list_models():
        open_clip.add_model_config(config_dir)
    if model_name not in open_clip.list_models():
        from cl_bench.registry import closest

        raise ConfigError(
            f"unknown open_clip model '{model_name}'{closest(model_name, open_clip.list_models())}"
        )
    location = _check_weights(weights) if weights else None
    local_dir = location is not None and location.startswith("local-dir:")
    source_name = location if local_dir and location else model_name
    kwargs: dict[str, Any] = {"force_image_size": image_size} if image_size else {}
    if location and not local_dir:
        kwargs["pretrained"] = location
    try:
        model = open_clip.create_model(source_name, require_pretrained=location is not None, **kwargs)
        tokenizer = open_clip.get_tokenizer(source_name)
    except Exception as err:  # torch.load raises many types (pickle, zip, shape) for one cause: bad weights
        if location is None:
            raise
        raise WeightsError(
            f"weights {weights} could not be loaded into {model_name}: "
            f"{type(err).__name__}: {error_summary(err)}"
        ) from None
    return OpenCLIPBackbone(
        name=name,
        model=model,
        tokenizer=tokenizer,
        source=f"open_clip:{source_name}",
        pretrained=location is not None,
        weights=weights or None,
    )


def clip_tokenizer(context_length: int) -> Any:
    """open_clip's bundled CLIP BPE tokenizer (vocabulary 49408), for tiny HF CLIP models."""
    import open_clip

    return open_clip.tokenizer.SimpleTokenizer(context_length=context_length)


@BACKBONES.register("open-clip", description="any open_clip CLIP ViT by name (backbone.model), local weights")
@dataclass(frozen=True)
class OpenCLIP:
    """``model``: an open_clip model name; ``weights``: a local file or ``local-dir:<dir>`` (empty:
    random weights, reported loudly); ``image_size``: 0 keeps the model's own."""

    model: str = "ViT-B-16"
    weights: str = ""
    image_size: int = 0

    def __post_init__(self) -> None:
        if self.image_size < 0:
            raise ConfigError(f"backbone.image_size must be >= 0, got {self.image_size}")

    def build(self) -> OpenCLIPBackbone:
        """Create ``model`` and load ``weights`` (see :func:`load_open_clip`)."""
        return load_open_clip(self.model, self.weights, name="open-clip", image_size=self.image_size)


@BACKBONES.register(
    "clip-vit-b-16", description="open_clip CLIP ViT-B/16 at 224 px; weights from backbone.weights"
)
@dataclass(frozen=True)
class ClipViTB16:
    """open_clip ViT-B-16; set ``weights`` to the OpenAI checkpoint file for real results."""

    weights: str = ""

    def build(self) -> OpenCLIPBackbone:
        """Create ViT-B-16 and load ``weights`` (see :func:`load_open_clip`)."""
        return load_open_clip("ViT-B-16", self.weights, name="clip-vit-b-16")
