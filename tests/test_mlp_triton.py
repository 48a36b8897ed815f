"""The MLP's fused fc1 + GELU (kernels/triton_mlp.py): output and every gradient against the float64 definition,
the GELU-gradient kernel's stored values and bias sums, the custom ops' registration and FLOP counts, and
``models.layers.Mlp`` on each backend; interpreted on CPU, compiled on CUDA."""

from __future__ import annotations

import os

import pytest
import torch

triton = pytest.importorskip("triton")

from kernels.triton_mlp import gelu_grad, linear_gelu_fwd_op, linear_gelu_ref, linear_gelu_triton  # noqa: E402
from models.layers import Mlp, mlp_kernel, set_backend  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
TOLERANCES = {torch.float32: (2e-5, 2e-5), torch.bfloat16: (3e-2, 3e-2), torch.float16: (5e-3, 5e-3)}
pytestmark = pytest.mark.usefixtures("triton_kernels_run")


def fc1_tensors(tokens: int, dim: int, hidden: int, seed: int) -> list[torch.Tensor]:
    """x (2, tokens, dim), fc1's weight and bias, float64 on the CPU, scaled as a trained block's are."""
    gen = torch.Generator().manual_seed(seed)
    return [torch.randn(2, tokens, dim, generator=gen, dtype=torch.float64),
            torch.randn(hidden, dim, generator=gen, dtype=torch.float64) / dim ** 0.5,
            torch.randn(hidden, generator=gen, dtype=torch.float64) * 0.5]


def check_against_reference(tensors: list[torch.Tensor], dtype: torch.dtype) -> None:
    rtol, atol = TOLERANCES[dtype]
    exact = [t.clone().requires_grad_(True) for t in tensors]
    inputs = [t.to(DEVICE, dtype).requires_grad_(True) for t in tensors]
    out = linear_gelu_triton(*inputs)
    want = linear_gelu_ref(*exact)
    assert out.shape == want.shape and out.dtype == dtype
    torch.testing.assert_close(out.double().cpu(), want, rtol=rtol, atol=atol)
    dout = torch.randn(out.shape, generator=torch.Generator().manual_seed(7), dtype=torch.float64)
    grads = torch.autograd.grad(out, inputs, dout.to(DEVICE, dtype))
    want_grads = torch.autograd.grad(want, exact, dout)
    for name, got, expected in zip(("x", "fc1.weight", "fc1.bias"), grads, want_grads):
        assert got.shape == expected.shape and got.dtype == dtype
        # relative to the gradient's scale: sums over the tokens grow with their count
        scale = expected.abs().max().item()
        torch.testing.assert_close(got.double().cpu() / scale, expected / scale, rtol=rtol, atol=atol,
                                   msg=lambda m, name=name: f"d {name}: {m}")


# Sizes: token counts inside one 128-row block, past it (several row blocks' bias sums) and a single token; hidden
# widths inside one 128-column block and past it.
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("tokens, dim, hidden", [(37, 24, 48), (150, 32, 200), (1, 16, 16)])
def test_matches_float64_definition(tokens, dim, hidden, dtype):
    check_against_reference(fc1_tensors(tokens, dim, hidden, seed=tokens), dtype)


def test_gelu_grad_stores_what_the_unfused_pass_stores():
    """dpre is aten's gelu_backward of the stored tensors (within one bf16 step: the interpreter rounds its casts
    differently from the GPU's round-to-nearest); the bias sums are the sums of the dpre it stores."""
    gen = torch.Generator().manual_seed(1)
    dact, pre = (torch.randn(300, 160, generator=gen).mul(2).to(DEVICE, torch.bfloat16) for _ in range(2))
    dpre, dbias = gelu_grad(dact, pre)
    assert dpre.dtype == torch.bfloat16 and dbias.dtype == torch.float32 and dbias.shape == (160,)
    want = torch.ops.aten.gelu_backward(dact.float(), pre.float()).to(torch.bfloat16)
    torch.testing.assert_close(dpre, want, rtol=2 ** -7, atol=1e-6)
    torch.testing.assert_close(dbias, dpre.float().sum(0), rtol=1e-5, atol=1e-4)


def test_ops_pass_torch_library_checks():
    x, w1, b1 = fc1_tensors(9, 16, 32, seed=2)
    args = tuple(t.to(DEVICE, torch.float32).requires_grad_(True) for t in (x.reshape(-1, 16), w1, b1))
    torch.library.opcheck(linear_gelu_fwd_op, args, test_utils=("test_schema", "test_faketensor",
                                                                "test_autograd_registration"))


