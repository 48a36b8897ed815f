"""``--profile_steps A:B``: a torch.profiler window over optimizer steps A..B (1-based, inclusive).

Every rank writes ``OUTPUT_DIR/profile/rank{r}.json`` (wall time per step, device time per step split into
compute, communication (NCCL) and copies, the idle share of the main stream's wall time, and the top operators)
and ``rank{r}.txt`` (torch's operator table), so a slow multi-GPU run says whether its time goes to kernels,
collectives or waiting on the host. ``--profile_trace`` also writes the Chrome trace (large).
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import torch
from torch.profiler import ProfilerActivity, profile


class ProfileSpecError(ValueError):
    """``--profile_steps`` is not ``A:B`` with 1 <= A <= B."""


def parse_profile_steps(spec: str) -> tuple[int, int] | None:
    """``"A:B"`` -> (A, B); empty -> None."""
    if not spec:
        return None
    first, sep, last = spec.partition(":")
    try:
        start, end = int(first), int(last if sep else first)
    except ValueError:
        start, end = 0, -1
    if not 1 <= start <= end:
        raise ProfileSpecError(f"--profile_steps {spec!r}: expected A:B optimizer steps with 1 <= A <= B")
    return start, end


def _device_time_us(event: Any) -> float:
    # torch renamed cuda -> device in 2.4; both spellings exist for a while
    for name in ("self_device_time_total", "self_cuda_time_total"):
        value = getattr(event, name, None)
        if value is not None:
            return float(value)
    return 0.0


def _kind(name: str) -> str:
    lowered = name.lower()
    if "nccl" in lowered or "allreduce" in lowered or "all_gather" in lowered or "reduce_scatter" in lowered:
        return "communication"
    if lowered.startswith("memcpy") or lowered.startswith("memset"):
        return "copy"
    return "compute"


def summarize(prof: profile, steps: int, wall_s: float, top: int = 25) -> dict[str, Any]:
    """Per-step times from a finished profile (device times are sums over kernels; streams may overlap)."""
    by_kind = {"compute": 0.0, "communication": 0.0, "copy": 0.0}
    rows = []
    for avg in prof.key_averages():
        device_us = _device_time_us(avg)
        cpu_us = float(getattr(avg, "self_cpu_time_total", 0.0))
        if device_us > 0 and getattr(avg, "device_type", None) is not None and "CPU" not in str(avg.device_type):
            by_kind[_kind(avg.key)] += device_us
        rows.append({"name": avg.key, "calls": int(avg.count), "self_device_ms": round(device_us / 1e3, 3),
                     "self_cpu_ms": round(cpu_us / 1e3, 3)})
    per_step = {k: round(v / 1e3 / steps, 3) for k, v in by_kind.items()}
    wall_ms = wall_s * 1e3 / steps
    busy = per_step["compute"] + per_step["copy"]
    return {"steps": steps, "wall_ms_per_step": round(wall_ms, 3),
            "device_ms_per_step": per_step,
            # kernels of the compute stream(s) against wall time: what is left is the GPU waiting (host, collectives)
            "compute_idle_fraction": round(max(0.0, 1.0 - busy / wall_ms), 4) if wall_ms > 0 else None,
            # where device time goes, and where the host spends its time (a sync shows up here as a long call)
            "top_device": sorted(rows, key=lambda r: r["self_device_ms"], reverse=True)[:top],
            "top_cpu": sorted(rows, key=lambda r: r["self_cpu_ms"], reverse=True)[:top]}


class StepProfiler:
    """Starts before optimizer step ``start`` and stops after step ``end``; call ``before_step`` / ``after_step``."""

    def __init__(self, window: tuple[int, int] | None, out_dir: Path, rank: int, trace: bool = False):
        self.window = window
        self.out_dir = out_dir
        self.rank = rank
        self.trace = trace
        self._prof: profile | None = None
        self._t0 = 0.0

    def _sync(self) -> None:
        if torch.cuda.is_available():
            torch.cuda.synchronize()

    def before_step(self, step: int) -> None:
        """``step`` is the 1-based number of the optimizer step about to run."""
        if self.window is None or step != self.window[0] or self._prof is not None:
            return
        activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if torch.cuda.is_available() else [])
        self._sync()
        self._prof = profile(activities=activities, record_shapes=False)
        self._prof.__enter__()
        self._t0 = time.perf_counter()

    def after_step(self, step: int) -> Path | None:
        """Stops and writes the report after the window's last step; returns the JSON path then."""
        if self._prof is None or self.window is None or step < self.window[1]:
            return None
        self._sync()
        wall_s = time.perf_counter() - self._t0
        prof, self._prof = self._prof, None
        prof.__exit__(None, None, None)
        steps = self.window[1] - self.window[0] + 1
        self.out_dir.mkdir(parents=True, exist_ok=True)
        summary = {"rank": self.rank, "window": list(self.window), **summarize(prof, steps, wall_s)}
        json_path = self.out_dir / f"rank{self.rank}.json"
        json_path.write_text(json.dumps(summary, indent=2) + "\n")
        sort_key = "self_cuda_time_total" if torch.cuda.is_available() else "self_cpu_time_total"
        (self.out_dir / f"rank{self.rank}.txt").write_text(
            prof.key_averages().table(sort_by=sort_key, row_limit=40) + "\n")
        if self.trace:
            prof.export_chrome_trace(str(self.out_dir / f"rank{self.rank}.trace.json"))
        return json_path
