"""Curation throughput: CT series (pydicom-data 693_UNCI replicated to N slices with distinct UIDs and
positions) and the Kermany chest X-ray JPEGs: files/s, samples/s, samples per CPU-second (the child
process and its workers), peak memory (``--part pipeline``, whole runs including process start-up);
per-slice CPU time of the worker's job without start-up (``--part steady``); the stored format
(``--part format``: size, encode and decode time of PNG levels, WebP-lossless and .npy).

    .venv/bin/python bench/curate.py --part all --slices 500 --workers 1 2
"""

from __future__ import annotations

import argparse
import io
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pydicom
from PIL import Image

SITE = Path(pydicom.__file__).parent.parent
CT_SOURCE = SITE / "data_store" / "data" / "693_UNCI.dcm"
KERMANY = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "xray" / "kermany_cxr_224"


def cpu_name() -> str:
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("model name"):
            return line.split(":", 1)[1].strip()
    return platform.processor() or "unknown CPU"


def make_ct_series(folder: Path, n: int) -> None:
    """Replicate one real 512x512 CT slice into an n-slice series with distinct UIDs and positions; each
    replica is rolled by its index along the columns so that the duplicate detector keeps them all."""
    ds = pydicom.dcmread(CT_SOURCE)
    pixels = ds.pixel_array
    series = pydicom.uid.generate_uid()
    folder.mkdir(parents=True, exist_ok=True)
    for i in range(n):
        ds.SOPInstanceUID = pydicom.uid.generate_uid()
        ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
        ds.SeriesInstanceUID = series
        ds.ImagePositionPatient = [-122.5, -112.4, 47.0 + 2.5 * i]
        ds.InstanceNumber = i + 1
        ds.PixelData = np.roll(pixels, i + 1, axis=1).tobytes()
        ds.save_as(folder / f"slice{i:04d}.dcm", enforce_file_format=True)


def run_curate(inputs: list[str], workers: int, extra: list[str]) -> tuple[float, float, dict, int]:
    """Run curate in a child process; returns (wall seconds, CPU seconds of the child and its workers,
    manifest, peak RSS of one process in MiB)."""
    import json
    import resource
    import subprocess

    with tempfile.TemporaryDirectory() as out:
        env = {**os.environ, "SCANMAE_CURATE_SALT": os.environ.get("SCANMAE_CURATE_SALT", "bench-salt-0123456789abcdef")}
        code = ("import resource,sys; from data_curation.cli import main; rc=main(sys.argv[1:]); "
                "print('PEAK', resource.getrusage(resource.RUSAGE_SELF).ru_maxrss, "
                "resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss); sys.exit(rc)")
        before = resource.getrusage(resource.RUSAGE_CHILDREN)
        t0 = time.perf_counter()
        proc = subprocess.run([sys.executable, "-c", code, *inputs, "--output", out, "--workers", str(workers),
                               "--no-progress", *extra], env=env, capture_output=True, text=True,
                              cwd=Path(__file__).resolve().parents[1])
        seconds = time.perf_counter() - t0
        after = resource.getrusage(resource.RUSAGE_CHILDREN)
        cpu = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
        if proc.returncode != 0:
            raise RuntimeError(proc.stderr[-2000:])
        peak = next(line for line in proc.stdout.splitlines() if line.startswith("PEAK")).split()[1:]
        manifest = json.loads((Path(out) / "manifest.json").read_text())
    return seconds, cpu, manifest, max(int(p) for p in peak) // 1024


def bench_steady(slices: int) -> None:
    """Per-slice CPU time of the worker's job (read, map, encode, hash) and of the header pass, in this
    process after a warm-up: the throughput of one busy core without process start-up."""
    from data_curation.config import CurateConfig
    from data_curation.discover import InputFile
    from data_curation.readers.dicom import read_header
    from data_curation.tasks import Task, run_task

    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp) / "ct"
        make_ct_series(folder, slices)
        files = sorted(folder.iterdir())
        print(f"CPU: {cpu_name()}; one process, {slices} CT slices 512x512, after a warm-up")
        print("| windows | header pass ms/slice | task ms/slice | slices per CPU-second |")
        print("|---|---|---|---|")
        for windows in (["soft_tissue"], ["brain", "subdural", "bone"], ["hu16"]):
            cfg = CurateConfig(ct_windows=windows)
            tasks = [Task(InputFile(str(f), "ct", f.name, "dicom"), 0, 1, {"series_index": i})
                     for i, f in enumerate(files)]
            for t in tasks[:5]:
                run_task(t, cfg, b"bench-salt-0123456789abcdef")
            t0 = time.process_time()
            for f in files:
                read_header(f)
            t1 = time.process_time()
            for t in tasks:
                if run_task(t, cfg, b"bench-salt-0123456789abcdef").reject:
                    raise RuntimeError("bench slice rejected")
            t2 = time.process_time()
            per = (t2 - t0) / slices
            print(f"| {' '.join(windows)} | {(t1 - t0) / slices * 1e3:.2f} | {(t2 - t1) / slices * 1e3:.2f} "
                  f"| {1 / per:.0f} |", flush=True)


