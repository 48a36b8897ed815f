"""Shared by the pretraining tests: shards curated from the bundled X-rays, pretrain/main.py's argument list, and
waiting on runs started as processes."""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

from data_curation.cli import main as curate_main

REPO = Path(__file__).resolve().parents[1]
XRAYS = REPO / "sample_data" / "xray"  # 24 real chest X-rays (Kermany et al.), 224 px


def curate_xrays(out: Path) -> Path:
    """The bundled X-rays as shards of 4 samples in `out`."""
    rc = curate_main([str(XRAYS), "--output", str(out), "--workers", "0", "--shard_maxcount", "4", "--no-progress"])
    assert rc == 0 and (out / "manifest.json").is_file()
    return out


def args(data: Path, out: Path, **over: object) -> list[str]:
    """pretrain/main.py's flags for a tiny ViT MAE run on `data`; `over` replaces or adds flags (None: a switch)."""
    opts: dict[str, object] = {"model": "mae_test_vit", "input_size": 32, "in_chans": 1, "data_path": data,
                               "output_dir": out, "batch_size": 4, "epochs": 4, "warmup_epochs": 1, "lr": 2e-3,
                               "num_workers": 0, "log_every": 1, "save_every": 1000, "vis_every": 0, "seed": 5}
    opts.update(over)
    argv = ["--norm_pix_loss", "--no-tensorboard"]
    for key, value in opts.items():
        argv += [f"--{key}"] if value is None else [f"--{key}", str(value)]
    return argv


def files_digest(ckpt: Path) -> dict[str, str]:
    """SHA-256 of each weight file in a checkpoint folder: equal digests, bitwise equal states."""
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(ckpt.iterdir())
            if p.suffix in (".safetensors", ".bin")}


def wait_for(predicate: Callable[[], bool], proc: subprocess.Popen, timeout: float = 120.0) -> None:
    """Polls `predicate` while `proc` runs; fails if the run ends first or the time runs out."""
    end = time.time() + timeout
    while time.time() < end:
        if predicate():
            return
        assert proc.poll() is None, f"run ended early with code {proc.returncode}: {proc.stdout.read()}"
        time.sleep(0.05)
    proc.kill()
    raise AssertionError("timed out waiting for the run")


def spawn(argv: list[str]) -> subprocess.Popen:
    """pretrain/main.py as a child process, its output unbuffered on one pipe."""
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    return subprocess.Popen([sys.executable, str(REPO / "pretrain" / "main.py"), *argv], cwd=REPO, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
