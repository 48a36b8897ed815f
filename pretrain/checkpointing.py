"""Atomic, rotating training checkpoints built on accelerate's ``save_state`` / ``load_state``.

``output_dir/checkpoints/step_{N:08d}/`` holds accelerate's files (model as safetensors, optimizer,
RNG states) plus ``train_state.json``. A checkpoint is written to ``.tmp-step_*`` and renamed when complete,
so a crash while saving never leaves a half checkpoint where ``--resume auto`` would find it.
"""

from __future__ import annotations

import json
import os
import re
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

from accelerate import Accelerator

from common.io import atomic_write_json

STATE_FILE = "train_state.json"
_STEP_DIR = re.compile(r"^step_(\d{8})$")


class CheckpointMismatch(ValueError):
    """The checkpoint to resume from belongs to a run with another model or input geometry."""


class CheckpointManager:
    def __init__(self, output_dir: str | Path, keep_last: int = 3):
        self.root = Path(output_dir) / "checkpoints"
        self.keep_last = max(1, keep_last)

    def path_for(self, step: int) -> Path:
        return self.root / f"step_{step:08d}"

    def complete(self) -> list[Path]:
        """Finished checkpoints, oldest first."""
        if not self.root.is_dir():
            return []
        found = [p for p in self.root.iterdir() if _STEP_DIR.match(p.name) and (p / STATE_FILE).is_file()]
        return sorted(found, key=lambda p: int(_STEP_DIR.match(p.name).group(1)))

    def latest(self) -> Path | None:
        done = self.complete()
        return done[-1] if done else None

    def save(self, accelerator: Accelerator, step: int, state: dict[str, Any],
             write_extra: Callable[[Path], object] | None = None) -> Path:
        """Write the checkpoint of ``step``; ``write_extra(folder)`` adds files of the main process's (before the
        folder is complete, so a crash leaves none of it where ``--resume auto`` looks)."""
        final = self.path_for(step)
        tmp = self.root / f".tmp-{final.name}"
        if accelerator.is_main_process:
            self.root.mkdir(parents=True, exist_ok=True)
            shutil.rmtree(tmp, ignore_errors=True)
        accelerator.wait_for_everyone()
        if (final / STATE_FILE).is_file():  # this step is already saved (e.g. resumed exactly here)
            return final
        accelerator.save_state(str(tmp), safe_serialization=True)
        accelerator.wait_for_everyone()
        if accelerator.is_main_process:
            if write_extra is not None:
                write_extra(tmp)
            atomic_write_json(tmp / STATE_FILE, state)
            os.replace(tmp, final)
            self._prune()
        accelerator.wait_for_everyone()
        return final

    def _prune(self) -> None:
        done = self.complete()
        for old in done[: max(0, len(done) - self.keep_last)]:
            shutil.rmtree(old, ignore_errors=True)
        for stale in self.root.glob(".tmp-step_*"):
            shutil.rmtree(stale, ignore_errors=True)

    @staticmethod
    def load(accelerator: Accelerator, path: Path, expected: dict[str, Any] | None = None) -> dict[str, Any]:
        """Restore the checkpoint at ``path``; ``expected`` (model name, input size, channels) is compared with
        what the checkpoint recorded first, so a mismatch is a one-line ``CheckpointMismatch``, not a missing-keys
        dump from the state-dict load. Keys a checkpoint did not record are not compared."""
        state_file = path / STATE_FILE
        if not state_file.is_file():
            raise FileNotFoundError(f"{path}: not a complete checkpoint (no {STATE_FILE})")
        state = json.loads(state_file.read_text())
        differ = {k: (state[k], v) for k, v in (expected or {}).items() if k in state and state[k] != v}
        if differ:
            raise CheckpointMismatch(f"{path} was written by another run: " + ", ".join(
                f"{k} {old!r} there, {new!r} now" for k, (old, new) in differ.items())
                + f"; give another --output_dir (or remove {path.parent} to start over in this one)")
        accelerator.load_state(str(path))
        return state
