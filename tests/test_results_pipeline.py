"""pipeline.results: the Kermany patient-level split, a tiny end-to-end run, and the time budget."""

from __future__ import annotations

import csv
import json
import subprocess
import sys
from pathlib import Path

import pytest
from test_linprobe_fixtures import write_split_csv

from pipeline.commands import finetune_epochs, label_space
from pipeline.kermany import kermany_patient_id
from pipeline.results import main
from pipeline.results_table import table_lines
from pipeline.run_log import encoder_digest
from pipeline.stages import REPO_ROOT

KERMANY = REPO_ROOT.parent / "shared" / "data" / "xray" / "kermany_cxr_224"
BREAST = REPO_ROOT / "sample_data" / "medmnist" / "breastmnist.npz"

needs_kermany = pytest.mark.skipif(not KERMANY.is_dir(), reason=f"{KERMANY} not present")


def read_rows(path: Path) -> list[dict]:
    with open(path, newline="") as fh:
        return list(csv.DictReader(fh))


def test_patient_id_rule() -> None:
    assert kermany_patient_id("person1_bacteria_1.jpeg") == "person1"
    assert kermany_patient_id("person1_virus_7.jpeg") == "person1"
    assert kermany_patient_id("IM-0122-0001.jpeg") == "IM-0122"
    assert kermany_patient_id("IM-0011-0001-0002.jpeg") == "IM-0011"
    assert kermany_patient_id("NORMAL2-IM-0123-0001.jpeg") == "NORMAL2-IM-0123"
    with pytest.raises(ValueError, match="scan.jpeg"):
        kermany_patient_id("scan.jpeg")


@needs_kermany
def test_kermany_csv_patient_disjoint_and_deterministic(tmp_path: Path) -> None:
    first, second = tmp_path / "a" / "kermany.csv", tmp_path / "b" / "kermany.csv"
    assert main(["kermany-csv", str(KERMANY), str(first), "--val_fraction", "0.1"]) == 0
    assert main(["kermany-csv", str(KERMANY), str(second), "--val_fraction", "0.1"]) == 0
    rows = read_rows(first)
    assert [(r["path"], r["split"]) for r in rows] == [(r["path"], r["split"]) for r in read_rows(second)]
    # every image once; the test folder is passed through untouched
    n_train = sum(1 for _ in (KERMANY / "train").rglob("*.jpeg"))
    n_test = sum(1 for _ in (KERMANY / "test").rglob("*.jpeg"))
    assert len(rows) == len({r["path"] for r in rows}) == n_train + n_test
    assert all(("/test/" in r["path"]) == (r["split"] == "test") for r in rows)
    patients = {s: {kermany_patient_id(Path(r["path"]).name) for r in rows if r["split"] == s}
                for s in ("train", "val")}
    assert patients["train"] and patients["val"] and not patients["train"] & patients["val"]
    for label in ("NORMAL", "PNEUMONIA"):  # stratified: each class gives about 10 % of its images
        n_val = sum(r["split"] == "val" and r["label"] == label for r in rows)
        n_all = sum(r["split"] != "test" and r["label"] == label for r in rows)
        assert 0.09 <= n_val / n_all <= 0.12
    # relative paths resolve from the CSV's folder through common.data
    from common.data import build_dataset

    val = build_dataset(str(first), split="val", labeled=True, in_chans=1)
    assert len(val) == sum(r["split"] == "val" for r in rows) and val.labels.num_classes == 2
    assert (first.parent / rows[0]["path"]).is_file()
    # another seed moves patients, still disjointly
    other = tmp_path / "c.csv"
    assert main(["kermany-csv", str(KERMANY), str(other), "--seed", "1"]) == 0
    assert [r["split"] for r in read_rows(other)] != [r["split"] for r in rows]


def small_kermany_csv(tmp_path: Path, per_split_class: int) -> Path:
    """The real Kermany CSV cut to a few images per (split, class), written in the same folder."""
    full = tmp_path / "kermany_full.csv"
    main(["kermany-csv", str(KERMANY), str(full), "--val_fraction", "0.1"])
    taken: dict[tuple[str, str], int] = {}
    small = []
    for r in read_rows(full):
        key = (r["split"], r["label"])
        if taken.get(key, 0) < per_split_class:
            taken[key] = taken.get(key, 0) + 1
            small.append(r)
    return write_split_csv(tmp_path / "kermany_small.csv", small)


