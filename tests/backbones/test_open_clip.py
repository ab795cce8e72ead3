"""open_clip loading: unfused attention is output-identical; weights load from files and local-dir:."""

from __future__ import annotations

import copy
import json

import pytest
import torch

from cl_bench import config
from cl_bench.backbones.attention import UnfusedAttention
from cl_bench.backbones.open_clip import AutocastLayerNorm, OpenCLIPBackbone, PatchConv2d, unfuse_attention
from cl_bench.errors import WeightsError
from cl_bench.registry import BACKBONES
from tests.helpers import CUT_PROMPTS, assert_cut_tokens_encode_as_full_rows, tiny_backbone


def raw_model(name: str = "tiny-clip"):
    import open_clip

    from cl_bench.backbones.tiny import CONFIG_DIR

    if name not in open_clip.list_models():
        open_clip.add_model_config(CONFIG_DIR)
    torch.manual_seed(0)
    return open_clip.create_model(name)


@pytest.mark.parametrize("name", ["tiny-clip", "ViT-B-16"])
def test_unfused_attention_is_output_identical(name: str) -> None:
    original = raw_model(name).eval()
    unfused = copy.deepcopy(original)
    unfuse_attention(unfused.visual.transformer.resblocks, causal=False)
    unfuse_attention(unfused.transformer.resblocks, causal=True)
    assert all(isinstance(b.attn, UnfusedAttention) for b in unfused.visual.transformer.resblocks)
    size = (
        original.visual.image_size[0]
        if isinstance(original.visual.image_size, tuple)
        else original.visual.image_size
    )
    images = torch.randn(2, 3, size, size, generator=torch.Generator().manual_seed(1))
    tokens = torch.randint(1, 49406, (3, original.context_length), generator=torch.Generator().manual_seed(2))
    tokens[:, 5] = 49407  # an end-of-text token for the pooling
    with torch.no_grad():
        torch.testing.assert_close(
            unfused.encode_image(images), original.encode_image(images), rtol=0, atol=1e-5
        )
        torch.testing.assert_close(
            unfused.encode_text(tokens), original.encode_text(tokens), rtol=0, atol=1e-5
        )


def test_patch_embedding_as_a_gemm_equals_the_convolution_with_its_gradients() -> None:
    torch.manual_seed(0)
    for bias in (False, True):
        conv = torch.nn.Conv2d(3, 16, 8, stride=8, bias=bias).double()
        patch = PatchConv2d.from_conv(conv)
        assert isinstance(patch, PatchConv2d)
        assert patch.state_dict().keys() == conv.state_dict().keys()
        x = torch.randn(2, 3, 32, 24, dtype=torch.float64)
        got, want = patch(x), conv(x)
        torch.testing.assert_close(got, want, rtol=0, atol=1e-12)
        upstream = torch.randn_like(want)
        got_grads = torch.autograd.grad(got, list(patch.parameters()), upstream)
        want_grads = torch.autograd.grad(want, list(conv.parameters()), upstream)
        for g, w in zip(got_grads, want_grads, strict=True):
            torch.testing.assert_close(g, w, rtol=0, atol=1e-12)
        # tokens as open_clip flattens them: no copy needed, same values
        tokens = got.reshape(2, 16, -1).permute(0, 2, 1)
        assert tokens.is_contiguous()
        torch.testing.assert_close(patch(x[..., :31, :]), conv(x[..., :31, :]), rtol=0, atol=0)  # cropped
    overlapping = torch.nn.Conv2d(3, 4, 3, stride=1, padding=1)
    assert PatchConv2d.from_conv(overlapping) is overlapping


def test_the_backbone_embeds_patches_with_the_gemm_without_drawing_random_numbers() -> None:
    """Swapping the module must not move the seeded stream (adapters drawn later keep their init)."""
    torch.manual_seed(0)
    conv = torch.nn.Conv2d(3, 8, 4, stride=4)
    state = torch.random.get_rng_state()
    PatchConv2d.from_conv(conv)
    assert torch.equal(torch.random.get_rng_state(), state)
    backbone = tiny_backbone("tiny-clip")
    assert isinstance(backbone.model.visual.conv1, PatchConv2d)
    assert "visual.conv1.weight" in backbone.model.state_dict()


