"""launch/accelerate/*.yaml and launch/deepspeed/*.json as accelerate reads them."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from test_launch_fakeslurm import LAUNCH, REPO

from pretrain.deepspeed_settings import fill_script_fields

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
    # what pretrain/main.py fills before accelerate (batch per GPU 64, no clipping, a DeepSpeed that knows the key)
    fill_script_fields(plugin.deepspeed_config, 64, None, bf16_fields={"enabled", "check_grad_overflow"})
    plugin.deepspeed_config_process(must_match=False, train_micro_batch_size_per_gpu=64,
                                    train_batch_size=64 * 2 * 8, gradient_accumulation_steps=2,
                                    gradient_clipping=0.0, **{"bf16.enabled": True, "fp16.enabled": False})
    cfg = plugin.deepspeed_config
    assert (cfg["train_micro_batch_size_per_gpu"], cfg["train_batch_size"]) == (64, 1024)
    assert cfg["gradient_accumulation_steps"] == 2 and cfg["bf16"]["enabled"] is True
    assert "auto" not in json.dumps(cfg), cfg
    assert cfg["bf16"]["check_grad_overflow"] is False
    # no host sync per step from DeepSpeed's throughput timer
    assert cfg["timers"] == {"throughput": {"enabled": False}}


@pytest.mark.parametrize("fields, expected", [({"enabled", "check_grad_overflow"}, {"enabled": "auto",
                                                                                  "check_grad_overflow": False}),
                                              ({"enabled"}, {"enabled": "auto"})])
def test_overflow_check_follows_the_installed_deepspeed(fields: set[str], expected: dict) -> None:
    ds_cfg = {"bf16": {"enabled": "auto", "check_grad_overflow": "auto"}, "gradient_clipping": "auto",
              "train_micro_batch_size_per_gpu": "auto"}
    fill_script_fields(ds_cfg, 32, 1.0, bf16_fields=fields)
    assert ds_cfg == {"bf16": expected, "gradient_clipping": 1.0, "train_micro_batch_size_per_gpu": 32}
    explicit = {"bf16": {"enabled": True, "check_grad_overflow": True}}  # a user's own choice is kept
    assert fill_script_fields(explicit, 8, None, bf16_fields=fields)["bf16"]["check_grad_overflow"] is True
