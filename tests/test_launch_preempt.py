"""The whole preemption path with the real pieces: pretrain_single_node.sbatch under a fake Slurm runs the real
``accelerate launch pretrain/main.py`` (tiny MAE, CPU, real BreastMNIST images); SIGUSR1 delivered the way
``#SBATCH --signal=USR1@...`` does (every process of the job step, data-loader workers included) must end in
a checkpoint, exit status 75 and ``scontrol requeue``; the requeued run resumes from that checkpoint."""

from __future__ import annotations

import json
import os
import signal
import socket
import sys
from pathlib import Path

import pytest
from test_launch_fakeslurm import REPO, REQUEUE_EXIT, FakeSlurm, signal_job_steps, wait_for

BREAST_NPZ = (REPO / ".." / "shared" / "data" / "medmnist" / "breastmnist.npz").resolve()
TINY_PRETRAIN = ["--model", "mae_test_vit", "--input_size", "32", "--in_chans", "1", "--batch_size", "16",
                 "--epochs", "50", "--warmup_epochs", "1", "--num_workers", "1", "--log_every", "1",
                 "--save_every", "100000", "--vis_every", "0", "--no-tensorboard", "--no-export_encoder"]


def _log_records(output_dir: Path) -> list[dict]:
    path = output_dir / "log.jsonl"
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


@pytest.mark.skipif(not (REPO / "pretrain" / "main.py").exists(), reason="pretrain/main.py has not landed")
@pytest.mark.skipif(not BREAST_NPZ.exists(), reason=f"real data missing: {BREAST_NPZ}")
def test_usr1_checkpoints_exits_75_requeues_and_resumes(tmp_path: Path) -> None:
    fake = FakeSlurm(tmp_path, stubs=("srun", "scontrol", "sbatch"))  # the real accelerate runs
    output_dir = tmp_path / "run"
    env = fake.env(1, 1, REPO_DIR=str(REPO), LOG_ROOT=str(tmp_path / "logs"), DATA_PATH=str(BREAST_NPZ),
                   OUTPUT_DIR=str(output_dir), MODEL="mae_test_vit", MIXED_PRECISION="no",
                   PATH=f"{fake.bin}:{Path(sys.executable).parent}:/usr/bin:/bin", OMP_NUM_THREADS="1")
    env.pop("SLURM_GPUS_ON_NODE")
    node_log = tmp_path / "logs" / "testjob-1234" / "node0-gpu001.log"

    proc = fake.start("pretrain_single_node.sbatch", env, *TINY_PRETRAIN)
    try:
        wait_for(lambda: len(_log_records(output_dir)) >= 2 or proc.poll() is not None, 240,
                 "two logged training steps")
        assert proc.poll() is None, proc.communicate()[0] + node_log.read_text()
        assert signal_job_steps(fake, signal.SIGUSR1) >= 4  # node shell, accelerate, rank, loader worker
        out, _ = proc.communicate(timeout=240)
    finally:
        if proc.poll() is None:
            proc.kill()
    log = node_log.read_text()
    assert proc.returncode == REQUEUE_EXIT, out + log
    assert [c["argv"] for c in fake.calls("scontrol") if c["argv"][0] == "requeue"] == [["requeue", "1234"]]
    (preempted,) = [r for r in _log_records(output_dir) if r.get("event") == "preempted"]
    checkpoint = Path(preempted["checkpoint"])
    assert checkpoint.is_dir() and checkpoint.parent == output_dir / "checkpoints"
    step = int(preempted["step"])
    assert step >= 2

    # the requeued job: same command, SLURM_RESTART_COUNT=1; --resume auto picks the checkpoint up
    fake.clear()
    env["SLURM_RESTART_COUNT"] = "1"
    proc = fake.start("pretrain_single_node.sbatch", env, *TINY_PRETRAIN, "--max_steps", str(step + 2))
    out, _ = proc.communicate(timeout=240)
    log = node_log.read_text()
    assert proc.returncode == 0, out + log
    assert f"resumed from {checkpoint} at step {step}" in log
    steps = [r["step"] for r in _log_records(output_dir) if "loss" in r]
    assert steps[-2:] == [step + 1, step + 2]
    assert not [c for c in fake.calls("scontrol") if c["argv"][0] == "requeue"]


# A stand-in for the training ranks under the real torchrun agent: checkpoint on SIGUSR1, exit 75. Like the
# real checkpoint (accelerate save_state between barriers) the save is collective: a rank leaves only when
# every rank has written its part. Without that barrier the first rank out makes the agent SIGTERM a sibling
# that the test's signal loop has not reached yet (seen in CI on 2 loaded cores).
_RANK_SCRIPT = """
import os, signal, sys, time
record = os.environ["FAKE_SLURM_RECORD"]
state = os.path.join(record, "rank%s" % os.environ["RANK"])
stop = []
signal.signal(signal.SIGUSR1, lambda s, f: stop.append(s))
open(state + ".ready", "w").close()
deadline = time.time() + 120
while not stop and time.time() < deadline:
    time.sleep(0.05)
open(state + ".checkpoint.tmp", "w").write(str(stop[0]) if stop else "none")
os.replace(state + ".checkpoint.tmp", state + ".checkpoint")
world = int(os.environ["WORLD_SIZE"])
while time.time() < deadline + 60 and not all(
        os.path.exists(os.path.join(record, "rank%d.checkpoint" % r)) for r in range(world)):
    time.sleep(0.05)
sys.exit(75 if stop else 3)
"""


def test_usr1_reaches_the_ranks_under_the_real_torchrun_agent(tmp_path: Path) -> None:
    """Two fake nodes x two ranks on this machine through the real accelerate + torchrun (static
    rendezvous on localhost): the agents, started with SIGUSR1 ignored, survive the signal and do not
    kill the ranks; every rank checkpoints; the job requeues."""
    fake = FakeSlurm(tmp_path, stubs=("srun", "scontrol", "sbatch"))
    (fake.repo / "pretrain" / "main.py").write_text(_RANK_SCRIPT)
    job_id = 1000 + os.getpid() % 9000
    # A port that is free now (the job-id-derived default could meet a port another test or process holds).
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    env = fake.env(2, 2, job_id=job_id, SLURM_JOB_NODELIST="localhost,localhost", MIXED_PRECISION="no",
                   MAIN_PORT=str(port),
                   PATH=f"{fake.bin}:{Path(sys.executable).parent}:/usr/bin:/bin", OMP_NUM_THREADS="1")
    proc = fake.start("pretrain_multi_node.sbatch", env)
    ready = [fake.record_dir / f"rank{r}.ready" for r in range(4)]
    try:
        wait_for(lambda: all(p.exists() for p in ready) or proc.poll() is not None, 180, "four ranks")
        assert proc.poll() is None, proc.communicate()[0]
        signal_job_steps(fake, signal.SIGUSR1)
        out, _ = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
    logs = "".join(p.read_text() for p in sorted((fake.repo / "logs").rglob("node*.log")))
    assert proc.returncode == REQUEUE_EXIT, out + logs
    for rank in range(4):
        assert (fake.record_dir / f"rank{rank}.checkpoint").read_text() == str(int(signal.SIGUSR1)), logs
    assert "exitcode  : 75" in logs  # torchrun saw the ranks' own status before turning it into a failure
    assert [c["argv"] for c in fake.calls("scontrol") if c["argv"][0] == "requeue"] == [["requeue", str(job_id)]]
