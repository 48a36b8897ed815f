"""Dataset readers and the training input pipeline shared by pretrain, linprobe and finetune.

``build_dataset`` opens a split of a curated shard directory, a tar brace pattern, an ImageFolder, a
MedMNIST-style ``.npz`` or a CSV; ``build_loader`` streams it as uint8 batches (split by rank and worker,
shuffled, resumable); ``gpu_augment`` / ``eval_transform`` turn those batches into normalised model input.
"""

from common.data.augment import (
    default_normalization,
    eval_canvas_size,
    eval_transform,
    gpu_augment,
)
from common.data.dataset import ImageDataset, build_dataset, detect_kind
from common.data.images import ImageDecodeError
from common.data.loader import ImageLoader, build_loader
from common.data.source import DataSourceError, LabelInfo
from common.data.stream import BatchStream, StreamConfig

__all__ = [
    "BatchStream",
    "DataSourceError",
    "ImageDataset",
    "ImageDecodeError",
    "ImageLoader",
    "LabelInfo",
    "StreamConfig",
    "build_dataset",
    "build_loader",
    "default_normalization",
    "detect_kind",
    "eval_canvas_size",
    "eval_transform",
    "gpu_augment",
]
