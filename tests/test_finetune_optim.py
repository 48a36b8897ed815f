"""LARS, the warmup-cosine schedule and the LR scaling rule shared by linprobe and finetune."""

from __future__ import annotations

import math

import pytest
import torch

from common.transfer.lars import LARS
from common.transfer.schedule import apply_schedule, effective_lr, lr_at


def test_lars_step_matches_hand_computation() -> None:
    torch.manual_seed(0)
    w = torch.nn.Parameter(torch.randn(4, 3))
    b = torch.nn.Parameter(torch.randn(4))
    opt = LARS([w, b], lr=0.5, weight_decay=0.1, momentum=0.9, trust_coefficient=0.01)
    gw, gb = torch.randn(4, 3), torch.randn(4)
    w0, b0 = w.detach().clone(), b.detach().clone()
    for _ in range(2):
        w.grad, b.grad = gw.clone(), gb.clone()
        opt.step()
    # hand computation of two momentum steps
    bw, bb = torch.zeros_like(w0), torch.zeros_like(b0)
    ew, eb = w0.clone(), b0.clone()
    for _ in range(2):
        u = gw + 0.1 * ew
        u = u * (0.01 * ew.norm() / u.norm())
        bw = 0.9 * bw + u
        ew = ew - 0.5 * bw
        bb = 0.9 * bb + gb  # 1-D: no decay, no trust ratio
        eb = eb - 0.5 * bb
    torch.testing.assert_close(w.detach(), ew)
    torch.testing.assert_close(b.detach(), eb)


def test_lars_zero_weight_takes_unscaled_step() -> None:
    w = torch.nn.Parameter(torch.zeros(2, 2))
    opt = LARS([w], lr=1.0, momentum=0.0)
    w.grad = torch.ones(2, 2)
    opt.step()
    torch.testing.assert_close(w.detach(), -torch.ones(2, 2))


def test_lars_rejects_bad_settings() -> None:
    with pytest.raises(ValueError, match="momentum"):
        LARS([torch.nn.Parameter(torch.zeros(1))], momentum=1.5)


def test_schedule_warmup_then_cosine() -> None:
    assert lr_at(0.0, 1.0, 0.0, 10, 90) == 0.0
    assert lr_at(5.0, 1.0, 0.0, 10, 90) == pytest.approx(0.5)
    assert lr_at(10.0, 1.0, 0.1, 10, 90) == pytest.approx(1.0)
    assert lr_at(50.0, 1.0, 0.1, 10, 90) == pytest.approx(0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * 0.5)))
    assert lr_at(90.0, 1.0, 0.1, 10, 90) == pytest.approx(0.1)
    assert lr_at(3.0, 1.0, 0.0, 0, 5) == pytest.approx(0.5 * (1 + math.cos(math.pi * 0.6)))


def test_effective_lr_and_group_scales() -> None:
    assert effective_lr(0.1, None, 512, 2, 4) == pytest.approx(0.1 * 4096 / 256)
    assert effective_lr(0.1, 0.3, 512, 2, 4) == 0.3
    p1, p2 = torch.nn.Parameter(torch.zeros(1)), torch.nn.Parameter(torch.zeros(1))
    opt = torch.optim.SGD([{"params": [p1], "lr_scale": 0.25}, {"params": [p2], "peak_lr": 3.0}], lr=0.0)
    assert apply_schedule(opt, 1.0, 2.0, 0.0, 2, 10) == pytest.approx(1.0)  # half-way through warmup
    assert [g["lr"] for g in opt.param_groups] == pytest.approx([0.25, 1.5])
