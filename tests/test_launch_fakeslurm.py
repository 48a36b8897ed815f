"""A fake Slurm for testing launch/slurm/*.sbatch without a cluster, plus tests of the fake itself.

``FakeSlurm`` builds a throw-away repository (``launch/`` linked to the real one, empty entry points) and a
``bin/`` of stubs that go first on PATH: ``srun`` (runs its command once per fake node, concurrently, with
SLURM_NODEID / SLURM_PROCID / SLURMD_NODENAME set, and returns the highest exit status, as srun does),
``scontrol`` (``show hostnames`` expands a node list; ``requeue`` is recorded), ``sbatch``, ``accelerate``,
``curate``. Every stub call is recorded as one JSON file: argv, selected environment, and whether SIGUSR1
was ignored when the process started. The ``accelerate`` stub can also play a launcher whose child "rank"
checkpoints on SIGUSR1 and exits 75 while the launcher itself exits 1, as torchrun does.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
LAUNCH = REPO / "launch"
REQUEUE_EXIT = 75

# The stub program: `stub.py NAME ARGS...`; its behaviour depends on NAME.
_STUB = r'''
import json, os, re, signal, subprocess, sys, time

NAME, ARGS = sys.argv[1], sys.argv[2:]
RECORD = os.environ["FAKE_SLURM_RECORD"]
ENV_KEYS = ("SLURM_NODEID", "SLURM_PROCID", "SLURMD_NODENAME", "SLURM_JOB_ID", "SLURM_ARRAY_TASK_ID",
            "SCANMAE_NODE_LOG_DIR", "SLURM_CPUS_PER_TASK", "PYTHONUNBUFFERED", "NCCL_SOCKET_IFNAME")


def record(**extra):
    entry = {"name": NAME, "argv": ARGS, "pid": os.getpid(), "time": time.time(), "cwd": os.getcwd(),
             "env": {k: os.environ[k] for k in ENV_KEYS if k in os.environ},
             "usr1_ignored": signal.getsignal(signal.SIGUSR1) == signal.SIG_IGN}
    entry.update(extra)
    path = os.path.join(RECORD, "%s-%d-%d.json" % (NAME, os.getpid(), time.monotonic_ns()))
    with open(path + ".tmp", "w") as f:
        json.dump(entry, f)
    os.replace(path + ".tmp", path)


def expand_hostlist(spec):
    hosts = []
    for part in re.findall(r"[^,\[]+(?:\[[^\]]*\])?", spec):
        m = re.fullmatch(r"(.*)\[(.*)\]", part)
        if not m:
            hosts.append(part)
            continue
        prefix, ranges = m.groups()
        for r in ranges.split(","):
            lo, _, hi = r.partition("-")
            for i in range(int(lo), int(hi or lo) + 1):
                hosts.append(prefix + str(i).zfill(len(lo)))
    return hosts


def srun():
    args = list(ARGS)
    opts = {}
    while args and args[0].startswith("-"):
        key, _, value = args.pop(0).partition("=")
        opts[key] = value
    record(opts=opts, command=args)
    hosts = expand_hostlist(os.environ["SLURM_JOB_NODELIST"])
    nodes = int(opts.get("--nodes") or os.environ["SLURM_JOB_NUM_NODES"])
    if int(opts.get("--ntasks-per-node", "1")) != 1:
        sys.exit("fake srun supports one task per node only")
    procs = []
    for node in range(nodes):
        env = dict(os.environ, SLURM_NODEID=str(node), SLURM_PROCID=str(node), SLURM_LOCALID="0",
                   SLURMD_NODENAME=hosts[node], SLURM_STEP_ID="0", SLURM_STEP_NUM_NODES=str(nodes),
                   SLURM_NTASKS=str(nodes))
        procs.append(subprocess.Popen(args, env=env))
    codes = [p.wait() for p in procs]
    sys.exit(max(128 - c if c < 0 else c for c in codes))


def scontrol():
    args = ARGS
    record()
    if args[:2] == ["show", "hostnames"]:
        print("\n".join(expand_hostlist(args[2] if len(args) > 2 else os.environ["SLURM_JOB_NODELIST"])))
    elif args[:1] == ["requeue"]:
        pass
    else:
        sys.exit("fake scontrol: unsupported %r" % (args,))


def accelerate():
    mode = os.environ.get("FAKE_LAUNCH_MODE", "ok")
    record()
    print("fake accelerate on node %s: %s" % (os.environ.get("SLURM_NODEID"), " ".join(ARGS)), flush=True)
    if mode.startswith("exit:"):
        sys.exit(int(mode[5:]))
    if mode == "rank":
        # a "rank" that checkpoints on SIGUSR1 or SIGTERM and exits 75; the launcher reports 1, like torchrun
        state = os.path.join(RECORD, "node%s" % os.environ["SLURM_NODEID"])
        rank = subprocess.Popen([sys.executable, "-c", RANK_CODE, state])
        # torchrun forwards SIGTERM to its ranks and waits for them (up to its own timeout) rather than dying
        signal.signal(signal.SIGTERM, lambda s, f: rank.send_signal(s))
        code = rank.wait()
        with open(state + ".launcher", "w") as f:
            f.write(str(code))
        sys.exit(0 if code == 0 else 1)


RANK_CODE = """
import signal, sys, time
state = sys.argv[1]
stop = []
signal.signal(signal.SIGUSR1, lambda s, f: stop.append(s))
signal.signal(signal.SIGTERM, lambda s, f: stop.append(s))
open(state + ".ready", "w").close()
deadline = time.time() + 60
while not stop and time.time() < deadline:
    time.sleep(0.05)
