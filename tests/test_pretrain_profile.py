"""--profile_steps: a torch.profiler window over chosen optimizer steps of a real tiny run, and its report."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from data_curation.cli import main as curate_main
from pretrain.main import main as pretrain_main
from pretrain.profiling import ProfileSpecError, parse_profile_steps

REPO = Path(__file__).resolve().parents[1]
XRAYS = REPO / "sample_data" / "xray"


@pytest.mark.parametrize("spec, expected", [("", None), ("3", (3, 3)), ("2:5", (2, 5))])
def test_parse_profile_steps(spec: str, expected: tuple[int, int] | None) -> None:
    assert parse_profile_steps(spec) == expected


@pytest.mark.parametrize("spec", ["0:2", "5:3", "a:b", "2:"])
def test_bad_profile_steps_are_refused(spec: str) -> None:
    with pytest.raises(ProfileSpecError, match="--profile_steps"):
        parse_profile_steps(spec)


def test_profile_window_of_a_real_run(tmp_path: Path) -> None:
    data = tmp_path / "curated"
    assert curate_main([str(XRAYS), "--output", str(data), "--workers", "0", "--shard_maxcount", "8",
                        "--no-progress"]) == 0
    out = tmp_path / "run"
    argv = ["--model", "mae_test_vit", "--input_size", "32", "--in_chans", "1", "--data_path", str(data),
            "--output_dir", str(out), "--batch_size", "4", "--epochs", "2", "--max_steps", "6", "--lr", "1e-3",
            "--num_workers", "0", "--log_every", "2", "--vis_every", "0", "--no-tensorboard",
            "--profile_steps", "3:5"]
    assert pretrain_main(argv) == 0
    report = json.loads((out / "profile" / "rank0.json").read_text())
    assert report["window"] == [3, 5] and report["steps"] == 3
    assert report["wall_ms_per_step"] > 0
    names = [row["name"] for row in report["top_cpu"]]
    assert len(report["top_device"]) == len(report["top_cpu"])
    # the model's own work shows up: linear layers of the tiny ViT and the optimizer step
    assert any("linear" in n or "addmm" in n or "mm" == n.split("::")[-1] for n in names), names
    assert any("Optimizer.step" in n or "adamw" in n.lower() for n in names), names
    assert (out / "profile" / "rank0.txt").read_text().strip()
    assert not (out / "profile" / "rank0.trace.json").exists()  # only with --profile_trace


def test_bad_profile_steps_stop_the_run_before_training(tmp_path: Path) -> None:
    argv = ["--model", "mae_test_vit", "--data_path", str(XRAYS), "--output_dir", str(tmp_path / "r"),
            "--profile_steps", "4:2", "--no-tensorboard"]
    assert pretrain_main(argv) == 2
