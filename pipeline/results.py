"""The transfer-results table: MAE pretraining on a curated pool, then linprobe / finetune vs random init.

``python -m pipeline.results run ...`` (on a GPU) pretrains each encoder as an MAE on ``--pool`` (a curated shard
folder), exports a randomly initialised twin, and runs ``linprobe --fast`` and ``finetune`` on each labeled
dataset (any path ``common.data`` reads: MedMNIST ``.npz``, ImageFolder, CSV with a split column; the class count
comes from the data) for both initialisations; ``--scratch_models`` adds classifiers trained from scratch with
the same finetune recipe. Every stage is a real CLI call, echoed so it can be rerun; ``OUT/runs.json`` collects
one row per stage: its metrics, or why it failed or was skipped (``--time_budget_s``). A one-epoch preflight of
every transfer stage kind runs before the pretraining (``--no_preflight`` skips it). ``--jobs N`` runs up to N
stages at once; on several GPUs (``--gpus``, by default every GPU the process sees) each stage gets one of them.
``python -m pipeline.results kermany-csv SRC OUT.csv`` writes the Kermany chest X-ray set as a CSV with a
patient-level train / val split. ``python -m pipeline.results table OUT --benchmarks DIR`` prints the markdown
table with the published MedMNIST v2 and MedMNIST+ rows beside ours.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from concurrent.futures import ThreadPoolExecutor
from functools import partial
from pathlib import Path

from pipeline.commands import (
    FT_RECIPES,
    PRETRAIN_PORT,
    SELECT_METRICS,
    LabeledSet,
    dataset_key,
    label_space,
    pretrain_command,
    transfer_command,
)
from pipeline.kermany import write_kermany_csv
from pipeline.results_table import PRETRAIN, row_status, table_lines
from pipeline.run_log import POOL, RunLog, encoder_digest
from pipeline.stages import GpuSlots, StageError, TimeBudget, run_stage, shared_cpu_threads, visible_gpus


def export_random_encoder(mae_name: str, input_size: int, in_chans: int, out_dir: Path) -> Path:
    """A randomly initialised encoder, exported exactly like a pretrained one (the 'random init' baseline)."""
    import torch

    import models
    from models.checkpoint import export_encoder

    torch.manual_seed(0)
    mae = models.create_model(mae_name, img_size=input_size, in_chans=in_chans)
    export_encoder(mae, out_dir)
    return out_dir / "encoder.safetensors"


def positive_number(text: str) -> str:
    """An argparse type: a positive number, kept as written (it goes into a recorded command)."""
    try:
        ok = float(text) > 0
    except ValueError:
        ok = False
    if not ok:
        raise argparse.ArgumentTypeError(f"expected a positive number, got {text!r}")
    return text


def preflight(args: argparse.Namespace, datasets: dict[str, LabeledSet], random_encoders: dict[str, Path],
              out: Path, gpus: GpuSlots | None = None) -> None:
    """One epoch of every transfer stage kind (each encoder's linprobe and finetune from its random twin, each
    from-scratch model) on the smallest dataset, before any pretraining: a stage that cannot run at all (a bad
    flag, a device mismatch only the GPU shows) stops the call within a minute instead of after the pretraining.
    Nothing here goes into runs.json. Its stages are spread over ``gpus`` like the real ones."""
    gpus = gpus or GpuSlots()
    smallest = min(datasets, key=lambda ds: datasets[ds].n_train)
    checks = [(f"{encoder} {protocol}", protocol, ["--finetune", str(checkpoint)], encoder, str(args.ft_layer_decay),
               out / protocol / encoder)
              for encoder, checkpoint in random_encoders.items() for protocol in args.protocols]
    checks += [(f"{model} scratch", "finetune", [], model, "1.0", out / "scratch" / model)
               for model in args.scratch_models]
    failures: list[str] = []

    def check(name: str, protocol: str, init_args: list[str], model: str, layer_decay: str, run_dir: Path) -> None:
        command = transfer_command(args, protocol, datasets[smallest], init_args, model, layer_decay, run_dir,
                                   epochs=1)
        try:
            with gpus.take() as gpu:
                run_stage(f"preflight {name} ({smallest}, 1 epoch)", command, log_path=run_dir / "stage.log",
                          quiet=True, gpu=gpus.pinned(gpu))
        except StageError as exc:
            failures.append(f"{name}: {exc.cause or exc} (log: {run_dir / 'stage.log'})")

    _run_parallel(args.jobs, [partial(check, *c) for c in checks])
    if failures:
        raise SystemExit("results: the preflight failed, nothing was pretrained (--no_preflight skips it):\n  "
                         + "\n  ".join(failures))


def _run_parallel(jobs: int, tasks: list) -> None:
    """Run zero-argument callables, at most ``jobs`` at a time (each one is a subprocess stage)."""
    if jobs <= 1:
        for task in tasks:
            task()
        return
    with ThreadPoolExecutor(max_workers=jobs) as pool:
        for future in [pool.submit(task) for task in tasks]:
            future.result()


def device_count() -> int:
    import torch

    return torch.cuda.device_count()


def stage_gpus(requested: list[str] | None, jobs: int) -> GpuSlots:
    """The GPU slots of the call's stages: ``--gpus`` when given (each stage pinned to one of them), else every GPU
    this process sees, pinned only when there are several: with one GPU or none, stages inherit the environment."""
    visible = visible_gpus(os.environ, device_count)
    if requested is None:
        return GpuSlots(visible, jobs, pin=len(visible) > 1)
    if "CUDA_VISIBLE_DEVICES" in os.environ and not set(requested) <= set(visible):
        # --gpus names the machine's GPUs, as CUDA_VISIBLE_DEVICES does, not the indices inside this process.
        print(f"results: --gpus {' '.join(requested)} names GPUs outside CUDA_VISIBLE_DEVICES="
              f"{os.environ['CUDA_VISIBLE_DEVICES']}; each stage gets the id as given", file=sys.stderr)
    try:
        return GpuSlots(requested, jobs)
    except ValueError as exc:
        raise SystemExit(f"results: --gpus: {exc}") from None


def run(args: argparse.Namespace) -> int:
    with shared_cpu_threads(args.jobs, os.cpu_count()) as threads:
        if threads is not None:
            print(f"results: {args.jobs} stages at a time, OMP_NUM_THREADS={threads} each", file=sys.stderr)
        return _run(args)


def _run(args: argparse.Namespace) -> int:
    budget = TimeBudget(args.time_budget_s)
    out = Path(args.out).resolve()
    out.mkdir(parents=True, exist_ok=True)
    gpus = stage_gpus(args.gpus, args.jobs)
    if args.pretrain_gpus > 1 and len(gpus.gpus) < args.pretrain_gpus:
        raise SystemExit(f"results: --pretrain_gpus {args.pretrain_gpus} needs that many GPUs; this call has "
                         f"{len(gpus.gpus)} ({' '.join(gpus.gpus) or 'none'}; see --gpus)")
    if args.batch_size % args.pretrain_gpus:
        raise SystemExit(f"results: --batch_size {args.batch_size} (the global batch) is not divisible by "
                         f"--pretrain_gpus {args.pretrain_gpus}")
    log = RunLog(out / "runs.json", budget, gpus)
    # Read every dataset's label space first, so a bad path stops the run before any GPU time is spent.
    datasets = {dataset_key(p): LabeledSet(p, *label_space(p)) for p in args.datasets}
    if len(datasets) != len(args.datasets):
        raise SystemExit(f"results: two --datasets share a name ({sorted(datasets)}); rename one file")

    # The random-init twins first: the random-init rows need them, and so does the preflight.
    blocked: dict[tuple[str, str], str | None] = {}
    checkpoints: dict[tuple[str, str], Path] = {}
    random_encoders = {encoder: export_random_encoder(f"mae_{encoder}", args.input_size, args.in_chans,
                                                      out / "random" / encoder)
                       for encoder in args.encoders if "random" in args.inits or args.preflight}
    if args.preflight:
        preflight(args, datasets, random_encoders, out / "preflight", gpus)

    def transfer_stage(encoder: str, init: str, protocol: str, ds: str) -> tuple[list[str], Path]:
        """The command and folder of one transfer stage from an encoder's checkpoint."""
        run_dir = out / protocol / encoder / init / ds
        return transfer_command(args, protocol, datasets[ds], ["--finetune", str(checkpoints[(encoder, init)])],
                                encoder, str(args.ft_layer_decay), run_dir), run_dir

    # Phase 1: MAE pretraining of every encoder (concurrently with --jobs > 1).
    pretrain_tasks = []
    for index, encoder in enumerate(args.encoders):
        mae_name = f"mae_{encoder}"
        if "mae" not in args.inits:
            continue
        pre_dir = out / "pretrain" / encoder
        checkpoints[(encoder, "mae")] = pre_dir / "encoder.safetensors"
        blocked[(encoder, "mae")] = None
        pretrain_key = (encoder, "mae", PRETRAIN, POOL)
        command = pretrain_command(args, mae_name, pre_dir, PRETRAIN_PORT + index)
        # Nothing to do when this recipe's pretraining is recorded and every row is done on the encoder at hand,
        # or, with the encoder gone (runs.json from another machine), every row is recorded.
        checkpoint = checkpoints[(encoder, "mae")]
        digest = encoder_digest(checkpoint) if checkpoint.is_file() else None
        if log.done(pretrain_key, command) and all(
                log.done((encoder, "mae", protocol, ds), transfer_stage(encoder, "mae", protocol, ds)[0], digest)
                for ds in datasets for protocol in args.protocols):
            continue
        if log.done(pretrain_key, command) and not checkpoint.is_file():
            # runs.json came from another machine (a GPU call's files do not outlive it): the encoder must be
            # pretrained again before any of its missing rows can run (and those rows then all run on it).
            print(f"results: MAE pretraining of {encoder} is recorded but {checkpoint} is missing: pretraining it "
                  "again", file=sys.stderr)
            log.drop(pretrain_key)

        def pretrain(encoder: str = encoder, command: list[str] = command, pre_dir: Path = pre_dir) -> None:
            pre = log.stage((encoder, "mae", PRETRAIN, POOL), command, pre_dir, gpus=args.pretrain_gpus)
            if pre is not None and row_status(pre) != "ok":
                blocked[(encoder, "mae")] = f"MAE pretraining of {encoder} {row_status(pre)}: " + (
                    pre.get("reason") or pre.get("error", ""))

        pretrain_tasks.append(pretrain)
    _run_parallel(args.jobs, pretrain_tasks)
    if "random" in args.inits:
        for encoder in args.encoders:
            checkpoints[(encoder, "random")] = random_encoders[encoder]
            blocked[(encoder, "random")] = None

    # Phase 2: every transfer stage and the from-scratch classifiers, at most --jobs at a time.
    def transfer(encoder: str, init: str, protocol: str, ds: str) -> None:
        command, run_dir = transfer_stage(encoder, init, protocol, ds)
        block, checkpoint = blocked[(encoder, init)], checkpoints[(encoder, init)]
        # No file and not blocked: every row of it was recorded, on an encoder that is not on this machine.
        digest = encoder_digest(checkpoint) if block is None and checkpoint.is_file() else None
        row = log.stage((encoder, init, protocol, ds), command, run_dir, blocked=block, digest=digest)
        if row is not None and init == "mae":
            seconds = log.pretrain_seconds(encoder)
            if seconds is not None:
                log.put(row | {"pretrain_seconds": seconds})

    def scratch(model: str, ds: str) -> None:
        run_dir = out / "scratch" / model / ds
        log.stage((model, "scratch", "finetune", ds), transfer_command(
            args, "finetune", datasets[ds], [], model, "1.0", run_dir), run_dir)

    tasks = [partial(transfer, encoder, init, protocol, ds) for (encoder, init) in checkpoints
             for ds in datasets for protocol in args.protocols]
    tasks += [partial(scratch, model, ds) for model in args.scratch_models for ds in datasets]
    _run_parallel(args.jobs, tasks)
    counts = {s: sum(row_status(r) == s for r in log.rows) for s in ("ok", "failed", "skipped")}
    print(f"results: {len(log.rows)} rows in {log.path} ({counts['ok']} ok, {counts['failed']} failed, "
          f"{counts['skipped']} skipped; {budget.elapsed():.0f} s)")
    return 0


