"""pipeline.results' stage commands: the fine-tune epoch floor, the fine-tune recipes, the selection metrics and
the pretraining flags, each read back by the stage's own config parser."""

from __future__ import annotations

import argparse
from pathlib import Path

import pytest
from test_results_pipeline import TINY

from pipeline.commands import finetune_epochs


def test_finetune_epochs_reach_the_minimum_steps() -> None:
    assert finetune_epochs(30, 0, 546, 128) == 30
    assert finetune_epochs(30, 1000, 546, 128) == 250  # 4 full batches per epoch
    assert finetune_epochs(30, 1000, 4708, 128) == 30  # 36 per epoch: 1080 steps already
    assert finetune_epochs(1, 3, 5, 8) == 3  # fewer samples than a batch: finetune itself reports that


def test_the_light_fine_tune_recipe_reaches_finetune_and_its_config() -> None:
    """--ft_recipe light turns MAE's augmentation off in the finetune command, and finetune accepts the flags."""

    from common.config import parse_config
    from finetune.config import FinetuneConfig
    from pipeline.commands import FT_RECIPES, LabeledSet, transfer_command

    args = argparse.Namespace(input_size=64, in_chans=1, num_workers=0, ft_epochs=3, ft_min_steps=0,
                              ft_batch_size=8, ft_blr=5e-4, ft_class_weighted=False, ft_recipe="light",
                              ft_select_metric="auc")
    data = LabeledSet(path="x.npz", num_classes=2, multilabel=False, n_train=100)
    command = transfer_command(args, "finetune", data, [], "vit_small_patch8", "0.65", Path("run"))
    flags = command[command.index("finetune.main") + 1:]
    assert all(flag in flags for flag in FT_RECIPES["light"])
    cfg = parse_config(FinetuneConfig, flags)
    assert cfg.aa in (None, "none") and cfg.reprob == 0 and cfg.smoothing == 0
    args.ft_recipe = "mae"
    assert "--aa" not in transfer_command(args, "finetune", data, [], "vit_small_patch8", "0.65", Path("run"))


def test_select_metrics_reach_every_finetune_and_linprobe_command(tmp_path: Path,
                                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    """--ft_select_metric / --probe_select_metric reach the finetune / linprobe commands of the table and of the
    preflight, and the stages' own config parsers read them back (their defaults, auc, would otherwise win)."""
    import pipeline.commands as commands
    import pipeline.results as results
    from common.config import parse_config
    from common.transfer.results import SELECT_METRICS
    from finetune.config import FinetuneConfig
    from linprobe.config import LinprobeConfig

    assert commands.SELECT_METRICS == SELECT_METRICS  # the CLI's choices are the stages' choices
    base = ["run", "--pool", "p", "--datasets", "d.npz", "--out", str(tmp_path / "o"), *TINY]
    data = commands.LabeledSet(path="d.npz", num_classes=2, multilabel=False, n_train=100)

    def config(command: list[str]) -> FinetuneConfig | LinprobeConfig:
        module = next(part for part in command if part.endswith(".main"))
        flags = command[command.index(module) + 1:]
        return parse_config(FinetuneConfig if module == "finetune.main" else LinprobeConfig, flags)

    args = results.build_parser().parse_args(base)
    assert (args.ft_select_metric, args.probe_select_metric) == ("balanced_acc", "auc")
    assert config(commands.transfer_command(args, "finetune", data, [], "test_vit", "0.65", tmp_path)
                  ).select_metric == "balanced_acc"
    # the probes' default is linprobe's own, so their commands (and the rows recorded with them) stay as they were
    probe = commands.transfer_command(args, "linprobe", data, [], "test_vit", "0.65", tmp_path)
    assert "--select_metric" not in probe and config(probe).select_metric == "auc"
    args = results.build_parser().parse_args([*base, "--ft_select_metric", "loss", "--probe_select_metric", "f1"])
    assert config(commands.transfer_command(args, "finetune", data, [], "test_vit", "0.65", tmp_path)
                  ).select_metric == "loss"
    assert config(commands.transfer_command(args, "linprobe", data, [], "test_vit", "0.65", tmp_path)
                  ).select_metric == "f1"

    # --probe_n_last_blocks: absent from the command at its default (recorded probe rows stay valid), read back
    # by linprobe otherwise; fine-tunes never get it
    assert "--n_last_blocks" not in probe and config(probe).n_last_blocks == 1
    args.probe_n_last_blocks = 4
    assert config(commands.transfer_command(args, "linprobe", data, [], "test_vit", "0.65", tmp_path)
                  ).n_last_blocks == 4
    assert "--n_last_blocks" not in commands.transfer_command(args, "finetune", data, [], "test_vit", "0.65", tmp_path)

    # The preflight builds its one-epoch commands itself: record them instead of running them.
    commands: list[list[str]] = []
    monkeypatch.setattr(results, "run_stage", lambda name, command, **kw: commands.append(command))
    args.scratch_models = ["test_vit"]
    results.preflight(args, {"d": data}, {"test_vit": tmp_path / "encoder.safetensors"}, tmp_path / "pre")
    assert sorted(config(c).select_metric for c in commands) == ["f1", "loss", "loss"]  # probe, finetune, scratch


def test_pretrain_command_takes_the_recipe_and_compile_flag(tmp_path: Path) -> None:
    """--pretrain_epochs sets the schedule (warmup 5 %) and --pretrain_compile MODE adds --compile in that mode;
    pretrain.main's config parser accepts the whole command, and the flag alone means mode "default"."""

    from common.config import parse_config
    from pipeline.commands import pretrain_command
    from pretrain.config import PretrainConfig

    args = argparse.Namespace(pool=str(tmp_path), input_size=64, in_chans=1, batch_size=256, pretrain_epochs=64,
                              num_workers=4, pretrain_compile="reduce-overhead", pretrain_blr="3.75e-5",
                              pretrain_data_on_device=True, pretrain_gpus=1)
    command = pretrain_command(args, "mae_vit_small_patch8", tmp_path / "pre")
    cfg = parse_config(PretrainConfig, command[command.index("pretrain.main") + 1:])
    assert cfg.compile and cfg.compile_mode == "reduce-overhead" and cfg.data_on_device
    assert cfg.epochs == 64 and cfg.warmup_epochs == 3 and cfg.batch_size == 256 and cfg.blr == 3.75e-5
    assert command[command.index("--blr") + 1] == "3.75e-5"  # as written: recorded commands compare as text
    args.pretrain_compile, args.pretrain_data_on_device = None, False
    plain = pretrain_command(args, "mae_vit_small_patch8", tmp_path / "pre")
    assert "--compile" not in plain and "--data_on_device" not in plain  # earlier recorded commands stay valid
    from pipeline.results import build_parser

    parsed = build_parser().parse_args(["run", "--pool", "p", "--datasets", "d.npz", "--out", "o", "--pretrain_compile"])
    assert parsed.pretrain_compile == "default"
    assert parsed.pretrain_blr == "1.5e-4"  # the earlier sessions' recorded commands stay valid
    for bad in ("0", "-1e-4", "fast"):
        with pytest.raises(SystemExit):
            build_parser().parse_args(["run", "--pool", "p", "--datasets", "d.npz", "--out", "o",
                                       "--pretrain_blr", bad])
