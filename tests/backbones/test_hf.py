"""transformers backbones load from local save_pretrained directories (tiny random models)."""

from __future__ import annotations

import json

import pytest
import torch

from cl_bench.backbones.hf import build_clip_from_config, build_vit_from_config
from cl_bench.errors import ConfigError, WeightsError
from cl_bench.registry import BACKBONES

TOWER = {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2, "num_attention_heads": 4}


def write_clip_tokenizer(directory) -> None:
    """HF CLIP tokenizer files made from open_clip's bundled BPE vocabulary (same ids as OpenAI's)."""
    from open_clip.tokenizer import SimpleTokenizer

    simple = SimpleTokenizer()
    # open_clip names the special tokens <start_of_text>/<end_of_text>; OpenAI's files use <|...|>
    renamed = {"<start_of_text>": "<|startoftext|>", "<end_of_text>": "<|endoftext|>"}
    vocab = {renamed.get(token, token): index for token, index in simple.encoder.items()}
    (directory / "vocab.json").write_text(json.dumps(vocab))
    merges = sorted(simple.bpe_ranks, key=simple.bpe_ranks.get)
    (directory / "merges.txt").write_text("#version: 0.2\n" + "\n".join(" ".join(m) for m in merges) + "\n")
    (directory / "tokenizer_config.json").write_text(
        json.dumps(
            {
                "tokenizer_class": "CLIPTokenizer",
                "bos_token": "<|startoftext|>",
                "eos_token": "<|endoftext|>",
                "pad_token": "<|endoftext|>",
                "unk_token": "<|endoftext|>",
                "model_max_length": 16,
            }
        )
    )


def test_hf_clip_loads_model_and_tokenizer_from_a_directory(tmp_path) -> None:
    torch.manual_seed(0)
    model = build_clip_from_config(
        {
            "text_config": {**TOWER, "max_position_embeddings": 16, "vocab_size": 49408},
            "vision_config": {**TOWER, "image_size": 32, "patch_size": 8},
            "projection_dim": 16,
        }
    )
    model.save_pretrained(tmp_path)
    write_clip_tokenizer(tmp_path)
    backbone = BACKBONES.get("hf-clip")(path=str(tmp_path)).build()
    assert backbone.pretrained is True
    assert backbone.kind == "clip"
    assert len(backbone.blocks) == 4
    tokens = backbone.tokenize(["a photo of a cat."])
    assert tokens.shape == (1, 16)
    assert tokens[0, 0].item() == 49406  # start of text, as open_clip's tokenizer
    from open_clip.tokenizer import SimpleTokenizer

    assert tokens[0, 1:7].tolist() == SimpleTokenizer().encode("a photo of a cat.")
    with torch.no_grad():
        expected = model.get_text_features(input_ids=tokens).pooler_output
        torch.testing.assert_close(backbone.encode_text(tokens), expected)
        assert backbone.encode_image(torch.randn(2, 3, 32, 32)).shape == (2, 16)


def test_hf_vit_loads_from_a_directory_and_uses_the_cls_token(tmp_path) -> None:
    torch.manual_seed(0)
    model = build_vit_from_config({**TOWER, "image_size": 32, "patch_size": 8})
    model.save_pretrained(tmp_path)
    backbone = BACKBONES.get("hf-vit")(path=str(tmp_path)).build()
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(backbone.encode_image(x), model(pixel_values=x).last_hidden_state[:, 0])
    assert backbone.kind == "vision"
    assert backbone.feature_dim == 32


def test_missing_directory_and_missing_path_are_clear_errors(tmp_path) -> None:
    with pytest.raises(ConfigError, match="needs backbone.path"):
        BACKBONES.get("hf-clip")().build()
    with pytest.raises(WeightsError, match="no config.json"):
        BACKBONES.get("hf-vit")(path=str(tmp_path)).build()
