"""What every reader provides: shards of raw samples with known counts, and a decoder.

A *source* is the list of shards of one split. Streaming formats (WebDataset tars) are read shard by shard;
random-access formats (ImageFolder, ``.npz``, CSV) are cut into virtual shards of consecutive indices by the
stream, so one pipeline (``common.data.stream``) serves all of them.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import numpy as np

Label = int | np.ndarray  # class index, or a float32 multi-hot vector for multi-label data


class DataSourceError(ValueError):
    """A data path cannot be read as a dataset; the message names the path and the reason."""


@dataclass
class LabelInfo:
    """Label space of a source. ``num_classes`` is None when unknown (unlabeled shards).

    ``derived`` says where the classes came from when nothing declared them: ``"names"`` (class names gathered
    from the labels of every split: CSV label cells, class folders) or ``"indices"`` (integer labels, the count
    being the largest of every split plus one); None when declared (manifest, class columns, ``num_classes``).
    Transfer needs it because a class gathered from val/test alone has no training samples.
    """

    num_classes: int | None = None
    class_names: list[str] | None = None
    multilabel: bool = False
    derived: str | None = None


@dataclass
class Decoded:
    """One decoded sample: pixels as read (H, W, C) of any integer/float dtype, label, a name for errors."""

    pixels: np.ndarray
    label: Any
    key: str
    meta: dict[str, Any] = field(default_factory=dict)


class Source(ABC):
    """Common interface of the readers."""

    path: str
    split: str | None
    labels: LabelInfo

    @property
    @abstractmethod
    def shard_counts(self) -> list[int]:
        """Number of samples in each shard (virtual shards for random-access sources)."""

    @abstractmethod
    def iter_raw(self, shard: int, order: np.ndarray | None = None) -> Iterator[Any]:
        """Raw (undecoded) samples of one shard, cheap to produce and to skip."""

    @abstractmethod
    def decode(self, raw: Any) -> Decoded:
        """Decode one raw sample; errors name the file or sample."""

    def __len__(self) -> int:
        return int(sum(self.shard_counts))


class RandomAccessSource(Source):
    """A source whose samples are addressed by index; the stream cuts it into virtual shards."""

    chunk_size: int = 256

    @abstractmethod
    def num_samples(self) -> int: ...

    @abstractmethod
    def load(self, index: int) -> Decoded: ...

    @property
    def shard_counts(self) -> list[int]:
        n = self.num_samples()
        return [min(self.chunk_size, n - start) for start in range(0, n, self.chunk_size)]

    def iter_raw(self, shard: int, order: np.ndarray | None = None) -> Iterator[Any]:
        """Indices of virtual shard ``shard``; ``order`` is a permutation of all indices (shuffled runs)."""
        start = shard * self.chunk_size
        stop = min(start + self.chunk_size, self.num_samples())
        for pos in range(start, stop):
            yield int(order[pos]) if order is not None else pos

    def decode(self, raw: Any) -> Decoded:
        return self.load(int(raw))

    def __len__(self) -> int:
        return self.num_samples()


def normalize_label(raw: Any, labels: LabelInfo, where: str) -> Label:
    """Shard/CSV/npz label -> int, or float32 multi-hot of length ``num_classes`` for multi-label data.

    A list label is read as a multi-hot vector when it has ``num_classes`` entries that are all 0/1,
    otherwise as a list of positive class indices.
    """
    if raw is None:
        raise DataSourceError(f"{where}: sample has no label (labeled mode needs one)")
    if isinstance(raw, np.ndarray) and raw.ndim == 0:
        raw = raw.item()
    if isinstance(raw, (list, tuple, np.ndarray)):
        values = [int(v) for v in np.asarray(raw).reshape(-1).tolist()]
        k = labels.num_classes
        if k is None:
            raise DataSourceError(f"{where}: multi-label sample but the number of classes is unknown "
                                  f"(pass num_classes)")
        if not labels.multilabel and len(values) == 1:
            return _check_index(values[0], k, where)
        vec = np.zeros(k, dtype=np.float32)
        if len(values) == k and all(v in (0, 1) for v in values):
            vec[:] = values
        else:
            for v in values:
                vec[_check_index(v, k, where)] = 1.0
        return vec
    if isinstance(raw, (bool, np.bool_)) or not isinstance(raw, (int, np.integer)):
        raise DataSourceError(f"{where}: label must be an int or a list of ints, got {raw!r}")
    value = int(raw)
    if labels.multilabel and labels.num_classes is not None:
        vec = np.zeros(labels.num_classes, dtype=np.float32)
        vec[_check_index(value, labels.num_classes, where)] = 1.0
        return vec
    return _check_index(value, labels.num_classes, where)


def _check_index(value: int, num_classes: int | None, where: str) -> int:
    if value < 0 or (num_classes is not None and value >= num_classes):
        raise DataSourceError(f"{where}: label {value} outside 0..{(num_classes or 0) - 1} "
                              f"(num_classes={num_classes})")
    return value
