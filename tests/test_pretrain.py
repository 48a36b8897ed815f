"""pretrain/main.py end to end on shards curated from real X-rays: learning, exact resume after SIGKILL,
preemption (SIGUSR1 -> checkpoint + exit 75), the non-finite stop, configuration merging and the schedule."""

from __future__ import annotations

import json
import math
import re
import signal
from pathlib import Path

import pytest
import torch
from PIL import Image
from pretrain_runs import args, curate_xrays, files_digest, spawn, wait_for

from common.config import ConfigError, load_yaml, parse_config
from common.logging import read_jsonl
from pretrain.config import DEMO_CONFIG, PretrainConfig
from pretrain.main import main as pretrain_main
from pretrain.schedule import Schedule, param_groups


@pytest.fixture(scope="module")
def curated(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return curate_xrays(tmp_path_factory.mktemp("curated"))


def test_end_to_end_loss_falls_and_outputs(curated: Path, tmp_path: Path) -> None:
    out = tmp_path / "run"
    rc = pretrain_main(args(curated, out, batch_size=8, epochs=17, max_steps=50, vis_every=25, vis_samples=3,
                            num_workers=2))
    assert rc == 0
    records = [r for r in read_jsonl(out / "log.jsonl") if "loss" in r]
    losses = [r["loss"] for r in records]
    assert len(losses) == 50 and all(torch.isfinite(torch.tensor(losses)))
    assert sum(losses[-10:]) / 10 < 0.9 * sum(losses[:10]) / 10, losses
    assert records[-1]["step"] == 50 and records[0]["img_per_s"] > 0 and records[0]["tflops_per_gpu"] > 0
    assert (out / "checkpoints" / "step_00000050" / "model.safetensors").is_file()
    assert load_yaml(out / "config.yaml")["max_steps"] == 50
    meta = json.loads((out / "encoder.json").read_text())
    assert meta["model"] == "test_vit" and meta["in_chans"] == 1 and (out / "encoder.safetensors").is_file()
    for step in (25, 50):
        with Image.open(out / "vis" / f"step_{step:08d}.png") as img:
            assert img.mode == "L" and img.height > 3 * 96 and img.width > 4 * 96  # 3 rows x 4 panels


def test_sigkill_then_resume_is_bitwise_exact(curated: Path, tmp_path: Path) -> None:
    common = {"save_every": 5, "num_workers": 2, "epochs": 4}  # 6 steps/epoch -> 24 steps
    ref = tmp_path / "ref"
    assert pretrain_main(args(curated, ref, **common)) == 0
    run = tmp_path / "killed"
    proc = spawn(args(curated, run, **common))
    wait_for(lambda: (run / "checkpoints" / "step_00000005" / "train_state.json").is_file(), proc)
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=30)
    assert proc.returncode == -signal.SIGKILL
    assert not (run / "encoder.safetensors").exists()  # it really stopped before the end
    assert pretrain_main(args(curated, run, **common)) == 0  # --resume auto
    final_ref, final_run = ref / "checkpoints" / "step_00000024", run / "checkpoints" / "step_00000024"
    assert files_digest(final_ref) == files_digest(final_run)
    assert (ref / "encoder.safetensors").read_bytes() == (run / "encoder.safetensors").read_bytes()
    resumed = [r for r in read_jsonl(run / "log.jsonl") if "loss" in r and r["step"] > 5]
    reference = {r["step"]: r["loss"] for r in read_jsonl(ref / "log.jsonl") if "loss" in r}
    assert all(reference[r["step"]] == r["loss"] for r in resumed)


