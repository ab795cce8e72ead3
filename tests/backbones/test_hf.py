"""transformers backbones load from local save_pretrained directories (tiny random models), and
weights that only partly match the model are a one-line WeightsError, never a silent re-init."""

from __future__ import annotations

import json

import pytest
import torch

from cl_bench.backbones.hf import build_clip_from_config, build_vit_from_config
from cl_bench.errors import ConfigError, WeightsError
from cl_bench.registry import BACKBONES
from tests.helpers import CUT_PROMPTS, assert_cut_tokens_encode_as_full_rows

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


CLIP_CONFIG = {
    "text_config": {**TOWER, "max_position_embeddings": 16, "vocab_size": 49408},
    "vision_config": {**TOWER, "image_size": 32, "patch_size": 8},
    "projection_dim": 16,
}
VIT_CONFIG = {**TOWER, "image_size": 32, "patch_size": 8}


def save_clip(directory):
    torch.manual_seed(0)
    model = build_clip_from_config(CLIP_CONFIG)
    model.save_pretrained(directory)
    write_clip_tokenizer(directory)
    return model


def save_vit(directory):
    torch.manual_seed(0)
    model = build_vit_from_config(VIT_CONFIG)
    model.save_pretrained(directory)
    return model


def test_hf_clip_loads_model_and_tokenizer_from_a_directory(tmp_path) -> None:
    model = save_clip(tmp_path)
    backbone = BACKBONES.get("hf-clip")(path=str(tmp_path)).build()
    assert backbone.pretrained is True
    assert backbone.kind == "clip"
    assert len(backbone.blocks) == 4
    tokens = backbone.tokenize(["a photo of a cat."])
    assert tokens.shape == (1, 8)  # start, 6 tokens, end: the padding after it is cut
    assert tokens[0, 0].item() == 49406  # start of text, as open_clip's tokenizer
    from open_clip.tokenizer import SimpleTokenizer

    assert tokens[0, 1:7].tolist() == SimpleTokenizer().encode("a photo of a cat.")
    with torch.no_grad():
        expected = model.get_text_features(input_ids=tokens).pooler_output
        torch.testing.assert_close(backbone.encode_text(tokens), expected)
        assert backbone.encode_image(torch.randn(2, 3, 32, 32)).shape == (2, 16)


def test_hf_vit_loads_from_a_directory_and_uses_the_cls_token(tmp_path) -> None:
    model = save_vit(tmp_path)
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


def edit_weights(directory, *, drop=(), add=None, reshape=None) -> None:
    """Rewrite ``model.safetensors`` without the keys ``drop``, with ``add`` and with ``reshape``
    (key -> new shape, zeros) applied: a weights file that only partly matches its config."""
    from safetensors.torch import load_file, save_file

    path = directory / "model.safetensors"
    state = load_file(path)
    for key in drop:
        del state[key]
    for key, shape in (reshape or {}).items():
        state[key] = torch.zeros(shape)
    state.update(add or {})
    save_file(state, path, metadata={"format": "pt"})


