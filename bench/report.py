"""What every GPU micro-benchmark writes with ``--json``: the device, torch's version and the rows."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from common.io import atomic_write_json


def write_device_rows(path: str | Path, rows: list[dict[str, Any]]) -> Path:
    return atomic_write_json(path, {"device": torch.cuda.get_device_name(), "torch": torch.__version__, "rows": rows})
