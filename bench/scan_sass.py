"""Offline SASS report of the scan kernels: registers, spills, instruction histogram (no GPU needed).

    python -m bench.scan_sass [--block-d 16 8] [--variant v1 v2] [--chunk 4] [--maxnreg 168] [--reverse]
                              [--shape B D N L] [--dump DIR] [--block-l 128 256] [--channel-last]

Compiles the default-shaped kernels (bf16 u/delta/z/B/C/dout, N=16, D, z, delta_bias, softplus) for sm_90
with the local Triton and its bundled ptxas, disassembles them with nvdisasm, and prints per kernel: the
registers, spill bytes, the total SASS count, and for the hottest loop (the innermost backward branch with
the most instructions) its size, the positions it covers and a histogram of opcode classes per position
per warp. The v4 forward (kernels/triton_scan_fwd4.py, a forward only) walks a span of --block-l positions per
pass with several warps: its line also gives thread-instructions per (channel, position, state) element, the unit
of docs/scan_kernels.md's issue-rate budget. This is a static proxy for speed (fewer instructions and registers per position = faster);
times still come from bench/scan.py on a GPU.
"""

from __future__ import annotations

import argparse
import re
import subprocess
import tempfile
from collections import Counter
from pathlib import Path
from typing import Any

import triton
from triton.backends.compiler import GPUTarget

BF16_ARGS = {"U", "DELTA", "Z", "B", "C", "OUT", "DOUT", "DU", "DDELTA", "DZ"}
# Opcode prefixes grouped into classes that explain where the time goes.
CLASSES = [
    ("shuffle", ("SHFL",)),
    ("fp32 math", ("FADD", "FMUL", "FFMA", "FMNMX", "FSEL", "FSETP", "FCHK")),
    ("mufu", ("MUFU",)),
    ("global load", ("LDG",)),
    ("global store", ("STG",)),
    ("atomic", ("RED", "ATOM")),
    ("shared", ("LDS", "STS", "BAR", "LDSM")),
    ("local (spill)", ("LDL", "STL")),
    ("convert/pack", ("F2F", "I2F", "F2I", "PRMT", "F2FP", "HADD2", "HMUL2", "HFMA2")),
    ("integer/predicate", ("IMAD", "IADD", "LEA", "ISETP", "LOP", "SHF", "SEL", "PLOP", "P2R", "R2P", "MOV",
                           "IABS", "IMNMX", "SGXT", "VIADD", "UIADD", "UMOV", "ULDC", "ULEA", "UIMAD",
                           "ULOP", "USHF", "USEL", "UISETP", "S2R", "S2UR", "CS2R", "VOTE", "POPC", "FLO")),
    ("branch/control", ("BRA", "BSSY", "BSYNC", "WARPSYNC", "EXIT", "NOP", "YIELD", "CALL", "RET")),
]


def _signature(kernel: Any, ints: dict[str, int]) -> tuple[dict[str, str], dict[tuple[int], list]]:
    """Pointer and integer argument types and the hints the launcher would specialise on (pointers are 16-byte
    aligned; an integer divisible by 16 gets the divisibility hint and one equal to 1 becomes a constant, as at a
    real launch, unless the kernel opts out with ``do_not_specialize``)."""
    sig, attrs = {}, {}
    for i, (name, param) in enumerate(zip(kernel.arg_names, kernel.params)):
        if param.is_constexpr or (ints.get(name) == 1 and not param.do_not_specialize):
            sig[name] = "constexpr"
        elif name[0].isupper():
            # The v3 launchers hand B and C over as float32 (kernels/triton_scan_fwd3.py).
            bf16 = name in BF16_ARGS and not (kernel.__name__.endswith("_v3") and name in ("B", "C"))
            sig[name] = "*bf16" if bf16 else "*fp32"
            attrs[(i,)] = [["tt.divisibility", 16]]
        else:
            sig[name] = "i32"
            if ints.get(name, 1) % 16 == 0 and not param.do_not_specialize:
                attrs[(i,)] = [["tt.divisibility", 16]]
    return sig, attrs


