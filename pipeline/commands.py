"""The command lines of the transfer-results stages (``pipeline.results``): MAE pretraining, linprobe and finetune.

Each is a real CLI call recorded in ``runs.json``; a recorded row is reused only while its command stays the same,
so flags at their stage's own default stay off the command line.
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import NamedTuple

from common.launch import PRETRAIN_SCRIPT, accelerate_launch_command
from pipeline.stages import python_module_command

MULTI_GPU_CONFIG = "launch/accelerate/multi_gpu.yaml"  # DDP on the GPUs of one machine


def dataset_key(path: str) -> str:
    """Short name of a dataset path: the file stem of an ``.npz`` / CSV, the folder name of an ImageFolder."""
    p = Path(path.rstrip("/"))
    return p.stem if p.suffix.lower() in (".npz", ".csv") else p.name


class LabeledSet(NamedTuple):
    """A labeled dataset of the study: its path and what the stages' command lines need from it."""

    path: str
    num_classes: int
    multilabel: bool
    n_train: int


def label_space(path: str) -> tuple[int, bool, int]:
    """(number of classes, multi-label?, training samples) of the train split of ``path``; errors name the path."""
    from common.data import build_dataset

    train = build_dataset(path, split="train", labeled=True, in_chans=1)
    if train.labels.num_classes is None:
        raise ValueError(f"{path}: the train split does not declare its classes")
    return train.labels.num_classes, train.labels.multilabel, len(train)


# finetune's and linprobe's --select_metric choices (common.transfer.results.SELECT_METRICS; a test keeps the two
# equal), spelled out here because importing that module loads torch, which the table / kermany-csv commands and
# the parser do not need.
SELECT_METRICS = ("acc", "balanced_acc", "auc", "f1", "loss")

# finetune flags of each --ft_recipe. The ninth session's 64 px fine-tunes under MAE's ImageNet recipe ended below
# the same encoders' linear probes, their validation AUC flat from the first epoch (docs/end_to_end.md).
FT_RECIPES: dict[str, list[str]] = {
    "mae": [],
    "light": ["--aa", "none", "--reprob", "0", "--smoothing", "0"],
}


def finetune_epochs(epochs: int, min_steps: int, train_samples: int, batch_size: int) -> int:
    """``epochs``, raised so that fine-tuning takes at least ``min_steps`` optimizer steps (finetune uses full
    batches only): a small set (BreastMNIST, 546 images = 4 steps of 128 per epoch) gets too few steps in a
    recipe sized for larger ones."""
    steps_per_epoch = max(1, train_samples // batch_size)
    return max(epochs, -(-min_steps // steps_per_epoch))


def transfer_command(args: argparse.Namespace, protocol: str, data: LabeledSet, init_args: list[str], model: str,
                     layer_decay: str, run_dir: Path, epochs: int | None = None) -> list[str]:
    """The linprobe / finetune command of one stage; ``epochs`` overrides the recipe's (the preflight's one-epoch
    runs)."""
    label_args = ["--nb_classes", str(data.num_classes), *(["--multilabel"] if data.multilabel else [])]
    common = ["--input_size", str(args.input_size), "--in_chans", str(args.in_chans),
              "--num_workers", str(args.num_workers), "--output_dir", str(run_dir)]
    if protocol == "linprobe":
        probe_batch = ["--batch_size", str(args.probe_batch_size)] if args.probe_batch_size else []
        # Only a metric other than linprobe's own default goes on the command line: runs.json keeps a row whose
        # command is unchanged, so probes recorded before this flag existed are not run again for nothing.
        probe_select = [] if args.probe_select_metric == "auc" else ["--select_metric", args.probe_select_metric]
        # Likewise only a block count other than one.
        probe_blocks = [] if args.probe_n_last_blocks == 1 else ["--n_last_blocks", str(args.probe_n_last_blocks)]
        return python_module_command(
            "linprobe.main", "--data_path", data.path, *label_args, *init_args, "--fast", "--global_pool",
            "--epochs", str(epochs or args.probe_epochs), *probe_select, *probe_blocks, *probe_batch, *common)
    epochs = epochs or finetune_epochs(args.ft_epochs, args.ft_min_steps, data.n_train, args.ft_batch_size)
    return python_module_command(
        "finetune.main", "--data_path", data.path, *label_args, *init_args, "--model", model, "--epochs",
        str(epochs), "--warmup_epochs", str(max(1, min(5, epochs // 10))), "--batch_size",
        str(args.ft_batch_size), "--blr", str(args.ft_blr), "--layer_decay", layer_decay,
        "--select_metric", args.ft_select_metric, *(["--class_weighted_loss"] if args.ft_class_weighted else []),
        *FT_RECIPES[args.ft_recipe], *common)


# DDP pretraining of the encoder at index i of --encoders meets at this port + i: a fixed port keeps the recorded
# command reusable, and concurrent pretrainings (--jobs) of different encoders do not meet at one port.
PRETRAIN_PORT = 29500


def pretrain_command(args: argparse.Namespace, mae_name: str, pre_dir: Path, port: int = PRETRAIN_PORT) -> list[str]:
    """The MAE pretraining command of one encoder (MAE's recipe: blr 1.5e-4 unless --pretrain_blr, 5 % warmup,
    normalised pixel loss). With ``--pretrain_gpus N`` above 1 it is ``accelerate launch`` of N DDP processes, each
    with ``--batch_size / N`` images, so the global batch, the learning rate and the schedule stay those of one GPU."""
    gpus = args.pretrain_gpus
    if args.batch_size % gpus:
        raise ValueError(f"--batch_size {args.batch_size} is not divisible by --pretrain_gpus {gpus}")
    flags = [
        "--model", mae_name, "--data_path", args.pool, "--input_size", str(args.input_size),
        "--in_chans", str(args.in_chans), "--batch_size", str(args.batch_size // gpus), "--epochs",
        str(args.pretrain_epochs), "--warmup_epochs", str(max(1, args.pretrain_epochs // 20)), "--blr",
        args.pretrain_blr, "--norm_pix_loss", "--num_workers", str(args.num_workers), "--save_every", "100000", "--vis_every",
        "100000", *(["--compile", "--compile_mode", args.pretrain_compile] if args.pretrain_compile else []),
        *(["--data_on_device"] if args.pretrain_data_on_device else []), "--output_dir", str(pre_dir)]
    if gpus > 1:
        return accelerate_launch_command(MULTI_GPU_CONFIG, gpus, port, "bf16", PRETRAIN_SCRIPT, flags)
    return python_module_command("pretrain.main", *flags)
