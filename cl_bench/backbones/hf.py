"""transformers backbones (the only module that imports transformers).

``hf-clip`` loads a ``CLIPModel`` and its tokenizer from a local directory (``save_pretrained``
layout); ``hf-vit`` loads a ``ViTModel`` (image features = the final-norm CLS token, scored by a
linear head). Nothing is downloaded: ``local_files_only=True`` everywhere. The weights must match
the model of the directory's config.json: missing, unexpected or wrongly shaped tensors are a
one-line WeightsError (transformers would re-initialise them and only log a report).
"""

from __future__ import annotations

import contextlib
import json
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from cl_bench.backbones.base import Backbone, Block, Tower, error_summary, trim_padding
from cl_bench.errors import ConfigError, WeightsError
from cl_bench.registry import BACKBONES

OPENAI_MEAN = (0.48145466, 0.4578275, 0.40821073)
OPENAI_STD = (0.26862954, 0.26130258, 0.27577711)
IMAGENET_HALF = (0.5, 0.5, 0.5)
_CLIP_LINEARS = {
    "q": "self_attn.q_proj",
    "k": "self_attn.k_proj",
    "v": "self_attn.v_proj",
    "out": "self_attn.out_proj",
    "fc1": "mlp.fc1",
    "fc2": "mlp.fc2",
}
_VIT_LINEARS = {
    "q": "attention.q_proj",
    "k": "attention.k_proj",
    "v": "attention.v_proj",
    "out": "attention.o_proj",
    "fc1": "mlp.fc1",
    "fc2": "mlp.fc2",
}


def _blocks(
    tower: Tower, prefix: str, layers: Any, n_heads: int, hidden: int, linears: dict[str, str]
) -> list[Block]:
    return [
        Block(
            tower=tower,
            index=i,
            path=f"{prefix}.{i}",
            n_heads=n_heads,
            head_dim=hidden // n_heads,
            linears=dict(linears),
        )
        for i in range(len(layers))
    ]


class HFCLIPBackbone(Backbone):
    """A transformers ``CLIPModel``; ``tokenize`` is any callable list[str] -> ids [N, context]."""

    kind = "clip"

    def __init__(
        self,
        *,
        name: str,
        model: Any,
        tokenize: Callable[[list[str]], torch.Tensor],
        source: str,
        pretrained: bool,
        weights: str | None,
        mean: Sequence[float] = OPENAI_MEAN,
        std: Sequence[float] = OPENAI_STD,
    ) -> None:
        vcfg, tcfg = model.config.vision_config, model.config.text_config
        blocks = [
            *_blocks(
                "vision",
                "vision_model.encoder.layers",
                model.vision_model.encoder.layers,
                vcfg.num_attention_heads,
                vcfg.hidden_size,
                _CLIP_LINEARS,
            ),
            *_blocks(
                "text",
                "text_model.encoder.layers",
                model.text_model.encoder.layers,
                tcfg.num_attention_heads,
                tcfg.hidden_size,
                _CLIP_LINEARS,
            ),
        ]
        super().__init__(
            name=name,
            model=model,
            source=source,
            blocks=blocks,
            feature_dim=int(model.config.projection_dim),
            image_size=int(vcfg.image_size),
            mean=mean,
            std=std,
            embedding_names=("vision_model.embeddings", "vision_model.pre_layrnorm", "text_model.embeddings"),
            head_names=(
                "vision_model.post_layernorm",
                "visual_projection",
                "text_model.final_layer_norm",
                "text_projection",
            ),
            pretrained=pretrained,
            weights=weights,
            text_prefixes=("text_model.", "text_projection"),
        )
        self._tokenize = tokenize
        model.logit_scale.requires_grad_(False)

    def encode_image(self, images: torch.Tensor) -> torch.Tensor:
        return self.model.get_image_features(pixel_values=images).pooler_output

    def encode_text(self, tokens: torch.Tensor) -> torch.Tensor:
        return self.model.get_text_features(input_ids=tokens).pooler_output

    def tokenize(self, texts: Sequence[str]) -> torch.Tensor:
        """Token ids [N, L], cut after the longest prompt's pooled end token (exact: the text
        tower is causal; see :func:`~cl_bench.backbones.base.trim_padding`)."""
        eos_id = self.model.config.text_config.eos_token_id
        # CLIPTextTransformer's pooling: the largest id for the legacy eos_token_id 2, else the first eos
        return trim_padding(self._tokenize(list(texts)), None if eos_id == 2 else eos_id)

    @property
    def logit_scale(self) -> torch.Tensor:
        return self.model.logit_scale.exp()


