"""finetune.sbatch, linprobe_sweep.sbatch and curate_array.sbatch under the fake Slurm: what each node or
array task runs, the merge job of the curation array, resume and bad settings."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest
from test_launch_fakeslurm import FakeSlurm


@pytest.fixture
def fake(tmp_path: Path) -> FakeSlurm:
    return FakeSlurm(tmp_path)


def _flag(argv: list[str], name: str) -> str:
    return argv[len(argv) - 1 - argv[::-1].index(name) + 1]  # the last occurrence wins, as in argparse


def _script_args(call: dict, script: str) -> list[str]:
    argv = call["argv"]
    return argv[argv.index(script) + 1:]


# ---- finetune ----

@pytest.mark.parametrize("nodes,gpus,config", [(1, 1, "single_gpu.yaml"), (1, 4, "multi_gpu.yaml"),
                                               (2, 4, "multi_node_ddp.yaml")])
def test_finetune_picks_the_config_for_the_job_size(fake: FakeSlurm, nodes: int, gpus: int, config: str) -> None:
    encoder = fake.root / "encoder.safetensors"
    encoder.write_bytes(b"x")
    rc, out = fake.run("finetune.sbatch", fake.env(nodes, gpus, FINETUNE=str(encoder)), "--nb_classes", "2")
    assert rc == 0, out
    calls = sorted(fake.calls("accelerate"), key=lambda c: int(c["env"]["SLURM_NODEID"]))
    assert [int(_flag(c["argv"], "--machine_rank")) for c in calls] == list(range(nodes))
    for call in calls:
        assert _flag(call["argv"], "--config_file") == f"launch/accelerate/{config}"
        assert _flag(call["argv"], "--num_processes") == str(nodes * gpus)
        args = _script_args(call, "finetune/main.py")
        assert _flag(args, "--finetune") == str(encoder) and args[-2:] == ["--nb_classes", "2"]
        assert "--resume" not in args


def test_finetune_continues_from_its_last_checkpoint(fake: FakeSlurm) -> None:
    output_dir = fake.root / "ft"
    output_dir.mkdir()
    (output_dir / "checkpoint-last.pt").write_bytes(b"x")
    rc, out = fake.run("finetune.sbatch", fake.env(1, 4, OUTPUT_DIR=str(output_dir), FINETUNE=""), "--model", "vit")
    assert rc == 0, out
    (call,) = fake.calls("accelerate")
    args = _script_args(call, "finetune/main.py")
    assert _flag(args, "--resume") == str(output_dir / "checkpoint-last.pt")
    assert "--finetune" not in args


def test_finetune_missing_checkpoint_is_an_error(fake: FakeSlurm) -> None:
    rc, out = fake.run("finetune.sbatch", fake.env(1, 4, FINETUNE="/no/such/encoder.safetensors"))
    assert rc != 0 and "FINETUNE=/no/such/encoder.safetensors does not exist" in out
    assert not fake.calls("accelerate")


# ---- linprobe sweep ----

def _array_env(fake: FakeSlurm, task: int, count: int, **extra: str) -> dict[str, str]:
    return fake.env(1, 1, job_id=5000 + task, SLURM_ARRAY_JOB_ID="5000", SLURM_ARRAY_TASK_ID=str(task),
                    SLURM_ARRAY_TASK_COUNT=str(count), SLURM_ARRAY_TASK_MIN="0", SLURM_ARRAY_TASK_MAX=str(count - 1),
                    **extra)


def test_linprobe_sweep_over_learning_rates(fake: FakeSlurm) -> None:
    encoder = fake.root / "encoder.safetensors"
    encoder.write_bytes(b"x")
    values = ["0.01", "0.1", "1.0"]
    for task in range(3):
        rc, out = fake.run("linprobe_sweep.sbatch", _array_env(fake, task, 3, FINETUNE=str(encoder),
                                                                BLR_VALUES=" ".join(values)), "--nb_classes", "2")
        assert rc == 0, out
    calls = fake.calls("accelerate")
    assert len(calls) == 3
    seen = []
    for call in calls:
        assert _flag(call["argv"], "--config_file") == "launch/accelerate/single_gpu.yaml"
        assert _flag(call["argv"], "--num_processes") == "1"
        args = _script_args(call, "linprobe/main.py")
        seen.append(_flag(args, "--blr"))
        assert _flag(args, "--finetune") == str(encoder)
        assert _flag(args, "--output_dir") == f"{fake.repo}/runs/testjob-5000/blr-{seen[-1]}"
    assert seen == values
    assert len({c["env"]["SLURM_JOB_ID"] for c in calls}) == 3  # distinct jobs -> distinct default ports


def test_linprobe_sweep_over_checkpoints(fake: FakeSlurm) -> None:
    ckpts = []
    for name in ("run a", "run-b"):
        (fake.root / name).mkdir()
        ckpts.append(fake.root / name / "encoder.safetensors")
        ckpts[-1].write_bytes(b"x")
    listing = fake.root / "ckpts.txt"
    listing.write_text(f"# checkpoints to compare\n{ckpts[0]}\n\n{ckpts[1]}\n")
    for task in range(2):
        rc, out = fake.run("linprobe_sweep.sbatch", _array_env(fake, task, 2, SWEEP="checkpoint",
                                                                CHECKPOINT_LIST=str(listing)))
        assert rc == 0, out
    calls = fake.calls("accelerate")
    got = [(_flag(_script_args(c, "linprobe/main.py"), "--finetune"),
            Path(_flag(_script_args(c, "linprobe/main.py"), "--output_dir")).name) for c in calls]
    assert got == [(str(ckpts[0]), "ckpt000-run_a"), (str(ckpts[1]), "ckpt001-run-b")]
    assert all("--blr" not in c["argv"] for c in calls)


@pytest.mark.parametrize("task,overrides,message", [
    (3, {"BLR_VALUES": "0.1 0.3"}, "array task 3 has no blr value"),
    (0, {"BLR_VALUES": "fast"}, "is not a number"),
    (0, {"FINETUNE": ""}, "SWEEP=blr needs FINETUNE"),
    (0, {"SWEEP": "lr"}, "SWEEP must be blr or checkpoint"),
    (0, {"SWEEP": "checkpoint", "CHECKPOINT_LIST": "/nope.txt"}, "SWEEP=checkpoint needs CHECKPOINT_LIST"),
])
def test_linprobe_sweep_bad_settings(fake: FakeSlurm, task: int, overrides: dict, message: str) -> None:
    env = _array_env(fake, task, 4, FINETUNE=str(fake.root))
    env.update(overrides)
    rc, out = fake.run("linprobe_sweep.sbatch", env)
    assert rc != 0 and message in out, out
    assert not fake.calls("accelerate")


# ---- curation array ----

@pytest.fixture
def curate_setup(fake: FakeSlurm) -> dict[str, str]:
    salt = fake.root / "salt"
    salt.write_text("0123456789abcdef0123456789abcdef")
    listing = fake.root / "inputs.txt"
    listing.write_text("".join(f"/data/subject{i}\n" for i in range(10)) + "# a comment\n\n")
    return {"INPUT_LIST": str(listing), "OUTPUT": str(fake.root / "out"), "SALT_FILE": str(salt)}


def test_curate_array_splits_inputs_and_submits_one_merge(fake: FakeSlurm, curate_setup: dict) -> None:
    for task in range(4):
        rc, out = fake.run("curate_array.sbatch", _array_env(fake, task, 4, **curate_setup), "--ct_windows", "brain")
        assert rc == 0, out
    calls = sorted(fake.calls("curate"), key=lambda c: c["env"]["SLURM_ARRAY_TASK_ID"])
    parts = fake.root / "out.parts"
    for task, call in enumerate(calls):
        argv = call["argv"]
        inputs = argv[argv.index("--") + 1:]
        assert inputs == [f"/data/subject{i}" for i in range(task, 10, 4)]
        assert _flag(argv, "--output") == f"{parts}/part-{task:04d}"
        assert _flag(argv, "--salt_file") == curate_setup["SALT_FILE"]
        assert _flag(argv, "--workers") == "16" and _flag(argv, "--ct_windows") == "brain"
    assert (parts / "NUM_PARTS").read_text().strip() == "4"

    (submit,) = fake.calls("sbatch")
    assert submit["env"]["SLURM_ARRAY_TASK_ID"] == "0"
    opts = [a for a in submit["argv"] if not a.startswith("--wrap=")]
    assert "--dependency=afterok:5000" in opts and "--kill-on-invalid-dep=yes" in opts
    (wrap,) = [a[len("--wrap="):] for a in submit["argv"] if a.startswith("--wrap=")]

    # run the merge job's command as Slurm would (sh -c), with the curate stub
    fake.clear()
    subprocess.run(["sh", "-c", wrap], env=fake.env(1), check=True)
    (merge,) = fake.calls("curate")
    assert merge["cwd"] == str(fake.repo)
    argv = merge["argv"]
    assert argv[0] == "--merge" and _flag(argv, "--output") == curate_setup["OUTPUT"]
    assert argv[1:5] == [f"{parts}/part-{k:04d}" for k in range(4)]


def test_curate_array_rerun_of_one_task_keeps_the_split(fake: FakeSlurm, curate_setup: dict) -> None:
    rc, out = fake.run("curate_array.sbatch", _array_env(fake, 1, 4, **curate_setup))
    assert rc == 0, out
    fake.clear()
    # resubmitted alone: --array=1 gives a one-task array; NUM_PARTS comes from PARTS_DIR
    env = _array_env(fake, 1, 1, **curate_setup)
    env.update(SLURM_ARRAY_JOB_ID="6000", SLURM_ARRAY_TASK_MIN="1", SLURM_ARRAY_TASK_MAX="1")
    rc, out = fake.run("curate_array.sbatch", env)
    assert rc == 0, out
    (call,) = fake.calls("curate")
    assert call["argv"][call["argv"].index("--") + 1:] == ["/data/subject1", "/data/subject5", "/data/subject9"]
    (submit,) = fake.calls("sbatch")
    assert "--dependency=afterok:6000" in submit["argv"]
    fake.clear()
    env["NUM_PARTS"] = "3"
    rc, out = fake.run("curate_array.sbatch", env)
    assert rc != 0 and "split into 4 parts, not NUM_PARTS=3" in out


@pytest.mark.parametrize("overrides,message", [
    ({"SALT_FILE": "/no/salt"}, "create it once before submitting"),
    ({"INPUT_LIST": "/no/list.txt"}, "is not a file"),
    ({"SLURM_ARRAY_TASK_ID": None}, "submit with sbatch --array"),
    ({"SLURM_ARRAY_TASK_COUNT": "20", "SLURM_ARRAY_TASK_MAX": "19"}, "fewer than the 20 parts"),
])
def test_curate_array_bad_settings(fake: FakeSlurm, curate_setup: dict, overrides: dict, message: str) -> None:
    env = _array_env(fake, 0, 4, **curate_setup)
    for key, value in overrides.items():
        if value is None:
            env.pop(key)
        else:
            env[key] = value
    rc, out = fake.run("curate_array.sbatch", env)
    assert rc != 0 and message in out, out
    assert not fake.calls("curate") and not fake.calls("sbatch")