def compile_kernel(kernel: Any, constexprs: dict[str, Any], ints: dict[str, int], num_warps: int = 1,
                   maxnreg: int | None = None) -> Any:
    """triton.compile for sm_90 with the launch-time signature of the benchmark's bf16 inputs; ``ints``
    gives the integer arguments' values (only their divisibility by 16 matters)."""
    sig, attrs = _signature(kernel, ints)
    # Constexprs not given take their default (TILE_IO), integers specialised as constants (== 1) the value 1.
    defaults = {p.name: p.default for p in kernel.params if p.has_default}
    unit_ints = {name: defaults.get(name, 1) for name, kind in sig.items()
                 if kind == "constexpr" and name not in constexprs}
    src = triton.compiler.ASTSource(kernel, sig, {**constexprs, **unit_ints}, attrs)
    options = {"num_warps": num_warps} if maxnreg is None else {"num_warps": num_warps, "maxnreg": maxnreg}
    return triton.compile(src, target=GPUTarget("cuda", 90, 32), options=options)


def _tool(name: str, cubin: bytes, *flags: str) -> str:
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(cubin)
        f.flush()
        return subprocess.run([str(Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / name), *flags,
                               f.name], check=True, capture_output=True, text=True).stdout


def resources(cubin: bytes) -> tuple[int, int]:
    """(registers, local-memory bytes per thread, i.e. spills) from cuobjdump's resource usage."""
    text = _tool("cuobjdump", cubin, "--dump-resource-usage")
    return int(re.search(r"REG:(\d+)", text).group(1)), int(re.search(r"LOCAL:(\d+)", text).group(1))


def disassemble(cubin: bytes) -> list[tuple[int, str, str]]:
    """(address, label-or-empty, instruction text) for every SASS instruction."""
    text = _tool("nvdisasm", cubin, "-c")
    out, label = [], ""
    for line in text.splitlines():
        m = re.match(r"\s*(\.L_\w+):", line)
        if m:
            label = m.group(1)
            continue
        m = re.match(r"\s*/\*([0-9a-f]{4,})\*/\s+(.*?);", line)
        if m:
            out.append((int(m.group(1), 16), label, m.group(2).strip()))
            label = ""
    return out


def opcode(instr: str) -> str:
    instr = re.sub(r"^@!?U?P[T0-9]+\s+", "", instr)
    return instr.split()[0].split(".")[0]


def op_class(op: str) -> str:
    for name, prefixes in CLASSES:
        if op.startswith(prefixes):
            return name
    return "other"


def loops(sass: list[tuple[int, str, str]]) -> list[tuple[int, int]]:
    """(first, last) instruction indices of every backward branch's loop body."""
    label_at = {lab: i for i, (_, lab, _) in enumerate(sass) if lab}
    found = []
    for i, (_, _, instr) in enumerate(sass):
        m = re.search(r"\bBRA\b.*?`\((\.L_\w+)\)", instr)
        if m and m.group(1) in label_at and label_at[m.group(1)] <= i:
            found.append((label_at[m.group(1)], i))
    return found


