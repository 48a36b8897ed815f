"""Run the pipeline's command-line stages as subprocesses, echoing the exact command (so it can be rerun)."""

from __future__ import annotations

import shlex
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]


class StageError(RuntimeError):
    """A pipeline stage exited with a non-zero code."""


@dataclass
class StageResult:
    name: str
    command: list[str]
    seconds: float


def python_module_command(module: str, *args: str) -> list[str]:
    return [sys.executable, "-m", module, *args]


def run_stage(name: str, command: list[str], log_path: Path | None = None, quiet: bool = False) -> StageResult:
    """Run one stage; its output goes to the console (and to ``log_path`` when given)."""
    print(f"\n==> {name}: {shlex.join(command)}", flush=True)
    start = time.perf_counter()
    if log_path is None:
        proc = subprocess.run(command, cwd=REPO_ROOT)
    else:
        log_path.parent.mkdir(parents=True, exist_ok=True)
        with open(log_path, "w") as log:
            proc = subprocess.Popen(command, cwd=REPO_ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                    text=True, bufsize=1)
            assert proc.stdout is not None
            for line in proc.stdout:
                log.write(line)
                if not quiet:
                    sys.stdout.write(line)
            proc.wait()
    seconds = time.perf_counter() - start
    if proc.returncode != 0:
        where = f" (log: {log_path})" if log_path else ""
        raise StageError(f"stage '{name}' failed with exit code {proc.returncode}{where}: {shlex.join(command)}")
    return StageResult(name, command, seconds)