class HFViTBackbone(Backbone):
    """A transformers ``ViTModel`` (no pooler): features are the final-norm CLS token."""

    kind = "vision"

    def __init__(
        self,
        *,
        name: str,
        model: Any,
        source: str,
        pretrained: bool,
        weights: str | None,
        mean: Sequence[float] = IMAGENET_HALF,
        std: Sequence[float] = IMAGENET_HALF,
    ) -> None:
        cfg = model.config
        blocks = _blocks(
            "vision",
            "layers" if hasattr(model, "layers") else "encoder.layer",
            model.layers if hasattr(model, "layers") else model.encoder.layer,
            cfg.num_attention_heads,
            cfg.hidden_size,
            _VIT_LINEARS,
        )
        super().__init__(
            name=name,
            model=model,
            source=source,
            blocks=blocks,
            feature_dim=int(cfg.hidden_size),
            image_size=int(cfg.image_size),
            mean=mean,
            std=std,
            embedding_names=("embeddings",),
            head_names=("layernorm",),
            pretrained=pretrained,
            weights=weights,
        )

    def encode_image(self, images: torch.Tensor) -> torch.Tensor:
        return self.model(pixel_values=images).last_hidden_state[:, 0]


def _preprocessing(
    directory: Path, default_mean: Sequence[float], default_std: Sequence[float]
) -> tuple[Sequence[float], Sequence[float]]:
    path = directory / "preprocessor_config.json"
    if not path.is_file():
        return default_mean, default_std
    cfg = json.loads(path.read_text())
    return cfg.get("image_mean", default_mean), cfg.get("image_std", default_std)


def _require_dir(path: str, what: str) -> Path:
    if not path:
        raise ConfigError(f"{what} needs backbone.path=<directory saved with save_pretrained>")
    directory = Path(path)
    if not (directory / "config.json").is_file():
        raise WeightsError(f"{what}: no config.json in {directory} (expected a save_pretrained directory)")
    return directory


@contextlib.contextmanager
def _quiet_transformers() -> Iterator[None]:
    """transformers at ERROR level and without progress bars, restored afterwards.

    A partial match is reported by :func:`_check_loading` as one line; without this, transformers
    would also print its multi-line LOAD REPORT and a "Loading weights" bar into every run.
    """
    from transformers.utils import logging as hf_logging

    verbosity = hf_logging.get_verbosity()
    bars = hf_logging.is_progress_bar_enabled()
    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        hf_logging.set_verbosity(verbosity)
        if bars:
            hf_logging.enable_progress_bar()


def _non_persistent_buffers(model: nn.Module) -> set[str]:
    """Full names of buffers never saved in a state dict (e.g. ``...embeddings.position_ids``)."""
    return {
        f"{prefix}.{name}" if prefix else name
        for prefix, module in model.named_modules()
        for name in getattr(module, "_non_persistent_buffers_set", ())
    }


def _first(keys: Iterable[str], n: int = 3) -> str:
    ordered = sorted(keys)
    more = f" and {len(ordered) - n} more" if len(ordered) > n else ""
    return ", ".join(ordered[:n]) + more


def _check_loading(
    directory: Path, model: nn.Module, info: dict[str, Any], what: str, unused_prefixes: tuple[str, ...] = ()
) -> None:
    """Raise a one-line WeightsError when the weights only partly match ``model``.

    ``info`` is ``from_pretrained(..., output_loading_info=True)``'s report. Keys of buffers the
    model never saves (``position_ids``, stored by older checkpoints) are ignored, and so are
    unexpected keys under ``unused_prefixes`` (checkpoint heads the backbone deliberately drops).
    """
    ignored = _non_persistent_buffers(model)

    def relevant(key: str) -> bool:
        return key not in ignored and not key.endswith("position_ids")

    missing = [k for k in info.get("missing_keys", ()) if relevant(k)]
    unexpected = [
        k for k in info.get("unexpected_keys", ()) if relevant(k) and not k.startswith(unused_prefixes)
    ]
    mismatched = sorted(info.get("mismatched_keys", ()), key=lambda m: str(m[0]))
    problems = []
    if missing:
        problems.append(f"{len(missing)} missing key(s): {_first(missing)}")
    if unexpected:
        problems.append(f"{len(unexpected)} unexpected key(s): {_first(unexpected)}")
    if mismatched:
        key, checkpoint, expected = mismatched[0][:3]
        more = f" and {len(mismatched) - 1} more" if len(mismatched) > 1 else ""
        problems.append(
            f"{len(mismatched)} shape mismatch(es): {key} is {list(checkpoint)} in the checkpoint, "
            f"{list(expected)} in the model{more}"
        )
    if problems:
        raise WeightsError(f"{directory} does not match the {what}: {'; '.join(problems)}")


