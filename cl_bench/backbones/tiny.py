"""Registered tiny models for tests and the CPU demo (random weights unless ``weights`` is given).

``tiny-clip`` is a real open_clip CLIP (config in ``configs/tiny-clip.json``) and goes through
exactly the loading code of the full-size models, including local weight files; ``tiny-hf-clip``
and ``tiny-vit`` are transformers models built from configs.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from cl_bench.backbones import hf, open_clip
from cl_bench.registry import BACKBONES

CONFIG_DIR = Path(__file__).parent / "configs"
_TINY_TOWER = {"hidden_size": 64, "intermediate_size": 256, "num_hidden_layers": 4, "num_attention_heads": 4}


@BACKBONES.register(
    "tiny-clip", description="tiny open_clip CLIP (4+4 blocks, width 64, 32 px) for tests and demos"
)
@dataclass(frozen=True)
class TinyClip:
    """``weights``: optional local weights file or ``local-dir:`` (same loader as real models)."""

    weights: str = ""

    def build(self) -> open_clip.OpenCLIPBackbone:
        """The tiny open_clip model, random or with ``weights`` (same loader as real models)."""
        return open_clip.load_open_clip("tiny-clip", self.weights, name="tiny-clip", config_dir=CONFIG_DIR)


@BACKBONES.register("tiny-hf-clip", description="tiny transformers CLIPModel (random weights) for tests")
@dataclass(frozen=True)
class TinyHFClip:
    """No options: a 4+4-block transformers CLIP (width 64) with random weights, open_clip's tokenizer."""

    def build(self) -> hf.HFCLIPBackbone:
        """A freshly initialised model (seed it with torch.manual_seed)."""
        context = 16
        model = hf.build_clip_from_config(
            {
                "text_config": {**_TINY_TOWER, "max_position_embeddings": context, "vocab_size": 49408},
                "vision_config": {**_TINY_TOWER, "image_size": 32, "patch_size": 8},
                "projection_dim": 32,
            }
        )
        return hf.HFCLIPBackbone(
            name="tiny-hf-clip",
            model=model,
            tokenize=open_clip.clip_tokenizer(context),
            source="transformers:tiny",
            pretrained=False,
            weights=None,
        )


@BACKBONES.register(
    "tiny-vit", description="tiny transformers ViT (random weights) with a linear head, for tests"
)
@dataclass(frozen=True)
class TinyViT:
    """No options: a 4-block transformers ViT (width 64) with random weights."""

    def build(self) -> hf.HFViTBackbone:
        """A freshly initialised model (seed it with torch.manual_seed)."""
        model = hf.build_vit_from_config({**_TINY_TOWER, "image_size": 32, "patch_size": 8})
        return hf.HFViTBackbone(
            name="tiny-vit", model=model, source="transformers:tiny", pretrained=False, weights=None
        )
