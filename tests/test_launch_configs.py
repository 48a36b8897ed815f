"""launch/accelerate/*.yaml and launch/deepspeed/*.json as accelerate reads them."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from test_launch_fakeslurm import LAUNCH, REPO

ACCELERATE_CONFIGS = sorted((LAUNCH / "accelerate").glob("*.yaml"))
DEEPSPEED_CONFIGS = sorted((LAUNCH / "deepspeed").glob("zero*.json"))


def test_the_expected_configs_exist() -> None:
    names = {p.stem for p in ACCELERATE_CONFIGS}
    assert {"single_gpu", "multi_gpu", "deepspeed_zero2", "deepspeed_zero3", "multi_node_ddp",
            "multi_node_zero2", "multi_node_zero3"} <= names
    assert [p.name for p in DEEPSPEED_CONFIGS] == ["zero1.json", "zero2.json", "zero3.json"]


@pytest.mark.parametrize("path", ACCELERATE_CONFIGS, ids=lambda p: p.name)
def test_accelerate_config_resolves(path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from accelerate.commands.config.config_args import ClusterConfig
    from accelerate.commands.launch import _validate_launch_command, launch_command_parser

    config = ClusterConfig.from_yaml_file(path)  # unknown keys are an error here
    monkeypatch.chdir(REPO)
    processes = "1" if config.distributed_type.value == "NO" else "16"
    args = launch_command_parser().parse_args(
        ["--config_file", str(path), "--num_processes", processes, "--mixed_precision", "bf16", "x.py"])
    args, defaults, mp_from_config = _validate_launch_command(args)
    if config.distributed_type.value == "DEEPSPEED":
        ds = config.deepspeed_config
        assert (REPO / ds["deepspeed_config_file"]).is_file()
        # a DeepSpeed config file forbids mixed precision in the accelerate config: it comes from the flag
        assert config.mixed_precision is None and not mp_from_config
        multi_node = path.stem.startswith("multi_node")
        assert (ds.get("deepspeed_multinode_launcher") == "standard") == multi_node
    else:
        assert config.mixed_precision == "bf16"
    assert args.num_machines == config.num_machines


@pytest.mark.parametrize("path", DEEPSPEED_CONFIGS, ids=lambda p: p.name)
def test_deepspeed_auto_fields_take_the_script_settings(path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from accelerate.utils import DeepSpeedPlugin

    stage = int(path.stem[-1])
    raw = json.loads(path.read_text())
    assert raw["zero_optimization"]["stage"] == stage
    for key in ("train_batch_size", "train_micro_batch_size_per_gpu", "gradient_accumulation_steps",
                "gradient_clipping"):
        assert raw[key] == "auto", key
    assert raw["bf16"]["enabled"] == "auto" and "optimizer" not in raw and "scheduler" not in raw

    monkeypatch.setenv("ACCELERATE_CONFIG_DS_FIELDS", "deepspeed_config_file,zero3_init_flag")
    monkeypatch.setenv("ACCELERATE_MIXED_PRECISION", "bf16")
    plugin = DeepSpeedPlugin(hf_ds_config=str(path))
    assert plugin.zero_stage == stage
    # what Accelerator.prepare fills in for a per-GPU batch of 64, 2 accumulation steps, 8 processes
    plugin.deepspeed_config_process(must_match=False, train_micro_batch_size_per_gpu=64,
                                    train_batch_size=64 * 2 * 8, gradient_accumulation_steps=2,
                                    gradient_clipping=0.0, **{"bf16.enabled": True, "fp16.enabled": False})
    cfg = plugin.deepspeed_config
    assert (cfg["train_micro_batch_size_per_gpu"], cfg["train_batch_size"]) == (64, 1024)
    assert cfg["gradient_accumulation_steps"] == 2 and cfg["bf16"]["enabled"] is True
    assert "auto" not in json.dumps(cfg), cfg
