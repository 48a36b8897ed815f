"""bench.scaling: the orchestration end to end on the CPU (1 process vs 2 gloo ranks through `accelerate launch`,
real X-rays), the log analysis by hand, bad settings, a failing run; ZeRO-2 on two GPUs where there are two."""

from __future__ import annotations

import importlib.util
import json
import re
from pathlib import Path

import pytest
import torch

from bench.scaling.__main__ import main as scaling_main
from bench.scaling.analysis import RunLogError, Window, compare_curves, read_windows, steady_throughput
from bench.scaling.variants import ScalingConfigError, build_variants

REPO = Path(__file__).resolve().parents[1]
XRAYS = REPO / "sample_data" / "xray"  # 24 real chest X-rays (Kermany et al.), ImageFolder


def tiny_args(out: Path, *extra: str) -> list[str]:
    return ["--data_path", str(XRAYS), "--output_dir", str(out), "--model", "mae_test_vit", "--input_size", "32",
            "--global_batch", "8", "--steps", "8", "--epochs", "4", "--warmup_epochs", "1", "--blr", "1e-2",
            "--num_workers", "0", "--log_every", "2", *extra]


def test_cpu_one_process_vs_two_ranks_end_to_end(tmp_path: Path) -> None:
    out = tmp_path / "scaling"
    rc = scaling_main(tiny_args(out, "--cpu", "--variants", "1gpu", "ddp", "--", "--no-tensorboard"))
    assert rc == 0
    result = json.loads((out / "scaling.json").read_text())
    assert result["device"] == "cpu" and result["mixed_precision"] == "no"
    assert result["extra_args"] == ["--no-tensorboard"]
    single, ddp = result["runs"]
    assert (single["name"], single["processes"], single["per_gpu_batch"]) == ("1gpu", 1, 8)
    assert (ddp["name"], ddp["processes"], ddp["per_gpu_batch"]) == ("ddp", 2, 4)
    assert ddp["command"].startswith("accelerate launch --config_file launch/accelerate/multi_gpu.yaml "
                                     "--num_processes 2 ")
    assert "pretrain/main.py" in ddp["command"] and "--batch_size 4" in ddp["command"]
    # the launcher really started two ranks sharing the global batch of 8
    assert "effective batch: 8 (4 x 1 accum x 2 processes)" in (out / "ddp" / "launcher.log").read_text()
    assert "effective batch: 8 (8 x 1 accum x 1 processes)" in (out / "1gpu" / "launcher.log").read_text()
    for run in (single, ddp):
        assert run["status"] == "ok" and run["returncode"] == 0
        assert [s for s, _ in run["loss_curve"]] == [2, 4, 6, 8]
        assert all(torch.isfinite(torch.tensor(loss)) for _, loss in run["loss_curve"])
        assert run["img_per_s"] > 0 and run["steps_timed"] == 6  # warm-up = first window (log_every 2, 20% of 8)
        assert run["final_loss"] == run["loss_curve"][-1][1]
        assert (out / run["name"] / "encoder.safetensors").is_file()
    # speedup is rounded to 3 decimals: up to 5e-4 off the ratio (a relative bound fails below a speedup of 0.5).
    assert ddp["speedup"] == pytest.approx(ddp["img_per_s"] / single["img_per_s"], abs=6e-4)
    assert ddp["target"] == 1.9 and ddp["target_met"] == (ddp["speedup"] >= 1.9)
    assert ddp["loss_steps_compared"] == 4 and 0 <= ddp["loss_rel_diff_last_quarter"] <= ddp["loss_rel_diff_max"]
    assert "speedup" not in single
    rows = [line for line in result["table"].splitlines() if line.startswith("| 1gpu") or line.startswith("| ddp")]
    assert len(rows) == 2
    assert (out / "scaling.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_fixed_micro_batch_accumulates_on_fewer_gpus(tmp_path: Path) -> None:
    single, ddp, zero2 = build_variants(["1gpu", "ddp", "zero2"], 2, 16, micro_batch=4)
    assert (single.per_gpu_batch, single.accum_iter, single.global_batch) == (4, 4, 16)
    assert (ddp.per_gpu_batch, ddp.accum_iter, ddp.global_batch) == (4, 2, 16)
    assert (zero2.processes, zero2.accum_iter) == (2, 2)
    with pytest.raises(ScalingConfigError, match="--micro_batch 16 does not divide the 8 images per process of ddp"):
        build_variants(["1gpu", "ddp"], 2, 16, micro_batch=16)
    out = tmp_path / "micro"
    argv = tiny_args(out, "--cpu", "--variants", "1gpu", "ddp", "--micro_batch", "4", "--plot", "none", "--",
                     "--no-tensorboard")
    assert scaling_main(argv) == 0
    result = json.loads((out / "scaling.json").read_text())
    single_run, ddp_run = result["runs"]
    assert (single_run["per_gpu_batch"], single_run["accum_iter"]) == (4, 2)
    assert (ddp_run["per_gpu_batch"], ddp_run["accum_iter"]) == (4, 1)
    assert "effective batch: 8 (4 x 2 accum x 1 processes)" in (out / "1gpu" / "launcher.log").read_text()
    assert "effective batch: 8 (4 x 1 accum x 2 processes)" in (out / "ddp" / "launcher.log").read_text()
    assert "| 1gpu | 1 | 4 x 2 |" in result["table"]


def test_a_failing_run_is_reported_with_its_log(tmp_path: Path) -> None:
    out = tmp_path / "fail"
    rc = scaling_main(tiny_args(out, "--cpu", "--variants", "1gpu", "--plot", "none", "--", "--no-tensorboard",
                                "--mask_ratio", "1.5"))
    assert rc == 1
    run = json.loads((out / "scaling.json").read_text())["runs"][0]
    assert re.fullmatch(r"failed \(exit [1-9]\d*\)", run["status"])
    assert "mask_ratio must be in [0, 1)" in run["log_tail"]
    assert "no log.jsonl" in run["error"] and "img_per_s" not in run


def test_settings_that_cannot_compare_fairly_are_refused(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    assert scaling_main(tiny_args(tmp_path, "--cpu", "--variants", "1gpu", "zero2")) == 2
    assert "zero2 needs CUDA GPUs" in capsys.readouterr().err
    cpu = ("--cpu", "--variants", "1gpu", "ddp")
    assert scaling_main(tiny_args(tmp_path, *cpu, "--global_batch", "9")) == 2
    assert "not divisible by 2 processes" in capsys.readouterr().err
    bad = tiny_args(tmp_path, *cpu)
    bad[bad.index("--data_path") + 1] = str(tmp_path / "missing")
    assert scaling_main(bad) == 2
    assert "no such file or folder" in capsys.readouterr().err
    assert scaling_main(tiny_args(tmp_path, *cpu, "--target", "ddp=fast")) == 2
    assert "expected VARIANT=SPEEDUP" in capsys.readouterr().err
    with pytest.raises(ScalingConfigError, match="--gpus must be >= 2"):
        build_variants(["ddp"], 1, 8)
    old = tmp_path / "old"
    (old / "1gpu").mkdir(parents=True)
    (old / "1gpu" / "log.jsonl").write_text('{"step": 1, "loss": 1.0, "img_per_s": 5.0}\n')
    assert scaling_main(tiny_args(old, "--cpu", "--variants", "1gpu")) == 2
    assert "holds a previous run" in capsys.readouterr().err


def _write_log(path: Path, records: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


def test_throughput_is_images_over_seconds_after_warmup(tmp_path: Path) -> None:
    log = _write_log(tmp_path / "log.jsonl", [
        {"time": 0, "step": 10, "loss": 2.0, "img_per_s": 10.0, "mfu": 0.1},  # warm-up window, left out
        {"event": "something", "step": 12},
        {"time": 1, "step": 20, "loss": 1.5, "img_per_s": 100.0, "tflops_per_gpu": 4.0, "mfu": 0.2},
        {"time": 2, "step": 30, "loss": 1.2, "img_per_s": 300.0, "tflops_per_gpu": 12.0, "mfu": 0.6},
    ])
    windows = read_windows(log)
    assert [(w.step, w.steps) for w in windows] == [(10, 10), (20, 10), (30, 10)]
    rate = steady_throughput(windows, global_batch=8, warmup_steps=10)
    # 2 windows x 10 steps x 8 images = 160 images in 80/100 + 80/300 seconds
    seconds = 80 / 100 + 80 / 300
    assert rate.img_per_s == pytest.approx(160 / seconds)  # not the mean of the rates (200)
    assert rate.steps_timed == 20 and rate.seconds_timed == pytest.approx(seconds)
    assert rate.tflops_per_gpu == pytest.approx((4.0 * 0.8 + 12.0 * 80 / 300) / seconds)
    assert rate.mfu == pytest.approx((0.2 * 0.8 + 0.6 * 80 / 300) / seconds)
    # a warm-up longer than the run still leaves every window but the first
    assert steady_throughput(windows, 8, warmup_steps=1000).steps_timed == 20


def test_unusable_logs_name_the_file_and_line(tmp_path: Path) -> None:
    with pytest.raises(RunLogError, match="no log.jsonl"):
        read_windows(tmp_path / "nothing.jsonl")
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"step": 1, "loss": 1.0, "img_per_s": 5.0}\n{"step": 2, "loss":\n')
    with pytest.raises(RunLogError, match=r"bad.jsonl:2: not JSON"):
        read_windows(bad)
    appended = _write_log(tmp_path / "appended.jsonl", [{"step": 5, "loss": 1.0, "img_per_s": 5.0},
                                                        {"step": 5, "loss": 1.0, "img_per_s": 5.0}])
    with pytest.raises(RunLogError, match=r"appended.jsonl:2: step 5 does not follow step 5"):
        read_windows(appended)
    empty = _write_log(tmp_path / "events.jsonl", [{"event": "preempted", "step": 3}])
    with pytest.raises(RunLogError, match="no step records"):
        read_windows(empty)


def _curve(losses: list[float], every: int = 10) -> list[Window]:
    return [Window(every * (i + 1), every, loss, 100.0) for i, loss in enumerate(losses)]


def test_loss_curves_compare_at_common_steps() -> None:
    base = _curve([2.0, 1.5, 1.2, 1.0, 0.9, 0.85, 0.8, 0.8])
    same = compare_curves(base, base, tolerance=0.02)
    assert same.matches and same.rel_diff_max == 0 and same.steps_compared == 8
    noisy = _curve([2.02, 1.48, 1.21, 1.0, 0.905, 0.85, 0.79, 0.81])
    close = compare_curves(noisy, base, tolerance=0.02)
    assert close.matches
    assert close.rel_diff_last_quarter == pytest.approx(abs((0.79 + 0.81) - 1.6) / 1.6)
    worse = compare_curves(_curve([2.0, 1.6, 1.3, 1.1, 1.0, 0.95, 0.9, 0.9]), base, tolerance=0.02)
    assert not worse.matches and worse.rel_diff_last_quarter == pytest.approx(0.125)
    with pytest.raises(RunLogError, match="no common step"):
        compare_curves(_curve([1.0], every=3), base, tolerance=0.02)


@pytest.mark.gpu
@pytest.mark.skipif(torch.cuda.device_count() < 2 or importlib.util.find_spec("deepspeed") is None,
                    reason="needs 2 CUDA GPUs and deepspeed")
def test_two_gpus_ddp_and_zero2_run_and_compare(tmp_path: Path) -> None:
    out = tmp_path / "gpu"
    rc = scaling_main(tiny_args(out, "--global_batch", "16", "--steps", "20", "--epochs", "20", "--log_every", "5",
                                "--", "--no-tensorboard"))
    assert rc == 0
    runs = {r["name"]: r for r in json.loads((out / "scaling.json").read_text())["runs"]}
    assert set(runs) == {"1gpu", "ddp", "zero2"}
    assert all(r["status"] == "ok" and r["img_per_s"] > 0 for r in runs.values())
    assert runs["zero2"]["speedup"] > 0 and runs["zero2"]["loss_steps_compared"] == 4


def test_bf16_weights_variant_runs_one_process_against_1gpu(tmp_path: Path) -> None:
    """``1gpu_bf16w``: the single-GPU command with ``--precision bf16_weights`` added, compared with ``1gpu``
    (speed-up, loss curve at the same data order); not among the default variants."""
    out = tmp_path / "bf16w"
    rc = scaling_main(tiny_args(out, "--cpu", "--variants", "1gpu", "1gpu_bf16w", "--", "--no-tensorboard"))
    assert rc == 0
    single, bf16w = json.loads((out / "scaling.json").read_text())["runs"]
    assert bf16w["name"] == "1gpu_bf16w" and bf16w["processes"] == 1 and bf16w["per_gpu_batch"] == 8
    assert "--precision bf16_weights" in bf16w["command"] and "--precision" not in single["command"]
    state = json.loads(next((out / "1gpu_bf16w" / "checkpoints").glob("step_*/train_state.json")).read_text())
    assert state["master_weights"] is True
    assert bf16w["loss_steps_compared"] == 4 and bf16w["loss_rel_diff_max"] < 0.01  # same data, bf16 rounding
    assert bf16w["speedup"] > 0 and "target" not in bf16w
    from bench.scaling.__main__ import parse_args

    assert parse_args(tiny_args(tmp_path / "defaults"))[0].variants == ["1gpu", "ddp", "zero2"]
