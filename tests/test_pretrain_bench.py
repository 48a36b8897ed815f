"""bench/pretrain.py runs every mode on CPU with a tiny model, and a broken row does not stop the table."""

from __future__ import annotations

import json
from pathlib import Path

import torch
from test_data_fixtures import breast_shards

from bench.pretrain import main as bench_main
from common.data import build_dataset


def test_bench_rows_modes_and_error_isolation(tmp_path: Path) -> None:
    shards = breast_shards(tmp_path / "cur", n=40, per_shard=10)
    assert len(build_dataset(shards)) == 40
    out = tmp_path / "bench.json"
    rc = bench_main(["--models", "mae_test_vit", "mae_no_such_model", "--input_sizes", "32", "--batch_size", "4",
                     "--steps", "2", "--warmup", "1", "--data_path", str(shards), "--num_workers", "0",
                     "--in_chans", "1", "--device", "cpu", "--json", str(out), "--canvas_size", "24"])
    assert rc == 0
    rows = json.loads(out.read_text())["rows"]
    by_key = {(r["mode"], r["model"]): r for r in rows}
    for mode in ("synthetic", "loader", "resident"):
        ok = by_key[(mode, "mae_test_vit")]
        assert ok["status"] == "ok" and ok["img_per_s"] > 0 and ok["tflops"] > 0
        assert by_key[(mode, "mae_no_such_model")]["status"] == "error"
    assert by_key[("loader_only", "-")]["img_per_s"] > 0
    assert all(r["steps"] == 2 for r in rows if r["status"] == "ok")


def test_bench_row_time_cap_keeps_min_steps(tmp_path: Path) -> None:
    out = tmp_path / "bench.json"
    rc = bench_main(["--models", "mae_test_vit", "--input_sizes", "32", "--batch_size", "2", "--steps", "50",
                     "--min_steps", "2", "--row_seconds", "0", "--warmup", "0", "--modes", "synthetic",
                     "--in_chans", "1", "--device", "cpu", "--json", str(out)])
    assert rc == 0
    (row,) = json.loads(out.read_text())["rows"]
    assert row["status"] == "ok" and row["steps"] == 2


def test_loader_bench_counts_images_and_hand_off(tmp_path: Path) -> None:
    from bench.loader import main as loader_main

    breast_shards(tmp_path / "cur", n=40, per_shard=10)
    out = tmp_path / "loader.json"
    result = loader_main(["--data_path", str(tmp_path / "cur"), "--in_chans", "1", "--batch_size", "8",
                          "--canvas_size", "28", "--num_workers", "2", "--batches", "6", "--prefill_seconds", "1",
                          "--json", str(out)])
    saved = json.loads(out.read_text())
    assert result["img_per_s"] > 0 and 0 < result["handoff_ms_per_batch"] < 1e4
    assert saved["img_per_s"] == result["img_per_s"] and saved["batches"] == 6


def test_loader_rows_drain_the_prefilled_queue_before_timing(tmp_path: Path) -> None:
    import argparse

    import torch

    from bench.pretrain import Batches

    shards = breast_shards(tmp_path / "cur", n=40, per_shard=10)
    args = argparse.Namespace(data_path=str(shards), in_chans=1, num_workers=2, canvas_size=24)
    batches = Batches(args, 32, 2, torch.device("cpu"), "loader")
    assert batches.queue_depth == 2 * 4  # workers x the loader's prefetch factor
    taken = []
    batches.it = (taken.append(i) or {"image": torch.zeros(2, 1, 24, 24), "size": None} for i in range(100))
    batches.drain()
    assert len(taken) == 8
    assert Batches(args, 32, 2, torch.device("cpu"), "synthetic").queue_depth == 0
    resident = Batches(args, 32, 2, torch.device("cpu"), "resident")  # decoded once, nothing queued
    assert resident.queue_depth == 0
    images, sizes = resident.next()
    assert images.shape == (2, 1, 24, 24) and images.dtype == torch.uint8 and sizes.shape == (2, 2)


def test_scan_and_conv_backend_flags_reach_every_mixer(tmp_path: Path) -> None:
    """--scan_backend / --conv_backend put the Vim MAE's encoder and decoder mixers on those backends (a synthetic
    CPU row with the reference scan and the Triton conv, interpreted, runs: the flags are honoured end to end)."""
    import models
    from models.layers import set_backend

    model = models.create_model("mae_test_vim", img_size=32, in_chans=1)
    set_backend(model, "scan_backend", "reference")
    set_backend(model, "conv_backend", "triton")
    assert {m.scan_backend for m in model.modules() if hasattr(m, "scan_backend")} == {"reference"}
    assert {m.conv_backend for m in model.modules() if hasattr(m, "conv_backend")} == {"triton"}
    out = tmp_path / "bench.json"
    rc = bench_main(["--models", "mae_test_vim", "--input_sizes", "32", "--batch_size", "2", "--steps", "1",
                     "--warmup", "0", "--min_steps", "1", "--modes", "synthetic", "--in_chans", "1",
                     "--device", "cpu", "--scan_backend", "reference", "--conv_backend", "triton", "--json", str(out)])
    assert rc == 0
    result = json.loads(out.read_text())
    assert result["args"]["scan_backend"] == "reference" and result["args"]["conv_backend"] == "triton"
    assert [r["status"] for r in result["rows"]] == ["ok"]


