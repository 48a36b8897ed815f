"""Start one benchmark run as a subprocess, with a time limit, its output kept in a log file."""

from __future__ import annotations

import os
import signal
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path


@dataclass
class LaunchResult:
    returncode: int | None  # None: killed at the time limit
    wall_s: float
    log_path: Path

    @property
    def status(self) -> str:
        if self.returncode is None:
            return "timeout"
        return "ok" if self.returncode == 0 else f"failed (exit {self.returncode})"

    def log_tail(self, lines: int = 25) -> str:
        try:
            text = self.log_path.read_text(errors="replace")
        except OSError:
            return ""
        return "\n".join(text.splitlines()[-lines:])


def run_logged(command: list[str], env: dict[str, str], cwd: Path, log_path: Path, timeout_s: float) -> LaunchResult:
    """Run ``command``; stdout+stderr go to ``log_path``. On timeout the whole process group (launcher, ranks,
    loader workers) is killed, so a hung collective cannot outlive the benchmark."""
    log_path.parent.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    with open(log_path, "w") as log:
        log.write("$ " + " ".join(command) + "\n")
        log.flush()
        proc = subprocess.Popen(command, cwd=cwd, env=env, stdout=log, stderr=subprocess.STDOUT,
                                start_new_session=True)
        try:
            returncode: int | None = proc.wait(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            _kill_group(proc)
            returncode = None
    return LaunchResult(returncode, time.perf_counter() - start, log_path)


def _kill_group(proc: subprocess.Popen) -> None:
    for sig, grace in ((signal.SIGTERM, 15.0), (signal.SIGKILL, 10.0)):
        try:
            os.killpg(proc.pid, sig)
        except ProcessLookupError:
            return
        try:
            proc.wait(timeout=grace)
            return
        except subprocess.TimeoutExpired:
            continue


def device_description() -> str:
    """GPU names as nvidia-smi reports them (e.g. '2 x NVIDIA H200'), else 'cpu'."""
    try:
        out = subprocess.run(["nvidia-smi", "--query-gpu=name", "--format=csv,noheader"], capture_output=True,
                             text=True, timeout=30, check=True).stdout
    except (OSError, subprocess.SubprocessError):
        return "cpu"
    names = [line.strip() for line in out.splitlines() if line.strip()]
    if not names:
        return "cpu"
    kinds = sorted(set(names))
    return ", ".join(f"{names.count(k)} x {k}" for k in kinds)
