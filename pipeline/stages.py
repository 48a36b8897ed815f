"""Run the pipeline's command-line stages as subprocesses, echoing the exact command (so it can be rerun)."""

from __future__ import annotations

import math
import os
import shlex
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
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

    def _limit(self) -> str:
        # Never None where these reasons are given (only an exhausted budget gives them); no crash if it were.
        return "unlimited" if self.seconds is None else f"{self.seconds:g} s"

    def skip_reason(self) -> str:
        return f"time budget of {self._limit()} used up ({self.elapsed():.0f} s elapsed) before the stage started"

    def stopped_reason(self) -> str:
        return f"stopped when the time budget of {self._limit()} ran out while it ran"


def last_output_line(log_path: Path, max_chars: int = 300) -> str:
    """The last non-empty line of a stage's log (read from its end), shortened to ``max_chars``."""
    with open(log_path, "rb") as fh:
        fh.seek(0, os.SEEK_END)
        fh.seek(max(0, fh.tell() - 16384))
        lines = [line.strip() for line in fh.read().decode("utf-8", "replace").splitlines() if line.strip()]
    if not lines:
        return ""
    return lines[-1] if len(lines[-1]) <= max_chars else lines[-1][:max_chars - 3] + "..."


def visible_gpus(environ: Mapping[str, str], device_count: Callable[[], int]) -> list[str]:
    """The GPU ids this process can use, as ``CUDA_VISIBLE_DEVICES`` names them: its entries when it is set (up to
    the first negative one, where CUDA stops reading it: ``-1`` hides every GPU), else ``0 .. device_count() - 1``.
    """
    if "CUDA_VISIBLE_DEVICES" not in environ:
        return [str(i) for i in range(device_count())]
    gpus = []
    for entry in environ["CUDA_VISIBLE_DEVICES"].split(","):
        entry = entry.strip()
        if not entry or entry.startswith("-"):
            break
        gpus.append(entry)
    return gpus


class GpuSlots:
    """Places concurrent stages on GPUs: each stage takes the least-loaded GPU (earliest in ``gpus`` on a tie),
    and a GPU hosts at most ``ceil(jobs / len(gpus))`` stages at once, so ``jobs`` stages fill every GPU evenly.

    With ``pin`` a stage sees only its GPU (``CUDA_VISIBLE_DEVICES``); without it (one GPU that the process would
    use anyway) its environment is left as it is. No GPUs: every stage gets ``None`` and nothing changes.
    """

    def __init__(self, gpus: Sequence[str] = (), jobs: int = 1, pin: bool = True):
        if len(set(gpus)) != len(gpus):
            raise ValueError(f"a GPU is named twice: {list(gpus)}")
        self.gpus = list(gpus)
        self.pin = pin and bool(self.gpus)
        self.per_gpu = math.ceil(max(1, jobs) / len(self.gpus)) if self.gpus else 0
        self.load = dict.fromkeys(self.gpus, 0)
        self._free = threading.Condition()

    @contextmanager
    def take(self, count: int = 1) -> Iterator[str | None]:
        """Hold a slot on each of the ``count`` least-loaded GPUs while the block runs (waiting until that many have
        a free slot) and give them the stage as ``CUDA_VISIBLE_DEVICES`` lists them (``"1"``, ``"0,1"``); the
        slots are given back however the block ends (done, failed, timed out, interrupted)."""
        if not self.gpus:
            yield None
            return
        if not 1 <= count <= len(self.gpus):
            raise ValueError(f"a stage on {count} GPUs, but the call has {len(self.gpus)}: {self.gpus}")
        with self._free:
            self._free.wait_for(lambda: sum(load < self.per_gpu for load in self.load.values()) >= count)
            chosen = set(sorted(self.gpus, key=self.load.__getitem__)[:count])  # stable: ties go to the first named
            taken = [gpu for gpu in self.gpus if gpu in chosen]
            for gpu in taken:
                self.load[gpu] += 1
        try:
            yield ",".join(taken)
        finally:
            with self._free:
                for gpu in taken:
                    self.load[gpu] -= 1
                self._free.notify_all()

    def pinned(self, gpu: str | None) -> str | None:
        """The GPU a stage's environment should name: ``gpu`` when stages are pinned, else ``None``."""
        return gpu if self.pin else None


def python_module_command(module: str, *args: str) -> list[str]:
    return [sys.executable, "-m", module, *args]


def _kill_group(proc: subprocess.Popen) -> None:
    # The stage runs in its own process group so that its DataLoader workers die with it.
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass


@contextmanager
def shared_cpu_threads(jobs: int, cpus: int | None) -> Iterator[str | None]:
    """While the block runs, OMP_NUM_THREADS in this process's environment (which every stage inherits) shares the
    ``cpus`` out among ``jobs`` concurrent stages (at least one thread each): ``jobs`` torch processes, each starting
    a thread per core, would otherwise oversubscribe the host. Yields the value set; ``None`` (nothing changed)
    with one job at a time or when the environment already sets it. The environment is restored afterwards."""
    if jobs <= 1 or "OMP_NUM_THREADS" in os.environ:
        yield None
        return
    threads = str(max(1, (cpus or 1) // jobs))
    os.environ["OMP_NUM_THREADS"] = threads
    try:
        yield threads
    finally:
        del os.environ["OMP_NUM_THREADS"]


def stage_environment(gpu: str | None) -> dict[str, str] | None:
    """The environment of a stage pinned to ``gpu`` (this process's, with only that GPU visible); ``None`` (inherit
    this process's unchanged) when it is not pinned."""
    return None if gpu is None else {**os.environ, "CUDA_VISIBLE_DEVICES": gpu}


def run_stage(name: str, command: list[str], log_path: Path | None = None, quiet: bool = False,
              timeout_s: float | None = None, gpu: str | None = None) -> StageResult:
    """Run one stage; its output goes to the console (and to ``log_path`` when given).

    With ``timeout_s`` the stage (and every process it started) is killed after that many seconds and
    :class:`StageTimeout` is raised. With ``gpu`` it sees only that GPU (``CUDA_VISIBLE_DEVICES``).
    """
    # The echoed line names the GPU as a shell assignment, so it still reruns the stage as it ran.
    pin = f"CUDA_VISIBLE_DEVICES={shlex.quote(gpu)} " if gpu is not None else ""
    print(f"\n==> {name}: {pin}{shlex.join(command)}", flush=True)
    start = time.perf_counter()
    timed_out = threading.Event()
    log = None
    if log_path is not None:
        log_path.parent.mkdir(parents=True, exist_ok=True)
        log = open(log_path, "w")
    try:
        proc = subprocess.Popen(command, cwd=REPO_ROOT, env=stage_environment(gpu), start_new_session=True,
                                text=True, bufsize=1,
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