def test_layer_norms_keep_open_clips_function_and_skip_the_float32_round_trip_under_autocast() -> None:
    from open_clip.transformer import LayerNorm

    torch.manual_seed(0)
    ours, theirs = LayerNorm(16), LayerNorm(16)
    with torch.no_grad():
        theirs.weight.normal_()
        theirs.bias.normal_()
    ours.load_state_dict(theirs.state_dict())
    ours.__class__ = AutocastLayerNorm
    x = torch.randn(4, 16) * 3 + 1
    assert torch.equal(ours(x), theirs(x))  # no autocast: open_clip's function exactly
    xb = x.bfloat16()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got, want = ours(xb), theirs(xb)
    assert got.dtype == want.dtype == torch.bfloat16
    # bf16 kernel with float32 statistics and bf16 gamma/beta vs open_clip's float32 round trip
    torch.testing.assert_close(got.float(), want.float(), rtol=2e-2, atol=2e-2)
    backbone = tiny_backbone("tiny-clip")
    norms = [m for m in backbone.model.modules() if isinstance(m, torch.nn.LayerNorm)]
    assert norms
    assert all(type(m) is AutocastLayerNorm for m in norms)


def test_non_causal_path_with_an_explicit_mask_matches_multihead_attention() -> None:
    mha = torch.nn.MultiheadAttention(16, 4, batch_first=True)
    unfused = UnfusedAttention.from_multihead(mha)
    x = torch.randn(2, 5, 16)
    mask = torch.triu(torch.full((5, 5), float("-inf")), diagonal=1)
    expected, _ = mha(x, x, x, need_weights=False, attn_mask=mask)
    got, _ = unfused(x, x, x, need_weights=False, attn_mask=mask)
    torch.testing.assert_close(got, expected, rtol=0, atol=1e-6)


def test_backbone_describes_blocks_heads_and_pretraining() -> None:
    backbone = tiny_backbone("tiny-clip")
    assert [b.name for b in backbone.blocks] == [f"vision.{i}" for i in range(4)] + [
        f"text.{i}" for i in range(4)
    ]
    assert {(b.n_heads, b.head_dim) for b in backbone.blocks} == {(4, 16)}
    assert isinstance(backbone.linear(backbone.blocks[0], "q"), torch.nn.Linear)
    assert backbone.pretrained is False
    assert backbone.info().n_parameters == sum(p.numel() for p in backbone.model.parameters())


def test_weights_file_loads_exactly_and_is_reported_as_pretrained(tmp_path) -> None:
    source = raw_model()
    path = tmp_path / "tiny.pt"
    torch.save(source.state_dict(), path)
    backbone = config.build(BACKBONES.get("tiny-clip"), {"weights": str(path)}, "tiny-clip").build()
    assert backbone.pretrained is True
    assert backbone.weights == str(path)
    loaded = backbone.model.visual.transformer.resblocks[0].attn.q_proj.weight
    torch.testing.assert_close(
        loaded, source.visual.transformer.resblocks[0].attn.in_proj_weight[:64], rtol=0, atol=0
    )


def test_local_dir_weights_define_model_and_weights(tmp_path) -> None:
    from cl_bench.backbones.tiny import CONFIG_DIR

    source = raw_model()
    (tmp_path / "open_clip_config.json").write_text(
        json.dumps(
            {"model_cfg": json.loads((CONFIG_DIR / "tiny-clip.json").read_text()), "preprocess_cfg": {}}
        )
    )
    torch.save(source.state_dict(), tmp_path / "open_clip_pytorch_model.bin")
    backbone = config.build(BACKBONES.get("tiny-clip"), {"weights": f"local-dir:{tmp_path}"}, "x").build()
    assert backbone.pretrained is True
    torch.testing.assert_close(backbone.model.token_embedding.weight, source.token_embedding.weight)


def test_missing_and_mismatched_weights_are_one_line_errors(tmp_path) -> None:
    build = BACKBONES.get("tiny-clip")
    with pytest.raises(WeightsError, match="weights file not found"):
        build(weights=str(tmp_path / "nope.pt")).build()
    with pytest.raises(WeightsError, match="no open_clip_config.json"):
        build(weights=f"local-dir:{tmp_path}").build()
    state = raw_model().state_dict()
    state["token_embedding.weight"] = torch.zeros(10, 64)
    torch.save(state, tmp_path / "bad.pt")
    with pytest.raises(WeightsError, match="could not be loaded into tiny-clip") as err:
        build(weights=str(tmp_path / "bad.pt")).build()
    assert "\n" not in str(err.value)
    # the key and both shapes, from the detail line of torch's "Error(s) in loading state_dict" message
    assert (
        "size mismatch for token_embedding.weight: copying a param with shape torch.Size([10, 64]) "
        "from checkpoint" in str(err.value)
    )
    (tmp_path / "garbage.pt").write_bytes(b"not a checkpoint")
    with pytest.raises(WeightsError, match="could not be loaded"):
        build(weights=str(tmp_path / "garbage.pt")).build()


