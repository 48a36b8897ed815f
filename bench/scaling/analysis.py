"""What a run's ``log.jsonl`` says: steady-state throughput, the loss curve, and how two curves compare.

``pretrain`` writes one record every ``log_every`` steps with the mean loss of that window and the window's
img/s (global batch x steps / seconds). Throughput is taken over the windows after a warm-up (CUDA/cuDNN
start-up, loader workers filling their buffers) as total images / total seconds, not as a mean of rates.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path


class RunLogError(ValueError):
    """A log.jsonl that cannot be analysed (message names the file and the reason)."""


@dataclass(frozen=True)
class Window:
    step: int  # last step of the window
    steps: int  # optimizer steps in the window
    loss: float
    img_per_s: float
    tflops_per_gpu: float | None = None
    mfu: float | None = None


def read_windows(path: Path) -> list[Window]:
    """The step records of a pretrain ``log.jsonl`` (event records are skipped), in step order."""
    if not path.is_file():
        raise RunLogError(f"{path}: no log.jsonl (the run wrote no step record)")
    windows: list[Window] = []
    previous = 0
    for number, line in enumerate(path.read_text().splitlines(), 1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as exc:
            raise RunLogError(f"{path}:{number}: not JSON ({exc.msg})") from exc
        if "event" in record or "step" not in record:
            continue
        try:
            step, loss, rate = int(record["step"]), float(record["loss"]), float(record["img_per_s"])
        except (KeyError, TypeError, ValueError) as exc:
            raise RunLogError(f"{path}:{number}: step record without a numeric step/loss/img_per_s") from exc
        if step <= previous:
            raise RunLogError(f"{path}:{number}: step {step} does not follow step {previous} (a resumed or "
                              f"appended log; benchmark runs start fresh)")
        windows.append(Window(step, step - previous, loss, rate, record.get("tflops_per_gpu"), record.get("mfu")))
        previous = step
    if not windows:
        raise RunLogError(f"{path}: no step records")
    return windows


@dataclass(frozen=True)
class Throughput:
    img_per_s: float
    steps_timed: int
    seconds_timed: float
    tflops_per_gpu: float | None
    mfu: float | None


def steady_throughput(windows: list[Window], global_batch: int, warmup_steps: int) -> Throughput:
    """Images / seconds over the windows that start after ``warmup_steps`` (all windows but the first when
    none does, so a short run still reports a number)."""
    timed = [w for w in windows if w.step - w.steps >= warmup_steps] or windows[1:] or windows
    images = sum(w.steps * global_batch for w in timed)
    seconds = sum(w.steps * global_batch / w.img_per_s for w in timed if w.img_per_s > 0)
    if seconds <= 0:
        raise RunLogError("no timed window with a positive img/s")
    return Throughput(images / seconds, sum(w.steps for w in timed), seconds,
                      _time_weighted([(w.tflops_per_gpu, w) for w in timed], global_batch),
                      _time_weighted([(w.mfu, w) for w in timed], global_batch))


def _time_weighted(values: list[tuple[float | None, Window]], global_batch: int) -> float | None:
    pairs = [(v, w.steps * global_batch / w.img_per_s) for v, w in values if v is not None and w.img_per_s > 0]
    total = sum(t for _, t in pairs)
    return sum(v * t for v, t in pairs) / total if pairs and total > 0 else None


@dataclass(frozen=True)
class CurveComparison:
    steps_compared: int
    rel_diff_mean: float  # mean |loss - baseline| / baseline over the common logged steps
    rel_diff_max: float
    rel_diff_last_quarter: float  # |mean loss - mean baseline| / mean baseline over the last quarter
    matches: bool


def compare_curves(curve: list[Window], baseline: list[Window], tolerance: float) -> CurveComparison:
    """Compare two loss curves at the steps both logged. They cannot agree bitwise (ranks draw their own
    crops and masks, the data is split differently), so they match when the end of training agrees within
    ``tolerance`` (relative) and the whole curve stays within 5 x ``tolerance``."""
    base = {w.step: w.loss for w in baseline}
    common = [(w.loss, base[w.step]) for w in curve if w.step in base]
    if not common:
        raise RunLogError("the two runs logged no common step (different --log_every?)")
    rel = [abs(a - b) / abs(b) if b else math.inf for a, b in common]
    tail = common[len(common) - max(1, len(common) // 4):]
    tail_mean = sum(a for a, _ in tail) / len(tail)
    tail_base = sum(b for _, b in tail) / len(tail)
    last_quarter = abs(tail_mean - tail_base) / abs(tail_base) if tail_base else math.inf
    matches = last_quarter <= tolerance and max(rel) <= 5 * tolerance
    return CurveComparison(len(common), sum(rel) / len(rel), max(rel), last_quarter, matches)
