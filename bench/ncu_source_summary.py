"""Where a kernel's warps wait, per SASS instruction: a summary of Nsight Compute's source page.

    python -m bench.ncu_source_summary ncu_..._source.csv [--top 12]

``bash bench/gpu_scan_session.sh ncu`` writes the page (``ncu --import R --page source --csv --print-source sass``).
Per kernel it prints the stall reasons over all samples, the samples by opcode, the instructions with the most
samples (with their two main reasons), and every global memory instruction's L2 sectors against the ideal (a
strided or scattered access moves many more sectors than its bytes need).
"""

from __future__ import annotations

import argparse
import collections
import csv
from pathlib import Path

SAMPLES = "Warp Stall Sampling (All Samples)"
SECTORS, IDEAL = "L2 Theoretical Sectors Global", "L2 Theoretical Sectors Global Ideal"


def read_kernels(path: Path) -> dict[str, list[dict[str, str]]]:
    """Rows of the source page per kernel (the page repeats a header line per kernel)."""
    kernels: dict[str, list[dict[str, str]]] = collections.defaultdict(list)
    kernel, header = None, None
    with path.open(newline="") as f:
        for row in csv.reader(f):
            if not row:
                continue
            if row[0] == "Kernel Name":
                kernel, header = row[1], None
            elif row[0] == "Address":
                header = row
            elif kernel and header:
                kernels[kernel].append(dict(zip(header, row)))
    return kernels


def _int(value: str | None) -> int:
    return int(value) if value and value.isdigit() else 0


def _stalls(instr: dict[str, str]) -> collections.Counter[str]:
    return collections.Counter({k[len("stall_"):]: _int(v) for k, v in instr.items()
                                if k.startswith("stall_") and "Not Issued" not in k})


def summarize(name: str, instrs: list[dict[str, str]], top: int) -> str:
    total = sum(_int(i[SAMPLES]) for i in instrs) or 1
    reasons: collections.Counter[str] = collections.Counter()
    by_opcode: collections.Counter[str] = collections.Counter()
    for instr in instrs:
        reasons.update(_stalls(instr))
        words = [w for w in instr["Source"].split() if not w.startswith("@")]
        by_opcode[words[0].split(".")[0] if words else "?"] += _int(instr[SAMPLES])
    lines = [f"== {name}: {total} samples",
             "  reasons: " + ", ".join(f"{k} {100 * v / total:.1f}%" for k, v in reasons.most_common(8)),
             "  by opcode: " + ", ".join(f"{k} {100 * v / total:.1f}%" for k, v in by_opcode.most_common(10))]
    for instr in sorted(instrs, key=lambda i: -_int(i[SAMPLES]))[:top]:
        main = ", ".join(f"{k} {v}" for k, v in _stalls(instr).most_common(2))
        lines.append(f"  {100 * _int(instr[SAMPLES]) / total:5.1f}%  {instr['Source'].strip()[:60]:60s} {main}")
    memory = [i for i in instrs if any(op in i["Source"] for op in ("LDG", "STG", "RED", "ATOM"))
              and _int(i.get("Instructions Executed"))]
    if memory:
        lines.append("  global memory (executed, L2 sectors / ideal):")
        lines += [f"    {i['Source'].strip()[:50]:50s} {_int(i['Instructions Executed']):>9} "
                  f"{_int(i.get(SECTORS)):>10} / {_int(i.get(IDEAL))}" for i in memory]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("csv", type=Path)
    parser.add_argument("--top", type=int, default=12, help="instructions listed per kernel")
    args = parser.parse_args(argv)
    for name, instrs in read_kernels(args.csv).items():
        print(summarize(name, instrs, args.top))


if __name__ == "__main__":
    main()
