"""MAE wrapper: masking, raster order, loss on masked patches only, patchify round trips, both encoders."""

from __future__ import annotations

import pytest
import torch

import models
from models.mae import patchify, random_masking, unpatchify


@pytest.mark.parametrize("ratio", [0.0, 0.5, 0.75, 0.9])
def test_masked_count_matches_ratio_and_restore_inverts_shuffle(ratio: float) -> None:
    num_patches = 24
    m = random_masking(3, num_patches, ratio, generator=torch.Generator().manual_seed(0))
    keep = int(num_patches * (1 - ratio))
    assert m.ids_keep.shape == (3, keep)
    assert (m.mask.sum(1) == num_patches - keep).all()
    arange = torch.arange(num_patches).expand(3, -1)
    assert torch.equal(torch.gather(m.ids_shuffle, 1, m.ids_restore), arange)
    # Visible tokens are in raster order and are exactly the unmasked positions.
    assert (m.ids_keep[:, 1:] > m.ids_keep[:, :-1]).all()
    for b in range(3):
        assert m.ids_keep[b].tolist() == torch.nonzero(m.mask[b] == 0).flatten().tolist()


def test_masking_is_reproducible_from_a_generator() -> None:
    a = random_masking(2, 49, 0.75, generator=torch.Generator().manual_seed(5)).mask
    b = random_masking(2, 49, 0.75, generator=torch.Generator().manual_seed(5)).mask
    c = random_masking(2, 49, 0.75, generator=torch.Generator().manual_seed(6)).mask
    assert torch.equal(a, b) and not torch.equal(a, c)


def test_bad_mask_ratio_and_noise_are_rejected() -> None:
    with pytest.raises(ValueError, match="mask_ratio"):
        random_masking(1, 16, 1.0)
    with pytest.raises(ValueError, match="no visible patch"):
        random_masking(1, 4, 0.9)
    with pytest.raises(ValueError, match="noise must have shape"):
        random_masking(2, 16, 0.5, noise=torch.rand(2, 15))


@pytest.mark.parametrize("channels,size", [(1, (16, 16)), (3, (16, 24)), (5, (24, 8))])
def test_patchify_unpatchify_round_trip(channels: int, size: tuple[int, int]) -> None:
    p = 8
    imgs = torch.randn(2, channels, *size)
    patches = patchify(imgs, p)
    grid = (size[0] // p, size[1] // p)
    assert patches.shape == (2, grid[0] * grid[1], p * p * channels)
    # Patch k is the k-th raster block, pixels ordered (row, col, channel).
    row, col = divmod(grid[0] * grid[1] - 1, grid[1])
    block = imgs[1, :, row * p:(row + 1) * p, col * p:(col + 1) * p].permute(1, 2, 0).reshape(-1)
    assert torch.equal(patches[1, -1], block)
    assert torch.equal(unpatchify(patches, p, grid, channels), imgs)


@pytest.mark.parametrize("norm_pix_loss", [False, True])
def test_loss_ignores_target_pixels_of_visible_patches(norm_pix_loss: bool) -> None:
    mae = models.create_model("mae_test_vit", norm_pix_loss=norm_pix_loss)
    imgs = torch.randn(2, 3, 32, 32)
    m = mae.random_masking(2, 0.75, generator=torch.Generator().manual_seed(1))
    pred = torch.randn(2, 16, 8 * 8 * 3)
    loss = mae.forward_loss(imgs, pred, m.mask)
    changed = mae.patchify(imgs).clone()
    visible = m.mask == 0
    changed[visible] += torch.randn_like(changed[visible]) * 5
    loss_visible_changed = mae.forward_loss(mae.unpatchify(changed), pred, m.mask)
    torch.testing.assert_close(loss_visible_changed, loss)
    # Control: changing masked-patch pixels does change the loss (random, so norm_pix_loss keeps it).
    changed[~visible] += torch.randn_like(changed[~visible])
    assert not torch.allclose(mae.forward_loss(mae.unpatchify(changed), pred, m.mask), loss)


@pytest.mark.parametrize("name", ["mae_test_vit", "mae_test_vim"])
def test_encoder_sees_only_visible_patches_and_training_step_works(name: str) -> None:
    torch.manual_seed(0)
    mae = models.create_model(name, in_chans=1, img_size=(32, 48), norm_pix_loss=True)
    imgs = torch.randn(2, 1, 32, 48)
    loss, pred, mask = mae(imgs, mask_ratio=0.75, generator=torch.Generator().manual_seed(3))
    assert pred.shape == (2, 24, 64) and mask.shape == (2, 24) and torch.isfinite(loss)
    assert (mask.sum(1) == 18).all()
    loss.backward()
    no_grad = [n for n, p in mae.named_parameters() if p.requires_grad and p.grad is None]
    assert no_grad == [] and mae.encoder.patch_embed.proj.weight.grad.abs().sum() > 0

    # Changing only masked pixels leaves the prediction unchanged (eval mode, same mask).
    mae.eval()
    with torch.no_grad():
        _, pred_a, mask_a = mae(imgs, generator=torch.Generator().manual_seed(4))
        pixel_mask = mae.unpatchify(mask_a.unsqueeze(-1).expand(-1, -1, 64)).bool()
        edited = torch.where(pixel_mask, torch.randn_like(imgs), imgs)
        _, pred_b, _ = mae(edited, generator=torch.Generator().manual_seed(4))
    torch.testing.assert_close(pred_b, pred_a)


def test_decoder_is_configurable_and_the_encoder_is_a_registry_encoder() -> None:
    mae = models.create_model("mae_test_vim", decoder_embed_dim=16, decoder_depth=1, decoder_num_heads=4)
    assert mae.encoder.model_name == "test_vim" and len(mae.decoder_blocks) == 1
    assert mae.decoder_embed.out_features == 16
    assert "mask_token" in mae.no_weight_decay() and "encoder.pos_embed" in mae.no_weight_decay()
    with torch.device("meta"):
        full = models.create_model("mae_vit_base_patch16", img_size=224, in_chans=1, norm_pix_loss=True)
    assert full.decoder_embed.out_features == 512 and len(full.decoder_blocks) == 8
    assert full.decoder_blocks[0].attn.num_heads == 16 and full.decoder_pred.out_features == 16 * 16 * 1


def test_bf16_weights_take_float32_images_and_keep_the_target_in_float32() -> None:
    """DeepSpeed's bf16 mode (no autocast): the encoder gets bf16 input, the norm-pix target is not rounded."""
    torch.manual_seed(0)
    mae = models.create_model("mae_test_vit", norm_pix_loss=True).bfloat16()
    imgs = torch.rand(2, 3, 32, 32) * 4 + 100  # large mean, small spread: bf16 rounding of pixels hurts here
    noise = torch.rand(2, mae.num_patches)
    loss, pred, mask = mae(imgs, noise=noise)
    assert pred.dtype == torch.bfloat16 and loss.dtype == torch.float32
    target = mae.patchify(imgs.double())
    target = (target - target.mean(-1, keepdim=True)) / (target.var(-1, keepdim=True) + 1e-6) ** 0.5
    exact = (((pred.double() - target) ** 2).mean(-1) * mask).sum() / mask.sum()
    torch.testing.assert_close(loss.double(), exact, rtol=1e-5, atol=1e-6)
    # Control: the same model fed pre-rounded bf16 pixels computes a visibly different target.
    rounded, _, _ = mae(imgs.bfloat16(), noise=noise)
    assert abs(rounded.item() - exact.item()) > 1e-3 * exact.item()