def small_breastmnist(tmp_path: Path) -> Path:
    """The bundled BreastMNIST cut to its first 176 / 32 / 48 train / val / test images (both classes in each; 22
    batches of 8, so --ft_min_steps up to 22 keeps one fine-tuning epoch), under the name the tables know."""
    import numpy as np

    sizes = {"train": 176, "val": 32, "test": 48}
    with np.load(BREAST) as full:
        arrays = {f"{split}_{part}": full[f"{split}_{part}"][:n] for split, n in sizes.items()
                  for part in ("images", "labels")}
    path = tmp_path / "breast" / "breastmnist.npz"
    path.parent.mkdir()
    np.savez(path, **arrays)
    return path


def curated_pool(tmp_path: Path) -> Path:
    pool = tmp_path / "pool"
    subprocess.run([sys.executable, "-m", "data_curation.cli", str(REPO_ROOT / "sample_data" / "xray" / "train"),
                    "--output", str(pool), "--size_policy", "max:32", "--workers", "1"],
                   cwd=REPO_ROOT, check=True, capture_output=True)
    return pool


TINY = ["--encoders", "test_vit", "--input_size", "32", "--batch_size", "8", "--pretrain_epochs", "1",
        "--probe_epochs", "2", "--ft_epochs", "1", "--ft_batch_size", "8", "--probe_batch_size", "8", "--num_workers", "0"]


@needs_kermany
def test_run_tiny_end_to_end(tmp_path: Path) -> None:
    kermany = small_kermany_csv(tmp_path, per_split_class=6)
    breast = small_breastmnist(tmp_path)
    pool = curated_pool(tmp_path)
    out = tmp_path / "res"
    assert main(["run", "--pool", str(pool), "--datasets", str(breast), str(kermany),
                 "--out", str(out), "--inits", "mae", "--jobs", "2", "--ft_class_weighted", "--ft_min_steps", "20",
                 "--ft_layer_decay", "0.8", "--ft_select_metric", "loss", *TINY]) == 0
    rows = json.loads((out / "runs.json").read_text())
    transfer = [r for r in rows if r["protocol"] != "pretrain"]
    assert {(r["protocol"], r["dataset"]) for r in transfer} == {
        (p, d) for p in ("linprobe", "finetune") for d in ("breastmnist", "kermany_small")}
    for r in rows:
        assert r["status"] == "ok", r
    for r in transfer:
        assert isinstance(r["acc"], float) and isinstance(r["auc"], float) and r["evaluated_on"] == "test"
        # both tasks have two classes: the row keeps the test metrics at the validation-fitted threshold
        assert isinstance(r["at_val_threshold"]["balanced_acc"], float) and "acc" in r["at_val_threshold"]["ci95"]
        assert "--nb_classes" in r["command"] and r["command"][r["command"].index("--nb_classes") + 1] == "2"
        assert isinstance(r["pretrain_seconds"], float)
        assert ("--class_weighted_loss" in r["command"]) == (r["protocol"] == "finetune")
        # --ft_select_metric reaches the fine-tunes; the probes keep linprobe's default metric, left implicit
        if r["protocol"] == "finetune":
            assert r["command"][r["command"].index("--select_metric") + 1] == "loss"
        else:
            assert "--select_metric" not in r["command"]
        if r["protocol"] == "finetune":
            assert r["command"][r["command"].index("--layer_decay") + 1] == "0.8"
            # --ft_min_steps 20 at batch 8: BreastMNIST (22 full batches) keeps --ft_epochs 1, the 12 Kermany
            # images (one full batch) get 20 epochs.
            n_train = label_space(str(breast) if r["dataset"] == "breastmnist" else str(kermany))[2]
            epochs = int(r["command"][r["command"].index("--epochs") + 1])
            assert epochs == (1 if n_train == 176 else 20) == finetune_epochs(1, 20, n_train, 8)
    text = "\n".join(table_lines(rows, None, 32))
    assert "Kermany pediatric chest X-ray" in text and "**BreastMNIST**" in text and "**failed**" not in text
    point = transfer[0]["at_val_threshold"]
    assert f"{point['acc']:.3f} [" in text and f"] / {point['balanced_acc']:.3f} [" in text
    assert "| linprobe |" in text and "blocks)" not in text

    # A rerun on a machine without the pretrained encoder (runs.json carried over from an earlier GPU call):
    # the recorded pretraining runs again before the rows still to do, and the finished rows are kept. The rerun
    # also raises --ft_min_steps to 21: the Kermany fine-tune's command changes (21 epochs), so it runs again,
    # while BreastMNIST's (1 epoch either way) is kept.
    (out / "pretrain" / "test_vit" / "encoder.safetensors").unlink()
    redo = next(r for r in rows if r["protocol"] == "linprobe" and r["dataset"] == "breastmnist")
    (out / "runs.json").write_text(json.dumps([r for r in rows if r is not redo]))
    rerun = {("linprobe", "breastmnist"), ("finetune", "kermany_small")}
    kept = {(r["protocol"], r["dataset"]): r["seconds"] for r in rows
            if r["protocol"] != "pretrain" and (r["protocol"], r["dataset"]) not in rerun}
    assert main(["run", "--pool", str(pool), "--datasets", str(breast), str(kermany),
                 "--out", str(out), "--inits", "mae", "--no_preflight", "--jobs", "2", "--ft_class_weighted",
                 "--ft_min_steps", "21", "--ft_layer_decay", "0.8", "--ft_select_metric", "loss", *TINY]) == 0
    again = json.loads((out / "runs.json").read_text())
    assert all(r["status"] == "ok" for r in again) and len(again) == len(rows)
    assert (out / "pretrain" / "test_vit" / "encoder.safetensors").is_file()
    by_stage = {(r["protocol"], r["dataset"]): r for r in again}
    assert {k: by_stage[k]["seconds"] for k in kept} == kept
    kermany_ft = by_stage[("finetune", "kermany_small")]["command"]
    assert kermany_ft[kermany_ft.index("--epochs") + 1] == "21"
    # (On the CPU the pretraining repeats bit for bit, so the kept rows stand on the same encoder.)
    encoder = out / "pretrain" / "test_vit" / "encoder.safetensors"
    first_digest = encoder_digest(encoder)
    assert {r["encoder_digest"] for r in again if r["protocol"] != "pretrain"} == {first_digest}

    # A pretraining that runs again on a different encoder (here a changed recipe: 2 epochs) reruns every MAE row,
    # though their own commands are unchanged: a table never mixes two pretraining runs.
    assert main(["run", "--pool", str(pool), "--datasets", str(breast), str(kermany),
                 "--out", str(out), "--inits", "mae", "--no_preflight", "--jobs", "2", "--ft_class_weighted",
                 "--ft_min_steps", "21", "--ft_layer_decay", "0.8", "--ft_select_metric", "loss", *TINY,
                 "--pretrain_epochs", "2"]) == 0
    third = json.loads((out / "runs.json").read_text())
    assert all(r["status"] == "ok" for r in third) and len(third) == len(rows)
    second_digest = encoder_digest(encoder)
    assert second_digest != first_digest
    assert {r["encoder_digest"] for r in third if r["protocol"] != "pretrain"} == {second_digest}


