"""bench.model_stats: the MAC counts add up to hand-computed numbers on the test-size MambaMIC."""

from __future__ import annotations

import json

import torch

from bench.model_stats import ScanCall, main, model_stats, scan_macs
from models import create_model
from models.ss2d import NUM_DIRECTIONS, SS2D


def test_scan_macs_formula():
    # 2 x 8 channels x 10 positions, N = 4: per position and channel 4 * 4 + 2 = 18 MACs.
    assert scan_macs(ScanCall(batch=2, channels=8, length=10, n_state=4, backend="auto")) == 2 * 8 * 10 * 18


def test_counts_match_hand_computation(tmp_path):
    img = 64
    row = model_stats("test_mambamic", img_size=img, in_chans=1, num_classes=2)
    model = create_model("test_mambamic", in_chans=1, num_classes=2)
    assert row["params_m"] * 1e6 == sum(p.numel() for p in model.parameters())
    assert row["scan_calls"] == sum(model.depths)

    # Every SS2D sees (4 chunks, H, W) at its stage: 64 px -> 16, 8, 4, 2.
    sides = [img // 4 // 2 ** i for i in range(len(model.depths))]
    ssms = [m for m in model.modules() if isinstance(m, SS2D)]
    scan, projections = 0, 0
    for side, ssm in zip(sides, ssms):
        batch, length, k = 4, side * side, NUM_DIRECTIONS
        scan += scan_macs(ScanCall(batch, k * ssm.d_inner, length, ssm.d_state, "auto"))
        # x_proj (d_inner -> dt_rank + 2N) and dt_proj (dt_rank -> d_inner), per direction: einsums.
        # torch runs an einsum whose contraction has size 1 (dt_rank 1) as an element-wise product,
        # which the counter does not see.
        dt_proj_rank = ssm.dt_rank if ssm.dt_rank > 1 else 0
        projections += batch * k * length * ssm.d_inner * (ssm.dt_rank + 2 * ssm.d_state + dt_proj_rank)
    assert row["scan_gmacs"] * 1e9 == scan
    # The counter sees the conv/linear layers and the projection einsums, and nothing of the scan.
    assert round((row["counter_gmacs"] - row["layers_gmacs"]) * 1e9) == projections

    out = tmp_path / "stats.json"
    rows = main(["--models", "test_mambamic", "--img_size", "32", "--in_chans", "1", "--json", str(out)])
    assert json.loads(out.read_text())["rows"] == json.loads(json.dumps(rows))
    assert torch.isfinite(torch.tensor(rows[0]["total_gmacs"]))
