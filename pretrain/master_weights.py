"""bf16 weights with float32 master copies, without autocast (``--precision bf16_weights``).

Under bf16 autocast (``--precision bf16``, the default on CUDA) the weights stay float32 and every matrix product
casts its operands, while LayerNorm and the residual adds run in float32: the residual stream between the blocks
is a float32 tensor that every norm, add and their backward read and write. Here the model itself is bfloat16 (the
activations between the products too, half the bytes for those memory-bound kernels) and the optimizer steps
float32 master copies of the weights, which are rounded into the model after every step: the precision recipe of
DeepSpeed's bf16 mode, which ran the same MAE step 12 % faster than autocast in the fifth session (eager, one
H200, docs/cluster.md), for single-GPU and DDP runs, with ``--compile`` and CUDA graphs.

What stays float32: the master weights and their gradients (the model's bf16 gradients are cast once per optimizer
step, after the last micro-batch; micro-batches accumulate in bf16), the optimizer state, the SSM parameters marked
``_keep_fp32`` (``models.ssm``: the model keeps them float32 and the optimizer steps them directly), the MAE target
and loss (``models.mae``). Checkpoints hold the masters in ``master_weights.safetensors`` beside accelerate's files,
so a resumed run continues from exactly the float32 values; the exported encoder is made from them.
"""

from __future__ import annotations

from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from pretrain.checkpointing import CheckpointMismatch

MASTER_FILE = "master_weights.safetensors"


class MasterWeights:
    """Float32 masters of the trained parameters of ``model``, which is cast to ``dtype`` on construction."""

    def __init__(self, model: nn.Module, dtype: torch.dtype = torch.bfloat16) -> None:
        self.names: list[str] = []
        self.params: list[nn.Parameter] = []  # the model's, in ``dtype`` after the cast below
        self.masters: list[nn.Parameter] = []  # float32, what the optimizer steps
        for name, param in model.named_parameters():
            if param.requires_grad and param.is_floating_point() and not getattr(param, "_keep_fp32", False):
                if param.dtype != torch.float32:
                    raise ValueError(f"bf16 weights: {name} is {param.dtype}; build the model in float32")
                self.names.append(name)
                self.params.append(param)
                self.masters.append(nn.Parameter(param.detach().clone()))
        self._master_of = {id(p): m for p, m in zip(self.params, self.masters)}
        self._grad_buffers: list[torch.Tensor] | None = None  # the masters' float32 gradients (grads_to_masters)
        model.to(dtype)  # in place (the Parameter objects stay); _keep_fp32 parameters stay float32 (models.ssm)

    def optimizer_groups(self, groups: list[dict]) -> list[dict]:
        """``param_groups`` of the model with each cast parameter replaced by its master."""
        return [{**group, "params": [self._master_of.get(id(p), p) for p in group["params"]]} for group in groups]

    @torch.no_grad()
    def grads_to_masters(self) -> None:
        """The model's (all-reduced, accumulated) gradients, in float32, as the masters' gradients; the model's
        are released. One multi-tensor copy into float32 buffers kept for the run (a cast per parameter would be
        a launch per parameter, about 200 per ViT-B step)."""
        if self._grad_buffers is None:
            self._grad_buffers = [torch.empty_like(m) for m in self.masters]
        sources, targets = [], []
        for param, master, buffer in zip(self.params, self.masters, self._grad_buffers):
            master.grad = None if param.grad is None else buffer
            if param.grad is not None:
                sources.append(param.grad)
                targets.append(buffer)
            param.grad = None
        if sources:
            torch._foreach_copy_(targets, sources)

    @torch.no_grad()
    def masters_to_model(self) -> None:
        """Round the stepped masters into the model's weights."""
        torch._foreach_copy_(self.params, self.masters)

    def save(self, directory: Path) -> Path:
        """The masters by parameter name in ``directory/master_weights.safetensors``."""
        path = Path(directory) / MASTER_FILE
        save_file({name: m.detach().cpu().contiguous() for name, m in zip(self.names, self.masters)}, str(path))
        return path

    @torch.no_grad()
    def load(self, directory: Path) -> None:
        """Masters (and, rounded, the model's weights) from a checkpoint written by ``save``."""
        path = Path(directory) / MASTER_FILE
        if not path.is_file():
            raise CheckpointMismatch(f"{directory}: no {MASTER_FILE}; the checkpoint was not written with "
                                     f"--precision bf16_weights (resume it with the precision it was written with)")
        stored = load_file(str(path))
        missing = sorted(set(self.names) - set(stored))
        if missing:
            more = f" and {len(missing) - 5} more" if len(missing) > 5 else ""
            raise CheckpointMismatch(f"{path}: no master weights for {', '.join(missing[:5])}{more}")
        for name, master in zip(self.names, self.masters):
            if stored[name].shape != master.shape:
                raise CheckpointMismatch(f"{path}: {name} is {tuple(stored[name].shape)}, the model's "
                                         f"{tuple(master.shape)}")
            master.copy_(stored[name])
        self.masters_to_model()

    def float32_state_dict(self, module: nn.Module) -> dict[str, torch.Tensor]:
        """``module``'s state dict in float32 on the CPU with every cast parameter replaced by its master (for the
        exported encoder); ``module`` is the model this object was built on (its parameter names)."""
        state = cpu_float32_state(module)
        for name, master in zip(self.names, self.masters):
            state[name] = master.detach().cpu().clone()
        return state


def cpu_float32_state(module: nn.Module) -> dict[str, torch.Tensor]:
    """``module``'s state dict on the CPU, floating-point entries in float32."""
    return {k: v.detach().float().cpu() if v.is_floating_point() else v.detach().cpu()
            for k, v in module.state_dict().items()}