def load_hf_clip(path: str, *, name: str) -> HFCLIPBackbone:
    """A ``CLIPModel`` and its tokenizer from the ``save_pretrained`` directory ``path``.

    Offline only; weights that do not match the model exactly (missing, unexpected or
    wrongly shaped tensors) are a one-line WeightsError, never a silently re-initialised layer.
    """
    from transformers import AutoTokenizer, CLIPModel

    directory = _require_dir(path, name)
    try:
        with _quiet_transformers():
            # (model, loading info); mismatched shapes are reported there instead of raised
            loaded: Any = CLIPModel.from_pretrained(
                directory, local_files_only=True, output_loading_info=True, ignore_mismatched_sizes=True
            )
            tokenizer = AutoTokenizer.from_pretrained(directory, local_files_only=True)
    except (OSError, ValueError, RuntimeError) as err:
        raise WeightsError(f"{directory} could not be loaded as a CLIP model: {error_summary(err)}") from None
    model, info = loaded
    _check_loading(directory, model, info, "CLIP model of its config.json")
    if tokenizer.vocab_size < 1000:
        raise WeightsError(
            f"{directory}: the tokenizer has only {tokenizer.vocab_size} entries (an offline hub stub?)"
        )
    context = int(model.config.text_config.max_position_embeddings)

    def tokenize(texts: list[str]) -> torch.Tensor:
        out = tokenizer(texts, padding="max_length", max_length=context, truncation=True, return_tensors="pt")
        return out["input_ids"]

    mean, std = _preprocessing(directory, OPENAI_MEAN, OPENAI_STD)
    return HFCLIPBackbone(
        name=name,
        model=model,
        tokenize=tokenize,
        source=f"transformers:{directory}",
        pretrained=True,
        weights=str(directory),
        mean=mean,
        std=std,
    )


# A ViT checkpoint may carry a pooler (ViTModel's default) or a classifier (ViTForImageClassification):
# this backbone uses the final-norm CLS token and cl-bench's own head, so those tensors go unused.
_VIT_UNUSED = ("pooler.", "classifier.")


def load_hf_vit(path: str, *, name: str) -> HFViTBackbone:
    """A ``ViTModel`` (no pooler) from the ``save_pretrained`` directory ``path``.

    Offline only; weights that do not match the model exactly are a one-line WeightsError, except
    a checkpoint's pooler or classifier tensors, which this backbone does not use.
    """
    from transformers import ViTModel

    directory = _require_dir(path, name)
    try:
        with _quiet_transformers():
            loaded: Any = ViTModel.from_pretrained(
                directory,
                local_files_only=True,
                add_pooling_layer=False,
                output_loading_info=True,
                ignore_mismatched_sizes=True,
            )
    except (OSError, ValueError, RuntimeError) as err:
        raise WeightsError(f"{directory} could not be loaded as a ViT: {error_summary(err)}") from None
    model, info = loaded
    _check_loading(directory, model, info, "ViT of its config.json", unused_prefixes=_VIT_UNUSED)
    mean, std = _preprocessing(directory, IMAGENET_HALF, IMAGENET_HALF)
    return HFViTBackbone(
        name=name,
        model=model,
        source=f"transformers:{directory}",
        pretrained=True,
        weights=str(directory),
        mean=mean,
        std=std,
    )


def build_clip_from_config(config: dict[str, Any]) -> nn.Module:
    """A randomly initialised ``CLIPModel`` from a plain config dict (tiny test models)."""
    from transformers import CLIPConfig, CLIPModel

    return CLIPModel(CLIPConfig(**config))


def build_vit_from_config(config: dict[str, Any]) -> nn.Module:
    """A randomly initialised ``ViTModel`` (no pooler) from a plain config dict."""
    from transformers import ViTConfig, ViTModel

    return ViTModel(ViTConfig(**config), add_pooling_layer=False)


@BACKBONES.register("hf-clip", description="transformers CLIPModel from a local save_pretrained directory")
@dataclass(frozen=True)
class HFClip:
    """``path``: a directory with config.json, weights and tokenizer files."""

    path: str = ""

    def build(self) -> HFCLIPBackbone:
        """Load the directory (see :func:`load_hf_clip`)."""
        return load_hf_clip(self.path, name="hf-clip")


@BACKBONES.register("hf-vit", description="transformers ViTModel from a local directory, with a linear head")
@dataclass(frozen=True)
class HFViT:
    """``path``: a directory with config.json and weights."""

    path: str = ""

    def build(self) -> HFViTBackbone:
        """Load the directory (see :func:`load_hf_vit`)."""
        return load_hf_vit(self.path, name="hf-vit")
