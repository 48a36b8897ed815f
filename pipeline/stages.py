"""Run the pipeline's command-line stages as subprocesses, echoing the exact command (so it can be rerun)."""

from __future__ import annotations

import os
import shlex
import signal
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]


class StageError(RuntimeError):
    """A pipeline stage exited with a non-zero code; ``cause`` is the stage's last line of output, which for our
    commands (and for a Python traceback) says what went wrong."""

    def __init__(self, message: str, cause: str = ""):
        super().__init__(message)
        self.cause = cause


class StageTimeout(StageError):
    """A pipeline stage was stopped because it ran past its time limit."""


@dataclass
class StageResult:
    name: str
    command: list[str]
    seconds: float


@dataclass
class TimeBudget:
    """Wall-clock budget shared by a sequence of stages; ``None`` seconds means unlimited."""

    seconds: float | None
    start: float = field(default_factory=time.perf_counter)

    def elapsed(self) -> float:
        return time.perf_counter() - self.start

    def remaining(self) -> float | None:
        return None if self.seconds is None else self.seconds - self.elapsed()

    def exhausted(self) -> bool:
        remaining = self.remaining()
        return remaining is not None and remaining <= 0

    def skip_reason(self) -> str:
        return f"time budget of {self.seconds:g} s used up ({self.elapsed():.0f} s elapsed) before the stage started"

    def stopped_reason(self) -> str:
        return f"stopped when the time budget of {self.seconds:g} s ran out while it ran"


def last_output_line(log_path: Path, max_chars: int = 300) -> str:
    """The last non-empty line of a stage's log (read from its end), shortened to ``max_chars``."""
    with open(log_path, "rb") as fh:
        fh.seek(0, os.SEEK_END)
        fh.seek(max(0, fh.tell() - 16384))
        lines = [line.strip() for line in fh.read().decode("utf-8", "replace").splitlines() if line.strip()]
    if not lines:
        return ""
    return lines[-1] if len(lines[-1]) <= max_chars else lines[-1][:max_chars - 3] + "..."


def python_module_command(module: str, *args: str) -> list[str]:
    return [sys.executable, "-m", module, *args]


def _kill_group(proc: subprocess.Popen) -> None:
    # The stage runs in its own process group so that its DataLoader workers die with it.
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass


def run_stage(name: str, command: list[str], log_path: Path | None = None, quiet: bool = False,
              timeout_s: float | None = None) -> StageResult:
    """Run one stage; its output goes to the console (and to ``log_path`` when given).

    With ``timeout_s`` the stage (and every process it started) is killed after that many seconds and
    :class:`StageTimeout` is raised.
    """
    print(f"\n==> {name}: {shlex.join(command)}", flush=True)
    start = time.perf_counter()
    timed_out = threading.Event()
    log = None
    if log_path is not None:
        log_path.parent.mkdir(parents=True, exist_ok=True)
        log = open(log_path, "w")
    try:
        proc = subprocess.Popen(command, cwd=REPO_ROOT, start_new_session=True, text=True, bufsize=1,
                                stdout=subprocess.PIPE if log else None,
                                stderr=subprocess.STDOUT if log else None)
        timer = None
        if timeout_s is not None:
            def expire() -> None:
                timed_out.set()
                _kill_group(proc)

            timer = threading.Timer(max(0.0, timeout_s), expire)
            timer.daemon = True
            timer.start()
        try:
            if log is not None:
                assert proc.stdout is not None
                for line in proc.stdout:
                    log.write(line)
                    if not quiet:
                        sys.stdout.write(line)
            proc.wait()
        except BaseException:  # Ctrl-C or an error here: don't leave the stage running on its own
            _kill_group(proc)
            proc.wait()
            raise
        finally:
            if timer is not None:
                timer.cancel()
    finally:
        if log is not None:
            log.close()
    seconds = time.perf_counter() - start
    where = f" (log: {log_path})" if log_path else ""
    if timed_out.is_set():
        raise StageTimeout(f"stage '{name}' stopped at its time limit of {timeout_s:.0f} s{where}: "
                           f"{shlex.join(command)}")
    if proc.returncode != 0:
        cause = last_output_line(log_path) if log_path else ""
        raise StageError(f"stage '{name}' failed with exit code {proc.returncode}{where}: {shlex.join(command)}"
                         + (f"\n  last output: {cause}" if cause else ""), cause)
    return StageResult(name, command, seconds)
