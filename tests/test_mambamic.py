"""MambaMIC: shapes, gradients, encoder interface, paper parameter counts, scan-backend parity, training."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from common.transfer.param_groups import layer_decay_groups
from models import create_model, list_models
from models.mambamic import ChunkedGlobalBranch, MambaMIC
from models.mambamic_layers import LocallyAwareEnhancedFilter, PatchMerging, channel_shuffle_last

REPO = Path(__file__).resolve().parents[1]
MEDMNIST = REPO.parent / "shared" / "data" / "medmnist"
# MambaMIC paper (arXiv 2409.07896), Table 1: parameters in millions with a 1000-class head.
PAPER_PARAMS_M = {"mambamic_tiny": 4.32, "mambamic_small": 4.97}


def _tiny(**kwargs) -> MambaMIC:
    torch.manual_seed(0)
    return create_model("test_mambamic", **{"in_chans": 1, "num_classes": 3, "drop_path_rate": 0.0, **kwargs})


def test_registry_names():
    assert {"mambamic_tiny", "mambamic_small", "mambamic_base", "test_mambamic"} <= set(list_models("*mambamic*"))


@pytest.mark.parametrize("name", sorted(PAPER_PARAMS_M))
def test_parameter_count_matches_paper(name):
    with torch.device("meta"):  # shapes only: no memory, no init cost
        model = create_model(name, in_chans=3, num_classes=1000)
    count = sum(p.numel() for p in model.parameters()) / 1e6
    assert count == pytest.approx(PAPER_PARAMS_M[name], rel=0.05), f"{name}: {count:.3f} M"


@pytest.mark.parametrize("in_chans,size", [(1, (32, 32)), (3, (32, 48)), (1, (28, 28))])
def test_shapes_and_finite(in_chans, size):
    model = _tiny(in_chans=in_chans).eval()
    x = torch.randn(2, in_chans, *size)
    with torch.no_grad():
        tokens = model.forward_features(x)
        logits = model.forward_head(tokens)
        pooled = model.forward_head(tokens, pre_logits=True)
    # Stride-4 stem, then three 2x merges, each rounding up (odd maps are padded): ceil(size / 32).
    rows, cols = [-(-s // 32) for s in size]
    assert tokens.shape == (2, rows * cols, model.num_features)
    assert pooled.shape == (2, model.num_features) and logits.shape == (2, 3)
    assert torch.isfinite(tokens).all() and torch.isfinite(logits).all()


def test_every_parameter_gets_a_gradient():
    model = _tiny(in_chans=3).train()
    model(torch.randn(2, 3, 32, 48)).logsumexp(dim=1).sum().backward()
    missing = [n for n, p in model.named_parameters() if p.grad is None or not torch.isfinite(p.grad).all()]
    zero = [n for n, p in model.named_parameters() if p.grad is not None and p.grad.abs().sum() == 0]
    assert not missing and not zero, (missing, zero)


def test_grad_checkpointing_same_output_and_grads():
    model = _tiny().train()
    x = torch.randn(2, 1, 32, 32)
    out = model(x)
    out.square().sum().backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad()
    model.set_grad_checkpointing(True)
    out_ckpt = model(x)
    out_ckpt.square().sum().backward()
    torch.testing.assert_close(out_ckpt, out)
    for name, p in model.named_parameters():
        torch.testing.assert_close(p.grad, grads[name], msg=name)


def test_chunks_share_one_ssm_and_batching_matches_a_loop():
    torch.manual_seed(1)
    branch = ChunkedGlobalBranch(16, num_chunks=4, d_state=4, d_conv=3, ssm_ratio=2.0, laef_ratio=0.25,
                                 scan_backend="reference").eval()
    x = torch.randn(2, 3, 5, 16)
    with torch.no_grad():
        normed = branch.norm(x)
        parts = [branch.ssm(c) + branch.skip_scale * c for c in normed.chunk(4, dim=-1)]
        want = branch.proj(branch.norm(torch.cat(parts, dim=-1)))
        torch.testing.assert_close(branch(x), want)


def test_channel_shuffle_and_laef_split():
    x = torch.arange(8.0).view(1, 1, 1, 8)
    assert channel_shuffle_last(x, 4).flatten().tolist() == [0, 2, 4, 6, 1, 3, 5, 7]
    with pytest.raises(ValueError, match="groups"):
        channel_shuffle_last(x, 3)
    laef = LocallyAwareEnhancedFilter(8, 8, ratio=0.25)
    assert laef.filtered_dim == 2 and laef.local.in_channels == 2
    with pytest.raises(ValueError, match="filters none"):
        LocallyAwareEnhancedFilter(8, 2, ratio=0.25)


def test_patch_merging_pads_odd_maps():
    merge = PatchMerging(4, 8)
    assert merge(torch.randn(1, 7, 5, 4)).shape == (1, 4, 3, 8)


def test_layer_ids_and_param_groups():
    model = _tiny()
    ids = {name: model.layer_id(name) for name, _ in model.named_parameters()}
    assert all(0 <= i < model.num_layer_ids for i in ids.values())
    assert model.num_layer_ids == sum(model.depths) + 2
    assert {i for n, i in ids.items() if n.startswith("stem.")} == {0}
    assert {i for n, i in ids.items() if n.startswith("head.")} == {model.num_layer_ids - 1}
    # Block ids increase through the stages; patch merging shares the id of the stage's first block.
    assert ids["stages.1.downsample.reduction.weight"] == ids["stages.1.blocks.0.fusion.gate_conv.weight"] == 2
    assert ids["stages.3.blocks.0.fusion.gate_conv.weight"] == 4
    assert set(ids.values()) == set(range(model.num_layer_ids))
    groups = layer_decay_groups(model, weight_decay=0.05, layer_decay=0.75)
    assert sum(len(g["params"]) for g in groups) == len(ids)


def test_no_weight_decay_lists_ssm_parameters():
    model = _tiny()
    names = model.no_weight_decay()
    params = dict(model.named_parameters())
    assert names <= set(params)
    per_ssm = {"A_logs", "Ds", "dt_projs_bias"}
    assert {n.rsplit(".", 1)[-1] for n in names} == per_ssm
    assert len(names) == len(per_ssm) * sum(model.depths)


def test_reset_classifier_and_bad_input():
    model = _tiny().eval()  # batch of 1 with a 1x1 last map: BatchNorm needs eval mode
    model.reset_classifier(5)
    assert model(torch.randn(1, 1, 32, 32)).shape == (1, 5)
    model.reset_classifier(0)
    assert model(torch.randn(1, 1, 32, 32)).shape == (1, model.num_features)
    with pytest.raises(ValueError, match="global_pool"):
        model.reset_classifier(2, global_pool="token")
    with pytest.raises(ValueError, match=r"\(B, 1, H, W\)"):
        model(torch.randn(1, 3, 32, 32))
    with pytest.raises(ValueError, match="stride"):
        create_model("test_mambamic", patch_size=16)


def test_export_and_reload_as_encoder(tmp_path):
    from models.checkpoint import export_encoder

    model = _tiny().eval()
    export_encoder(model, tmp_path, normalization={"mean": [0.5], "std": [0.25]})
    config = json.loads((tmp_path / "encoder.json").read_text())
    assert config["model"] == "test_mambamic" and config["in_chans"] == 1 and config["num_prefix_tokens"] == 0
    reloaded = create_model("test_mambamic", pretrained=tmp_path / "encoder.safetensors", in_chans=1,
                            num_classes=0).eval()
    x = torch.randn(2, 1, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(reloaded.forward_features(x), model.forward_features(x))


def test_reference_and_chunked_scans_agree():
    model = _tiny().eval()
    x = torch.randn(2, 1, 32, 48)
    with torch.no_grad():
        model.set_scan_backend("reference")
        want = model(x)
        model.set_scan_backend("chunked")
        got = model(x)
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)


# Runs in a fresh interpreter: Triton picks interpreted vs compiled when its kernels are imported, so
# TRITON_INTERPRET must be set before ``kernels.selective_scan_triton`` is first imported.
TRITON_PARITY_SCRIPT = """
import json, torch
from models import create_model
torch.manual_seed(0)
# One stage (stem, one block, head) and one small image: the interpreter runs every Triton program in
# Python, so this is ~15 s on two busy cores; the full test_mambamic is checked against the chunked scan.
model = create_model("test_mambamic", in_chans=1, num_classes=3, drop_path_rate=0.0, depths=(1,), dims=(32,))
model.eval()
x = torch.randn(1, 1, 16, 24)
# Compiled Triton kernels read CUDA memory only (the interpreter, without a GPU, reads CPU tensors).
device = "cuda" if torch.cuda.is_available() else "cpu"
model, x = model.to(device), x.to(device)
# The backend attribute really reaches the scan: an unknown name must be refused.
model.set_scan_backend("no_such_backend")
try:
    model(x)
    raise SystemExit("unknown scan backend was accepted")
