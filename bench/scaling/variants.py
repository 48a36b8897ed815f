"""The runs compared by the scaling benchmark and the exact `accelerate launch` commands that start them.

Every variant runs ``pretrain/main.py`` through the accelerate config a user would pick from ``launch/accelerate/``
at the same global batch. By default the per-GPU batch is ``global_batch / processes`` (strong scaling: fewer images
per GPU on more GPUs). With a fixed ``micro_batch`` every GPU runs that many images per forward pass and a variant
with fewer processes accumulates gradients (``accum_iter``) to the same global batch, so the runs differ only in how
the work is spread, not in the per-GPU batch each kernel sees.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from common.launch import PRETRAIN_SCRIPT, accelerate_launch_command

REPO_ROOT = Path(__file__).resolve().parents[2]


@dataclass(frozen=True)
class VariantKind:
    config_file: str  # relative to the repository root
    multi_process: bool  # uses all GPUs (else one process)
    deepspeed: bool
    pretrain_flags: tuple[str, ...] = ()  # added to every pretrain/main.py command of the variant


KINDS: dict[str, VariantKind] = {
    "1gpu": VariantKind("launch/accelerate/single_gpu.yaml", multi_process=False, deepspeed=False),
    # one GPU with the model in bf16 and float32 master weights (pretrain/master_weights.py) instead of autocast:
    # its speed-up and loss curve against 1gpu, same data order
    "1gpu_bf16w": VariantKind("launch/accelerate/single_gpu.yaml", multi_process=False, deepspeed=False,
                              pretrain_flags=("--precision", "bf16_weights")),
    "ddp": VariantKind("launch/accelerate/multi_gpu.yaml", multi_process=True, deepspeed=False),
    "zero2": VariantKind("launch/accelerate/deepspeed_zero2.yaml", multi_process=True, deepspeed=True),
}
BASELINE = "1gpu"
DEFAULT_VARIANTS = ("1gpu", "ddp", "zero2")  # the scaling comparison; 1gpu_bf16w on request


class ScalingConfigError(ValueError):
    """The benchmark settings cannot produce a fair comparison (message says why)."""


@dataclass(frozen=True)
class Variant:
    name: str
    config_file: str
    processes: int
    per_gpu_batch: int
    deepspeed: bool
    accum_iter: int = 1
    pretrain_flags: tuple[str, ...] = ()

    @property
    def global_batch(self) -> int:
        return self.per_gpu_batch * self.accum_iter * self.processes


def build_variants(names: list[str], gpus: int, global_batch: int, micro_batch: int | None = None) -> list[Variant]:
    """One Variant per name; the global batch must split evenly over the processes (and, with ``micro_batch``,
    into whole micro-batches) of every variant."""
    if gpus < 2:
        raise ScalingConfigError(f"--gpus must be >= 2 for a scaling comparison, got {gpus}")
    variants = []
    for name in names:
        if name not in KINDS:
            raise ScalingConfigError(f"unknown variant {name!r}; choose from {sorted(KINDS)}")
        kind = KINDS[name]
        processes = gpus if kind.multi_process else 1
        if global_batch % processes:
            raise ScalingConfigError(f"--global_batch {global_batch} is not divisible by {processes} processes "
                                     f"({name}): the runs would not share one global batch")
        per_process = global_batch // processes
        if micro_batch is None:
            variants.append(Variant(name, kind.config_file, processes, per_process, kind.deepspeed,
                                    pretrain_flags=kind.pretrain_flags))
            continue
        if micro_batch < 1 or per_process % micro_batch:
            raise ScalingConfigError(f"--micro_batch {micro_batch} does not divide the {per_process} images per "
                                     f"process of {name} (--global_batch {global_batch} over {processes})")
        variants.append(Variant(name, kind.config_file, processes, micro_batch, kind.deepspeed,
                                accum_iter=per_process // micro_batch, pretrain_flags=kind.pretrain_flags))
    return variants


def launch_command(variant: Variant, port: int, mixed_precision: str, pretrain_args: list[str]) -> list[str]:
    return accelerate_launch_command(variant.config_file, variant.processes, port, mixed_precision, PRETRAIN_SCRIPT,
                                     pretrain_args)


def pretrain_args(variant: Variant, *, model: str, data_path: str, output_dir: Path, input_size: int,
                  in_chans: int, steps: int, epochs: int, warmup_epochs: float, blr: float, num_workers: int,
                  log_every: int, seed: int, extra: list[str]) -> list[str]:
    """Flags of ``pretrain/main.py`` for one variant; only the per-GPU batch (or accumulation) differs."""
    args = ["--model", model, "--data_path", data_path, "--output_dir", str(output_dir),
            "--input_size", str(input_size), "--in_chans", str(in_chans), "--norm_pix_loss",
            "--batch_size", str(variant.per_gpu_batch), "--accum_iter", str(variant.accum_iter),
            "--epochs", str(epochs), "--warmup_epochs", str(warmup_epochs), "--blr", str(blr),
            "--max_steps", str(steps), "--num_workers", str(num_workers), "--log_every", str(log_every),
            "--seed", str(seed), "--resume", "none", "--vis_every", "0", "--save_every", str(steps),
            "--keep_last", "1"]
    return args + list(variant.pretrain_flags) + list(extra)