def test_data_on_device_learns_and_resumes_exactly(curated: Path, tmp_path: Path,
                                                  capfd: pytest.CaptureFixture[str]) -> None:
    """--data_on_device: the split decoded once and cut into batches in place; a run stopped by --max_steps and
    resumed (with another worker count, which must not matter here) ends with the uninterrupted run's weights."""
    common = {"save_every": 5, "epochs": 4, "data_on_device": None}  # 6 steps/epoch -> 24 steps
    ref = tmp_path / "ref"
    assert pretrain_main(args(curated, ref, num_workers=2, **common)) == 0
    assert "data on cpu: 24 samples" in capfd.readouterr().out  # the resident path ran, not the streaming one
    losses = [r["loss"] for r in read_jsonl(ref / "log.jsonl") if "loss" in r]
    assert len(losses) == 24 and all(torch.isfinite(torch.tensor(losses)))
    run = tmp_path / "stopped"
    assert pretrain_main(args(curated, run, num_workers=2, max_steps=10, **common)) == 0
    assert pretrain_main(args(curated, run, num_workers=0, **common)) == 0
    final = "step_00000024"
    assert files_digest(ref / "checkpoints" / final) == files_digest(run / "checkpoints" / final)
    assert (ref / "encoder.safetensors").read_bytes() == (run / "encoder.safetensors").read_bytes()
    capfd.readouterr()
    assert pretrain_main(args(curated, tmp_path / "big", data_on_device_max_gb=1e-6, **common)) == 2
    said = capfd.readouterr().out
    assert "over --data_on_device_max_gb" in said and "24 uint8 1x32x32 canvases" in said


def test_compiled_run_trains_the_same_model_and_resumes(curated: Path, tmp_path: Path) -> None:
    """``--compile`` (inductor, on the CPU here) compiles in place: checkpoints and the exported encoder keep the
    eager model's names, its steps follow the eager run's (to float32 rounding of the fused kernels), and a
    compiled run resumes from its own checkpoint (the path the GPU benchmarks' compiled rows take)."""
    from common.checkpoint import load_weights

    common = {"max_steps": 4, "data_on_device": None, "save_every": 2}
    assert pretrain_main(args(curated, tmp_path / "eager", **common)) == 0
    assert pretrain_main(args(curated, tmp_path / "compiled", compile=None, max_steps=2,
                              **{k: v for k, v in common.items() if k != "max_steps"})) == 0
    assert pretrain_main(args(curated, tmp_path / "compiled", compile=None, **common)) == 0  # --resume auto
    eager = load_weights(tmp_path / "eager" / "encoder.safetensors")
    compiled = load_weights(tmp_path / "compiled" / "encoder.safetensors")
    assert eager.keys() == compiled.keys() and not any("_orig_mod" in k for k in compiled)
    for key in eager:
        torch.testing.assert_close(compiled[key], eager[key], rtol=1e-3, atol=1e-4)
    steps = [r["step"] for r in read_jsonl(tmp_path / "compiled" / "log.jsonl") if "loss" in r]
    assert steps[-1] == 4


