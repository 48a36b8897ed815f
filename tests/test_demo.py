"""The README's demo, shortened: curate real bundled data -> pretrain a few steps -> linear probe -> report."""

from __future__ import annotations

import json
import re
from pathlib import Path

from pipeline.demo import main


def test_demo_end_to_end_short(tmp_path: Path, capsys) -> None:
    out = tmp_path / "demo"
    assert main(["--output", str(out), "--max_steps", "30", "--probe_epochs", "5", "--workers", "1"]) == 0
    report = capsys.readouterr().out
    manifest = json.loads((out / "curated" / "manifest.json").read_text())
    # every input file is accounted for exactly once
    assert manifest["files_seen"] == manifest["files_used"] + manifest["files_rejected"] + manifest["files_duplicate"]
    assert manifest["samples_written"] > 500
    # the broken DICOM shipped by pydicom is in the reject log with a reason
    rejects = [json.loads(line) for line in (out / "curated" / "rejects.jsonl").read_text().splitlines()]
    assert any(r["path"].endswith("MR_truncated.dcm") and r["reason"] for r in rejects)
    assert (out / "pretrain" / "encoder.safetensors").is_file()
    results = json.loads((out / "linprobe" / "results.json").read_text())
    for key in ("acc", "balanced_acc", "auc", "f1"):
        assert isinstance(results[key], float)
    point = results["test"]["at_val_threshold"]  # BreastMNIST has two classes
    assert re.search(rf"balanced accuracy  {point['balanced_acc']:.3f} \[.*\] at the validation threshold", report)
    recon = re.search(r"recon PNG\s+(\S+\.png)", report)
    assert recon and Path(recon.group(1)).is_file()
    assert (out / "report.txt").read_text().strip() in report


def test_threshold_text_reads_at_any_saturation() -> None:
    from pipeline.demo import threshold_text

    assert threshold_text("1", 0.4271) == "p(1) >= 0.427"
    assert threshold_text("malignant", 1.09e-26) == "p(malignant) >= 1.09e-26 (logit -59.8: saturated scores)"
    assert threshold_text("1", 0.99995) == "p(1) >= 1 (logit 9.9: saturated scores)"
    assert threshold_text("1", 1.0) == "p(1) >= 1" and threshold_text("1", 0.0) == "p(1) >= 0"
