"""Encoder interface of every tiny model: shapes, gradients, checkpointing, channels, non-square inputs."""

from __future__ import annotations

import pytest
import timm
import torch

import models
from models.layers import sincos_pos_embed_2d

TEST_ENCODERS = ["test_vit", "test_vim", "test_medmamba"]


def _make(name: str, **kwargs) -> torch.nn.Module:
    torch.manual_seed(0)
    return models.create_model(name, **kwargs)


@pytest.mark.parametrize("name", TEST_ENCODERS)
@pytest.mark.parametrize("in_chans,size", [(1, (32, 32)), (3, (32, 48))])
def test_forward_shapes_and_every_parameter_gets_a_gradient(name: str, in_chans: int, size: tuple[int, int]) -> None:
    model = _make(name, in_chans=in_chans, img_size=size, num_classes=4)
    x = torch.randn(2, in_chans, *size)
    tokens = model.forward_features(x)
    assert tokens.ndim == 3 and tokens.shape[0] == 2 and tokens.shape[2] == model.num_features
    if name != "test_medmamba":
        grid = (size[0] // model.patch_size, size[1] // model.patch_size)
        assert tokens.shape[1] == model.num_prefix_tokens + grid[0] * grid[1]
    logits = model.forward_head(tokens)
    assert logits.shape == (2, 4)
    assert model.forward_head(tokens, pre_logits=True).shape == (2, model.num_features)
    assert torch.isfinite(logits).all()
    logits.square().sum().backward()
    no_grad = [n for n, p in model.named_parameters() if p.requires_grad and (p.grad is None or not p.grad.abs().sum())]
    assert no_grad == []


@pytest.mark.parametrize("name", TEST_ENCODERS)
def test_gradient_checkpointing_gives_the_same_output_and_gradients(name: str) -> None:
    model = _make(name, num_classes=3).eval()
    x = torch.randn(2, 3, 32, 32)
    out_plain = model(x)
    out_plain.sum().backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    model.zero_grad()
    model.set_grad_checkpointing(True)
    out_ckpt = model(x)
    out_ckpt.sum().backward()
    torch.testing.assert_close(out_ckpt, out_plain)
    for n, p in model.named_parameters():
        if n in grads:
            torch.testing.assert_close(p.grad, grads[n], msg=n)


@pytest.mark.parametrize("name", TEST_ENCODERS)
def test_layer_ids_weight_decay_and_groups_cover_every_parameter(name: str) -> None:
    model = _make(name, num_classes=2)
    names = [n for n, _ in model.named_parameters()]
    ids = {n: model.layer_id(n) for n in names}
    assert set(ids.values()) <= set(range(model.num_layer_ids))
    assert ids[next(n for n in names if n.startswith("patch_embed"))] == 0
    assert ids["head.weight"] == model.num_layer_ids - 1
    assert model.no_weight_decay() <= set(names) | {"pos_embed", "cls_token"}
    groups = timm.models.group_parameters(model, model.group_matcher())
    assert sorted(p for g in groups.values() for p in g) == sorted(names)


@pytest.mark.parametrize("name", ["test_vit", "test_vim"])
def test_pooling_modes_and_reset_classifier(name: str) -> None:
    model = _make(name, global_pool="avg", num_classes=0)
    x = torch.randn(2, 3, 32, 32)
    tokens = model.forward_features(x)
    pooled = model.forward_head(tokens)
    assert pooled.shape == (2, model.num_features)
    torch.testing.assert_close(pooled, model.fc_norm(tokens[:, 1:].mean(1)))
    model.reset_classifier(7, global_pool="token")
    assert model(x).shape == (2, 7)
    torch.testing.assert_close(model.forward_head(tokens, pre_logits=True), model.fc_norm(tokens[:, 0]))
    with pytest.raises(ValueError, match="global_pool"):
        model.reset_classifier(2, global_pool="max")


def test_vim_without_class_token_needs_average_pooling() -> None:
    model = _make("test_vim", cls_token=False, global_pool="avg")
    assert model.num_prefix_tokens == 0
    assert model.forward_features(torch.randn(1, 3, 32, 32)).shape == (1, 16, 32)
    with pytest.raises(ValueError, match="class token"):
        models.create_model("test_vim", cls_token=False, global_pool="token")


def test_sincos_position_embedding_for_rectangular_grid() -> None:
    model = _make("test_vit", img_size=(16, 40))
    table = model.pos_embed[0]
    assert table.shape == (1 + 2 * 5, 32) and not model.pos_embed.requires_grad
    assert table[0].abs().sum() == 0  # class-token row
    # Tokens are raster ordered: the first half of the channels follows the column, the second the row.
    expected = sincos_pos_embed_2d(32, (2, 5))
    torch.testing.assert_close(table[1:], expected)
    assert torch.equal(table[1 + 0 * 5 + 3, 16:], table[1 + 1 * 5 + 3 - 5, 16:])  # same row -> same half
    assert torch.equal(table[1 + 3, :16], table[1 + 5 + 3, :16])  # same column -> same first half


def test_image_size_must_be_a_multiple_of_the_patch_and_input_must_match() -> None:
    with pytest.raises(ValueError, match="multiple"):
        models.create_model("test_vit", img_size=(30, 32))
    model = _make("test_vit", in_chans=1)
    with pytest.raises(ValueError, match="expected input"):
        model(torch.randn(1, 3, 32, 32))


def test_registry_names_and_timm_bridge() -> None:
    names = set(models.list_models())
    for size in ("tiny", "small", "base", "large", "huge"):
        assert {f"vit_{size}_patch16", f"vit_{size}_patch8", f"vit_{size}_patch14", f"mae_vit_{size}_patch16"} <= names
    for size in ("tiny", "small", "base"):
        assert {f"vim_{size}_patch16", f"mae_vim_{size}_patch16", f"medmamba_{size}"} <= names
        assert {f"vim_{size}_patch8", f"mae_vim_{size}_patch8", f"mae_vit_{size}_patch8"} <= names
    assert {"test_vit", "test_vim", "mae_test_vit", "mae_test_vim", "test_medmamba"} <= names
    assert models.list_models("mae_*", kind="mae") == models.list_models("mae_*")
    with pytest.raises(KeyError, match="unknown model"):
        models.create_model("vit_gigantic_patch16")
    model = timm.create_model("test_vim", num_classes=3)
    assert type(model).__name__ == "VisionMamba" and model.num_classes == 3
    # timm's own test_vit is not overwritten.
    assert type(timm.create_model("test_vit")).__module__.startswith("timm.")


# Published sizes minus the classifier head and the (here fixed) position embedding: ViT-B/16 86.6M,
# ViT-L/16 304.3M, ViT-H/14 632M; Vim-Ti 7M, Vim-S 26M.
@pytest.mark.parametrize("name,params_millions", [
    ("vit_base_patch16", 85.65), ("vit_large_patch16", 303.1), ("vit_huge_patch14", 630.4),
    ("vim_tiny_patch16", 6.92), ("vim_small_patch16", 25.34),
])
def test_full_size_parameter_counts(name: str, params_millions: float) -> None:
    # Built on the meta device: no memory and no init cost.
    with torch.device("meta"):
        model = models.create_model(name)
    count = sum(p.numel() for p in model.parameters() if p.requires_grad) / 1e6
    assert count == pytest.approx(params_millions, rel=0.005)


@pytest.mark.parametrize("name", ["mae_vit_small_patch8", "mae_vim_small_patch8"])
def test_patch8_mae_gives_small_images_four_times_the_tokens(name: str) -> None:
    with torch.device("meta"):
        mae = models.create_model(name, img_size=64, in_chans=1)
    assert mae.patch_size == 8 and mae.encoder.patch_embed.num_patches == 64


def test_hierarchical_classifier_refuses_mae_with_a_reason() -> None:
    model = models.create_model("test_medmamba", img_size=32, in_chans=1)
    with pytest.raises(NotImplementedError, match="cannot be used inside MAE"):
        model.forward_visible(torch.zeros(1, 1, 32, 32), torch.zeros(1, 2, dtype=torch.long))


def test_attention_equals_attention_written_out() -> None:
    """The attention block (q / k / v cut along the fused projection's axis) against softmax(q k^T / sqrt(d)) v
    from a head-first split, forward and every gradient, in float64."""
    from models.layers import Attention

    torch.manual_seed(0)
    attn = Attention(24, 3).double()
    x = torch.randn(2, 7, 24, dtype=torch.float64, requires_grad=True)
    grad = torch.randn(2, 7, 24, dtype=torch.float64)

    def by_hand(inp: torch.Tensor) -> torch.Tensor:
        q, k, v = attn.qkv(inp).reshape(2, 7, 3, 3, 8).permute(2, 0, 3, 1, 4)
        weights = torch.softmax(q @ k.transpose(-1, -2) / 8 ** 0.5, dim=-1)
        return attn.proj((weights @ v).transpose(1, 2).reshape(2, 7, 24))

    got, want = attn(x), by_hand(x)
    torch.testing.assert_close(got, want)
    leaves = [x, *attn.parameters()]
    for a, b in zip(torch.autograd.grad(got, leaves, grad), torch.autograd.grad(want, leaves, grad)):
        torch.testing.assert_close(a, b)


@pytest.mark.parametrize("in_chans,size,patch", [(1, (32, 48), 8), (3, (24, 24), 4)])
def test_patch_embed_is_the_strided_convolution(in_chans: int, size: tuple[int, int], patch: int) -> None:
    """The flattened-patch projection equals the strided convolution its weight is stored as (checkpoint layout),
    for every patch and for a selected subset (MAE's visible patches), forward and weight / bias gradients, in
    float64."""
    import torch.nn.functional as F

    from models.layers import PatchEmbed

    torch.manual_seed(0)
    embed = PatchEmbed(size, patch, in_chans, 12).double()
    x = torch.randn(3, in_chans, *size, dtype=torch.float64)
    conv = F.conv2d(x, embed.proj.weight, embed.proj.bias, stride=patch).flatten(2).transpose(1, 2)
    full = embed(x)
    torch.testing.assert_close(full, conv)
    num = embed.num_patches
    ids = torch.stack([torch.randperm(num)[: num // 4].sort().values for _ in range(3)])
    picked = embed(x, ids)
    want = torch.gather(conv, 1, ids.unsqueeze(-1).expand(-1, -1, 12))
    torch.testing.assert_close(picked, want)
    grad = torch.randn_like(picked)
    params = [embed.proj.weight, embed.proj.bias]
    for a, b in zip(torch.autograd.grad(picked, params, grad), torch.autograd.grad(want, params, grad)):
        torch.testing.assert_close(a, b)
    with pytest.raises(ValueError, match="expected input"):
        embed(x[:, :, :patch])


@pytest.mark.parametrize("name,blocks_input", [("test_vit", "_with_cls"), ("test_vim", "_encode")])
def test_forward_visible_embeds_the_kept_patches_at_their_positions(name: str, blocks_input: str) -> None:
    """forward_visible projects only the kept patches: what it hands to the blocks equals embedding every patch
    (the convolution), adding every position's embedding and keeping the same patches."""
    import torch.nn.functional as F

    model = _make(name, in_chans=1, img_size=(32, 32)).double().eval()
    x = torch.randn(2, 1, 32, 32, dtype=torch.float64)
    ids = torch.tensor([[0, 3, 5, 15], [1, 2, 8, 14]])
    seen = []
    run_blocks = getattr(model, blocks_input)
    setattr(model, blocks_input, lambda patches, *rest: seen.append(patches) or run_blocks(patches, *rest))
    model.forward_visible(x, ids)
    proj = model.patch_embed.proj
    every = F.conv2d(x, proj.weight, proj.bias, stride=model.patch_size).flatten(2).transpose(1, 2)
    every = every + model.pos_embed[:, model.num_prefix_tokens:]
    torch.testing.assert_close(seen[0], torch.gather(every, 1, ids.unsqueeze(-1).expand(-1, -1, every.shape[-1])))


def test_set_backend_refuses_triton_attention_on_heads_our_kernels_do_not_take() -> None:
    """A model with 80-wide heads (ViT-H/14's) put on "triton" fails when the backend is set, naming the block, not
    at its first forward step; "auto" and "sdpa" are set on every block."""
    from models.layers import Attention, set_backend

    model = torch.nn.Sequential(Attention(64, 2), Attention(160, 2))  # heads of 32, then of 80
    with pytest.raises(ValueError, match=r"1 has 80"):
        set_backend(model, "attention_backend", "triton")
    assert [m.attention_backend for m in model] == ["sdpa", "sdpa"]  # nothing half-set
    set_backend(model, "attention_backend", "auto")
    assert [m.attention_backend for m in model] == ["auto", "auto"]
    set_backend(model[:1], "attention_backend", "triton")
    assert model[0].attention_backend == "triton"
