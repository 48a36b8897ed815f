"""Our MAE-ViT against numbers computed once with facebookresearch/mae's own code (see the fixture's
``source``): identical weights (filled by the fixture's recipe), inputs and masking noise."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

import models

FIXTURE = Path(__file__).parent / "fixtures" / "mae_parity_tiny.json"


def _reference() -> dict:
    return json.loads(FIXTURE.read_text())


def _our_key(reference_key: str) -> str:
    return reference_key if reference_key.startswith(("decoder_", "mask_token")) else f"encoder.{reference_key}"


def _fill_like_reference(mae: torch.nn.Module, recipe: dict) -> None:
    """The fixture's weight recipe, applied in the reference's key order and mapped to our keys."""
    own = mae.state_dict()
    reference_keys = sorted(k.removeprefix("encoder.") for k in own)
    g = torch.Generator().manual_seed(recipe["seed"])
    new = {}
    for key in reference_keys:
        if "pos_embed" in key:
            continue
        value = torch.randn(own[_our_key(key)].shape, generator=g) * 0.1
        if "norm" in key and key.endswith(".weight"):
            value += 1.0
        new[_our_key(key)] = value
    missing = mae.load_state_dict(new, strict=False).missing_keys
    assert sorted(missing) == ["decoder_pos_embed", "encoder.pos_embed"]


@pytest.mark.parametrize("case", ["pixel_loss", "norm_pix_loss"])
def test_mae_loss_matches_facebookresearch_mae(case: str) -> None:
    ref = _reference()
    cfg, expected = ref["config"], ref["cases"][case]
    mae = models.create_model(
        "mae_test_vit", img_size=cfg["img_size"], patch_size=cfg["patch_size"], in_chans=cfg["in_chans"],
        embed_dim=cfg["embed_dim"], depth=cfg["depth"], num_heads=cfg["num_heads"], mlp_ratio=cfg["mlp_ratio"],
        decoder_embed_dim=cfg["decoder_embed_dim"], decoder_depth=cfg["decoder_depth"],
        decoder_num_heads=cfg["decoder_num_heads"], decoder_mlp_ratio=cfg["mlp_ratio"],
        norm_pix_loss=expected["norm_pix_loss"],
    ).eval()
    _fill_like_reference(mae, ref["weight_recipe"])
    # Our fixed sin-cos tables equal theirs (they were not overwritten above).
    assert mae.encoder.pos_embed.abs().sum().item() == pytest.approx(ref["pos_embed_abs_sum"], rel=1e-6)
    assert mae.decoder_pos_embed.abs().sum().item() == pytest.approx(ref["decoder_pos_embed_abs_sum"], rel=1e-6)

    size = cfg["img_size"]
    imgs = torch.randn(ref["batch"], cfg["in_chans"], size, size,
                       generator=torch.Generator().manual_seed(ref["image_seed"]))
    noise = torch.tensor(ref["noise"])
    with torch.no_grad():
        loss, pred, mask = mae(imgs, mask_ratio=ref["mask_ratio"], noise=noise)
    assert mask.tolist() == expected["mask"]
    torch.testing.assert_close(loss, torch.tensor(expected["loss"]), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(pred[0, 0, :8], torch.tensor(expected["pred_0_first_patch_8"]), rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(pred[1, -1, :8], torch.tensor(expected["pred_1_last_patch_8"]), rtol=1e-4, atol=1e-5)
    assert pred.abs().sum().item() == pytest.approx(expected["pred_abs_sum"], rel=1e-5)