def bench_pipeline(slices: int, workers_list: list[int]) -> None:
    print(f"CPU: {cpu_name()} ({os.cpu_count()} logical cores visible), python {platform.python_version()}, "
          f"load average {os.getloadavg()[0]:.1f}")
    print("| data | workers | files | samples | wall s | CPU s | samples/s | samples per CPU-second "
          "| peak RSS MiB |")
    print("|---|---|---|---|---|---|---|---|---|")
    with tempfile.TemporaryDirectory() as tmp:
        ct = Path(tmp) / "ct_series"
        make_ct_series(ct, slices)
        cases = [(f"CT {slices}x512x512 (soft_tissue window, 8-bit PNG)", [str(ct)], []),
                 (f"CT {slices}x512x512 + coronal/sagittal reslice (32 MiB slabs)", [str(ct)],
                  ["--dicom_reslice", "coronal", "sagittal", "--reslice_memory_mb", "32"]),
                 ("Kermany CXR 224 JPEG (2000 train + 624 test)", [str(KERMANY)], [])]
        for name, inputs, extra in cases:
            for w in workers_list:
                sec, cpu, man, peak = run_curate(inputs, w, extra)
                files, samples = man["files_seen"], man["samples_written"]
                print(f"| {name} | {w} | {files} | {samples} | {sec:.1f} | {cpu:.1f} | {samples / sec:.0f} "
                      f"| {samples / cpu:.0f} | {peak} |", flush=True)


def bench_format() -> None:
    ds = pydicom.dcmread(CT_SOURCE)
    hu = ds.pixel_array.astype(np.float32) * float(ds.RescaleSlope) + float(ds.RescaleIntercept)
    cases = {"CT 512x512 uint16 (HU+1024)": np.clip(hu + 1024, 0, 65535).astype(np.uint16),
             "CT 512x512 uint8 (brain window)": np.clip((hu - 0) / 80 * 255, 0, 255).astype(np.uint8)}
    first = sorted((KERMANY / "train" / "NORMAL").iterdir())[0]
    cases["Kermany 224x224 uint8"] = np.asarray(Image.open(first).convert("L"))
    from data_curation.png import encode_png

    print("| image | format | KiB | encode ms | decode ms |")
    print("|---|---|---|---|---|")
    for name, arr in cases.items():
        for fmt in ("curate-png", "png1", "png6", "webp", "npy"):
            if fmt == "webp" and arr.dtype != np.uint8:
                continue  # WebP has no 16-bit mode

            def enc(fmt=fmt, arr=arr) -> bytes:
                buf = io.BytesIO()
                if fmt == "curate-png":  # what curate stores: Up filter, zlib level 1 (RLE for 8-bit)
                    return encode_png(arr, 1)
                if fmt == "npy":
                    np.save(buf, arr, allow_pickle=False)
                elif fmt.startswith("png"):  # PIL's encoder (adaptive filter per row) at this zlib level
                    Image.fromarray(arr).save(buf, format="PNG", compress_level=int(fmt[3:]))
                else:
                    Image.fromarray(arr).save(buf, format="WEBP", lossless=True, quality=100)
                return buf.getvalue()

            def dec(data: bytes, fmt=fmt) -> np.ndarray:
                if fmt == "npy":
                    return np.load(io.BytesIO(data), allow_pickle=False)
                return np.asarray(Image.open(io.BytesIO(data)))

            data = enc()
            out = dec(data)
            out = out[..., 0] if out.ndim == 3 and arr.ndim == 2 else out
            assert np.array_equal(out, arr), f"{fmt} is not lossless"
            te = _time(enc, 20)
            td = _time(lambda data=data, dec=dec: dec(data), 30)
            print(f"| {name} | {fmt} | {len(data) / 1024:.1f} | {te * 1e3:.2f} | {td * 1e3:.2f} |")


def _time(fn, n: int) -> float:
    """CPU seconds per call (process time: less disturbed by other jobs on a shared machine)."""
    fn()
    t0 = time.process_time()
    for _ in range(n):
        fn()
    return (time.process_time() - t0) / n


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--part", choices=["format", "steady", "pipeline", "all"], default="all")
    p.add_argument("--slices", type=int, default=500)
    p.add_argument("--workers", type=int, nargs="+", default=[1, 2])
    a = p.parse_args(argv)
    if a.part in ("format", "all"):
        bench_format()
    if a.part in ("steady", "all"):
        bench_steady(min(a.slices, 200))
    if a.part in ("pipeline", "all"):
        bench_pipeline(a.slices, a.workers)
    return 0


if __name__ == "__main__":
    sys.exit(main())