# (backbone, case) -> (edit of the saved weights, the message after "<dir> does not match the ...: ").
# A ViT file keeps transformers' checkpoint names (encoder.layer.N.output.dense); the message names
# the model's own parameters (layers.N.mlp.fc2), as backbone.model.state_dict() does.
PARTIAL = {
    ("hf-clip", "missing"): (
        {"drop": ["visual_projection.weight", "text_model.final_layer_norm.bias"]},
        "2 missing key(s): text_model.final_layer_norm.bias, visual_projection.weight",
    ),
    ("hf-clip", "unexpected"): (
        {"add": {"extra_head.weight": torch.zeros(2, 2)}},
        "1 unexpected key(s): extra_head.weight",
    ),
    ("hf-clip", "shape mismatch"): (
        {"reshape": {"text_projection.weight": (8, 32)}},
        "1 shape mismatch(es): text_projection.weight is [8, 32] in the checkpoint, [16, 32] in the model",
    ),
    ("hf-vit", "missing"): (
        {"drop": ["encoder.layer.1.output.dense.weight"]},
        "1 missing key(s): layers.1.mlp.fc2.weight",
    ),
    ("hf-vit", "several missing"): (
        {
            "drop": [
                f"encoder.layer.{i}.{n}"
                for i in (0, 1)
                for n in ("output.dense.bias", "layernorm_after.bias")
            ]
        },
        "4 missing key(s): layers.0.layernorm_after.bias, layers.0.mlp.fc2.bias, "
        "layers.1.layernorm_after.bias and 1 more",
    ),
    ("hf-vit", "shape mismatch"): (
        {"reshape": {"embeddings.cls_token": (1, 1, 16)}},
        "1 shape mismatch(es): embeddings.cls_token is [1, 1, 16] in the checkpoint, [1, 1, 32] in the model",
    ),
}


@pytest.mark.parametrize(("backbone", "case"), sorted(PARTIAL))
def test_weights_that_only_partly_match_are_a_one_line_weights_error(
    tmp_path, capfd, backbone: str, case: str
) -> None:
    edit, message = PARTIAL[backbone, case]
    save, what = (save_clip, "CLIP model") if backbone == "hf-clip" else (save_vit, "ViT")
    save(tmp_path)
    edit_weights(tmp_path, **edit)
    with pytest.raises(WeightsError) as err:
        BACKBONES.get(backbone)(path=str(tmp_path)).build()
    assert str(err.value) == f"{tmp_path} does not match the {what} of its config.json: {message}"
    output = capfd.readouterr()
    assert "LOAD REPORT" not in output.out + output.err  # transformers' own multi-line table is silenced


def test_hf_vit_checkpoint_with_a_pooler_or_classifier_loads(tmp_path) -> None:
    """A checkpoint's pooler (ViTModel's default) or classifier goes unused by this backbone: fine."""
    model = save_vit(tmp_path)
    edit_weights(
        tmp_path,
        add={
            "pooler.dense.weight": torch.zeros(32, 32),
            "pooler.dense.bias": torch.zeros(32),
            "classifier.weight": torch.zeros(3, 32),
        },
    )
    backbone = BACKBONES.get("hf-vit")(path=str(tmp_path)).build()
    assert backbone.pretrained is True
    torch.testing.assert_close(backbone.model.embeddings.cls_token, model.embeddings.cls_token)


def test_transformers_logging_is_restored_after_a_load(tmp_path) -> None:
    from transformers.utils import logging as hf_logging

    save_vit(tmp_path)
    before = hf_logging.get_verbosity()
    BACKBONES.get("hf-vit")(path=str(tmp_path)).build()
    assert hf_logging.get_verbosity() == before


def test_a_run_on_partly_matching_weights_fails_before_it_starts_and_leaves_no_record(tmp_path) -> None:
    from cl_bench import results
    from tests.helpers import quick_run

    weights = tmp_path / "clip"
    weights.mkdir()
    save_clip(weights)
    edit_weights(weights, drop=["visual_projection.weight"])
    with pytest.raises(WeightsError, match="1 missing key"):
        quick_run(tmp_path, "zero-shot", backbone={"name": "hf-clip", "path": str(weights)})
    assert not (tmp_path / "runs" / "zero-shot-test" / results.RESULT_FILE).exists()


def test_hf_clip_tokens_end_at_the_longest_prompt_and_encode_as_the_full_context() -> None:
    """Cutting the padding that every row has is exact in the causal text tower: float64 features
    and every text parameter's gradient equal the full 16-token rows'."""
    backbone = BACKBONES.get("tiny-hf-clip")().build().double()
    assert_cut_tokens_encode_as_full_rows(
        backbone,
        backbone._tokenize(list(CUT_PROMPTS)),
        lambda ids: backbone.model.get_text_features(input_ids=ids).pooler_output,
    )