def test_missing_and_unexpected_keys_are_named(tmp_path) -> None:
    state = raw_model().state_dict()
    del state["ln_final.weight"]
    torch.save(state, tmp_path / "missing.pt")
    with pytest.raises(WeightsError) as err:
        BACKBONES.get("tiny-clip")(weights=str(tmp_path / "missing.pt")).build()
    assert str(err.value) == (
        f"weights {tmp_path / 'missing.pt'} could not be loaded into tiny-clip: RuntimeError: "
        'Error(s) in loading state_dict for CLIP: Missing key(s) in state_dict: "ln_final.weight".'
    )
    state = raw_model().state_dict()
    state["extra.weight"] = torch.zeros(1)
    torch.save(state, tmp_path / "extra.pt")
    with pytest.raises(WeightsError, match='Unexpected key\\(s\\) in state_dict: "extra.weight"'):
        BACKBONES.get("tiny-clip")(weights=str(tmp_path / "extra.pt")).build()


def test_a_long_detail_line_is_cut_to_about_200_characters(tmp_path) -> None:
    state = raw_model().state_dict()
    removed = sorted(k for k in state if k.startswith("transformer.resblocks."))
    for key in removed:
        del state[key]
    torch.save(state, tmp_path / "no_text_blocks.pt")
    with pytest.raises(WeightsError) as err:
        BACKBONES.get("tiny-clip")(weights=str(tmp_path / "no_text_blocks.pt")).build()
    message = str(err.value)
    detail = message.split("Error(s) in loading state_dict for CLIP: ", 1)[1]
    assert detail.startswith("Missing key(s) in state_dict: ")
    assert detail.endswith("...")
    assert len(detail) <= 200
    assert "\n" not in message


@pytest.mark.gpu
def test_on_cuda_the_patch_gemm_equals_the_convolution() -> None:
    torch.manual_seed(0)
    conv = torch.nn.Conv2d(3, 64, 16, stride=16, bias=False).cuda()
    patch = PatchConv2d.from_conv(conv)
    x = torch.randn(4, 3, 224, 224, device="cuda")
    with torch.no_grad():
        torch.testing.assert_close(patch(x), conv(x), rtol=1e-4, atol=1e-4)  # fp32 (TF32 off)
        with torch.autocast("cuda", dtype=torch.bfloat16):
            got, want = patch(x), conv(x)
        assert got.dtype == want.dtype == torch.bfloat16
        torch.testing.assert_close(got.float(), want.float(), rtol=2e-2, atol=2e-2)


@pytest.mark.gpu
def test_on_cuda_the_autocast_layer_norm_runs_the_bf16_kernel() -> None:
    from open_clip.transformer import LayerNorm

    torch.manual_seed(0)
    theirs = LayerNorm(768).cuda()
    ours = copy.deepcopy(theirs)
    ours.__class__ = AutocastLayerNorm
    x = torch.randn(8, 197, 768, device="cuda").bfloat16()
    with torch.no_grad(), torch.autocast("cuda", dtype=torch.bfloat16):
        got, want = ours(x), theirs(x)
    assert got.dtype == want.dtype == torch.bfloat16
    torch.testing.assert_close(got.float(), want.float(), rtol=2e-2, atol=2e-2)


def test_tokens_end_at_the_longest_prompt_and_encode_as_open_clips_full_context() -> None:
    """Prompts are cut after the longest one's end token, exactly: in float64 the text features and
    every text parameter's gradient equal open_clip's ``encode_text`` on the full 16-token rows."""
    backbone = tiny_backbone("tiny-clip")
    backbone.model.double()
    assert_cut_tokens_encode_as_full_rows(
        backbone, backbone.tokenizer(list(CUT_PROMPTS)), backbone.model.encode_text
    )


def test_a_text_tower_without_a_causal_mask_keeps_full_rows_and_bidirectional_attention() -> None:
    """Cutting is exact only for a causal tower pooling its end token: a model built without the
    causal mask (open_clip's ``no_causal_mask``, pooled at the last position) keeps every token,
    and its unfused attention is not made causal."""
    import open_clip

    model = raw_model()
    model.attn_mask = None
    model.text_pool_type = "last"
    backbone = OpenCLIPBackbone(
        name="x",
        model=model,
        tokenizer=open_clip.tokenizer.SimpleTokenizer(context_length=16),
        source="test",
        pretrained=False,
        weights=None,
    )
    assert not backbone.trims_text
    assert backbone.tokenize(["a cat."]).shape == (1, 16)
    assert not any(b.attn.causal for b in model.transformer.resblocks)
