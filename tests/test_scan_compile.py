"""The Triton scan as torch.library custom ops: torch.compile traces through it without graph breaks, and the
compiled and eager results (output, last state, every gradient) agree. CPU: kernels under the interpreter."""

from __future__ import annotations

import os

import pytest
import torch

import models
from kernels import selective_scan_fn
from kernels.testing import make_scan_inputs

HAS_CUDA = torch.cuda.is_available()
DEVICE = "cuda" if HAS_CUDA else "cpu"
GRAD_NAMES = ("u", "delta", "A", "B", "C", "D", "z", "delta_bias")


@pytest.fixture(autouse=True)
def _triton_ready():
    pytest.importorskip("triton")
    if not HAS_CUDA and os.environ.get("TRITON_INTERPRET") != "1":
        pytest.fail("no CUDA and TRITON_INTERPRET is not 1: run through pytest with tests/conftest.py")
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


def _scan(reverse: bool, with_optional: bool):
    def run(u, delta, A, B, C, D, z, delta_bias):
        out, last = selective_scan_fn(u, delta, A, B, C, D, z, delta_bias, delta_softplus=True,
                                      return_last_state=True, reverse=reverse, backend="triton")
        # a torch op on each side of the custom op, so the graph has something to fuse around it
        return (out.float() * 2).sum() + last.square().sum()
    return run


@pytest.mark.parametrize("reverse, with_optional, groups", [(False, True, 1), (True, True, 2), (False, False, 1)])
def test_fullgraph_compile_matches_eager_with_gradients(reverse: bool, with_optional: bool, groups: int) -> None:
    inputs = make_scan_inputs(2, 8, 11, 4, groups=groups, dtype=torch.float32, seed=3, device=DEVICE,
                              requires_grad=True, with_optional=with_optional)
    args = [inputs[k] for k in GRAD_NAMES]
    fn = _scan(reverse, with_optional)
    eager = fn(*args)
    eager_grads = torch.autograd.grad(eager, [a for a in args if a is not None])
    # fullgraph=True raises on any graph break; aot_eager also traces the backward through the custom ops
    compiled = torch.compile(fn, fullgraph=True, backend="aot_eager")(*args)
    compiled_grads = torch.autograd.grad(compiled, [a for a in args if a is not None])
    torch.testing.assert_close(compiled, eager, rtol=1e-5, atol=1e-5)
    for got, want in zip(compiled_grads, eager_grads):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


def test_the_ops_pass_torch_library_checks() -> None:
    """Schemas, fake (meta) implementations and the autograd registration are consistent with the real op."""
    from kernels.selective_scan_triton import config_to_ints, selective_scan_fwd_op
    from kernels.triton_scan_common import default_launch_config

    inputs = make_scan_inputs(1, 4, 6, 2, groups=None, dtype=torch.float32, seed=1, device=DEVICE,
                              requires_grad=True, with_optional=True)
    grouped = {k: (v.unsqueeze(1).detach().requires_grad_() if k in ("B", "C") else v) for k, v in inputs.items()}
    fwd = config_to_ints(default_launch_config(2, 6, backward=False))
    args = (*[grouped[k] for k in GRAD_NAMES], True, False, True, fwd, [])
    torch.library.opcheck(selective_scan_fwd_op, args,
                          test_utils=("test_schema", "test_faketensor", "test_autograd_registration"))


@pytest.mark.parametrize("conv_backend", ["auto", "triton"])
def test_tiny_vim_has_no_graph_break_with_the_triton_scan(conv_backend: str) -> None:
    torch.manual_seed(0)
    mae = models.create_model("mae_test_vim", img_size=32, in_chans=1).to(DEVICE)
    mae.encoder.set_scan_backend("triton")
    for module in mae.modules():
        if hasattr(module, "conv_backend"):
            module.conv_backend = conv_backend
    imgs = torch.randn(2, 1, 32, 32, device=DEVICE)
    noise = torch.rand(2, mae.num_patches, device=DEVICE)
    explanation = torch._dynamo.explain(mae)(imgs, noise=noise)
    reasons = [f"{b.reason} at {[str(frame) for frame in b.user_stack[-2:]]}" for b in explanation.break_reasons]
    assert explanation.graph_break_count == 0, reasons
    assert explanation.graph_count == 1


@pytest.mark.parametrize("config", [None, (8, 4, None, False, "v1"), (16, 2, 200, True, "v2"),
                                    (32, 4, None, False, "v3", 4, 256, 32)])
def test_launch_configs_survive_the_op_boundary(config) -> None:
    from kernels.selective_scan_triton import config_from_ints, config_to_ints
    from kernels.triton_scan_common import ScanLaunchConfig

    cfg = None if config is None else ScanLaunchConfig(*config)
    assert config_from_ints(config_to_ints(cfg)) == cfg


def test_eager_calls_skip_the_custom_op_dispatch() -> None:
    """Eager mode runs the kernels through a plain autograd.Function (the custom ops' dispatch is host time a
    short scan cannot afford); without a backward to come there is no autograd node at all."""
    inputs = make_scan_inputs(2, 8, 11, 4, groups=None, dtype=torch.float32, seed=5, device=DEVICE,
                              requires_grad=True, with_optional=True)
    args = [inputs[k] for k in GRAD_NAMES]
    out = selective_scan_fn(*args, delta_softplus=True, backend="triton")
    assert type(out.grad_fn).__name__ == "_EagerScanBackward"
    with torch.no_grad():
        assert selective_scan_fn(*args, delta_softplus=True, backend="triton").grad_fn is None
    # dB and dC come back contiguous in their inputs' dtype, as two halves of one buffer (one cast) that do not
    # overlap; under torch.compile the custom op hands back separate storages (test_custom_op_outputs_never_alias)
    out.float().square().sum().backward()
    dB, dC = inputs["B"].grad, inputs["C"].grad
    assert dB.is_contiguous() and dC.is_contiguous() and dB.dtype == dC.dtype == torch.float32
    assert abs(dC.data_ptr() - dB.data_ptr()) >= dB.numel() * dB.element_size()


def test_custom_op_outputs_never_alias() -> None:
    """The backward custom op (what torch.compile runs) returns no two gradients in one storage, though the eager
    backward's dB / dC and dA / dD / ddelta_bias share buffers."""
    from kernels.selective_scan_triton import (
        config_to_ints,
        launch_configs,
        selective_scan_bwd_op,
        selective_scan_fwd_op,
    )

    inputs = make_scan_inputs(2, 8, 11, 4, groups=None, dtype=torch.float32, seed=5, device=DEVICE,
                              with_optional=True)
    u, delta, A, B, C, D, z, bias = (inputs[k] for k in GRAD_NAMES)
    B, C = B.unsqueeze(1), C.unsqueeze(1)
    fwd = config_to_ints(launch_configs(4, 11, None, None)[0])
    _, _, states = selective_scan_fwd_op(u, delta, A, B, C, D, z, bias, True, False, True, fwd, [])
    grads = selective_scan_bwd_op(u, delta, A, B, C, D, z, bias, torch.randn_like(u), states, None, True, False,
                                  fwd[1], [])
    storages = [g.untyped_storage().data_ptr() for g in grads]
    assert len(set(storages)) == len(grads)
