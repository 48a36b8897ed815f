"""pretrain/main.py on two CPU ranks through torchrun: SIGUSR1 to one rank stops both and the resumed run is
bitwise the unbroken one; data held on the device, each rank reading its share."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from pretrain_runs import REPO, args, curate_xrays, files_digest, wait_for

from common.logging import read_jsonl


@pytest.fixture(scope="module")
def curated(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return curate_xrays(tmp_path_factory.mktemp("curated"))


def _torchrun(argv: list[str]) -> subprocess.Popen:
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "ACCELERATE_USE_CPU": "1", "OMP_NUM_THREADS": "1"}
    with socket.socket() as sock:  # a free port for the rendezvous
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", str(port),
           str(REPO / "pretrain" / "main.py"), *argv]
    return subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            start_new_session=True)


def _finish(proc: subprocess.Popen, timeout: float) -> str:
    """Output of a torchrun job; on timeout its whole process group (launcher and ranks) is killed."""
    try:
        return proc.communicate(timeout=timeout)[0]
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.communicate()
        raise


def _children(pid: int) -> list[int]:
    text = Path(f"/proc/{pid}/task/{pid}/children").read_text()
    return [int(p) for p in text.split()]


def test_two_rank_ddp_preempt_one_rank_then_resume_exact(curated: Path, tmp_path: Path) -> None:
    """SIGUSR1 to one rank stops both after the same step (exit 75); the resumed run matches an unbroken one."""
    common = {"epochs": 4, "num_workers": 1}  # 24 samples / (4 x 2 ranks) = 3 steps/epoch -> 12 steps
    ref = _torchrun(args(curated, tmp_path / "ref", **common))
    out = _finish(ref, 300)
    assert ref.returncode == 0, out
    run = tmp_path / "pre"
    proc = _torchrun(args(curated, run, **common))
    wait_for(lambda: (run / "log.jsonl").is_file() and len(read_jsonl(run / "log.jsonl")) >= 3, proc)
    workers = _children(proc.pid)
    assert len(workers) == 2
    os.kill(workers[1], signal.SIGUSR1)  # only rank 1 receives the signal
    out = _finish(proc, 120)
    assert "exitcode  : 75" in out, out[-3000:]
    event = read_jsonl(run / "log.jsonl")[-1]
    ckpt = Path(event["checkpoint"])
    assert event["event"] == "preempted" and (ckpt / "random_states_1.pkl").is_file()
    resumed = _torchrun(args(curated, run, **common))
    out = _finish(resumed, 300)
    assert resumed.returncode == 0, out[-3000:]
    assert files_digest(tmp_path / "ref" / "checkpoints" / "step_00000012") == \
        files_digest(run / "checkpoints" / "step_00000012")


def test_two_rank_ddp_with_data_on_device(curated: Path, tmp_path: Path) -> None:
    """Each rank holds the whole split and reads its own share of every pass: the run ends on both ranks."""
    proc = _torchrun(args(curated, tmp_path / "run", epochs=2, data_on_device=None))
    out = _finish(proc, 300)
    assert proc.returncode == 0, out[-3000:]
    assert out.count("data on cpu:0: 24 samples") == 1  # logged by rank 0; rank 1 decoded its own copy
    losses = [r["loss"] for r in read_jsonl(tmp_path / "run" / "log.jsonl") if "loss" in r]
    assert len(losses) == 6 and all(torch.isfinite(torch.tensor(losses)))  # 24 / (4 x 2 ranks) x 2 epochs