def test_micro_step_loss_is_a_copy_of_the_model_output() -> None:
    """Under CUDA graphs (``--compile_mode reduce-overhead``) the model's loss lives in the graph's memory pool,
    which the next micro-batch's replay overwrites: the loss a micro-step hands back (summed over ``accum_iter``
    micro-batches, then read at the next check) must not share its storage."""
    from types import SimpleNamespace

    from pretrain.engine import _micro_step

    class _Acc:
        device, process_index, sync_gradients = torch.device("cpu"), 0, True

        def accumulate(self, model):
            return torch.enable_grad()

        def backward(self, loss):
            loss.backward()

    class _Model(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.w = torch.nn.Parameter(torch.ones(()))
            self.outputs = []

        def forward(self, x, mask_ratio, noise):
            loss = self.w * x.mean()
            self.outputs.append(loss)
            return loss, None, None

    cfg = PretrainConfig(input_size=8, in_chans=1)
    model = _Model()
    ctx = SimpleNamespace(cfg=cfg, accelerator=_Acc(), model=model, mean=[0.5], std=[0.25], cuda_graphs=False,
                          masters=None, optimizer=torch.optim.SGD(model.parameters(), lr=0.0))
    batch = {"image": torch.full((2, 1, 8, 8), 100, dtype=torch.uint8), "size": torch.tensor([[8, 8], [8, 8]])}
    loss, _ = _micro_step(ctx, batch, step=0, micro=0, num_patches=4)
    assert loss.dtype == torch.float32 and loss.untyped_storage().data_ptr() != \
        model.outputs[0].untyped_storage().data_ptr()
    torch.testing.assert_close(loss, model.outputs[0].detach())


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("model", ["mae_test_vit", "mae_test_vim"])
def test_cuda_graphs_accumulate_like_plain_compile(curated: Path, tmp_path: Path, model: str) -> None:
    """``--compile_mode reduce-overhead`` (CUDA graphs) through the real loop on a GPU, with two micro-batches per
    step: the run (stopped at step 3 and resumed, with a picture at another batch size on the way) ends with the
    weights of a plain ``--compile`` run. Gradients the graphs overwrote between micro-batches (the torch bug the
    loop works around) would move the weights by about the learning rate, far outside the tolerance."""
    from common.checkpoint import load_weights

    common = {"model": model, "compile": None, "accum_iter": 2, "batch_size": 2, "save_every": 3}
    graphs = {**common, "compile_mode": "reduce-overhead", "vis_every": 3}
    assert pretrain_main(args(curated, tmp_path / "graphs", max_steps=3, **graphs)) == 0
    assert pretrain_main(args(curated, tmp_path / "graphs", max_steps=6, **graphs)) == 0  # --resume auto
    assert pretrain_main(args(curated, tmp_path / "plain", max_steps=6, **common)) == 0
    losses = [r["loss"] for r in read_jsonl(tmp_path / "graphs" / "log.jsonl") if "loss" in r]
    assert len(losses) == 6 and all(map(math.isfinite, losses))
    assert (tmp_path / "graphs" / "vis" / "step_00000006.png").is_file()
    graphs_weights = load_weights(tmp_path / "graphs" / "encoder.safetensors")
    plain_weights = load_weights(tmp_path / "plain" / "encoder.safetensors")
    for key in plain_weights:
        torch.testing.assert_close(graphs_weights[key], plain_weights[key], rtol=1e-3, atol=1e-4, msg=key)


def test_sigusr1_saves_and_exits_75(curated: Path, tmp_path: Path) -> None:
    out = tmp_path / "pre"
    proc = spawn(args(curated, out, epochs=100))
    wait_for(lambda: (out / "log.jsonl").is_file() and len(read_jsonl(out / "log.jsonl")) >= 2, proc)
    proc.send_signal(signal.SIGUSR1)
    assert proc.wait(timeout=60) == 75
    event = read_jsonl(out / "log.jsonl")[-1]
    assert event["event"] == "preempted"
    ckpt = Path(event["checkpoint"])
    assert json.loads((ckpt / "train_state.json").read_text())["step"] == event["step"] >= 2


def test_non_finite_loss_stops_without_touching_last_checkpoint(curated: Path, tmp_path: Path) -> None:
    out = tmp_path / "nan"
    assert pretrain_main(args(curated, out, max_steps=4, save_every=2)) == 0
    ckpt = out / "checkpoints" / "step_00000004"
    before = files_digest(ckpt)
    rc = pretrain_main(args(curated, out, max_steps=60, save_every=1000, lr=1e30))
    assert rc == 1
    event = read_jsonl(out / "log.jsonl")[-1]
    assert event["event"] == "non_finite_loss"
    assert re.search(rf"at step {event['step']} .*lr [0-9.]+e\+(29|30)", event["message"]), event["message"]
    assert str(ckpt) in event["message"]
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["step_00000002", "step_00000004"]
    assert files_digest(ckpt) == before


def test_non_finite_loss_between_checks_stops_before_the_next_save(curated: Path, tmp_path: Path) -> None:
    """Losses are read only at checks (every log_every steps and before saves): a NaN in between is still caught
    before the next checkpoint, and the message names the first bad step, not the check step."""
    out = tmp_path / "nan_between"
    assert pretrain_main(args(curated, out, max_steps=4, save_every=2)) == 0
    ckpt = out / "checkpoints" / "step_00000004"
    before = files_digest(ckpt)
    # resumed at step 4: the first check is the save at step 8; lr 1e30 makes the loss non-finite from step 6 on
    rc = pretrain_main(args(curated, out, max_steps=60, save_every=8, log_every=10, lr=1e30))
    assert rc == 1
    records = read_jsonl(out / "log.jsonl")
    event = records[-1]
    assert event["event"] == "non_finite_loss"
    assert 5 <= event["step"] < 8, event
    assert f"at step {event['step']} (found at the check after step 8)" in event["message"], event["message"]
    assert str(ckpt) in event["message"]
    assert max(r["step"] for r in records if "loss" in r) == 4  # nothing logged by the failing run either
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["step_00000002", "step_00000004"]
    assert files_digest(ckpt) == before


def test_resume_into_another_models_folder_is_a_one_line_error(curated: Path, tmp_path: Path,
                                                                capfd: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "run"
    assert pretrain_main(args(curated, out, max_steps=2, save_every=2)) == 0
    capfd.readouterr()
    assert pretrain_main(args(curated, out, model="mae_test_vim", max_steps=4)) == 2
    said = capfd.readouterr().out
    assert "written by another run: model 'mae_test_vit' there, 'mae_test_vim' now" in said
    assert "Missing key" not in said
    assert pretrain_main(args(curated, out, input_size=48, max_steps=4)) == 2
    assert "input_size 32 there, 48 now" in capfd.readouterr().out


def test_model_names_are_checked_before_anything_runs(curated: Path, tmp_path: Path,
                                                      capfd: pytest.CaptureFixture[str]) -> None:
    assert pretrain_main(args(curated, tmp_path / "a", model="mae_test_vti")) == 2
    assert "--model: unknown model 'mae_test_vti'; similar: mae_test_vit" in capfd.readouterr().out
    assert pretrain_main(args(curated, tmp_path / "b", model="test_vit")) == 2
    assert "is an encoder model, not an MAE: pretraining takes an mae_* name (here mae_test_vit)" in \
        capfd.readouterr().out
    assert not (tmp_path / "a").exists() and not (tmp_path / "b").exists()  # stopped before the output folder


def test_attention_backend_flag_trains_the_same_model(curated: Path, tmp_path: Path,
                                                      capfd: pytest.CaptureFixture[str],
                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    """--attention_backend triton (here interpreted on the CPU) puts every attention block, encoder and decoder, on
    kernels/triton_attention.py: the same losses as SDPA's up to float32 rounding, the choice kept in config.yaml;
    the default, auto, runs ours on CUDA and SDPA on the CPU, bitwise as that run; an unknown backend, or triton with
    neither CUDA nor the interpreter, is a one-line error before any step."""
    import kernels.triton_attention as attention

    common = {"max_steps": 3, "batch_size": 4}
    original = attention.packed_attention_bwd
    launches = {}
    for run, flags in (("sdpa", {"attention_backend": "sdpa"}), ("triton", {"attention_backend": "triton"}),
                       ("default", {})):
        calls: list[int] = []

        def counted(*a, calls: list[int] = calls, **k):  # noqa: ANN002, ANN003, ANN202
            calls.append(1)
            return original(*a, **k)

        monkeypatch.setattr(attention, "packed_attention_bwd", counted)
        assert pretrain_main(args(curated, tmp_path / run, **flags, **common)) == 0
        launches[run] = len(calls)
    monkeypatch.undo()
    auto_runs = "triton" if torch.cuda.is_available() else "sdpa"  # auto: ours on CUDA, SDPA on the CPU
    assert launches["sdpa"] == 0 and launches["triton"] > 0 and launches["default"] == launches[auto_runs]
    losses = {run: [r["loss"] for r in read_jsonl(tmp_path / run / "log.jsonl") if "loss" in r]
              for run in ("sdpa", "triton", "default")}
    sdpa, triton = losses["sdpa"], losses["triton"]
    assert len(sdpa) == len(triton) == 3
    assert load_yaml(tmp_path / "default" / "config.yaml")["attention_backend"] == "auto"
    assert losses["default"] == losses[auto_runs]  # bitwise the run of the backend auto chose
    rel = 2e-2 if torch.cuda.is_available() else 1e-4  # bf16 autocast on CUDA, float32 on the CPU
    assert triton == pytest.approx(sdpa, rel=rel, abs=1e-6)  # other kernels, same model
    assert load_yaml(tmp_path / "triton" / "config.yaml")["attention_backend"] == "triton"
    capfd.readouterr()
    assert pretrain_main(args(curated, tmp_path / "bad", attention_backend="flash")) == 2
    assert "attention_backend must be one of sdpa, triton, auto, got 'flash'" in capfd.readouterr().out
    assert not (tmp_path / "bad").exists()
    if not torch.cuda.is_available():  # no CUDA and no interpreter: said before the first step
        with pytest.MonkeyPatch.context() as env:
            env.delenv("TRITON_INTERPRET", raising=False)
            assert pretrain_main(args(curated, tmp_path / "cpu", attention_backend="triton", **common)) == 2
        assert "--attention_backend triton needs a CUDA device" in capfd.readouterr().out
        assert not (tmp_path / "cpu" / "log.jsonl").exists()


def test_config_merging_defaults_yaml_flags(tmp_path: Path) -> None:
    cfg = parse_config(PretrainConfig, ["--config", str(DEMO_CONFIG), "--batch_size", "7", "--no-norm_pix_loss"])
    demo = load_yaml(DEMO_CONFIG)
    assert cfg.batch_size == 7 and cfg.norm_pix_loss is False  # flags beat YAML
    assert cfg.model == demo["model"] and cfg.input_size == demo["input_size"]  # YAML beats defaults
    assert cfg.weight_decay == 0.05 and cfg.resume == "auto"  # MAE defaults where neither sets them
    bad = tmp_path / "bad.yaml"
    bad.write_text("batch_sise: 3\n")
    with pytest.raises(ConfigError, match="unknown key 'batch_sise'"):
        parse_config(PretrainConfig, ["--config", str(bad)])
    assert pretrain_main(["--data_path", str(tmp_path / "missing"), "--output_dir", str(tmp_path / "o")]) == 2


def test_schedule_and_weight_decay_groups() -> None:
    import models

    sched = Schedule(lr=1.0, min_lr=0.1, warmup_steps=10, total_steps=110)
    assert sched.lr_at(0) == 0 and sched.lr_at(5) == 0.5 and sched.lr_at(10) == 1.0
    assert sched.lr_at(60) == pytest.approx(0.55) and sched.lr_at(110) == pytest.approx(0.1)
    mae = models.create_model("mae_test_vit", img_size=32, in_chans=1)
    no_decay, decay = param_groups(mae, 0.05)
    names = {id(p): n for n, p in mae.named_parameters()}
    nd = {names[id(p)] for p in no_decay["params"]}
    trainable = {n for n, p in mae.named_parameters() if p.requires_grad}
    assert "encoder.cls_token" in nd and "mask_token" in nd
    assert mae.no_weight_decay() & trainable <= nd
    assert all(n.endswith(".bias") or "norm" in n or n in mae.no_weight_decay() or n.endswith("token") for n in nd)
    assert all(p.ndim >= 2 for p in decay["params"]) and decay["weight_decay"] == 0.05


def test_compile_in_place_turns_the_autograd_cache_off_unless_the_environment_says(monkeypatch) -> None:
    """A forward+backward loaded from AOTAutograd's cache stepped 1.4x slower on an H100 (host time): compiling
    for pretraining turns that cache off, but a user's TORCHINDUCTOR_AUTOGRAD_CACHE wins."""
    from torch._functorch import config as functorch_config

    from common.torch_compile import AUTOGRAD_CACHE_ENV, compile_in_place

    monkeypatch.setattr(functorch_config, "enable_autograd_cache", True)
    monkeypatch.delenv(AUTOGRAD_CACHE_ENV, raising=False)
    model = torch.nn.Linear(2, 2)
    compile_in_place(model, "default")
    assert functorch_config.enable_autograd_cache is False and model._compiled_call_impl is not None
    monkeypatch.setattr(functorch_config, "enable_autograd_cache", True)
    monkeypatch.setenv(AUTOGRAD_CACHE_ENV, "1")
    compile_in_place(torch.nn.Linear(2, 2), "default")
    assert functorch_config.enable_autograd_cache is True
