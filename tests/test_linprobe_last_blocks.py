"""``linprobe --n_last_blocks``: the pooled outputs of the encoder's last blocks side by side (DINO's linear
evaluation), for ViT and Vim; the encoders' ``forward_last_blocks`` against their own forward."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from test_linprobe_fixtures import BREAST_NPZ, fails_with, npz_head, read_results

import models
from common.checkpoint import load_weights
from common.transfer.heads import FrozenEncoderProbe, ProbeHead, probe_feature_dim
from linprobe.main import main as linprobe_main

COMMON = ["--num_workers", "0", "--n_bootstrap", "50", "--input_size", "32"]


@pytest.fixture(scope="module")
def breast_subset(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The first 160 / 60 / 60 real BreastMNIST images of each split."""
    return npz_head(BREAST_NPZ, tmp_path_factory.mktemp("data") / "breast_subset.npz",
                    {"train": 160, "val": 60, "test": 60})


def _tiny_encoder(name: str, out: Path) -> Path:
    from models.checkpoint import export_encoder

    torch.manual_seed(0)
    encoder = models.create_model(name, in_chans=1)
    weights, _ = export_encoder(encoder, out, normalization={"mean": [0.5], "std": [0.25]})
    return weights


@pytest.mark.parametrize("name,pool", [("test_vit", "token"), ("test_vit", "avg"), ("test_vim", "token"),
                                       ("test_vim", "avg")])
def test_intermediates_end_with_the_encoder_output(name: str, pool: str) -> None:
    torch.manual_seed(0)
    encoder = models.create_model(name, in_chans=1, global_pool=pool).eval()
    x = torch.randn(3, 1, 32, 32)
    with torch.no_grad():
        full = encoder.forward_features(x)
        outs = encoder.forward_last_blocks(x, encoder.depth)
    assert len(outs) == encoder.depth
    assert all(o.shape == full.shape for o in outs)
    torch.testing.assert_close(outs[-1], full)
    # Earlier blocks differ from the output (they are not the same tensor read twice).
    assert not torch.allclose(outs[0], full)
    with pytest.raises(ValueError, match="between 1 and the encoder's depth"):
        encoder.forward_last_blocks(x, encoder.depth + 1)


def test_vit_intermediate_is_the_normed_output_of_that_block() -> None:
    torch.manual_seed(0)
    encoder = models.create_model("test_vit", in_chans=1).eval()
    x = torch.randn(2, 1, 32, 32)
    with torch.no_grad():
        outs = encoder.forward_last_blocks(x, 2)
        tokens = encoder._with_cls(encoder.patch_embed(x) + encoder.pos_embed[:, 1:])
        for blk in encoder.blocks[:-1]:
            tokens = blk(tokens)
    torch.testing.assert_close(outs[0], encoder.norm(tokens))


def test_probe_features_concatenate_the_pooled_blocks() -> None:
    torch.manual_seed(0)
    encoder = models.create_model("test_vim", in_chans=1, global_pool="avg")
    dim = probe_feature_dim(encoder, 2)
    assert dim == 2 * encoder.num_features
    probe = FrozenEncoderProbe(encoder, ProbeHead(dim, 2), n_last_blocks=2)
    x = torch.randn(4, 1, 32, 32)
    feats = probe.features(x)
    assert feats.shape == (4, dim)
    with torch.no_grad():
        last = encoder.pool(encoder.forward_features(x))
    torch.testing.assert_close(feats[:, encoder.num_features:], last)
    assert probe(x).shape == (4, 2)


@pytest.mark.parametrize("name", ["test_vit", "test_vim"])
def test_fast_and_slow_probes_read_the_last_blocks(name: str, breast_subset: Path, tmp_path: Path) -> None:
    ckpt = _tiny_encoder(name, tmp_path / "enc")
    base = ["--data_path", str(breast_subset), "--finetune", str(ckpt), "--batch_size", "32", "--epochs", "2",
            "--warmup_epochs", "1", "--global_pool", *COMMON]
    cache = tmp_path / "features"
    linprobe_main([*base, "--fast", "--lr_grid", "1", "10", "--output_dir", str(tmp_path / "one"),
                   "--feature_cache", str(cache)])
    linprobe_main([*base, "--fast", "--lr_grid", "1", "10", "--n_last_blocks", "2",
                   "--output_dir", str(tmp_path / "two"), "--feature_cache", str(cache)])
    # Separate feature files: two blocks' features are not served from the one-block cache.
    assert len(list(cache.glob("train-*.safetensors"))) == 2
    width = models.create_model(name, in_chans=1).num_features
    for run, blocks in (("one", 1), ("two", 2)):
        head = load_weights(tmp_path / run / "checkpoint-best.safetensors")
        assert head["linear.weight"].shape == (2, blocks * width), run
        assert 0.0 <= read_results(tmp_path / run)["auc"] <= 1.0
    linprobe_main([*base, "--n_last_blocks", "2", "--train_aug", "none", "--blr", "1",
                   "--output_dir", str(tmp_path / "slow")])
    slow = read_results(tmp_path / "slow")
    assert load_weights(tmp_path / "slow" / "checkpoint-best.safetensors")["linear.weight"].shape == (2, 2 * width)
    # Scoring the saved head again reads the same blocks.
    linprobe_main([*base, "--n_last_blocks", "2", "--eval", "--resume",
                   str(tmp_path / "slow" / "checkpoint-best.safetensors"), "--output_dir", str(tmp_path / "eval")])
    assert read_results(tmp_path / "eval")["auc"] == pytest.approx(slow["auc"])
    # ... and says which count when it is given another.
    fails_with(linprobe_main, [*base, "--eval", "--resume", str(tmp_path / "slow" / "checkpoint-best.safetensors"),
                               "--output_dir", str(tmp_path / "eval1")],
               r"the head was trained on the last 2 block\(s\); pass --n_last_blocks 2 \(got 1\)")


def test_bad_n_last_blocks_are_one_line_errors(breast_subset: Path, tmp_path: Path) -> None:
    ckpt = _tiny_encoder("test_vit", tmp_path / "enc")
    base = ["--data_path", str(breast_subset), "--finetune", str(ckpt), "--fast", "--epochs", "1", "--batch_size", "32",
            "--output_dir", str(tmp_path / "out"), *COMMON]
    fails_with(linprobe_main, [*base, "--n_last_blocks", "0"], r"--n_last_blocks must be at least 1, got 0")
    depth = models.create_model("test_vit", in_chans=1).depth
    fails_with(linprobe_main, [*base, "--n_last_blocks", str(depth + 1)],
               rf"--n_last_blocks {depth + 1}: model 'test_vit' has {depth} blocks")
    fails_with(linprobe_main, ["--data_path", str(breast_subset), "--model", "test_medmamba", "--fast",
                               "--epochs", "1", "--batch_size", "32", "--n_last_blocks", "2", "--output_dir", str(tmp_path / "mm"),
                               *COMMON],
               r"--n_last_blocks 2: model 'test_medmamba' is a hierarchy of feature maps")
