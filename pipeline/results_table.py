"""The markdown table of the transfer study (``python -m pipeline.results table``): one section per dataset with
the published MedMNIST v2 and MedMNIST+ rows beside ours, the pretraining stages, and why rows are missing."""

from __future__ import annotations

import csv
import re
from pathlib import Path

MEDMNIST_NAMES = {"breastmnist": "BreastMNIST", "pneumoniamnist": "PneumoniaMNIST"}
KERMANY_NAME = "Kermany pediatric chest X-ray (normal vs pneumonia)"
# The protocol of a pretraining row in runs.json.
PRETRAIN = "pretrain"


def medmnist_base(key: str) -> str:
    """``breastmnist_64`` -> ``breastmnist`` (the MedMNIST size variants share the published rows)."""
    return re.sub(r"_\d+$", "", key)


def display_name(key: str) -> str:
    base = medmnist_base(key)
    if base in MEDMNIST_NAMES:
        return MEDMNIST_NAMES[base] + (f" ({key[len(base) + 1:]} px source)" if key != base else "")
    if key.lower().startswith("kermany"):
        return KERMANY_NAME
    return key


def row_status(row: dict) -> str:
    """``ok``, ``failed`` or ``skipped`` (rows written before the status field: failed iff they hold an error)."""
    return row.get("status") or ("failed" if "error" in row else "ok")


def baseline_rows(benchmarks: Path, dataset: str, input_size: int) -> list[tuple[str, float, float]]:
    """(method, ACC, AUC) rows: MedMNIST v2 ResNets and MedMNIST+ DINO ViT-B/16 linear probe at our size."""
    base = medmnist_base(dataset)
    rows = []
    with open(benchmarks / "medmnist_v2_official_benchmark.csv") as fh:
        for r in csv.DictReader(fh):
            if r["dataset"] == MEDMNIST_NAMES[base] and r["method"].startswith("ResNet"):
                rows.append((f"MedMNIST v2 {r['method']}", float(r["ACC"]), float(r["AUC"])))
    plus = benchmarks / f"medmnist_plus_doerrich2024_{base}.csv"
    if plus.exists():
        with open(plus) as fh:
            lines = [line for line in fh if not line.startswith("#")]
        for r in csv.DictReader(lines):
            if r["scheme"] == "linear-probing" and r["model"] == "DINO ViT-B/16":
                for size in (28, input_size):
                    acc, auc = r.get(f"ACC_{size}"), r.get(f"AUC_{size}")
                    if acc and auc:
                        rows.append((f"MedMNIST+ DINO ViT-B/16 linear probe ({size})",
                                     float(acc.split("±")[0]) / 100, float(auc.split("±")[0]) / 100))
    return list(dict.fromkeys(rows))


def _cell(row: dict, metric: str) -> str:
    """``value [low, high]`` of one of the row's metrics (``n/a`` when it has none)."""
    value, ci = row.get(metric), row.get("ci95") or {}
    if value is None:
        return "n/a"
    return f"{value:.3f} [{ci[metric][0]:.3f}, {ci[metric][1]:.3f}]" if metric in ci else f"{value:.3f}"


def protocol_label(r: dict) -> str:
    """The row's protocol as the table shows it: a linear probe on several blocks says how many (``linprobe
    --n_last_blocks``), a row scored on the validation split says so."""
    command = r.get("command") or []
    blocks = command[command.index("--n_last_blocks") + 1] if "--n_last_blocks" in command[:-1] else "1"
    label = r["protocol"] + (f" ({blocks} blocks)" if blocks != "1" else "")
    return label + (" (val)" if r.get("evaluated_on") == "val" else "")


def _table_row(r: dict) -> str:
    status = row_status(r)
    protocol = protocol_label(r)
    if status != "ok":
        return f"| {r['model']} | {r['init']} | {protocol} | **{status}** | | | | |"
    point = r.get("at_val_threshold")
    at_threshold = f"{_cell(point, 'acc')} / {_cell(point, 'balanced_acc')}" if point else ""
    return (f"| {r['model']} | {r['init']} | {protocol} | {_cell(r, 'acc')} | {_cell(r, 'balanced_acc')} | "
            f"{_cell(r, 'auc')} | {at_threshold} | {r.get('seconds', '')} |")


def _row_order(row: dict) -> tuple:
    """Table order: by model, then pretrained before random init before from scratch, linprobe before finetune."""
    inits = ("mae", "random", "scratch")
    return (row["model"], inits.index(row["init"]) if row["init"] in inits else len(inits), row["protocol"] != "linprobe")


def table_lines(runs: list[dict], benchmarks: Path | None, input_size: int) -> list[str]:
    """The markdown table: one section per dataset, then the pretraining stages, then why rows are missing."""
    lines = []
    transfer = [r for r in runs if r["protocol"] != PRETRAIN]
    for ds in dict.fromkeys(r["dataset"] for r in transfer):
        lines += [f"\n**{display_name(ds)}** (test split; ours at {input_size} px, 95% bootstrap CI; ACC, balanced ACC "
                  "and AUC by the most probable class, as the published rows; the next column at the decision "
                  "threshold fitted on validation, two-class tasks only)\n",
                  "| model | init | protocol | ACC | balanced ACC | AUC | ACC / balanced ACC at val threshold | "
                  "time (s) |", "|---|---|---|---|---|---|---|---|"]
        rows = sorted((r for r in transfer if r["dataset"] == ds), key=_row_order)
        lines += [_table_row(r) for r in rows]
        if benchmarks is not None and medmnist_base(ds) in MEDMNIST_NAMES:
            for method, acc, auc in baseline_rows(benchmarks, ds, input_size):
                lines.append(f"| {method} | published | | {acc:.3f} | | {auc:.3f} | | |")
    pretrain = [r for r in runs if r["protocol"] == PRETRAIN]
    if pretrain:
        lines += ["\n**MAE pretraining**\n", "| encoder | status | time (s) |", "|---|---|---|"]
        lines += [f"| {r['model']} | {row_status(r)} | {r.get('seconds', '')} |" for r in pretrain]
    notes = [r for r in runs if row_status(r) != "ok"]
    if notes:
        lines.append("\nNot run to the end:\n")
        for r in notes:
            if r.get("cause"):
                why = f"{r['cause']} (log: {r['log']})"
            else:
                why = (r.get("reason") or r.get("error", "")).split(": /")[0]
            lines.append(f"- {r['model']} {r['init']} {r['protocol']} {display_name(r['dataset'])}: "
                         f"{row_status(r)}: {why}")
    return lines
