"""pipeline.results run on several GPUs: which GPU each stage gets, the environment it runs in, runs.json rows
with and without the GPU they ran on, and the pretraining as DDP on several GPUs (--pretrain_gpus). CPU only: the stages are stand-ins (or tiny Python commands), no training."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import threading
from collections.abc import Collection
from pathlib import Path

import pytest

import pipeline.results as results
import pipeline.run_log as run_log
import pipeline.stages as stages
from pipeline.commands import LabeledSet
from pipeline.results_table import table_lines
from pipeline.run_log import RunLog
from pipeline.stages import GpuSlots, StageError, StageResult, StageTimeout, TimeBudget, run_stage

REPO_ROOT = stages.REPO_ROOT
BREAST = REPO_ROOT / "sample_data" / "medmnist" / "breastmnist.npz"
# A runs.json of a real GPU call, written before rows recorded their GPU (its transfer rows name their encoder).
OLD_RUNS = REPO_ROOT / "docs" / "results" / "transfer_h100_s11_runs.json"


def no_device_count() -> int:
    raise AssertionError("CUDA_VISIBLE_DEVICES is set: the device count must not be asked")


# --- which GPUs the process sees ---------------------------------------------------------------------------------

def test_visible_gpus_follow_cuda_visible_devices() -> None:
    assert stages.visible_gpus({"CUDA_VISIBLE_DEVICES": "2,3"}, no_device_count) == ["2", "3"]
    assert stages.visible_gpus({"CUDA_VISIBLE_DEVICES": " 1 , 0"}, no_device_count) == ["1", "0"]
    assert stages.visible_gpus({"CUDA_VISIBLE_DEVICES": "GPU-8f0c,GPU-1a2b"}, no_device_count) == ["GPU-8f0c", "GPU-1a2b"]
    # empty or -1 hides every GPU; CUDA stops reading at the first negative id
    assert stages.visible_gpus({"CUDA_VISIBLE_DEVICES": ""}, no_device_count) == []
    assert stages.visible_gpus({"CUDA_VISIBLE_DEVICES": "-1"}, no_device_count) == []
    assert stages.visible_gpus({"CUDA_VISIBLE_DEVICES": "0,-1,1"}, no_device_count) == ["0"]


def test_visible_gpus_count_devices_without_cuda_visible_devices() -> None:
    assert stages.visible_gpus({}, lambda: 3) == ["0", "1", "2"]
    assert stages.visible_gpus({"PATH": "/bin"}, lambda: 0) == []


# --- the slot pool -----------------------------------------------------------------------------------------------

def test_a_stage_takes_the_least_loaded_gpu_in_order() -> None:
    slots = GpuSlots(["1", "0"], jobs=4)
    assert slots.per_gpu == 2
    with slots.take() as a, slots.take() as b, slots.take() as c:
        assert (a, b, c) == ("1", "0", "1")  # ties go to the GPU named first
        assert slots.load == {"1": 2, "0": 1}
    assert slots.load == {"1": 0, "0": 0}
    with slots.take() as a:
        with slots.take() as b:
            assert (a, b) == ("1", "0")
        with slots.take() as c:  # "0" was given back: it is the least loaded again
            assert c == "0"


def test_each_gpu_hosts_at_most_ceil_jobs_over_gpus_stages() -> None:
    assert GpuSlots(["0", "1"], jobs=1).per_gpu == 1
    assert GpuSlots(["0", "1"], jobs=2).per_gpu == 1
    assert GpuSlots(["0", "1"], jobs=3).per_gpu == 2
    assert GpuSlots(["0", "1", "2"], jobs=8).per_gpu == 3
    assert GpuSlots(["0"], jobs=4).per_gpu == 4

    slots = GpuSlots(["0", "1"], jobs=2)
    got: list[str | None] = []
    started = threading.Event()

    def third() -> None:
        started.set()
        with slots.take() as gpu:
            got.append(gpu)

    with slots.take(), slots.take() as second:
        assert second == "1"
        waiter = threading.Thread(target=third)
        waiter.start()
        started.wait(5)
        waiter.join(0.3)
        assert waiter.is_alive() and not got  # both GPUs full: the third stage waits
    waiter.join(5)
    assert got in (["0"], ["1"]) and slots.load == {"0": 0, "1": 0}


def test_a_stage_on_two_gpus_holds_a_slot_on_each_and_waits_for_both() -> None:
    slots = GpuSlots(["1", "0"], jobs=2)
    with slots.take(2) as both:
        assert both == "1,0" and slots.load == {"1": 1, "0": 1}  # in the order --gpus names them
    assert slots.load == {"1": 0, "0": 0}
    got: list[str | None] = []
    with slots.take() as one:
        assert one == "1"
        waiter = threading.Thread(target=lambda: got.append(slots.take(2).__enter__()))
        waiter.start()
        waiter.join(0.3)
        assert waiter.is_alive() and not got  # "0" alone is free: a two-GPU stage waits for "1" as well
    waiter.join(5)
    assert got == ["1,0"]
    with pytest.raises(ValueError, match="on 3 GPUs"):
        with slots.take(3):
            pass


def test_pretraining_on_several_gpus_is_ddp_at_the_same_global_batch(tmp_path: Path, monkeypatch) -> None:
    """--pretrain_gpus 2: accelerate launch of two processes with the repository's DDP config, each with half the
    batch, everything else as on one GPU; the one-GPU command stays the one recorded by the sixteenth session's call
    (so its rows are reused); a batch that does not split, or too few GPUs, stops the call before any stage."""

    from accelerate.commands.launch import launch_command_parser

    from common.config import parse_config
    from pipeline.commands import pretrain_command
    from pretrain.config import PretrainConfig

    recorded = next(r["command"] for r in json.loads(
        (REPO_ROOT / "docs/results/transfer_h200_s16_320ep_runs.json").read_text())
        if r["model"] == "vit_small_patch8" and r["protocol"] == "pretrain")
    args = results.build_parser().parse_args([
        "run", "--pool", ".gpu_run/results/pool", "--datasets", "d.npz", "--out", "o", "--encoders", "vit_small_patch8",
        "--pretrain_epochs", "320", "--batch_size", "1024", "--num_workers", "8", "--pretrain_data_on_device"])
    pre_dir = Path("/tmp/results_run/pretrain/vit_small_patch8")
    assert pretrain_command(args, "mae_vit_small_patch8", pre_dir)[1:] == recorded[1:]

    args.pretrain_gpus = 2
    command = pretrain_command(args, "mae_vit_small_patch8", pre_dir, port=29501)
    assert command[1:3] == ["-m", "accelerate.commands.launch"]
    launch = launch_command_parser().parse_args(command[3:])
    assert launch.config_file == "launch/accelerate/multi_gpu.yaml" and (REPO_ROOT / launch.config_file).is_file()
    assert launch.num_processes == 2 and launch.main_process_port == 29501 and launch.training_script == \
        "pretrain/main.py"
    cfg = parse_config(PretrainConfig, launch.training_script_args)
    single = parse_config(PretrainConfig, recorded[recorded.index("pretrain.main") + 1:])
    assert cfg.batch_size == 512 and single.batch_size == 1024  # per GPU: the global batch stays 1024
    assert {k: v for k, v in vars(cfg).items() if k != "batch_size"} == \
        {k: v for k, v in vars(single).items() if k != "batch_size"}
    args.batch_size = 1023
    with pytest.raises(ValueError, match="not divisible"):
        pretrain_command(args, "mae_vit_small_patch8", pre_dir)

    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "0")  # one GPU
    args.batch_size, args.out = 1024, str(tmp_path / "out")
    with pytest.raises(SystemExit, match="--pretrain_gpus 2 needs that many GPUs"):
        results.run(args)


def test_a_slot_is_given_back_when_the_stage_fails() -> None:
    slots = GpuSlots(["0", "1"], jobs=2)
    with pytest.raises(StageError):
        with slots.take() as gpu:
            assert gpu == "0"
            raise StageError("boom")
    assert slots.load == {"0": 0, "1": 0}


def test_no_gpus_gives_none_and_pins_nothing() -> None:
    slots = GpuSlots([], jobs=4)
    with slots.take() as a, slots.take() as b:
        assert a is None and b is None
    assert not slots.pin and slots.pinned(None) is None
    assert GpuSlots(["0"], jobs=2, pin=False).pinned("0") is None
    assert GpuSlots(["0"], jobs=2).pinned("0") == "0"
    with pytest.raises(ValueError, match="named twice"):
        GpuSlots(["0", "0"], jobs=2)


# --- the environment a stage runs in -----------------------------------------------------------------------------

PRINT_GPU = [sys.executable, "-c", "import os; print('seen:', os.environ.get('CUDA_VISIBLE_DEVICES'))"]


def test_a_pinned_stage_sees_only_its_gpu(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                         capsys: pytest.CaptureFixture) -> None:
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "0,1")
    monkeypatch.setenv("SCANMAE_TEST_MARK", "kept")
    run_stage("probe", PRINT_GPU, log_path=tmp_path / "a.log", quiet=True, gpu="1")
    assert "seen: 1" in (tmp_path / "a.log").read_text()
    # the echoed line still reruns the stage as it ran
    assert f"==> probe: CUDA_VISIBLE_DEVICES=1 {sys.executable} -c" in capsys.readouterr().out
    env = stages.stage_environment("1")
    assert env is not None and env["CUDA_VISIBLE_DEVICES"] == "1" and env["SCANMAE_TEST_MARK"] == "kept"


def test_an_unpinned_stage_inherits_the_environment(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                    capsys: pytest.CaptureFixture) -> None:
    envs: list[object] = []
    real_popen = subprocess.Popen

    def popen(*args: object, **kwargs: object) -> subprocess.Popen:
        envs.append(kwargs.get("env"))
        return real_popen(*args, **kwargs)

    monkeypatch.setattr(stages.subprocess, "Popen", popen)
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "3")
    run_stage("probe", PRINT_GPU, log_path=tmp_path / "b.log", quiet=True)
    assert envs == [None] and "seen: 3" in (tmp_path / "b.log").read_text()
    assert f"==> probe: {sys.executable} -c" in capsys.readouterr().out
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES")
    run_stage("probe", PRINT_GPU, log_path=tmp_path / "c.log", quiet=True)
    assert envs == [None, None] and "seen: None" in (tmp_path / "c.log").read_text()


# --- runs.json rows ----------------------------------------------------------------------------------------------

class FakeStage:
    """Stands in for run_stage: records the GPU each stage was pinned to and how many ran at once on each, and
    writes what the real stage leaves behind (results.json of a transfer stage)."""

    def __init__(self, fail: Collection[str] = (), timeout: Collection[str] = (),
                 barrier: threading.Barrier | None = None):
        self.fail, self.timeout, self.barrier = fail, timeout, barrier
        self.calls: list[tuple[str, list[str], str | None]] = []
        self.running: dict[str | None, int] = {}
        self.most: dict[str | None, int] = {}
        self._lock = threading.Lock()

    def __call__(self, name: str, command: list[str], log_path: Path | None = None, quiet: bool = False,
                 timeout_s: float | None = None, gpu: str | None = None) -> StageResult:
        with self._lock:
            self.calls.append((name, command, gpu))
            self.running[gpu] = self.running.get(gpu, 0) + 1
            self.most[gpu] = max(self.most.get(gpu, 0), self.running[gpu])
        try:
            if self.barrier is not None and "pretrain" in name:
                self.barrier.wait(10)  # the pretrainings must run at the same time
            else:
                threading.Event().wait(0.05)  # long enough for concurrent stages to overlap
            if name in self.fail:
                raise StageError(f"stage '{name}' failed", "RuntimeError: boom")
            if name in self.timeout:
                raise StageTimeout(f"stage '{name}' stopped at its time limit")
            assert log_path is not None
            log_path.parent.mkdir(parents=True, exist_ok=True)
            if "pretrain" not in name:
                (log_path.parent / "results.json").write_text(json.dumps({"acc": 0.5, "auc": 0.5}))
            return StageResult(name, command, 0.1)
        finally:
            with self._lock:
                self.running[gpu] -= 1


def test_rows_record_their_gpu_and_failed_or_timed_out_stages_free_it(tmp_path: Path,
                                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    fake = FakeStage(fail={"m mae finetune d"}, timeout={"m mae linprobe e"})
    monkeypatch.setattr(run_log, "run_stage", fake)
    slots = GpuSlots(["0", "1"], jobs=2)
    log = RunLog(tmp_path / "runs.json", TimeBudget(1000), slots)
    failed = log.stage(("m", "mae", "finetune", "d"), ["py", "-m", "finetune.main"], tmp_path / "ft")
    stopped = log.stage(("m", "mae", "linprobe", "e"), ["py", "-m", "linprobe.main"], tmp_path / "lp")
    ok = log.stage(("m", "mae", "linprobe", "d"), ["py", "-m", "linprobe.main"], tmp_path / "lp2")
    assert failed is not None and failed["status"] == "failed" and failed["gpu"] == "0"
    assert stopped is not None and stopped["status"] == "skipped" and stopped["gpu"] == "0"
    assert ok is not None and ok["status"] == "ok" and ok["gpu"] == "0"  # each one had given its slot back
    assert slots.load == {"0": 0, "1": 0}
    assert [gpu for _, _, gpu in fake.calls] == ["0", "0", "0"]
    assert [r["gpu"] for r in json.loads((tmp_path / "runs.json").read_text())] == ["0", "0", "0"]
    # blocked (and budget-skipped) rows never ran: no GPU
    blocked = log.stage(("m", "mae", "finetune", "e"), ["py"], tmp_path / "x", blocked="pretraining failed")
    assert blocked is not None and "gpu" not in blocked and len(fake.calls) == 3


def test_rows_without_a_gpu_on_the_cpu(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    fake = FakeStage()
    monkeypatch.setattr(run_log, "run_stage", fake)
    row = RunLog(tmp_path / "runs.json", TimeBudget(None)).stage(("m", "mae", "linprobe", "d"), ["py"], tmp_path)
    assert row is not None and row["status"] == "ok" and "gpu" not in row and fake.calls[0][2] is None


def test_an_old_runs_json_without_gpus_is_reused_and_tabled(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    shutil.copy(OLD_RUNS, tmp_path / "runs.json")
    rows = json.loads(OLD_RUNS.read_text())
    assert rows and not any("gpu" in r for r in rows)
    fake = FakeStage()
    monkeypatch.setattr(run_log, "run_stage", fake)
    log = RunLog(tmp_path / "runs.json", TimeBudget(None), GpuSlots(["0", "1"], jobs=2))
    ok = [r for r in rows if r["status"] == "ok"]
    assert ok and any("encoder_digest" in r for r in ok)
    for r in ok:  # every finished row counts as done, on the encoder it names, and is not run again
        assert log.done(log.key(r), r["command"], r.get("encoder_digest"))
        assert log.stage(log.key(r), r["command"], tmp_path / "x", digest=r.get("encoder_digest")) is None
    assert fake.calls == []
    table = table_lines(log.rows, None, 64)
    assert table == table_lines(rows, None, 64) and any("| vit_small_patch8 | mae |" in line for line in table)
    # a row that now records its GPU tables exactly as before: the GPU shows nowhere
    assert table_lines([r | {"gpu": "1"} for r in rows], None, 64) == table


# --- pipeline.results run ----------------------------------------------------------------------------------------

def run_call(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, fake: FakeStage, *flags: str) -> list[dict]:
    """``pipeline.results run`` with stand-in stages: two encoders' pretrainings, then their transfer stages."""
    monkeypatch.setattr(run_log, "run_stage", fake)
    monkeypatch.setattr(results, "run_stage", fake)
    out = tmp_path / "res"
    assert results.main(["run", "--pool", str(tmp_path / "pool"), "--datasets", str(BREAST), "--out", str(out),
                         "--encoders", "enc_a", "enc_b", "--inits", "mae", "--no_preflight", "--num_workers", "0",
                         *flags]) == 0
    return json.loads((out / "runs.json").read_text())