def test_time_budget_stops_and_skips(tmp_path: Path) -> None:
    """A budget smaller than one stage: pretraining is stopped at it, everything after is recorded as skipped."""
    out = tmp_path / "res"
    assert main(["run", "--pool", str(tmp_path / "no_pool_needed"), "--datasets", str(BREAST), "--out", str(out),
                 "--time_budget_s", "0.5", "--no_preflight", *TINY]) == 0
    rows = json.loads((out / "runs.json").read_text())
    by_key = {(r["init"], r["protocol"]): r for r in rows}
    assert set(by_key) == {("mae", "pretrain"), ("mae", "linprobe"), ("mae", "finetune"),
                           ("random", "linprobe"), ("random", "finetune")}
    # stopped by the call's budget (or not started), not by an error of its own: skipped
    assert by_key[("mae", "pretrain")]["status"] == "skipped"
    assert "time budget of 0.5 s" in by_key[("mae", "pretrain")]["reason"]
    for init, protocol in (("mae", "linprobe"), ("mae", "finetune")):
        assert by_key[(init, protocol)]["status"] == "skipped"
        assert "MAE pretraining of test_vit skipped: " in by_key[(init, protocol)]["reason"]
    for protocol in ("linprobe", "finetune"):
        assert by_key[("random", protocol)]["status"] == "skipped"
        assert "time budget of 0.5 s used up" in by_key[("random", protocol)]["reason"]
        assert by_key[("random", protocol)]["command"][:3] == [sys.executable, "-m", f"{protocol}.main"]
    text = "\n".join(table_lines(rows, None, 32))
    assert text.count("**skipped**") == 4 and "| test_vit | skipped |" in text and "failed" not in text
    # a rerun without the budget would retry these rows: none of them counts as done
    from pipeline.run_log import RunLog
    from pipeline.stages import TimeBudget

    log = RunLog(out / "runs.json", TimeBudget(None))
    assert not any(log.done(log.key(r)) for r in rows)


def test_a_stage_stopped_by_the_budget_is_skipped_not_failed(tmp_path: Path) -> None:
    """The budget ran out while the stage ran: a rerun should retry it, and the table should not call it broken."""
    from pipeline.run_log import RunLog
    from pipeline.stages import TimeBudget

    log = RunLog(tmp_path / "runs.json", TimeBudget(1.0))
    row = log.stage(("m", "mae", "linprobe", "d"), [sys.executable, "-c", "import time; time.sleep(60)"],
                    tmp_path / "stage")
    assert row is not None and row["status"] == "skipped", row
    assert row["reason"] == "stopped when the time budget of 1 s ran out while it ran"
    assert Path(row["log"]).is_file() and not log.done(log.key(row))
    assert "failed" not in "\n".join(table_lines(json.loads((tmp_path / "runs.json").read_text()), None, 32))