def table(args: argparse.Namespace) -> int:
    runs = json.loads((Path(args.out) / "runs.json").read_text())
    print("\n".join(table_lines(runs, Path(args.benchmarks) if args.benchmarks else None, args.input_size)))
    return 0


def kermany_csv(args: argparse.Namespace) -> int:
    counts = write_kermany_csv(Path(args.src), Path(args.out_csv), args.val_fraction, args.seed)
    print(f"results: wrote {args.out_csv}: " + ", ".join(f"{k} {v}" for k, v in counts.items()))
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m pipeline.results", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    r = sub.add_parser("run", help="pretrain, probe and fine-tune (GPU)")
    r.add_argument("--pool", required=True, help="curated shard folder for MAE pretraining (train split)")
    r.add_argument("--datasets", nargs="+", required=True,
                   help="labeled datasets with train / val (/ test) splits: MedMNIST .npz, ImageFolder, CSV")
    r.add_argument("--out", required=True)
    r.add_argument("--encoders", nargs="*", default=["vit_small_patch16", "vim_small_patch16"])
    r.add_argument("--inits", nargs="+", default=["mae", "random"], choices=["mae", "random"])
    r.add_argument("--protocols", nargs="+", default=["linprobe", "finetune"], choices=["linprobe", "finetune"])
    r.add_argument("--scratch_models", nargs="*", default=[])
    r.add_argument("--input_size", type=int, default=64)
    r.add_argument("--in_chans", type=int, default=1)
    r.add_argument("--batch_size", type=int, default=256, help="MAE pretraining batch size")
    r.add_argument("--probe_batch_size", type=int, default=0, help="linear-probe batch size (0: linprobe's default)")
    r.add_argument("--ft_batch_size", type=int, default=128, help="fine-tuning batch size")
    r.add_argument("--pretrain_epochs", type=int, default=40)
    r.add_argument("--pretrain_blr", type=positive_number, default="1.5e-4",
                   help="MAE pretraining base learning rate (lr = blr x batch / 256), passed on as written: a "
                        "recorded pretraining is reused only when its command is the same")
    r.add_argument("--pretrain_compile", nargs="?", const="default", default=None, metavar="MODE",
                   help="torch.compile the MAE pretraining, in torch.compile mode MODE (default: default; "
                        "reduce-overhead adds CUDA graphs). At 64 px and batch 256 an eager step is bound by the "
                        "host's launches: the tenth session's ViT-S/8 ran 11 steps/s on an H100")
    r.add_argument("--pretrain_data_on_device", action="store_true",
                   help="pretrain from the pool decoded once onto the GPU (pretrain --data_on_device) instead of "
                        "streaming it through loader workers: the 64 px pool is about 63 MB, and the eleventh "
                        "session's ViT-S/8 pretraining read 9,000 img/s from the workers against 13,382 for the "
                        "model alone")
    r.add_argument("--pretrain_gpus", type=int, default=1,
                   help="GPUs of each MAE pretraining: above 1 it runs as DDP through accelerate launch "
                        "(launch/accelerate/multi_gpu.yaml), --batch_size split among them, so the global batch and "
                        "the schedule stay those of one GPU (a longer pretraining fits one call)")
    r.add_argument("--probe_epochs", type=int, default=90)
    r.add_argument("--probe_select_metric", choices=SELECT_METRICS, default="auc",
                   help="validation metric that picks each linear probe's LR and epoch (linprobe --select_metric); "
                        "linprobe's auc by default: the selection analysis behind --ft_select_metric covered "
                        "fine-tunes only")
    r.add_argument("--probe_n_last_blocks", type=int, default=1,
                   help="linear probes read the pooled outputs of the encoder's last N blocks (linprobe "
                        "--n_last_blocks; DINO's linear evaluation uses 4 for ViT-S)")
    r.add_argument("--ft_epochs", type=int, default=20)
    r.add_argument("--ft_min_steps", type=int, default=0,
                   help="fine-tune each dataset for at least this many optimizer steps (more epochs on small sets)")
    r.add_argument("--ft_blr", type=float, default=5e-4, help="fine-tuning base learning rate")
    r.add_argument("--ft_layer_decay", type=float, default=0.65,
                   help="fine-tuning layer-wise lr decay of the pretrained and random-init encoders (MAE's ViT-B "
                        "value by default; from-scratch models use none)")
    r.add_argument("--ft_class_weighted", action="store_true",
                   help="fine-tune with the loss weighted by inverse class frequency (finetune --class_weighted_loss); "
                        "without it imbalanced sets such as BreastMNIST can collapse to the majority class")
    r.add_argument("--ft_select_metric", choices=SELECT_METRICS, default="balanced_acc",
                   help="validation metric that picks each fine-tune's best epoch (finetune --select_metric). "
                        "balanced_acc by default, not finetune's auc: in the eleventh session's fine-tunes under "
                        "the class-weighted loss, AUC picked checkpoints whose argmax threshold was still off (MAE "
                        "PneumoniaMNIST: epoch 6 of 30, val ACC 0.677 vs 0.824 at the balanced-ACC pick, for 0.008 "
                        "less val AUC; docs/results/transfer_h100_s11_selection_analysis.md)")
    r.add_argument("--ft_recipe", choices=sorted(FT_RECIPES), default="mae",
                   help="fine-tuning regularisation: 'mae' (finetune's defaults, MAE's ImageNet recipe: RandAugment, "
                        "random erasing, label smoothing) or 'light' (random resized crop and flip only, no label "
                        "smoothing), for small low-resolution sets")
    r.add_argument("--num_workers", type=int, default=12, help="data loader workers of each stage")
    r.add_argument("--jobs", type=int, default=1,
                   help="stages run at once: the encoders' pretrainings together, then the transfer stages "
                        "(small models at low resolution leave most of a GPU idle; give each stage fewer workers)")
    r.add_argument("--gpus", nargs="*", default=None, metavar="ID",
                   help="GPUs the stages may use, as CUDA_VISIBLE_DEVICES names them (default: every GPU this "
                        "process sees). Each running stage sees one of them (CUDA_VISIBLE_DEVICES in its "
                        "environment), the least loaded, with at most ceil(jobs / GPUs) stages on a GPU at once; "
                        "with one GPU or none by default, stages run as before, on what the process sees")
    r.add_argument("--no_preflight", dest="preflight", action="store_false",
                   help="skip the preflight: one epoch of each transfer stage kind on the smallest dataset before "
                        "any pretraining, which stops the call early when a stage cannot run at all")
    r.add_argument("--time_budget_s", type=float, default=None,
                   help="wall-clock budget of the whole call: the running stage is stopped when it is used up "
                        "and later stages are recorded as skipped, so runs.json is always complete")
    t = sub.add_parser("table", help="markdown table from OUT/runs.json")
    t.add_argument("out")
    t.add_argument("--benchmarks", default="", help="folder with the published benchmark CSVs")
    t.add_argument("--input_size", type=int, default=64)
    k = sub.add_parser("kermany-csv", help="Kermany chest X-ray folder -> CSV with a patient-level val split")
    k.add_argument("src", help="folder with train/{NORMAL,PNEUMONIA} and test/{NORMAL,PNEUMONIA}")
    k.add_argument("out_csv", help="CSV to write (path,label,split; paths relative to its folder)")
    k.add_argument("--val_fraction", type=float, default=0.1, help="share of train images moved to val")
    k.add_argument("--seed", type=int, default=0, help="seed of the patient assignment")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return {"run": run, "table": table, "kermany-csv": kermany_csv}[args.command](args)


if __name__ == "__main__":
    sys.exit(main())