def test_two_pretrainings_on_two_gpus_run_one_per_gpu(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "0,1")
    monkeypatch.setattr(results, "device_count", no_device_count)
    fake = FakeStage(barrier=threading.Barrier(2))
    rows = run_call(tmp_path, monkeypatch, fake, "--jobs", "2")
    pretrain = {r["model"]: r["gpu"] for r in rows if r["protocol"] == "pretrain"}
    assert sorted(pretrain.values()) == ["0", "1"]
    assert all(r["status"] == "ok" and r["gpu"] in ("0", "1") for r in rows)
    assert fake.most == {"0": 1, "1": 1}  # --jobs 2 on 2 GPUs: never two stages on one GPU
    assert {gpu for _, _, gpu in fake.calls} == {"0", "1"}


def test_four_jobs_on_two_gpus_share_them_two_by_two(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    monkeypatch.setattr(results, "device_count", lambda: 2)
    fake = FakeStage()
    rows = run_call(tmp_path, monkeypatch, fake, "--jobs", "4")
    assert len(rows) == 6 and all(r["status"] == "ok" for r in rows)
    assert set(fake.most) == {"0", "1"} and max(fake.most.values()) <= 2


def test_gpus_flag_picks_the_gpus_and_pins_even_one(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    monkeypatch.setattr(results, "device_count", lambda: 4)
    fake = FakeStage()
    rows = run_call(tmp_path, monkeypatch, fake, "--jobs", "2", "--gpus", "3")
    assert {gpu for _, _, gpu in fake.calls} == {"3"} and {r["gpu"] for r in rows} == {"3"}
    assert fake.most == {"3": 2}  # one GPU takes every job
    with pytest.raises(SystemExit, match="named twice"):
        run_call(tmp_path, monkeypatch, FakeStage(), "--gpus", "1", "1")


@pytest.mark.parametrize("gpus", [0, 1])
def test_one_gpu_or_none_runs_stages_as_before(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, gpus: int) -> None:
    """Without --gpus, one GPU or none: no stage is pinned (each inherits the environment) and the commands are
    those of a call on several GPUs, which are the commands of before (the GPU goes only into the environment)."""
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    monkeypatch.setattr(results, "device_count", lambda: gpus)
    fake = FakeStage()
    rows = run_call(tmp_path / "one", monkeypatch, fake, "--jobs", "2")
    assert [gpu for _, _, gpu in fake.calls] == [None] * 6
    assert [r.get("gpu") for r in rows] == (["0"] * 6 if gpus else [None] * 6)

    monkeypatch.setattr(results, "device_count", lambda: 2)
    several = FakeStage()
    run_call(tmp_path / "two", monkeypatch, several, "--jobs", "2")
    assert {gpu for _, _, gpu in several.calls} == {"0", "1"}

    def commands(stage: FakeStage, root: Path) -> dict[str, list[str]]:
        return {name: [part.replace(str(root), "ROOT") for part in command] for name, command, _ in stage.calls}

    assert commands(fake, tmp_path / "one") == commands(several, tmp_path / "two")


def test_the_preflight_spreads_over_the_gpus(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    fake = FakeStage()
    monkeypatch.setattr(results, "run_stage", fake)
    args = results.build_parser().parse_args(["run", "--pool", "p", "--datasets", "d.npz", "--out", "o",
                                              "--jobs", "2", "--num_workers", "0"])
    data = LabeledSet(path="d.npz", num_classes=2, multilabel=False, n_train=100)
    encoders = {"enc_a": tmp_path / "a.safetensors", "enc_b": tmp_path / "b.safetensors"}
    results.preflight(args, {"d": data}, encoders, tmp_path / "pre", GpuSlots(["0", "1"], jobs=2))
    assert len(fake.calls) == 4 and {gpu for _, _, gpu in fake.calls} == {"0", "1"}
    assert fake.most == {"0": 1, "1": 1}


def test_run_passes_its_gpus_to_the_preflight(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "4,5")
    monkeypatch.setattr(results, "export_random_encoder", lambda mae, size, chans, out: out / "encoder.safetensors")
    monkeypatch.setattr(results, "run_stage", fake := FakeStage())
    monkeypatch.setattr(run_log, "run_stage", fake)
    assert results.main(["run", "--pool", str(tmp_path / "pool"), "--datasets", str(BREAST), "--out",
                         str(tmp_path / "res"), "--encoders", "enc_a", "--inits", "random", "--jobs", "2",
                         "--num_workers", "0"]) == 0
    preflight = [gpu for name, _, gpu in fake.calls if name.startswith("preflight")]
    assert len(preflight) == 2 and set(preflight) == {"4", "5"}


def test_concurrent_stages_share_the_cpus(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    with stages.shared_cpu_threads(3, 16) as threads:
        assert threads == "5" and os.environ["OMP_NUM_THREADS"] == "5"
    assert "OMP_NUM_THREADS" not in os.environ  # restored
    with stages.shared_cpu_threads(4, 2) as threads:
        assert threads == "1"  # never zero
    with stages.shared_cpu_threads(1, 16) as threads:  # one stage at a time: torch's own default
        assert threads is None and "OMP_NUM_THREADS" not in os.environ
    monkeypatch.setenv("OMP_NUM_THREADS", "7")
    with stages.shared_cpu_threads(3, 16) as threads:  # the user's setting wins
        assert threads is None and os.environ["OMP_NUM_THREADS"] == "7"
    assert os.environ["OMP_NUM_THREADS"] == "7"
