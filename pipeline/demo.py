"""``scanmae-demo``: curate bundled real data -> pretrain a tiny MAE -> linear probe -> metrics table.

Inputs are all real: ``sample_data/`` in the repository (BreastMNIST, Kermany chest X-rays, dipy NIfTI), the
DICOM test files shipped inside the installed ``pydicom`` and ``pydicom-data`` packages (CT, MR, US, CR, every
common transfer syntax, plus deliberately broken files that must land in the reject log) and NIfTI files shipped
with ``nibabel``. Runs on the CPU in a few minutes; uses a GPU when one is present.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import math
import secrets
import sys
from pathlib import Path

from pipeline.stages import REPO_ROOT, StageError, StageResult, python_module_command, run_stage

NIBABEL_FILES = ("anatomical.nii", "example4d.nii.gz", "example_nifti2.nii.gz")


def package_data_dir(package: str, *parts: str) -> Path | None:
    """A data folder inside an installed package (None when the package is missing)."""
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        return None
    path = Path(next(iter(spec.submodule_search_locations)), *parts)
    return path if path.exists() else None


def demo_inputs() -> list[Path]:
    """Real inputs for the demo; the bundled folder must exist, package data is used when installed."""
    sample = REPO_ROOT / "sample_data"
    if not sample.is_dir():
        raise SystemExit(f"scanmae-demo: bundled sample data not found at {sample} (run from a source checkout)")
    inputs = [sample]
    for folder in (package_data_dir("pydicom", "data", "test_files"), package_data_dir("data_store", "data")):
        if folder is not None:
            inputs.append(folder)
    nib_data = package_data_dir("nibabel", "tests", "data")
    if nib_data is not None:
        inputs += [nib_data / name for name in NIBABEL_FILES if (nib_data / name).exists()]
    return inputs


def ensure_salt(path: Path) -> Path:
    """The de-identification salt lives beside (never inside) the curated output."""
    if not path.exists():
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(secrets.token_hex(32))
        path.chmod(0o600)
    return path


def read_json(path: Path) -> dict:
    return json.loads(path.read_text())


def loss_curve(log_path: Path) -> tuple[float, float, int]:
    """First and last logged training loss and the last step from ``log.jsonl``."""
    losses = []
    for line in log_path.read_text().splitlines():
        rec = json.loads(line)
        if "loss" in rec and "step" in rec:
            losses.append((rec["step"], rec["loss"]))
    if not losses:
        raise StageError(f"{log_path}: no training loss was logged")
    return losses[0][1], losses[-1][1], losses[-1][0]


def threshold_text(positive: str, threshold: float) -> str:
    """The validation-fitted cut as the report prints it; a cut within 1e-3 of 0 or 1 (a probe whose scores
    saturate) also as a logit, which says how far from 0.5 it is where the probability's digits cannot."""
    text = f"p({positive}) >= {threshold:.3g}"
    if 0.0 < threshold < 1e-3 or 1.0 - 1e-3 < threshold < 1.0:
        text += f" (logit {math.log(threshold) - math.log1p(-threshold):.1f}: saturated scores)"
    return text


def format_report(manifest: dict, losses: tuple[float, float, int], results: dict, out: Path,
                  timings: list[StageResult]) -> str:
    def shown(metrics: dict, name: str) -> str:
        value, lo_hi = metrics.get(name), metrics.get("ci95", {}).get(name)
        if value is None:
            return "n/a"
        return f"{value:.3f} [{lo_hi[0]:.3f}, {lo_hi[1]:.3f}]" if lo_hi and None not in lo_hi else f"{value:.3f}"

    point = (results.get("test") or {}).get("at_val_threshold")
    if point is not None:
        positive = (results.get("class_names") or ["0", "1"])[1]
        at_threshold = (f"             balanced accuracy  {shown(point, 'balanced_acc')} at the validation threshold "
                        f"{threshold_text(positive, point['threshold'])}")
    else:
        at_threshold = "             (no validation-fitted threshold: not two classes, or one missing in val)"
    vis = sorted((out / "pretrain" / "vis").glob("*.png"))
    lines = [
        "",
        "scanmae demo: results",
        "=" * 64,
        f"curation   files seen {manifest['files_seen']}, used {manifest['files_used']}, "
        f"rejected {manifest['files_rejected']}, duplicate {manifest['files_duplicate']}; "
        f"samples written {manifest['samples_written']}",
        f"pretrain   MAE loss {losses[0]:.4f} -> {losses[1]:.4f} after {losses[2]} steps",
        "linprobe   BreastMNIST test (95% bootstrap CI):",
        f"             accuracy           {shown(results, 'acc')}",
        f"             balanced accuracy  {shown(results, 'balanced_acc')}",
        f"             AUC                {shown(results, 'auc')}",
        f"             macro F1           {shown(results, 'f1')}",
        at_threshold,
        "-" * 64,
        "time       " + ", ".join(f"{t.name} {t.seconds:.0f} s" for t in timings),
        f"manifest   {out / 'curated' / 'manifest.json'}",
        f"rejects    {out / 'curated' / 'rejects.jsonl'}",
        f"encoder    {out / 'pretrain' / 'encoder.safetensors'}",
        f"results    {out / 'linprobe' / 'results.json'}",
        f"recon PNG  {vis[-1] if vis else 'none written'}",
    ]
    return "\n".join(lines)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="scanmae-demo", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--output", default=str(REPO_ROOT / "demo_output"), help="folder for every stage's output")
    parser.add_argument("--max_steps", type=int, default=0,
                        help="stop pretraining after this many steps (0: the demo config's full schedule)")
    parser.add_argument("--probe_epochs", type=int, default=50, help="linear-probe epochs")
    parser.add_argument("--workers", type=int, default=2, help="curation worker processes")
    parser.add_argument("--fresh", action="store_true", help="delete earlier demo output first")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    out = Path(args.output).resolve()
    if args.fresh and out.exists():
        import shutil

        shutil.rmtree(out)
    curated, pretrained, probed = out / "curated", out / "pretrain", out / "linprobe"
    salt = ensure_salt(out / "curate_salt")
    pretrain_cmd = python_module_command("pretrain.main", "--config", "configs/demo.yaml", "--data_path",
                                         str(curated), "--output_dir", str(pretrained))
    if args.max_steps:
        pretrain_cmd += ["--max_steps", str(args.max_steps)]
    stages = [
        ("curate", python_module_command("data_curation.cli", *map(str, demo_inputs()), "--output", str(curated),
                                         "--workers", str(args.workers), "--salt_file", str(salt))),
        ("pretrain", pretrain_cmd),
        ("linprobe", python_module_command(
            "linprobe.main", "--data_path", str(REPO_ROOT / "sample_data/medmnist/breastmnist.npz"),
            "--nb_classes", "2", "--finetune", str(pretrained / "encoder.safetensors"), "--fast",
            "--global_pool", "--epochs", str(args.probe_epochs), "--warmup_epochs", "5",
            "--output_dir", str(probed))),
    ]
    timings = []
    try:
        for name, command in stages:
            timings.append(run_stage(name, command, log_path=out / "logs" / f"{name}.log"))
    except StageError as exc:
        print(f"scanmae-demo: {exc}", file=sys.stderr)
        return 1
    report = format_report(read_json(curated / "manifest.json"), loss_curve(pretrained / "log.jsonl"),
                           read_json(probed / "results.json"), out, timings)
    print(report)
    (out / "report.txt").write_text(report + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