except ValueError:
    pass
result = {}
for backend in ("reference", "triton"):
    model.set_scan_backend(backend)
    model.zero_grad()
    out = model(x)
    out.square().sum().backward()
    result[backend] = {"out": out.cpu().tolist(),
                       "grads": {n: p.grad.flatten()[:64].cpu().tolist() for n, p in model.named_parameters()
                                 if "global_branch.ssm" in n}}
print(json.dumps(result))
"""


def test_triton_scan_matches_reference():
    pytest.importorskip("triton")
    if not torch.cuda.is_available():
        env = {**os.environ, "TRITON_INTERPRET": "1"}
    else:
        env = dict(os.environ)
    proc = subprocess.run([sys.executable, "-c", TRITON_PARITY_SCRIPT], cwd=REPO, env=env, capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    ref, tri = result["reference"], result["triton"]
    torch.testing.assert_close(torch.tensor(tri["out"]), torch.tensor(ref["out"]), rtol=1e-4, atol=1e-5)
    for name, want in ref["grads"].items():
        torch.testing.assert_close(torch.tensor(tri["grads"][name]), torch.tensor(want), rtol=1e-3, atol=1e-5,
                                   msg=name)


@pytest.mark.skipif(not (MEDMNIST / "breastmnist.npz").exists(), reason="shared MedMNIST data not present")
def test_learns_on_breastmnist():
    """From scratch, a few Adam steps on 16 real BreastMNIST images lower the training loss."""
    data = np.load(MEDMNIST / "breastmnist.npz")
    images = torch.from_numpy(data["train_images"][:16]).float().div(255).unsqueeze(1)
    labels = torch.from_numpy(data["train_labels"][:16, 0]).long()
    images = (images - images.mean()) / images.std()
    # Two stages keep this to a few seconds on two busy cores.
    model = _tiny(num_classes=2, depths=(1, 1), dims=(32, 64)).train()
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    losses = []
    for _ in range(30):
        loss = torch.nn.functional.cross_entropy(model(images), labels)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert np.isfinite(losses).all()
    assert np.mean(losses[-3:]) < 0.5 * losses[0], losses
