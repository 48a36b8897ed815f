"""Run set-up shared by linprobe and finetune: accelerator, output folder, architecture and data checks.

Everything that can be wrong with the inputs (checkpoint, architecture, splits, label space) is checked
here, before a model is trained.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from accelerate import Accelerator

from common.config import config_to_dict, save_config
from common.data.dataset import ImageDataset
from common.data.labels import dataset_labels
from common.io import atomic_write_json
from common.logging import JsonlLogger, get_logger
from common.seed import seed_everything
from common.transfer.config import TransferConfig
from common.transfer.data import (
    IndexedSplit,
    LabelSpace,
    Transform,
    make_loader,
    open_splits,
    scan_labels,
    usable_workers,
)
from common.transfer.encoder import EncoderSpec, resolve_spec
from common.transfer.engine import gather_strided
from common.transfer.errors import TransferUsageError
from common.transfer.loop import check_resume
from common.transfer.results import SELECT_METRICS
from common.transfer.sampling import EpochShuffleSampler, StridedSampler
from common.transfer.transforms import eval_transform


@dataclass
class RunContext:
    accelerator: Accelerator
    out_dir: Path
    log: JsonlLogger
    spec: EncoderSpec
    splits: dict[str, ImageDataset]
    labels: LabelSpace
    targets: dict[str, np.ndarray] = field(default_factory=dict)  # per split, filled by the data check

    def eval_split(self, split: str) -> IndexedSplit:
        t = eval_transform(self.spec.input_size, self.spec.mean, self.spec.std, self.spec.in_chans)
        return IndexedSplit(self.splits[split], t, self.labels.num_classes)

    def eval_loader(self, split: str, batch_size: int, num_workers: int, pin_mem: bool,
                    dist_eval: bool, persistent: bool = False) -> Any:
        ds = self.eval_split(split)
        acc = self.accelerator
        sampler = StridedSampler(len(ds), acc.process_index if dist_eval else 0,
                                 acc.num_processes if dist_eval else 1)
        return make_loader(ds, batch_size, sampler, num_workers, pin_mem, persistent=persistent)

    def eval_loaders(self, cfg: TransferConfig) -> dict[str, Any]:
        """An evaluation loader for every split but train (val, and test where the data has one). Validation
        runs after every epoch, so its workers stay up between epochs instead of starting again each time."""
        return {s: self.eval_loader(s, cfg.batch_size, cfg.num_workers, cfg.pin_mem, cfg.dist_eval,
                                    persistent=s == "val")
                for s in self.splits if s != "train"}

    def train_loader(self, transform: Transform, cfg: TransferConfig) -> tuple[Any, EpochShuffleSampler]:
        """The shuffled training loader of this process (full batches only) and its sampler, whose epoch the
        loop sets; ``prepare_run`` has refused a split too small for one batch per process."""
        acc = self.accelerator
        ds = IndexedSplit(self.splits["train"], transform, self.labels.num_classes)
        sampler = EpochShuffleSampler(len(ds), cfg.seed, acc.process_index, acc.num_processes)
        loader = make_loader(ds, cfg.batch_size, sampler, cfg.num_workers, cfg.pin_mem, drop_last=True,
                             persistent=True)
        return loader, sampler

    def verify(self, splits: tuple[str, ...], batch_size: int, num_workers: int) -> None:
        """Decode every image of ``splits`` once, shared out over the processes (a corrupt file fails here,
        naming itself, before training) and keep each split's targets in ``targets``."""
        acc = self.accelerator
        for split in splits:
            if split in self.splits:
                ds = self.eval_split(split)
                sampler = StridedSampler(len(ds), acc.process_index, acc.num_processes)
                local = scan_labels(ds, sampler, batch_size, num_workers, split)
                self.targets[split] = gather_strided(acc, local, sharded=True)

    def split_targets(self, split: str) -> np.ndarray:
        """Every label of ``split`` in dataset order: kept from :meth:`verify`, else read without decoding
        any image (``common.data.labels``)."""
        if split not in self.targets:
            self.targets[split] = dataset_labels(self.splits[split])
        return self.targets[split]


