"""The scaling table (markdown, also printed) and the plot (loss curves + img/s)."""

from __future__ import annotations

from pathlib import Path
from typing import Any


def _num(value: float | None, fmt: str) -> str:
    return "-" if value is None else format(value, fmt)


def format_table(runs: list[dict[str, Any]]) -> str:
    header = ("| run | GPUs | batch/GPU x accum | status | img/s | img/s per GPU | speed-up | target | TFLOP/s per GPU "
              "| MFU | final loss | loss vs 1 GPU (last quarter) | curve |")
    lines = [header, "|" + "---|" * (header.count("|") - 1)]
    for r in runs:
        target = r.get("target")
        met = r.get("target_met")
        target_text = "-" if target is None else f">= {target:g}x " + ("met" if met else "MISSED")
        rel = r.get("loss_rel_diff_last_quarter")
        curve = "-" if r.get("loss_matches") is None else ("matches" if r["loss_matches"] else "DIFFERS")
        lines.append(
            f"| {r['name']} | {r['processes']} | {r['per_gpu_batch']} x {r.get('accum_iter', 1)} | {r['status']} | {_num(r.get('img_per_s'), ',.0f')} "
            f"| {_num(r.get('img_per_s_per_gpu'), ',.0f')} | {_num(r.get('speedup'), '.2f')}"
            f"{'x' if r.get('speedup') is not None else ''} | {target_text} | {_num(r.get('tflops_per_gpu'), '.1f')} "
            f"| {_num(r.get('mfu'), '.3f')} | {_num(r.get('final_loss'), '.4f')} "
            f"| {'-' if rel is None else f'{100 * rel:.2f}%'} | {curve} |")
    return "\n".join(lines)


def save_plot(runs: list[dict[str, Any]], path: Path, title: str) -> Path:
    """Left: loss per logged step for every run; right: steady img/s with the speed-up over one GPU."""
    import matplotlib

    matplotlib.use("Agg")  # files only, no display
    import matplotlib.pyplot as plt

    fig, (ax_loss, ax_rate) = plt.subplots(1, 2, figsize=(10, 3.8), gridspec_kw={"width_ratios": [3, 2]})
    done = [r for r in runs if r.get("loss_curve")]
    for r in done:
        steps, losses = zip(*r["loss_curve"])
        ax_loss.plot(steps, losses, label=f"{r['name']} ({r['processes']} GPU x {r['per_gpu_batch']})", lw=1.4)
    ax_loss.set_xlabel("optimizer step")
    ax_loss.set_ylabel("MAE loss (window mean)")
    ax_loss.set_title("loss at the same global batch")
    ax_loss.grid(alpha=0.3)
    if done:
        ax_loss.legend(fontsize=8)
    rated = [r for r in runs if r.get("img_per_s")]
    bars = ax_rate.bar([r["name"] for r in rated], [r["img_per_s"] for r in rated], color="#4477aa")
    for bar, r in zip(bars, rated):
        label = f"{r['img_per_s']:,.0f}" + (f"\n{r['speedup']:.2f}x" if r.get("speedup") is not None else "")
        ax_rate.annotate(label, (bar.get_x() + bar.get_width() / 2, bar.get_height()), ha="center", va="bottom",
                         fontsize=8)
    ax_rate.set_ylabel("img/s (steady state)")
    ax_rate.set_title("throughput")
    ax_rate.margins(y=0.25)
    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
