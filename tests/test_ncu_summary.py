"""bench.ncu_source_summary on a hand-made source page of Nsight Compute's CSV form (two kernels)."""

from __future__ import annotations

import csv

from bench.ncu_source_summary import read_kernels, summarize

HEADER = ["Address", "Source", "Warp Stall Sampling (All Samples)", "Instructions Executed",
          "L2 Theoretical Sectors Global", "L2 Theoretical Sectors Global Ideal", "stall_long_sb", "stall_wait",
          "stall_long_sb (Not Issued)"]


def test_summary_per_kernel_reasons_opcodes_and_sectors(tmp_path):
    path = tmp_path / "page.csv"
    with path.open("w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["Kernel Name", "fwd"])
        w.writerow(HEADER)
        w.writerow(["0x1", "LDG.E.U16 R0, desc[UR4][R2.64]", "10", "100", "3200", "200", "8", "2", "8"])
        w.writerow(["0x2", "@P0 FFMA R1, R0, R3, R1", "30", "100", "0", "0", "30", "0", "30"])
        w.writerow(["Kernel Name", "bwd"])
        w.writerow(HEADER)
        w.writerow(["0x1", "STG.E.U16 desc[UR4][R2.64], R0", "5", "50", "1600", "100", "0", "5", "0"])
    kernels = read_kernels(path)
    assert list(kernels) == ["fwd", "bwd"] and len(kernels["fwd"]) == 2
    text = summarize("fwd", kernels["fwd"], top=1)
    assert "40 samples" in text
    assert "long_sb 95.0%" in text and "wait 5.0%" in text  # the "(Not Issued)" columns are not counted twice
    assert "FFMA 75.0%" in text and "LDG 25.0%" in text  # the predicate is not the opcode
    assert "3200 / 200" in text  # a strided load: 16x its ideal sectors
    assert "1600 / 100" in summarize("bwd", kernels["bwd"], top=1)