def make_output_dir(out_dir: Path) -> None:
    """Create ``--output_dir``; a path that is a file (or lies under one) is a one-line usage error."""
    if out_dir.exists() and not out_dir.is_dir():
        raise TransferUsageError(f"--output_dir {out_dir}: is a file, not a folder; pass a folder path")
    try:
        out_dir.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        blocker = next((p for p in out_dir.parents if p.exists() and not p.is_dir()), None)
        reason = f"{blocker} is a file" if blocker else (exc.strerror or str(exc))
        raise TransferUsageError(f"--output_dir {out_dir}: cannot create the folder ({reason})") from exc


def prepare_run(cfg: TransferConfig, name: str, classifier_head: bool, drop_path: float | None,
                default_pool: str) -> RunContext:
    """Seed, create the output folder, resolve the architecture and open + check the data's structure
    (splits, label space); decoding every image is :meth:`RunContext.verify`'s job. ``default_pool`` is the
    command's pooling when neither ``--global_pool`` nor ``--cls_token`` is given."""
    if cfg.select_metric not in SELECT_METRICS:
        raise TransferUsageError(f"--select_metric must be one of {', '.join(SELECT_METRICS)}, got {cfg.select_metric!r}")
    if cfg.accum_iter < 1 or cfg.batch_size < 1 or cfg.epochs < 0:
        raise TransferUsageError(f"--batch_size / --accum_iter must be >= 1 and --epochs >= 0 (got {cfg.batch_size}, "
                         f"{cfg.accum_iter}, {cfg.epochs})")
    check_resume(cfg.resume, cfg.eval)
    accelerator = Accelerator()
    # models (timm, torchvision) is imported once a run starts, not with the command
    from models.layers import check_attention_backend

    try:
        check_attention_backend(cfg.attention_backend, accelerator.device.type == "cuda")
    except ValueError as exc:
        raise TransferUsageError(str(exc)) from exc
    seed_everything(cfg.seed)
    logger = get_logger(f"scanmae.{name}")
    out_dir = Path(cfg.output_dir)
    if accelerator.is_main_process:
        make_output_dir(out_dir)
        save_config(cfg, out_dir / "config.yaml")
    workers = usable_workers(cfg.num_workers)
    if workers < cfg.num_workers:
        logger.info(f"--num_workers {cfg.num_workers}: {workers} DataLoader workers per process (the CPUs "
                    "available to it)")
    spec = resolve_spec(cfg.model, cfg.finetune, cfg.input_size, cfg.in_chans, 0, cfg.global_pool, drop_path,
                        default_pool)
    splits, labels = open_splits(cfg.data_path, spec.in_chans, cfg.nb_classes, cfg.multilabel)
    # Samples per process as EpochShuffleSampler deals them; checked here, before any image is decoded.
    per_process = -(-len(splits["train"]) // accelerator.num_processes)
    if not cfg.eval and cfg.epochs > 0 and per_process < cfg.batch_size:
        raise TransferUsageError(f"{cfg.data_path}: {per_process} training samples per process are fewer than one "
                                 f"batch of {cfg.batch_size} (only full batches are used); lower --batch_size")
    spec.kwargs["num_classes"] = labels.num_classes if classifier_head else 0
    logger.info(f"{name}: model {spec.model} ({spec.input_size} px, {spec.in_chans} ch, "
                f"{'average' if spec.kwargs.get('global_pool') == 'avg' else 'class-token'} pooling), "
                f"{labels.num_classes} {'labels' if labels.multilabel else 'classes'}, "
                + ", ".join(f"{s} {len(d)}" for s, d in splits.items()))
    ctx = RunContext(accelerator, out_dir, JsonlLogger(out_dir / "log.jsonl", accelerator.is_main_process),
                     spec, splits, labels)
    if accelerator.is_main_process:
        atomic_write_json(out_dir / "model.json", {**spec.to_json(), "class_names": labels.class_names,
                                                   "multilabel": labels.multilabel,
                                                   "config": config_to_dict(cfg)})
    return ctx