def report(name: str, compiled: Any, positions_per_iter: int | None, dump: Path | None) -> dict[str, Any]:
    """Print and return registers, spills and the per-position histogram of the hottest loop. With
    ``positions_per_iter`` None (the forward) the loop's positions are its 16-bit stores (one bf16 output
    per position; the chunk states are float32)."""
    sass = disassemble(compiled.asm["cubin"])
    if dump is not None:
        dump.mkdir(parents=True, exist_ok=True)
        (dump / f"{name}.sass").write_text("\n".join(f"{a:05x} {lab:10s} {s}" for a, lab, s in sass))
        (dump / f"{name}.ttgir").write_text(compiled.asm["ttgir"])
    body = loops(sass)
    # The hottest loop: the largest among loops that contain no other loop.
    inner = [lp for lp in body if not any(o != lp and lp[0] <= o[0] and o[1] <= lp[1] for o in body)]
    first, last = max(inner, key=lambda lp: lp[1] - lp[0]) if inner else (0, len(sass) - 1)
    ops = Counter(op_class(opcode(s)) for _, _, s in sass[first:last + 1])
    if positions_per_iter is None:
        positions_per_iter = max(1, sum(re.search(r"\bSTG\.E\.U16\b", s) is not None
                                        for _, _, s in sass[first:last + 1]))
    local_ops = sum(opcode(s) in ("LDL", "STL") for _, _, s in sass)
    n_loop = last - first + 1
    md = compiled.metadata
    regs, spills = resources(compiled.asm["cubin"])
    res = {"kernel": name, "registers": regs, "spills": spills, "local_ops": local_ops, "sass_total": len(sass),
           "loop_instructions": n_loop, "positions_per_loop": positions_per_iter,
           "per_position": n_loop / positions_per_iter,
           "histogram_per_position": {k: v / positions_per_iter for k, v in ops.most_common()},
           "shared_bytes": md.shared}
    hist = ", ".join(f"{k} {v:.1f}" for k, v in res["histogram_per_position"].items())
    print(f"{name}: {res['registers']} registers, {res['spills']} spill bytes ({local_ops} LDL/STL), "
          f"{md.shared} B shared, "
          f"{len(sass)} SASS; hot loop {n_loop} instr / {positions_per_iter} positions = "
          f"{res['per_position']:.0f} per position per warp\n    {hist}", flush=True)
    return res


# Constexprs the v2 kernels add, as the launcher sets them for a CUDA launch at dim 768, N=16 (v1: none).
V2_FLAGS = dict(EVEN_D=True, EVEN_N=True, FAST=True)


def forward_kernels(variant: str, log2_tile: int = 4, tile_io: bool = False,
                    segmented: bool = False) -> list[tuple[Any, dict[str, Any]]]:
    """The forward kernel (kernels/triton_scan_fwd.py, or _fwd2.py for v2) with a training step's constexprs."""
    from kernels.triton_scan_fwd import _scan_fwd_kernel
    from kernels.triton_scan_fwd2 import _scan_fwd_kernel_v2
    from kernels.triton_scan_fwd3 import _scan_fwd_kernel_v3
    from kernels.triton_scan_fwd4 import _scan_fwd_kernel_v4

    if variant == "v4":
        return [(_scan_fwd_kernel_v4, dict(STORE_STATES=True, HAS_D=True))]
    if variant == "v3":
        from kernels.triton_scan_segments import _scan_segment_summary_v3

        return [(_scan_fwd_kernel_v3, dict(STORE_STATES=True, HAS_D=True, FAST=True, LOG2_TILE=log2_tile)),
                (_scan_segment_summary_v3, dict(ADJOINT=False, FAST=True))]
    if variant == "v2":
        return [(_scan_fwd_kernel_v2, dict(STORE_STATES=True, HAS_D=True, TILE_IO=tile_io, SEGMENTED=segmented,
                                           **V2_FLAGS))]
    return [(_scan_fwd_kernel, dict(STORE_STATES=True, HAS_D=True))]


def backward_kernels(variant: str, dlast: bool = False, tile_io: bool = False, tile_grads: bool = False,
                     segmented: bool = False) -> list[tuple[Any, dict[str, Any]]]:
    """The backward kernel (kernels/triton_scan_bwd.py, or _bwd2.py for v2), without and with prefetch; ``dlast``:
    as when the last state has a gradient."""
    from kernels.triton_scan_bwd import _scan_bwd_kernel
    from kernels.triton_scan_bwd2 import _scan_bwd_kernel_v2
    from kernels.triton_scan_bwd3 import _scan_bwd_kernel_v3

    if variant == "v4":
        return []  # forward only: a v4 forward runs with a v1 or v2 backward
    if variant == "v3":
        from kernels.triton_scan_segments import _scan_segment_summary_v3

        return [(_scan_bwd_kernel_v3, dict(HAS_DLAST=dlast, HAS_D=True, PREFETCH=p, FAST=True))
                for p in (False, True)] + [(_scan_segment_summary_v3, dict(ADJOINT=True, FAST=True))]
    if variant == "v2":
        return [(_scan_bwd_kernel_v2, dict(HAS_DLAST=dlast, HAS_D=True, PREFETCH=p, TILE_IO=tile_io,
                                           TILE_GRADS=tile_grads, SEGMENTED=segmented, **V2_FLAGS))
                for p in (False, True)]
    return [(_scan_bwd_kernel, dict(HAS_DLAST=dlast, HAS_D=True, PREFETCH=p)) for p in (False, True)]


