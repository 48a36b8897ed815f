"""The Triton scan reading its inputs through their strides, as a Mamba / Vim block hands them over: B and C as
slices of one projection, u / delta / z channel-last. Values and gradients against the reference or against the
same values passed contiguous; under the Triton interpreter on CPU, compiled on CUDA."""

from __future__ import annotations

import pytest
import torch

from kernels.selective_scan_ref import selective_scan_ref
from kernels.testing import make_scan_inputs

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
VARIANTS = ["v1", "v2", "v3"]


@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("reverse,shared", [(False, True), (True, True), (False, False)])
def test_triton_reads_strided_b_and_c(triton_scan, variant, reverse, shared):
    """B and C as a Mamba block passes them: transposed slices of one (batch, L, dt_rank + 2N) projection, read in
    place (v1 / v2), or C from another tensor (strides differ: copied) with A transposed in memory. Output and every
    gradient as the reference."""
    from kernels.triton_scan_common import position_major

    batch, dim, length, n_state, rank = 2, 6, 13, 4, 3
    inp = make_scan_inputs(batch, dim, length, n_state, groups=None, dtype=torch.float32, seed=11, device=DEVICE)
    x_dbl = torch.cat([torch.randn(batch, length, rank, device=DEVICE), inp["B"].transpose(1, 2),
                       inp["C"].transpose(1, 2)], dim=-1).requires_grad_()
    c_other = inp["C"].clone().requires_grad_()
    B = x_dbl[..., rank:rank + n_state].transpose(1, 2)
    C = x_dbl[..., rank + n_state:].transpose(1, 2) if shared else c_other
    if shared:
        b_t, c_t, strides = position_major(B.unsqueeze(1), C.unsqueeze(1))
        assert b_t.data_ptr() == B.data_ptr() and strides[2] == rank + 2 * n_state  # no copy
    rest = {k: inp[k].detach().requires_grad_() for k in ("u", "delta", "A", "D", "z", "delta_bias")}
    if not shared:  # and A over (N, dim) storage: the kernels read A through its strides too, no copy
        rest["A"] = inp["A"].detach().t().contiguous().t().requires_grad_()
    kw = dict(delta_softplus=True, reverse=reverse)
    cfg = {}
    if variant != "v1":
        fwd, bwd = triton_scan.variant_configs(variant, n_state, length, batch * dim, torch.device(DEVICE))
        cfg = dict(fwd_config=fwd, bwd_config=bwd)
    out = triton_scan.selective_scan_triton(B=B, C=C, **rest, **kw, **cfg)
    ref_rest = {k: v.detach().double().requires_grad_() for k, v in rest.items()}
    ref_B, ref_C = (inp[k].detach().double().requires_grad_() for k in ("B", "C"))
    out_ref = selective_scan_ref(B=ref_B, C=ref_C, **ref_rest, **kw)
    torch.testing.assert_close(out.double(), out_ref, rtol=6e-4, atol=2e-3)
    g = torch.randn(out.shape, device=DEVICE)
    leaves = [x_dbl, *([] if shared else [c_other]), *rest.values()]
    grads = dict(zip(["x_dbl", *([] if shared else ["C"]), *rest], torch.autograd.grad((out * g).sum(), leaves)))
    want = dict(zip(["B", "C", *ref_rest], torch.autograd.grad((out_ref * g.double()).sum(),
                                                               [ref_B, ref_C, *ref_rest.values()])))
    got_B = grads["x_dbl"][..., rank:rank + n_state].transpose(1, 2)
    got_C = grads["x_dbl"][..., rank + n_state:].transpose(1, 2) if shared else grads["C"]
    assert not grads["x_dbl"][..., :rank].any()  # the dt columns get no gradient from the scan
    for name, got in (("B", got_B), ("C", got_C), *((k, grads[k]) for k in rest)):
        torch.testing.assert_close(got.double(), want[name], rtol=5e-3, atol=1e-2,
                                   msg=lambda m, n=name: f"grad of {n}: {m}")


