"""Rank-aware console logging, JSON-lines logs and progress bars."""

from __future__ import annotations

import json
import logging
import os
import sys
import time
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any, TypeVar

from tqdm.auto import tqdm

T = TypeVar("T")


def process_rank() -> int:
    """Global rank from the launcher's environment (0 when not distributed)."""
    for var in ("RANK", "SLURM_PROCID"):
        if var in os.environ:
            try:
                return int(os.environ[var])
            except ValueError:
                pass
    return 0


def is_main_process() -> bool:
    return process_rank() == 0


class _StdoutHandler(logging.StreamHandler):
    """Writes to whatever ``sys.stdout`` is now (test capture and redirection replace it after setup)."""

    def emit(self, record: logging.LogRecord) -> None:
        self.stream = sys.stdout
        super().emit(record)


def get_logger(name: str = "scanmae", level: int = logging.INFO) -> logging.Logger:
    """A console logger that prints on rank 0 only (warnings and errors on every rank)."""
    logger = logging.getLogger(name)
    if not logger.handlers:
        handler = _StdoutHandler()
        handler.setFormatter(logging.Formatter("[%(asctime)s %(name)s] %(message)s", "%H:%M:%S"))
        logger.addHandler(handler)
        logger.propagate = False
    logger.setLevel(level if is_main_process() else logging.WARNING)
    return logger


class JsonlLogger:
    """Appends one JSON object per line; each line is flushed so a crash loses at most one record."""

    def __init__(self, path: str | Path, enabled: bool = True):
        self.path = Path(path)
        self.enabled = enabled
        if enabled:
            self.path.parent.mkdir(parents=True, exist_ok=True)

    def log(self, record: dict[str, Any]) -> None:
        if not self.enabled:
            return
        record = {"time": round(time.time(), 3), **record}
        with open(self.path, "a") as fh:
            fh.write(json.dumps(record, default=_json_default) + "\n")


def _json_default(obj: Any) -> Any:
    if hasattr(obj, "item"):
        return obj.item()
    if isinstance(obj, Path):
        return str(obj)
    return str(obj)


def read_jsonl(path: str | Path) -> list[dict[str, Any]]:
    with open(path) as fh:
        return [json.loads(line) for line in fh if line.strip()]


def progress(iterable: Iterable[T] | None = None, total: int | None = None, desc: str = "",
             disable: bool | None = None, **kwargs: Any) -> Iterator[T] | tqdm:
    """A tqdm progress bar shown on rank 0 only."""
    if disable is None:
        disable = not is_main_process()
    return tqdm(iterable, total=total, desc=desc, disable=disable, dynamic_ncols=True, **kwargs)
