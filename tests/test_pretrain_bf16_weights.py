"""``--precision bf16_weights`` (pretrain/master_weights.py): the model in bf16 with float32 master weights in the
optimizer; the masters' bookkeeping, and pretrain/main.py learning, resuming bitwise and exporting the masters."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from pretrain_runs import args, curate_xrays, files_digest

import models
from common.checkpoint import load_weights
from common.logging import read_jsonl
from pretrain.checkpointing import CheckpointMismatch
from pretrain.main import main as pretrain_main
from pretrain.master_weights import MASTER_FILE, MasterWeights
from pretrain.schedule import build_optimizer, param_groups


@pytest.fixture(scope="module")
def curated(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return curate_xrays(tmp_path_factory.mktemp("curated"))


def _mae(name: str) -> torch.nn.Module:
    torch.manual_seed(0)
    return models.create_model(name, img_size=32, in_chans=1, norm_pix_loss=True)


@pytest.mark.parametrize("name", ["mae_test_vit", "mae_test_vim"])
def test_masters_hold_the_float32_weights_and_the_optimizer_steps_them(name: str) -> None:
    model = _mae(name)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    masters = MasterWeights(model)
    params = dict(model.named_parameters())
    kept = {n for n, p in params.items() if getattr(p, "_keep_fp32", False)}
    assert (len(kept) > 0) == (name == "mae_test_vim")  # the Mamba blocks' A_log, D and dt bias
    for n, p in params.items():
        assert p.dtype == (torch.float32 if n in kept else torch.bfloat16), n
        if n in kept:
            assert torch.equal(p, before[n])  # kept, not rounded
    frozen = {n for n, p in params.items() if not p.requires_grad}  # the fixed sin-cos position tables
    assert frozen and set(masters.names) == set(params) - kept - frozen
    for n, m in zip(masters.names, masters.masters):
        assert m.dtype == torch.float32 and torch.equal(m, before[n]) and torch.equal(params[n], m.bfloat16())
    # The optimizer's groups are the model's (same decay split), with the masters in place of the cast weights.
    optimizer = build_optimizer(model, 1e-3, 0.05, fused=False, masters=masters)
    stepped = [{id(p) for p in g["params"]} for g in optimizer.param_groups]
    master_ids = {id(m) for m in masters.masters}
    for group, ids in zip(param_groups(model, 0.05), stepped):
        assert len(group["params"]) == len(ids)
        for p in group["params"]:
            assert (id(p) in ids) == (id(p) not in {id(q) for q in masters.params})
    assert master_ids <= set().union(*stepped)

    # The point of the mode: what passes between the blocks is bf16 (under autocast the ViT residual is float32).
    block_dtypes = set()
    for module in model.modules():
        if type(module).__name__ in ("Block", "VimBlock"):
            module.register_forward_hook(lambda m, i, out: block_dtypes.add((out[0] if isinstance(out, tuple)
                                                                             else out).dtype))
    loss, _, _ = model(torch.randn(4, 1, 32, 32), mask_ratio=0.75)
    assert loss.dtype == torch.float32 and torch.isfinite(loss)
    assert block_dtypes == {torch.bfloat16}
    loss.backward()
    model_grads = {n: params[n].grad.clone() for n in masters.names}
    masters.grads_to_masters()
    for n, p, m in zip(masters.names, masters.params, masters.masters):
        assert p.grad is None and m.grad.dtype == torch.float32 and torch.equal(m.grad, model_grads[n].float())
    optimizer.step()
    masters.masters_to_model()
    moved = 0
    for n, p, m in zip(masters.names, masters.params, masters.masters):
        assert torch.equal(p, m.bfloat16()), n
        moved += not torch.equal(m, before[n])
    assert moved > len(masters.names) // 2
    for n in kept:  # stepped directly, still float32
        assert params[n].dtype == torch.float32 and not torch.equal(params[n], before[n])


def test_masters_save_load_and_refuse_a_foreign_checkpoint(tmp_path: Path) -> None:
    model = _mae("mae_test_vit")
    masters = MasterWeights(model)
    with torch.no_grad():
        for m in masters.masters:
            m.add_(1e-4)  # below a bf16 step of most weights: only the masters hold it
    masters.save(tmp_path)
    values = [m.detach().clone() for m in masters.masters]
    other = _mae("mae_test_vit")
    restored = MasterWeights(other)
    restored.load(tmp_path)
    for v, m, p in zip(values, restored.masters, restored.params):
        assert torch.equal(m, v) and torch.equal(p, v.bfloat16())
    with pytest.raises(CheckpointMismatch, match=f"no {MASTER_FILE}.*bf16_weights"):
        restored.load(tmp_path / "elsewhere")
    vim = MasterWeights(_mae("mae_test_vim"))
    with pytest.raises(CheckpointMismatch, match="no master weights for"):
        vim.load(tmp_path)


def test_bf16_weights_run_learns_resumes_bitwise_and_exports_the_masters(curated: Path, tmp_path: Path) -> None:
    common = {"precision": "bf16_weights", "save_every": 5, "epochs": 4, "data_on_device": None, "clip_grad": 1.0}
    ref = tmp_path / "ref"  # 6 steps per epoch: 24 steps
    assert pretrain_main(args(curated, ref, vis_every=12, vis_samples=2, **common)) == 0
    assert (ref / "vis" / "step_00000024.png").is_file()  # the picture's forward takes the bf16 model too
    losses = [r["loss"] for r in read_jsonl(ref / "log.jsonl") if "loss" in r]
    assert len(losses) == 24 and all(torch.isfinite(torch.tensor(losses)))
    assert sum(losses[-6:]) / 6 < 0.9 * sum(losses[:6]) / 6, losses
    final = ref / "checkpoints" / "step_00000024"
    assert json.loads((final / "train_state.json").read_text())["master_weights"] is True
    # Stopped at step 10 and resumed: the uninterrupted run's model, masters, optimizer and encoder, bit for bit.
    run = tmp_path / "stopped"
    assert pretrain_main(args(curated, run, max_steps=10, **common)) == 0
    assert pretrain_main(args(curated, run, **common)) == 0
    digests = files_digest(run / "checkpoints" / "step_00000024")
    assert MASTER_FILE in digests and digests == files_digest(final)
    assert (ref / "encoder.safetensors").read_bytes() == (run / "encoder.safetensors").read_bytes()
    # The exported encoder is the float32 masters, not the model's rounded bf16 weights.
    masters = load_weights(final / MASTER_FILE)
    encoder = load_weights(ref / "encoder.safetensors")
    compared = 0
    for key, value in encoder.items():
        assert value.dtype == torch.float32, key
        if f"encoder.{key}" in masters:
            assert torch.equal(value, masters[f"encoder.{key}"]), key
            compared += 1
    assert compared > 10
    assert any(not torch.equal(v, v.bfloat16().float()) for v in masters.values())  # finer than bf16


def test_resuming_across_precisions_is_a_one_line_error(curated: Path, tmp_path: Path,
                                                       capfd: pytest.CaptureFixture[str]) -> None:
    autocast_run, bf16_run = tmp_path / "autocast", tmp_path / "bf16"
    assert pretrain_main(args(curated, autocast_run, max_steps=2, save_every=2)) == 0
    assert pretrain_main(args(curated, bf16_run, max_steps=2, save_every=2, precision="bf16_weights")) == 0
    capfd.readouterr()
    assert pretrain_main(args(curated, autocast_run, max_steps=4, precision="bf16_weights")) == 2
    assert "master_weights False there, True now" in capfd.readouterr().out
    assert pretrain_main(args(curated, bf16_run, max_steps=4)) == 2
    assert "master_weights True there, False now" in capfd.readouterr().out
    assert pretrain_main(args(curated, tmp_path / "x", precision="bf16_wieghts")) == 2
    assert "precision must be one of auto, bf16, fp16, no, bf16_weights" in capfd.readouterr().out


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("model", ["mae_test_vit", "mae_test_vim"])
def test_cuda_graphs_with_bf16_weights_match_plain_compile(curated: Path, tmp_path: Path, model: str) -> None:
    """On a GPU: the fused AdamW on the masters, ``--compile`` with and without CUDA graphs, two micro-batches per
    step accumulating bf16 gradients; the graphs run (stopped and resumed, with pictures) ends with the plain
    compiled run's masters."""
    common = {"model": model, "compile": None, "accum_iter": 2, "batch_size": 2, "save_every": 3,
              "precision": "bf16_weights"}
    graphs = {**common, "compile_mode": "reduce-overhead", "vis_every": 3}
    assert pretrain_main(args(curated, tmp_path / "graphs", max_steps=3, **graphs)) == 0
    assert pretrain_main(args(curated, tmp_path / "graphs", max_steps=6, **graphs)) == 0  # --resume auto
    assert pretrain_main(args(curated, tmp_path / "plain", max_steps=6, **common)) == 0
    losses = [r["loss"] for r in read_jsonl(tmp_path / "graphs" / "log.jsonl") if "loss" in r]
    assert len(losses) == 6 and all(torch.isfinite(torch.tensor(losses)))
    assert (tmp_path / "graphs" / "vis" / "step_00000006.png").is_file()
    graphs_masters = load_weights(tmp_path / "graphs" / "checkpoints" / "step_00000006" / MASTER_FILE)
    plain_masters = load_weights(tmp_path / "plain" / "checkpoints" / "step_00000006" / MASTER_FILE)
    for key, value in plain_masters.items():
        torch.testing.assert_close(graphs_masters[key], value, rtol=1e-3, atol=1e-4, msg=key)


def test_bf16_weights_loss_curve_follows_float32(curated: Path, tmp_path: Path) -> None:
    """100 steps of the same run in float32 and with bf16 weights: the curves agree to a fraction of a percent
    (bf16 rounding only). Masters not rounded back into the model, or gradients dropped or left over from an
    earlier step, would part them by far more. (On this machine, fortieth session: last-quarter means 0.7876 float32, 0.7875 bf16 autocast, 0.7875
    bf16 weights; Vim 0.7514 / 0.7514 / 0.7515.)"""
    common = {"batch_size": 8, "epochs": 34, "max_steps": 100, "data_on_device": None}
    curves = {}
    for precision in ("no", "bf16_weights"):
        out = tmp_path / precision
        assert pretrain_main(args(curated, out, precision=precision, **common)) == 0
        curves[precision] = [r["loss"] for r in read_jsonl(out / "log.jsonl") if "loss" in r]
    last = {k: sum(v[-25:]) / 25 for k, v in curves.items()}
    first = sum(curves["no"][:10]) / 10
    assert last["no"] < 0.8 * first  # it learned
    assert abs(last["bf16_weights"] - last["no"]) < 0.005 * last["no"], last