def _name(kernel: Any, extra: dict[str, Any], block_d: int) -> str:
    flags = (",prefetch" if extra.get("PREFETCH") else "") + (",adjoint" if extra.get("ADJOINT") else "")
    flags += f",bl{extra['BLOCK_L']}" if "BLOCK_L" in extra else ""
    flags += ",tile_io" if extra.get("TILE_IO") else ""
    flags += ",tile_grads" if extra.get("TILE_GRADS") else ""
    flags += ",segmented" if extra.get("SEGMENTED") else ""
    return f"{kernel.__name__.strip('_')}[bd{block_d}{flags}]"


def main(argv: list[str] | None = None) -> list[dict[str, Any]]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--block-d", type=int, nargs="+", default=[16])
    parser.add_argument("--chunk", type=int, default=4)
    parser.add_argument("--reverse", action="store_true")
    parser.add_argument("--shape", type=int, nargs=4, default=[16, 768, 16, 1024], metavar=("BATCH", "DIM", "N", "L"),
                        help="integer arguments as at this launch (their divisibility by 16 changes the code)")
    parser.add_argument("--only", choices=["fwd", "bwd"], default=None)
    parser.add_argument("--maxnreg", type=int, default=None, help="register cap (ScanLaunchConfig.maxnreg)")
    parser.add_argument("--dlast", action="store_true", help="backward kernels with a last-state gradient")
    parser.add_argument("--channel-last", action="store_true",
                        help="v1 / v2: u / delta / z as a Vim block passes them, (batch, L, dim) memory")
    parser.add_argument("--dump", type=Path, default=None, help="write each kernel's SASS and TTGIR here")
    parser.add_argument("--variant", nargs="+", choices=["v1", "v2", "v3", "v4"], default=["v1"],
                        help="kernel variants (ScanLaunchConfig.variant) to report")
    parser.add_argument("--tile-io", action="store_true",
                        help="v2: read and write chunk tiles (ScanLaunchConfig.tile_io; contiguous inputs only)")
    parser.add_argument("--tile-grads", action="store_true",
                        help="v2 backward: gradients written contiguous as chunk tiles (ScanLaunchConfig.tile_grads; "
                             "with --channel-last, as the copied backward runs it)")
    parser.add_argument("--segmented", action="store_true",
                        help="v2: the kernels of a launch split into sequence segments (ScanLaunchConfig.segments)")
    parser.add_argument("--tile-l", type=int, default=16,
                        help="v3 forward: positions per u / delta / z / out tile (ScanLaunchConfig.tile_l)")
    parser.add_argument("--block-l", type=int, nargs="+", default=[128],
                        help="v4: positions per span (ScanLaunchConfig.block_l)")
    args = parser.parse_args(argv)
    if args.tile_io and args.channel_last:
        parser.error("--tile-io reads contiguous inputs: not with --channel-last")
    from kernels.triton_scan_common import ScanLaunchConfig, v4_warps
    from kernels.triton_scan_fast import scatter_levels

    n_state_pad = 16
    common = dict(N_PAD=n_state_pad, CHUNK=args.chunk, HAS_Z=True, HAS_BIAS=True, SOFTPLUS=True, REVERSE=args.reverse)
    batch, dim, n_state, length = args.shape
    n_chunks = -(-length // args.chunk)
    ints = dict(dim=dim, length=length, dim_per_group=dim, n_groups=1, n_chunks=n_chunks,
                # v3: one segment of every chunk (a 1 here would be a compile-time constant: one chunk per segment)
                n_seg=1, chunks_per_seg=n_chunks,
                n_state=n_state, a_state_stride=dim,  # A as the launchers' dim-major copy
                bc_batch_stride=length * n_state, bc_group_stride=length * n_state,
                bc_pos_stride=n_state,  # B and C as the launchers' contiguous (batch, groups, L, N) copies
                bc_state_stride=length,  # v4: (batch, groups, N, L), unit position stride
                # v1 / v2: contiguous u / delta / z (sequence_strides), as the benchmark passes them
                seq_sb=dim * length, seq_sd=length, seq_sl=1, z_sb=dim * length, z_sd=length, z_sl=1)
    if args.channel_last:  # z: the second half of in_proj's (batch, L, 2 dim) output
        ints.update(seq_sb=dim * length, seq_sd=1, seq_sl=dim, z_sb=2 * dim * length, z_sd=1, z_sl=2 * dim)
    results = []
    for variant in args.variant:
        for block_d in args.block_d:
            consts = dict(common, BLOCK_D=block_d)
            warps = max(1, block_d // 32) if variant == "v3" else 1
            if args.only != "bwd" and variant == "v4":
                for block_l in args.block_l:
                    cfg = ScanLaunchConfig(block_d, args.chunk, variant="v4", block_l=block_l)
                    for kernel, extra in forward_kernels(variant):
                        extra = dict(extra, BLOCK_L=block_l)
                        warps4 = v4_warps(cfg)
                        c = compile_kernel(kernel, {**consts, **extra}, ints, num_warps=warps4, maxnreg=args.maxnreg)
                        # The hot loop is the state loop: one pass covers one state of block_l positions of
                        # block_d channels, spread over the program's warps.
                        per_warp = block_l * block_d / warps4
                        res = report(_name(kernel, extra, block_d), c, per_warp, args.dump)
                        res["per_element"] = res["per_position"] * 32
                        # Per span, outside the state loop: loads of u / delta / z, softplus, gate, output store.
                        body = loops(disassemble(c.asm["cubin"]))
                        outer = max((hi - lo + 1 for lo, hi in body), default=0)
                        inner = res["loop_instructions"]
                        res["span_overhead_per_element"] = (outer - inner) * warps4 * 32 / (block_l * block_d * n_state)
                        hist = ", ".join(f"{k} {v * 32:.1f}" for k, v in res["histogram_per_position"].items())
                        print(f"    {warps4} warps; state loop: {res['per_element']:.1f} thread-instructions per (channel, "
                              f"position, state) ({hist}); per span outside it: {outer - inner} instr = "
                              f"{res['span_overhead_per_element']:.1f} more per element at N={n_state}", flush=True)
                        results.append(res)
            elif args.only != "bwd":
                tile = ScanLaunchConfig(block_d, args.chunk, variant=variant, tile_l=args.tile_l)
                for kernel, extra in forward_kernels(variant, tile.log2_tile(), args.tile_io, args.segmented):
                    c = compile_kernel(kernel, {**consts, **extra}, ints, num_warps=warps, maxnreg=args.maxnreg)
                    # Positions per hot-loop pass: LLVM may unroll the per-position loop into the chunk's; the
                    # v3 forward walks a tile per pass (its segment summary a chunk).
                    per_pass = None
                    if variant == "v3":
                        per_pass = 1 << tile.log2_tile() if "LOG2_TILE" in extra else args.chunk
                    elif extra.get("TILE_IO"):  # v2 with chunk tiles: a chunk per pass
                        per_pass = args.chunk
                    results.append(report(_name(kernel, extra, block_d), c, per_pass, args.dump))
            if args.only != "fwd":
                for kernel, extra in backward_kernels(variant, args.dlast, args.tile_io, args.tile_grads,
                                                      args.segmented):
                    if "LEVELS" in kernel.arg_names:
                        # v2 reduce-scatters dB and dC one at a time, v3 stacked.
                        rows = n_state_pad if variant == "v2" else 2 * n_state_pad
                        extra = dict(extra, LEVELS=scatter_levels(rows, block_d))
                    c = compile_kernel(kernel, {**consts, **extra}, ints, num_warps=warps, maxnreg=args.maxnreg)
                    # The backward unrolls a chunk per loop iteration; the forward walks one position.
                    results.append(report(_name(kernel, extra, block_d), c, args.chunk, args.dump))
    return results


if __name__ == "__main__":
    main()