def test_module_backends_agree_under_autocast():
    """models.layers.Mlp on "triton" and on "torch", float32 parameters under bf16 autocast as in pretraining: the
    same output and parameter gradients, float32 gradients on the parameters."""
    torch.manual_seed(0)
    mlps = {backend: Mlp(32, 128).to(DEVICE) for backend in ("torch", "triton")}
    mlps["triton"].load_state_dict(mlps["torch"].state_dict())
    set_backend(mlps["triton"], "mlp_backend", "triton")
    x = torch.randn(3, 19, 32, device=DEVICE)
    outs = {}
    for backend, mlp in mlps.items():
        with torch.autocast(DEVICE, dtype=torch.bfloat16):
            outs[backend] = mlp(x)
        outs[backend].float().square().sum().backward()
    assert outs["triton"].dtype == outs["torch"].dtype == torch.bfloat16
    torch.testing.assert_close(outs["triton"], outs["torch"], rtol=3e-2, atol=3e-2)
    for (name, got), want in zip(mlps["triton"].named_parameters(), mlps["torch"].parameters()):
        assert got.grad.dtype == torch.float32
        scale = want.grad.abs().max()
        torch.testing.assert_close(got.grad / scale, want.grad / scale, rtol=3e-2, atol=3e-2,
                                   msg=lambda m, name=name: f"{name}: {m}")


def test_auto_backend_choice_and_errors():
    x = torch.randn(2, 4, 16)
    assert mlp_kernel("auto", x, dropout=False) == "torch"  # a CPU tensor
    assert mlp_kernel("triton", x, dropout=False) == "triton"
    if torch.cuda.is_available():
        cuda = x.cuda()
        assert mlp_kernel("auto", cuda, dropout=False) == "torch"  # float32 without autocast
        assert mlp_kernel("auto", cuda.half(), dropout=True) == "torch"
        with torch.autocast("cuda", dtype=torch.bfloat16):
            assert mlp_kernel("auto", cuda, dropout=False) == "triton"
    mlp = Mlp(16, 32, drop=0.1)
    mlp.mlp_backend = "triton"
    with pytest.raises(ValueError, match="no dropout"):
        mlp(x)
    with pytest.raises(ValueError, match="weights must have the input's dtype"):
        linear_gelu_triton(x.to(torch.bfloat16), *fc1_tensors(4, 16, 32, seed=0)[1:])
    with pytest.raises(ValueError, match="inputs must be one of"):
        linear_gelu_triton(*(t.to(torch.int32) for t in fc1_tensors(4, 16, 32, seed=0)))


def test_flop_counter_counts_the_fused_products():
    """MFU comes from torch.utils.flop_counter: the custom ops count as the unfused MLP's products."""
    from torch.utils.flop_counter import FlopCounterMode

    counts = {}
    for backend in ("torch", "triton"):
        torch.manual_seed(0)
        mlp = Mlp(16, 64).to(DEVICE)
        mlp.mlp_backend = backend
        x = torch.randn(2, 5, 16, device=DEVICE, requires_grad=True)
        counter = FlopCounterMode(display=False)
        with counter:
            mlp(x).sum().backward()
        counts[backend] = counter.get_total_flops()
    assert counts["triton"] == counts["torch"] == 3 * 2 * 2 * 10 * 16 * 64


@pytest.mark.skipif(not torch.cuda.is_available(), reason="torch.compile of the custom ops on CUDA")
def test_compiled_matches_eager():
    torch.manual_seed(0)
    mlp = Mlp(64, 256).cuda()
    mlp.mlp_backend = "triton"
    compiled = torch.compile(mlp)
    x = torch.randn(4, 50, 64, device="cuda", requires_grad=True)
    outs, grads = [], []
    for fn in (mlp, compiled):
        with torch.autocast("cuda", dtype=torch.bfloat16):
            out = fn(x)
        (grad,) = torch.autograd.grad(out.float().sum(), x)
        outs.append(out)
        grads.append(grad)
    torch.testing.assert_close(outs[1], outs[0])
    torch.testing.assert_close(grads[1], grads[0])


FLOPS_SCRIPT = """
import torch, models
from models.layers import set_backend
from pretrain.flops import train_flops_per_image
counts = []
for backend in ("torch", "triton"):
    mae = models.create_model("mae_test_vit", img_size=32, in_chans=1, norm_pix_loss=True)
    set_backend(mae, "mlp_backend", backend)
    counts.append(train_flops_per_image(mae, 32, 1, 0.75, torch.device("cpu")))
print(counts)
assert counts[0] == counts[1] > 0, counts
"""


def test_pretraining_flops_count_the_fused_op_in_a_fresh_process():
    """What pretraining reports MFU from, in a process that has not imported kernels.triton_mlp yet (a FlopCounterMode
    takes the FLOP formulas registered when it is made)."""
    import subprocess
    import sys
    from pathlib import Path

    env = {**os.environ, "TRITON_INTERPRET": os.environ.get("TRITON_INTERPRET", "0")}
    if DEVICE == "cuda":
        env.pop("TRITON_INTERPRET")
    result = subprocess.run([sys.executable, "-c", FLOPS_SCRIPT], cwd=Path(__file__).resolve().parents[1], env=env,
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