@pytest.mark.parametrize("variant", ["defaults", *VARIANTS])
@pytest.mark.parametrize("reverse,dtype", [(False, torch.float32), (True, torch.bfloat16)])
def test_triton_reads_channel_last_u_delta_and_z_in_place(triton_scan, variant, reverse, dtype):
    """u, delta and z as a Vim block hands them over: (batch, dim, L) views of channel-last (batch, L, dim) memory, z
    half of a wider projection output, and the output's gradient channel-last too. The v1 / v2 kernels read and
    write them through their strides with no full-size copy (v3 copies to contiguous); output and every gradient
    equal those of the same values passed contiguous."""
    from torch.utils._python_dispatch import TorchDispatchMode

    batch, dim, length, n_state = 2, 6, 13, 4
    inp = make_scan_inputs(batch, dim, length, n_state, groups=None, dtype=dtype, seed=21, device=DEVICE)
    # (batch, L, dim) leaves for u and delta; z the second half of a (batch, L, 2 dim) one (x and z of in_proj).
    leaves = {"u": inp["u"].transpose(1, 2).contiguous().requires_grad_(),
              "delta": inp["delta"].transpose(1, 2).contiguous().requires_grad_(),
              "xz": torch.cat([torch.randn_like(inp["z"]), inp["z"]], dim=1).transpose(1, 2).contiguous()
              .requires_grad_()}
    rest = {k: inp[k].detach().requires_grad_() for k in ("A", "B", "C", "D", "delta_bias")}
    u, delta = leaves["u"].transpose(1, 2), leaves["delta"].transpose(1, 2)
    z = leaves["xz"].transpose(1, 2)[:, dim:]
    cfg = {}
    if variant == "defaults":
        # The contiguous call below gets the tiles that the channel-last defaults chose (CHANNEL_LAST_FORWARD).
        fwd, bwd = triton_scan.launch_configs(n_state, length, None, None, rows=batch * dim, channel_last=True,
                                              multiprocessors=triton_scan.multiprocessor_count(torch.device(DEVICE)))
    else:
        fwd, bwd = triton_scan.variant_configs(variant, n_state, length, batch * dim, torch.device(DEVICE))
        cfg = dict(fwd_config=fwd, bwd_config=bwd)
    kw = dict(delta_softplus=True, reverse=reverse, **cfg)
    g = torch.randn(batch, length, dim, device=DEVICE).to(dtype).transpose(1, 2)  # channel-last gradient

    class CountCopies(TorchDispatchMode):
        copies = 0

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            out = func(*args, **(kwargs or {}))
            # (The interpreter's own host copies of kernel arguments are flat byte buffers: not counted.)
            if func.overloadpacket in (torch.ops.aten.clone, torch.ops.aten.copy_) and out.dim() == 3 \
                    and out.numel() >= batch * dim * length:
                CountCopies.copies += 1
            return out

    with CountCopies():
        out = triton_scan.selective_scan_triton(u, delta, z=z, **rest, **kw)
        grads = torch.autograd.grad((out.float() * g.float()).sum(), [*leaves.values(), *rest.values()])
    strided = variant in ("defaults", "v1", "v2")
    assert (CountCopies.copies == 0) == strided, CountCopies.copies
    if strided:
        assert out.stride() == u.stride()  # written channel-last
    plain = {k: inp[k].detach().contiguous().requires_grad_() for k in ("u", "delta", "z")}
    want = triton_scan.selective_scan_triton(plain["u"], plain["delta"], z=plain["z"], **rest,
                                             **{**kw, "fwd_config": fwd, "bwd_config": bwd})
    want_grads = torch.autograd.grad((want.float() * g.float()).sum(), [*plain.values(), *rest.values()])
    torch.testing.assert_close(out, want, rtol=0, atol=0)
    d_u, d_delta, d_xz = (t.transpose(1, 2) for t in grads[:3])
    assert not d_xz[:, :dim].any()
    for name, got, ref in (("u", d_u, want_grads[0]), ("delta", d_delta, want_grads[1]),
                           ("z", d_xz[:, dim:], want_grads[2]), *zip(rest, grads[3:], want_grads[3:])):
        torch.testing.assert_close(got, ref, rtol=0, atol=0, msg=lambda m, n=name: f"grad of {n}: {m}")


def test_with_strides_returns_the_tensor_itself_or_one_copy_in_the_given_strides():
    from kernels.strides import with_strides

    t = torch.randn(2, 3, 5, requires_grad=True)
    assert with_strides(t, t.stride()) is t
    channel_last = (15, 1, 3)
    moved = with_strides(t, channel_last)
    assert moved.stride() == channel_last and torch.equal(moved, t)
    moved.sum().backward()  # differentiable: the copy hands its gradient back
    assert torch.equal(t.grad, torch.ones_like(t))
