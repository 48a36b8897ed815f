"""Parameters and multiply-accumulates (MACs) of registry models, compared with MambaMIC's paper.

    python -m bench.model_stats [--models mambamic_tiny,mambamic_small] [--img_size 224] [--json out.json]

One real forward pass of one image on the CPU per model (SS2D turns autocast off, which the meta device
does not support): about 5-30 s per model on a busy 2-core machine.

How MACs are counted:
- ``counter``: ``torch.utils.flop_counter.FlopCounterMode`` over one forward pass of one image, divided
  by 2 (it reports a multiply-add as 2 FLOPs). It sees matrix products and convolutions (linear layers,
  the SS2D x/dt projections written as einsums, every conv incl. depthwise/grouped) and ignores
  element-wise work (norms, activations, gates, pooling, shuffles). An einsum whose contraction has
  size 1 (the dt projection where dt_rank = 1, i.e. d_model <= 16) runs as an element-wise product and
  is not counted either (1.2 M MACs in mambamic_tiny).
- ``scan``: the selective scans, counted analytically, because the counter cannot see inside a fused
  Triton / CUDA kernel and on the torch backends would count only the implementation's einsum. Per scan
  call with batch b, channels d (all four directions), length L and state size N:
  ``b * d * L * (4 N + 2)`` -- per state: the exponent dt*A, the input dt*u times B, the state update
  h = a*h + b (one MAC) and the read-out C.h (one MAC); per channel: dt*u and the D skip term.
  The scan's share of the counter's number is measured (the same scan on meta tensors under the
  counter) and removed, so nothing is counted twice.
- ``layers``: only the ``nn.Conv2d`` / ``nn.Linear`` modules, from forward hooks (output elements x
  input channels per group x kernel area, or x in_features). This is what a module-hook profiler
  (ptflops, thop: the authors' script uses them) sees: neither the scan nor the SS2D projections, which
  are einsums on parameters, not modules. The paper's GMACs (Table 1) compare with this column; such
  profilers also add one MAC per element for norms and activations, a few percent.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from common.config import build_parser, parse_config
from common.io import atomic_write_json
from kernels import selective_scan_fn
from models import create_model
from models.ss2d import NUM_DIRECTIONS, SS2D

# MambaMIC paper (arXiv 2409.07896), Table 1, 224x224 RGB inputs: (parameters in M, GMACs).
PAPER = {
    "mambamic_tiny": (4.32, 0.64),
    "mambamic_small": (4.97, 0.76),
    "mambamic_base": (8.39, 1.59),
}


@dataclass
class ModelStatsConfig:
    models: list[str] = field(default_factory=lambda: list(PAPER),
                              metadata={"help": "registry names, comma separated"})
    img_size: int = field(default=224, metadata={"help": "square input size (the paper uses 224)"})
    in_chans: int = field(default=3, metadata={"help": "input channels (the paper uses RGB)"})
    num_classes: int = field(default=1000, metadata={"help": "classifier width the paper counts"})
    json: str | None = field(default=None, metadata={"help": "also write the rows to this JSON file"})


@dataclass
class ScanCall:
    batch: int
    channels: int
    length: int
    n_state: int
    backend: str


def scan_macs(call: ScanCall) -> int:
    """Analytic MACs of one selective scan (see the module docstring)."""
    return call.batch * call.channels * call.length * (4 * call.n_state + 2)


def counted_scan_macs(call: ScanCall) -> int:
    """What FlopCounterMode attributes to the scan implementation itself (removed from ``counter``)."""
    # Shapes only: the counter needs no values, and the meta device skips the arithmetic.
    meta = dict(device="meta", dtype=torch.float32)
    b, d, length, n = call.batch, call.channels, call.length, call.n_state
    k = NUM_DIRECTIONS
    with FlopCounterMode(display=False) as counter:
        selective_scan_fn(torch.empty(b, d, length, **meta), torch.empty(b, d, length, **meta),
                          torch.empty(d, n, **meta), torch.empty(b, k, n, length, **meta),
                          torch.empty(b, k, n, length, **meta), torch.empty(d, **meta),
                          delta_bias=torch.empty(d, **meta), delta_softplus=True, backend=call.backend)
    return counter.get_total_flops() // 2


def _layer_macs_hook(store: list[int]) -> Any:
    def hook(module: nn.Module, args: tuple[torch.Tensor, ...], out: torch.Tensor) -> None:
        if isinstance(module, nn.Conv2d):
            kh, kw = module.kernel_size
            store.append(out.numel() * (module.in_channels // module.groups) * kh * kw)
        else:
            store.append(out.numel() * module.in_features)

    return hook


def _record_scans(model: nn.Module, calls: list[ScanCall]) -> list[Any]:
    def hook(module: SS2D, args: tuple[torch.Tensor, ...]) -> None:
        b, h, w, _ = args[0].shape
        calls.append(ScanCall(b, NUM_DIRECTIONS * module.d_inner, h * w, module.d_state, module.scan_backend))

    return [m.register_forward_pre_hook(hook) for m in model.modules() if isinstance(m, SS2D)]


def model_stats(name: str, img_size: int, in_chans: int, num_classes: int) -> dict[str, Any]:
    """Parameter and MAC counts of one registry model for a single ``img_size`` square image."""
    torch.manual_seed(0)
    model = create_model(name, in_chans=in_chans, num_classes=num_classes).eval()
    head = model.get_classifier() if hasattr(model, "get_classifier") else None
    params = sum(p.numel() for p in model.parameters())
    head_params = sum(p.numel() for p in head.parameters()) if head is not None else 0

    calls: list[ScanCall] = []
    handles = _record_scans(model, calls)
    layer_macs: list[int] = []
    handles += [m.register_forward_hook(_layer_macs_hook(layer_macs)) for m in model.modules()
                if isinstance(m, (nn.Conv2d, nn.Linear))]
    x = torch.randn(1, in_chans, img_size, img_size)
    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        model(x)
    for handle in handles:
        handle.remove()
    scan = sum(scan_macs(c) for c in calls)
    counter_macs = counter.get_total_flops() // 2 - sum(counted_scan_macs(c) for c in calls)
    paper_params, paper_gmacs = PAPER.get(name, (None, None))
    return {
        "model": name, "img_size": img_size, "in_chans": in_chans, "num_classes": num_classes,
        "params_m": params / 1e6, "backbone_params_m": (params - head_params) / 1e6,
        "layers_gmacs": sum(layer_macs) / 1e9, "counter_gmacs": counter_macs / 1e9, "scan_gmacs": scan / 1e9, "total_gmacs": (counter_macs + scan) / 1e9,
        "scan_calls": len(calls), "paper_params_m": paper_params, "paper_gmacs": paper_gmacs,
    }


def format_table(rows: list[dict[str, Any]]) -> str:
    def num(v: float | None, digits: int) -> str:
        return "-" if v is None else f"{v:.{digits}f}"

    lines = ["| model | params (M) | paper params (M) | backbone params (M) | layers GMACs | paper GMACs "
             "| counter GMACs | scan GMACs | total GMACs |", "|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['model']} | {num(r['params_m'], 2)} | {num(r['paper_params_m'], 2)} "
                     f"| {num(r['backbone_params_m'], 2)} | {num(r['layers_gmacs'], 3)} "
                     f"| {num(r['paper_gmacs'], 2)} | {num(r['counter_gmacs'], 3)} | {num(r['scan_gmacs'], 3)} "
                     f"| {num(r['total_gmacs'], 3)} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> list[dict[str, Any]]:
    parser = build_parser(ModelStatsConfig, prog="python -m bench.model_stats", description=__doc__.split("\n")[0])
    cfg = parse_config(ModelStatsConfig, argv, parser=parser)
    rows = [model_stats(name, cfg.img_size, cfg.in_chans, cfg.num_classes) for name in cfg.models]
    print(f"{cfg.img_size}x{cfg.img_size} input, {cfg.in_chans} channels, {cfg.num_classes}-class head, batch 1")
    print(format_table(rows))
    if cfg.json:
        atomic_write_json(cfg.json, {"config": dataclasses.asdict(cfg), "rows": rows})
    return rows


if __name__ == "__main__":
    main()
