"""Settings shared by linprobe and finetune (flag names and meaning follow facebookresearch/mae)."""

from __future__ import annotations

from dataclasses import dataclass, field


def _h(text: str) -> dict[str, str]:
    return {"help": text}


@dataclass
class TransferConfig:
    # batch and schedule
    batch_size: int = field(default=64, metadata=_h("batch size per process"))
    epochs: int = field(default=50, metadata=_h("training epochs"))
    accum_iter: int = field(default=1, metadata=_h("gradient accumulation steps (effective batch = "
                                                   "batch_size * accum_iter * processes)"))
    lr: float | None = field(default=None, metadata=_h("absolute learning rate (overrides --blr)"))
    blr: float = field(default=1e-3, metadata=_h("base LR: lr = blr * effective batch / 256"))
    min_lr: float = field(default=0.0, metadata=_h("LR at the end of the cosine schedule"))
    warmup_epochs: int = field(default=5, metadata=_h("epochs of linear LR warmup"))
    weight_decay: float = field(default=0.05, metadata=_h("weight decay (matrices only)"))

    # model and checkpoint
    model: str | None = field(default=None, metadata=_h(
        "registry model name; default: the one recorded in the checkpoint's encoder.json"))
    finetune: str | None = field(default=None, metadata=_h(
        "pretrained checkpoint: our encoder.safetensors / training checkpoint, a facebookresearch/mae or "
        "MedMAE .pth, or timm ViT weights"))
    input_size: int | None = field(default=None, metadata=_h(
        "input side in pixels; default: the checkpoint's, else 224"))
    in_chans: int | None = field(default=None, metadata=_h(
        "encoder input channels; default: the checkpoint's, else the data's"))
    global_pool: bool | None = field(default=None, metadata=_h(
        "average-pool the tokens (--cls_token: use the class token); default: the pooling a fine-tuned "
        "--finetune checkpoint was trained with, else average pooling (MAE's fine-tuning default); "
        "models without a class token always average"))

    # data
    data_path: str = field(default="", metadata=_h(
        "ImageFolder root (train/ val/ [test/]), MedMNIST .npz, curated shard folder, or CSV"))
    nb_classes: int | None = field(default=None, metadata=_h(
        "number of classes / labels; checked against the data (default: taken from the data)"))
    multilabel: bool = field(default=False, metadata=_h("multi-label targets: BCE loss, per-label AUC"))
    verify_data: bool = field(default=True, metadata=_h(
        "decode every image once before training so that a corrupt file stops the run early "
        "(--no-verify_data skips it; --fast always decodes everything while extracting features)"))
    num_workers: int = field(default=10, metadata=_h("DataLoader worker processes"))
    pin_mem: bool = field(default=True, metadata=_h("pin host memory for faster GPU transfer"))

    # run control
    output_dir: str = field(default="./output_dir", metadata=_h("where results, logs and checkpoints go"))
    seed: int = field(default=0, metadata=_h("random seed"))
    resume: str = field(default="", metadata=_h("checkpoint-last.pt to continue from (or to evaluate "
                                                "with --eval)"))
    start_epoch: int = field(default=0, metadata=_h("first epoch (overridden by --resume)"))
    save_every_s: float = field(default=60.0, metadata=_h(
        "write checkpoint-last.pt after an epoch once this many seconds have passed since the last write, and "
        "always after the last epoch (0: after every epoch); each write copies the model and optimizer state, "
        "which dominates short epochs"))
    eval: bool = field(default=False, metadata=_h("only evaluate the --resume checkpoint on val and test"))
    dist_eval: bool = field(default=False, metadata=_h(
        "shard evaluation across processes (otherwise every process evaluates everything)"))
    attention_backend: str = field(default="sdpa", metadata=_h(
        "ViT attention blocks on 'sdpa' (torch's), 'triton' (kernels/triton_attention.py; CUDA) or 'auto' (triton on CUDA "
        "wherever it applies, pretraining's default; untimed in fine-tuning, hence opt-in here)"))
    select_metric: str = field(default="auc", metadata=_h(
        "validation metric that picks the best epoch (and the --fast LR): acc, balanced_acc, auc, f1 or loss"))
    n_bootstrap: int = field(default=1000, metadata=_h("bootstrap resamples for the test-set 95 percent confidence intervals"))
