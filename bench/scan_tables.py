"""The printed tables of bench/scan.py: the backends side by side, and the tile sweeps."""

from __future__ import annotations

from typing import Any


def _chunk_tag(row: dict[str, Any]) -> str:
    chunk = row.get("chunk", 4)
    return "" if chunk == 4 else f"/ch{chunk}"


def format_sweep(sweeps: dict[str, list[dict[str, Any]]]) -> str:
    """One line per shape and pass: ms per (variant, block_d, maxnreg, prefetch), the fastest marked *, with the
    kernels' own time (GPU-busy) where the row has it."""
    lines = []
    for shape, rows in sweeps.items():
        for pass_name in ("fwd", "fwd+bwd"):
            sel = [r for r in rows if r["pass"] == pass_name]
            if not sel:
                continue
            best = min(r["ms"] for r in sel)
            cells = [f"{r.get('variant', 'v1')}/bd{r['block_d']}/reg{r['maxnreg'] or '-'}"
                     f"{'/pf' if r['prefetch'] else ''}{_chunk_tag(r)}"
                     f"{'/seg' + str(r['segments']) if r.get('segments', 1) > 1 else ''}"
                     f"{'/bl' + str(r['block_l']) if 'block_l' in r else ''}"
                     f"{'/tile' + str(r['tile_l']) if r.get('tile_l') else ''} "
                     f"{r['ms']:.3f}{'*' if r['ms'] == best else ''}"
                     f"{' (busy ' + format(r['gpu_ms'], '.3f') + ')' if r.get('gpu_ms') is not None else ''}"
                     for r in sel]
            lines.append(f"{shape} {pass_name}: " + "  ".join(cells))
    return "\n".join(lines)


def format_table(result: dict[str, Any]) -> str:
    """The backends table: one row per (shape, backend), speedups against mamba-ssm's row of the same shape."""
    head = ("| shape (batch, dim, N, L) | backend | fwd ms | fwd GB/s | fwd / floor | fwd speedup vs mamba-ssm | "
            "fwd+bwd ms | fwd+bwd GB/s | fwd+bwd / floor | fwd+bwd speedup vs mamba-ssm | fwd GPU-busy ms | "
            "fwd+bwd GPU-busy ms |")
    lines = [head, "|" + "---|" * 12]
    for r in result["rows"]:
        fwd_speed = f"{r['fwd_speedup_vs_mamba']:.2f}x" if r["fwd_speedup_vs_mamba"] else "n/a"
        speed = f"{r['fwd_bwd_speedup_vs_mamba']:.2f}x" if r["fwd_bwd_speedup_vs_mamba"] else "n/a"
        fwd_busy, gpu_busy = (f"{r[k]:.3f}" if r.get(k) is not None else "n/a"
                              for k in ("fwd_gpu_ms", "fwd_bwd_gpu_ms"))
        lines.append(
            f"| {r['shape']} | {r['backend']} | {r['fwd_ms']:.3f} | {r['fwd_GBps']:.0f} | {r['fwd_x_floor']:.1f}x"
            f" | {fwd_speed} | {r['fwd_bwd_ms']:.3f} | {r['fwd_bwd_GBps']:.0f} | {r['fwd_bwd_x_floor']:.1f}x | {speed}"
            f" | {fwd_busy} | {gpu_busy} |"
        )
    return "\n".join(lines)