def test_profile_steps_breaks_step_time_down_by_kernel_kind(tmp_path: Path, capsys) -> None:
    from bench.kernel_profile import kernel_kind

    out = tmp_path / "bench.json"
    rc = bench_main(["--models", "mae_test_vit", "--input_sizes", "32", "--batch_size", "2", "--steps", "2",
                     "--warmup", "1", "--modes", "synthetic", "--in_chans", "1", "--device", "cpu",
                     "--profile_steps", "2", "--json", str(out)])
    assert rc == 0
    (row,) = json.loads(out.read_text())["rows"]
    kinds = row["kernel_ms"]
    assert kinds["total"] > 0 and kinds.get("matmul", 0) > 0
    assert abs(sum(v for k, v in kinds.items() if k != "total") - kinds["total"]) < 0.01 + 1e-3 * kinds["total"]
    assert row["top_kernels"] and all(ms > 0 for _, ms in row["top_kernels"])
    assert "ms/step by kind" in capsys.readouterr().out
    assert kernel_kind("sm90_xmma_gemm_bf16bf16_bf16f32") == "matmul"
    assert kernel_kind("pytorch_flash::flash_fwd_kernel") == "attention"
    assert kernel_kind("triton_per_fused_native_layer_norm_0") == "triton"
    assert kernel_kind("void multi_tensor_apply_kernel<FusedAdamMathFunctor>") == "optimizer"
    # the Vim step's own kernels: the Triton scans (no "triton" in their names) and the causal conv
    assert kernel_kind("_scan_bwd_kernel_v2") == kernel_kind("_scan_fwd_kernel") == "scan"
    assert kernel_kind("sm90_xmma_wgrad_implicit_gemm_indexed_bf16") == "conv"
    assert kernel_kind("void at::native::conv_depthwise2d_forward_kernel<c10::BFloat16>") == "conv"
    assert kernel_kind("_conv_bwd_kernel") == kernel_kind("_conv_fwd_kernel") == "conv"  # our Triton causal conv
    assert kernel_kind("triton_poi_fused_convolution_silu_3") == "triton"
    # cuDNN's attention kernels, as the sixteenth session's H200 profile of ViT-B named them (counted as conv before)
    for name in ("cudnn_generated_fort_native_sdpa_sm90_flash_bprop_wgmma_f16_knob_26_64x64x64_1x4x1_cga1x1x1_kernel0_0",
                 "cudnn_generated_fort_native_sdpa_sm90_flash_fprop_wgmma_f16_knob_7_64x128x64_4x1x1_cga1x1x1_kernel0_0"):
        assert kernel_kind(name) == "attention"


def test_json_holds_every_finished_row_when_a_later_row_is_cut_off(tmp_path: Path, monkeypatch) -> None:
    """A device call stopped at its time limit keeps the rows finished before it: --json is written per row."""
    import pytest

    import bench.pretrain as bench

    real_run_row, calls = bench.run_row, []

    def run_row_then_stop(*args, **kwargs):
        calls.append(1)
        if len(calls) == 2:
            raise KeyboardInterrupt  # stands in for the call's time limit
        return real_run_row(*args, **kwargs)

    monkeypatch.setattr(bench, "run_row", run_row_then_stop)
    out = tmp_path / "bench.json"
    with pytest.raises(KeyboardInterrupt):
        bench_main(["--models", "mae_test_vit", "mae_test_vim", "--input_sizes", "32", "--batch_size", "2",
                    "--steps", "1", "--warmup", "0", "--modes", "synthetic", "--in_chans", "1", "--device", "cpu",
                    "--json", str(out)])
    (row,) = json.loads(out.read_text())["rows"]
    assert row["model"] == "mae_test_vit" and row["status"] == "ok"
    assert not list(tmp_path.glob("*.tmp"))


def test_sdpa_backend_flag_leaves_only_that_backend_enabled() -> None:
    """``--sdpa_backend`` (bench.attention.restrict_sdpa): one backend left on, or all of them for "default"."""
    import torch

    from bench.attention import SDPA_BACKENDS, restrict_sdpa

    flags = {"cudnn": torch.backends.cuda.cudnn_sdp_enabled, "flash": torch.backends.cuda.flash_sdp_enabled,
             "efficient": torch.backends.cuda.mem_efficient_sdp_enabled, "math": torch.backends.cuda.math_sdp_enabled}
    try:
        for backend in SDPA_BACKENDS:
            restrict_sdpa(backend)
            assert {name: flag() for name, flag in flags.items()} == {
                name: backend in ("default", name) for name in flags}, backend
    finally:
        restrict_sdpa("default")


def test_bf16_weights_rows_step_the_float32_masters(tmp_path: Path, monkeypatch) -> None:
    """--precision bf16_weights: the row's model runs in bf16 and every step ends by rounding the stepped float32
    masters into it (pretrain/master_weights.py), as pretrain/main.py's steps do."""
    from pretrain.master_weights import MasterWeights

    rounded = []
    original = MasterWeights.masters_to_model

    def counted(self: MasterWeights) -> None:
        assert {p.dtype for p in self.params} == {torch.bfloat16}
        assert all(m.grad is None for m in self.masters)  # the optimizer step consumed them
        rounded.append(1)
        original(self)

    monkeypatch.setattr(MasterWeights, "masters_to_model", counted)
    out = tmp_path / "bench.json"
    rc = bench_main(["--models", "mae_test_vit", "--input_sizes", "32", "--batch_size", "2", "--steps", "2",
                     "--warmup", "1", "--min_steps", "2", "--modes", "synthetic", "--in_chans", "1", "--device", "cpu",
                     "--precision", "bf16_weights", "--json", str(out)])
    assert rc == 0
    result = json.loads(out.read_text())
    assert result["args"]["precision"] == "bf16_weights" and [r["status"] for r in result["rows"]] == ["ok"]
    assert len(rounded) == 3  # warmup + timed steps
