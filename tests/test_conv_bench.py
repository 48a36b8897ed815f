"""bench/conv.py on the CPU: the inputs in a Vim block's layout and one timed row per backend (CPU time stands in
for kernel time)."""

from __future__ import annotations

import pytest
import torch

from bench.conv import main, make_inputs, time_conv


def test_inputs_come_channel_last_as_a_vim_block_hands_them_over():
    x, weight, bias, dout = make_inputs(2, 8, 10, channel_last=True, device="cpu")
    assert x.is_leaf and x.requires_grad and x.stride() == (160, 1, 16)  # half of a (2, 10, 16) projection
    assert dout.stride() == (80, 1, 8) and x.dtype == dout.dtype == torch.bfloat16
    assert weight.dtype == bias.dtype == torch.float32
    x, _, _, dout = make_inputs(2, 8, 10, channel_last=False, device="cpu")
    assert x.is_contiguous() and dout.is_contiguous()


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_one_row_per_backend_times_forward_and_backward(backend):
    # On the CPU the Triton conv runs under the interpreter (tests/conftest.py); with a GPU, compiled on it.
    times = time_conv(backend, 2, 8, 10, channel_last=True, reverse=backend == "triton",
                      device=torch.cuda.is_available())
    assert set(times) == {"fwd_ms", "fwd_bwd_ms", "fwd_GBps", "fwd_bwd_GBps"}
    # Both timed, nothing about their order: on a shared CPU (two test workers) one slow forward can outlast a
    # forward+backward, and speed belongs in benchmarks, not in tests.
    assert times["fwd_ms"] > 0 and times["fwd_bwd_ms"] > 0
    assert times["fwd_GBps"] == pytest.approx(2 * 2 * 2 * 8 * 10 / times["fwd_ms"] / 1e6)


def test_needs_a_gpu_for_the_table():
    if torch.cuda.is_available():
        pytest.skip("a GPU is present")
    with pytest.raises(SystemExit, match="needs a CUDA GPU"):
        main([])


def test_rows_are_written_with_the_device_and_torch_version(tmp_path, monkeypatch):
    import json

    from bench.report import write_device_rows

    monkeypatch.setattr(torch.cuda, "get_device_name", lambda *a: "NVIDIA H100 80GB HBM3")
    path = write_device_rows(tmp_path / "rows.json", [{"backend": "triton", "fwd_ms": 0.02}])
    assert json.loads(path.read_text()) == {"device": "NVIDIA H100 80GB HBM3", "torch": torch.__version__,
                                            "rows": [{"backend": "triton", "fwd_ms": 0.02}]}


def test_an_explicit_triton_launch_is_timed_directly():
    from kernels.triton_causal_conv1d import conv_launch

    launch = conv_launch(2, 8, 10, channel_last=True, num_warps=1, max_chunk=4)
    times = time_conv("triton", 2, 8, 10, channel_last=True, device=torch.cuda.is_available(), launch=launch)
    assert times["fwd_ms"] > 0 and times["fwd_bwd_ms"] > 0