def test_preflight_stops_the_call_before_any_pretraining(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    """A stage that cannot run (here a from-scratch model that does not exist) fails its one-epoch preflight, and
    the call stops before the pretraining it would otherwise have waited for."""
    out = tmp_path / "res"
    with pytest.raises(SystemExit, match="preflight failed") as stop:
        main(["run", "--pool", str(tmp_path / "never_read"), "--datasets", str(small_breastmnist(tmp_path)),
              "--out", str(out),
              "--scratch_models", "no_such_model", "--jobs", "3", *TINY])
    message = str(stop.value)
    assert "no_such_model scratch:" in message and "no_such_model" in message.split("scratch:")[1]
    assert "test_vit linprobe" not in message and "test_vit finetune" not in message  # those two passed
    assert (out / "preflight" / "scratch" / "no_such_model" / "stage.log").is_file()
    assert not (out / "pretrain").exists() and not (out / "runs.json").exists()


def test_bad_dataset_stops_before_any_stage(tmp_path: Path) -> None:
    with pytest.raises(Exception, match="missing.npz"):
        main(["run", "--pool", str(tmp_path), "--datasets", str(tmp_path / "missing.npz"), "--out",
              str(tmp_path / "res"), *TINY])
    assert not (tmp_path / "res" / "runs.json").exists()


def test_table_orders_rows_by_model_init_protocol() -> None:
    def row(model: str, init: str, protocol: str) -> dict:
        return {"model": model, "init": init, "protocol": protocol, "dataset": "breastmnist", "status": "ok",
                "acc": 0.5, "auc": 0.5}

    runs = [row("vit_s", "random", "finetune"), row("vit_s", "mae", "finetune"), row("vit_s", "mae", "linprobe"),
            row("medmamba", "scratch", "finetune"), row("vit_s", "random", "linprobe")]
    body = [line for line in table_lines(runs, None, 64) if line.startswith("| ") and "---" not in line][1:]
    assert [tuple(cell.strip() for cell in line.split("|")[1:4]) for line in body] == [
        ("medmamba", "scratch", "finetune"), ("vit_s", "mae", "linprobe"), ("vit_s", "mae", "finetune"),
        ("vit_s", "random", "linprobe"), ("vit_s", "random", "finetune")]


def test_table_names_the_probe_block_count_and_the_validation_split() -> None:
    base = {"model": "vit_s", "init": "mae", "dataset": "breastmnist", "status": "ok", "acc": 0.5, "auc": 0.5}
    probe = ["python", "-m", "linprobe.main", "--fast", "--output_dir", "x"]
    runs = [base | {"protocol": "linprobe", "command": [*probe, "--n_last_blocks", "4"]},
            base | {"protocol": "linprobe", "command": probe, "model": "vit_b"},
            base | {"protocol": "finetune", "evaluated_on": "val"}]
    shown = [tuple(cell.strip() for cell in line.split("|")[1:4]) for line in table_lines(runs, None, 64)
             if line.startswith("| vit_")]
    assert shown == [("vit_b", "mae", "linprobe"), ("vit_s", "mae", "linprobe (4 blocks)"),
                     ("vit_s", "mae", "finetune (val)")]


def test_a_failed_stage_records_its_last_output_line_and_the_table_shows_it(tmp_path: Path) -> None:
    from pipeline.run_log import RunLog
    from pipeline.stages import TimeBudget

    log = RunLog(tmp_path / "runs.json", TimeBudget(None))
    crash = [sys.executable, "-c", "print('epoch 0'); raise RuntimeError('weight is on cpu, logits on cuda:0')"]
    row = log.stage(("vit_s", "mae", "finetune", "breastmnist"), crash, tmp_path / "ft")
    assert row["status"] == "failed" and row["cause"] == "RuntimeError: weight is on cpu, logits on cuda:0"
    assert row["log"] == str(tmp_path / "ft" / "stage.log") and "epoch 0" in Path(row["log"]).read_text()
    assert "last output: RuntimeError" in row["error"]
    notes = [line for line in table_lines(log.rows, None, 64) if line.startswith("- ")]
    assert notes == [f"- vit_s mae finetune BreastMNIST: failed: RuntimeError: weight is on cpu, logits on cuda:0 "
                     f"(log: {tmp_path / 'ft' / 'stage.log'})"]
