"""``runs.json`` of the transfer study: one row per stage (model, init, protocol, dataset), what ran, its metrics
or why it failed or was skipped, and which encoder it was measured on; a stage runs only when no matching row
is done."""

from __future__ import annotations

import functools
import hashlib
import json
import sys
import threading
from functools import partial
from pathlib import Path

from common.io import atomic_write_json
from pipeline.results_table import PRETRAIN, row_status
from pipeline.stages import GpuSlots, StageError, StageTimeout, TimeBudget, run_stage

# The dataset of a pretraining row in runs.json.
POOL = "(pool)"


def encoder_digest(path: Path) -> str:
    """The first 16 hex digits of the checkpoint's sha256: which encoder a transfer row was measured on."""
    stat = path.stat()
    return _file_digest(path, stat.st_mtime_ns, stat.st_size)


@functools.lru_cache(maxsize=64)
def _file_digest(path: Path, mtime_ns: int, size: int) -> str:  # keyed on mtime and size: a rewrite is re-read
    digest = hashlib.sha256()
    with path.open("rb") as f:
        for block in iter(partial(f.read, 1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()[:16]


def _metrics(results_path: Path) -> dict:
    r = json.loads(results_path.read_text())
    point = (r.get("test") or {}).get("at_val_threshold")  # two-class tasks: the validation-fitted operating point
    return ({k: r.get(k) for k in ("acc", "balanced_acc", "auc", "f1")}
            | {"ci95": r.get("ci95", {}), "evaluated_on": r.get("evaluated_on", "test")}
            | ({"at_val_threshold": {k: point.get(k) for k in ("threshold", "acc", "balanced_acc", "ci95")}}
               if point else {}))


class RunLog:
    """``runs.json``: one row per (model, init, protocol, dataset), rewritten after every change.

    Rows that succeeded in an earlier call are kept and not rerun; failed or skipped ones are tried again. A
    transfer row records the digest of the encoder it was measured on and counts as done only for that encoder:
    a pretraining that ran again (a changed recipe, or a GPU run, which is not bit-exact) reruns its rows, so a
    table never mixes two pretraining runs. A stage that ran on a GPU records its id (``gpu``; rows of older files
    and of CPU runs have none): which GPU it ran on does not change what counts as done.
    """

    def __init__(self, path: Path, budget: TimeBudget, gpus: GpuSlots | None = None):
        self.path = path
        self.budget = budget
        self.gpus = gpus or GpuSlots()
        self.rows: list[dict] = json.loads(path.read_text()) if path.exists() else []
        self._lock = threading.Lock()  # stages may finish concurrently (--jobs)

    @staticmethod
    def key(row: dict) -> tuple[str, str, str, str]:
        return row["model"], row["init"], row["protocol"], row["dataset"]

    def done(self, key: tuple[str, str, str, str], command: list[str] | None = None,
             digest: str | None = None) -> bool:
        """An ``ok`` row for ``key``, run with the same ``command`` when one is given (a changed recipe runs the
        stage again; the interpreter's path, which differs between machines, is not compared) and on the encoder
        of ``digest`` when one is given."""
        return any(self.key(r) == key and row_status(r) == "ok"
                   and (command is None or r.get("command", [])[1:] == command[1:])
                   and (digest is None or r.get("encoder_digest") == digest) for r in self.rows)

    def put(self, row: dict) -> None:
        self._replace(self.key(row), [row])

    def drop(self, key: tuple[str, str, str, str]) -> None:
        self._replace(key, [])

    def _replace(self, key: tuple[str, str, str, str], rows: list[dict]) -> None:
        with self._lock:
            self.rows = [r for r in self.rows if self.key(r) != key] + rows
            atomic_write_json(self.path, self.rows, indent=1)

    def pretrain_seconds(self, encoder: str) -> float | None:
        rows = [r for r in self.rows if self.key(r) == (encoder, "mae", PRETRAIN, POOL)]
        return rows[0].get("seconds") if rows else None

    def stage(self, key: tuple[str, str, str, str], command: list[str], run_dir: Path,
              blocked: str | None = None, digest: str | None = None, gpus: int = 1) -> dict | None:
        """Run one stage (on ``gpus`` GPUs) unless done already (on the encoder of ``digest``, when given), blocked
        (``blocked`` is the reason) or out of budget; record it."""
        if self.done(key, command, digest):
            return None
        base = dict(zip(("model", "init", "protocol", "dataset"), key))
        if blocked is None and self.budget.exhausted():
            blocked = self.budget.skip_reason()
        if blocked is not None:
            print(f"results: skipped {' '.join(key)}: {blocked}", file=sys.stderr)
            row = base | {"status": "skipped", "reason": blocked, "command": command}
        else:
            # The GPU is taken only now, so rows that are done, blocked or out of budget hold no slot.
            with self.gpus.take(gpus) as gpu:
                row = self._run(key, command, run_dir, digest, gpu)
            if gpu is not None:
                row["gpu"] = gpu
        self.put(row)
        return row

    def _run(self, key: tuple[str, str, str, str], command: list[str], run_dir: Path, digest: str | None,
             gpu: str | None) -> dict:
        """Run one stage (on ``gpu``, when stages are pinned) and return its row: ok, failed or skipped."""
        base = dict(zip(("model", "init", "protocol", "dataset"), key))
        try:
            stage = run_stage(" ".join(key), command, log_path=run_dir / "stage.log", quiet=True,
                              timeout_s=self.budget.remaining(), gpu=self.gpus.pinned(gpu))
        except StageTimeout as exc:
            # Stopped only because the call's budget ran out while it ran: nothing is known to be wrong
            # with it, so it is skipped (and retried by a rerun), not failed.
            print(f"results: {exc}", file=sys.stderr)
            return base | {"status": "skipped", "reason": self.budget.stopped_reason(),
                           "log": str(run_dir / "stage.log"), "command": command}
        except StageError as exc:
            print(f"results: {exc}", file=sys.stderr)
            return base | {"status": "failed", "error": str(exc), "cause": exc.cause,
                           "log": str(run_dir / "stage.log"), "command": command}
        row = base | {"status": "ok", "seconds": round(stage.seconds, 1), "command": stage.command}
        if digest is not None:
            row["encoder_digest"] = digest
        if key[2] != PRETRAIN:
            row |= _metrics(run_dir / "results.json")
        return row