if not stop:
    sys.exit(3)
open(state + ".checkpoint", "w").write(str(stop[0]))
sys.exit(75)
"""


def sbatch():
    record()
    print("Submitted batch job 4242")


def plain():
    record()
    sys.exit(int(os.environ.get("FAKE_%s_EXIT" % NAME.upper(), "0")))


{"srun": srun, "scontrol": scontrol, "accelerate": accelerate, "sbatch": sbatch}.get(NAME, plain)()
'''

STUB_NAMES = ("srun", "scontrol", "sbatch", "accelerate", "curate")


def expand_nodes(prefix: str, count: int) -> tuple[str, list[str]]:
    """A Slurm node list string for ``count`` nodes and the host names it stands for."""
    hosts = [f"{prefix}{i:03d}" for i in range(1, count + 1)]
    spec = f"{prefix}[001-{count:03d}]" if count > 1 else hosts[0]
    return spec, hosts


class FakeSlurm:
    """A fake cluster rooted at ``root``: stubs, a fake repository, and the records of every stub call."""

    def __init__(self, root: Path, stubs: tuple[str, ...] = STUB_NAMES) -> None:
        self.root = root
        self.bin = root / "bin"
        self.record_dir = root / "record"
        self.repo = root / "repo"
        self.pkgs = root / "pkgs"
        for d in (self.bin, self.record_dir, self.repo, self.pkgs / "deepspeed"):
            d.mkdir(parents=True)
        stub = root / "stub.py"
        stub.write_text(_STUB)
        for name in stubs:
            path = self.bin / name  # the stub dispatches on its first argument
            path.write_text(f"#!/bin/sh\nexec {sys.executable} {stub} {name} \"$@\"\n")
            path.chmod(0o755)
        python = self.bin / "python"
        python.write_text(f"#!/bin/sh\nexec {sys.executable} \"$@\"\n")
        python.chmod(0o755)
        # the DeepSpeed template checks that deepspeed imports; it is not installed here
        (self.pkgs / "deepspeed" / "__init__.py").write_text("")
        (self.repo / "launch").symlink_to(LAUNCH)
        for script in ("pretrain/main.py", "linprobe/main.py", "finetune/main.py"):
            (self.repo / script).parent.mkdir(parents=True, exist_ok=True)
            (self.repo / script).write_text("")
        (self.repo / "logs").mkdir()

    def env(self, nodes: int, gpus_per_node: int = 8, job_id: int = 1234, **extra: str) -> dict[str, str]:
        spec, _ = expand_nodes("gpu", nodes)
        env = {
            "PATH": f"{self.bin}:/usr/bin:/bin",
            "HOME": str(self.root),
            "LANG": "C.UTF-8",
            "PYTHONPATH": str(self.pkgs),
            "FAKE_SLURM_RECORD": str(self.record_dir),
            "SLURM_JOB_ID": str(job_id),
            "SLURM_JOB_NAME": "testjob",
            "SLURM_JOB_NODELIST": spec,
            "SLURM_JOB_NUM_NODES": str(nodes),
            "SLURM_NNODES": str(nodes),
            "SLURM_SUBMIT_DIR": str(self.repo),
            "SLURM_CPUS_PER_TASK": "16",
            "SLURM_GPUS_ON_NODE": str(gpus_per_node),
            "GPUS_PER_NODE": str(gpus_per_node),
            "VENV": "",
            "DATA_PATH": str(self.root / "shards"),
        }
        env.update(extra)
        return env

    def start(self, template: str, env: dict[str, str], *args: str) -> subprocess.Popen:
        return subprocess.Popen(["bash", str(LAUNCH / "slurm" / template), *args], cwd=self.repo, env=env,
                                stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)

    def run(self, template: str, env: dict[str, str], *args: str, timeout: float = 60) -> tuple[int, str]:
        proc = self.start(template, env, *args)
        out, _ = proc.communicate(timeout=timeout)
        return proc.returncode, out

    def calls(self, name: str | None = None) -> list[dict]:
        entries = [json.loads(p.read_text()) for p in self.record_dir.glob("*.json")]
        entries.sort(key=lambda e: e["time"])
        return [e for e in entries if name is None or e["name"] == name]

    def clear(self) -> None:
        for p in self.record_dir.iterdir():
            p.unlink()


def descendants(pid: int) -> list[int]:
    """All live descendants of ``pid`` (what Slurm's process tracking signals for a job step)."""
    children: dict[int, list[int]] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            text = stat.read_text()
        except OSError:
            continue
        fields = text[text.rfind(")") + 2:].split()
        children.setdefault(int(fields[1]), []).append(int(stat.parent.name))
    found, todo = [], list(children.get(pid, []))
    while todo:
        p = todo.pop()
        found.append(p)
        todo.extend(children.get(p, []))
    return found


def signal_job_steps(fake: FakeSlurm, sig: int) -> int:
    """Send ``sig`` to every process started by the (single) srun, not to srun or the batch shell: what
    ``#SBATCH --signal=USR1@...`` without ``B:`` does. Returns how many processes were signalled."""
    (srun_call,) = fake.calls("srun")
    targets = descendants(srun_call["pid"])
    for pid in targets:
        try:
            os.kill(pid, sig)
        except ProcessLookupError:
            pass
    return len(targets)


def wait_for(predicate, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout:.0f} s waiting for {what}")
        time.sleep(0.1)


# ---- tests of the fake itself ----

@pytest.fixture
def fake(tmp_path: Path) -> FakeSlurm:
    return FakeSlurm(tmp_path)


def test_scontrol_stub_expands_node_lists(fake: FakeSlurm) -> None:
    env = fake.env(4)
    out = subprocess.run(["scontrol", "show", "hostnames", "gpu[001-003,007],cpu9"], env=env,
                         capture_output=True, text=True, check=True).stdout.split()
    assert out == ["gpu001", "gpu002", "gpu003", "gpu007", "cpu9"]


def test_srun_stub_runs_once_per_node_and_returns_the_highest_status(fake: FakeSlurm) -> None:
    env = fake.env(4)
    proc = subprocess.run(["srun", "--nodes=4", "--ntasks-per-node=1", "bash", "-c",
                           'echo "$SLURM_NODEID $SLURM_PROCID $SLURMD_NODENAME"; exit $((SLURM_NODEID * 2))'],
                          env=env, capture_output=True, text=True)
    assert proc.returncode == 6
    lines = sorted(proc.stdout.split("\n")[:-1])
    assert lines == ["0 0 gpu001", "1 1 gpu002", "2 2 gpu003", "3 3 gpu004"]


def test_descendants_sees_grandchildren() -> None:
    proc = subprocess.Popen(["bash", "-c", "sleep 30 & sleep 30 & wait"])
    try:
        wait_for(lambda: len(descendants(proc.pid)) == 2, 10, "the two sleeps under the shell")
    finally:
        for pid in descendants(proc.pid):
            os.kill(pid, signal.SIGKILL)
        proc.kill()
        proc.wait()

