"""``torch.compile`` of a model in place, as pretraining and its benchmark do it."""

from __future__ import annotations

import os

import torch
from torch import nn

AUTOGRAD_CACHE_ENV = "TORCHINDUCTOR_AUTOGRAD_CACHE"


def compile_in_place(model: nn.Module, mode: str) -> None:
    """Compile ``model`` in place (parameter names, checkpoints and ``unwrap_model`` stay the eager model's) with
    AOTAutograd's cache off, unless ``TORCHINDUCTOR_AUTOGRAD_CACHE`` says otherwise.

    Why the cache is off: on an H100 with torch 2.11 a ViT-B/16 MAE step whose forward+backward was loaded from that
    cache (a second run of the same model on the machine) took 79.6 ms instead of 56.2 ms, all of it host time
    (the kernels take 54 ms); with only that cache off, inductor's own graph cache still hit and the step took
    56.1 ms (docs/pretrain_benchmarks.md, twenty-first session). CUDA graphs (``reduce-overhead``) hide the cost
    either way. The setting is process-wide: it must hold when the first call compiles, after this returns.
    """
    if AUTOGRAD_CACHE_ENV not in os.environ:
        torch._functorch.config.enable_autograd_cache = False
    model.compile(mode=mode)
