"""The sidecar JSON of finetune's ``checkpoint-best.safetensors``.

It uses the ``encoder.json`` layout (``model`` is the registry name; ``kwargs`` the architecture; geometry and
normalisation at the top level), so the fine-tuned classifier is itself a pretrained checkpoint:
``linprobe --finetune`` / ``finetune --finetune`` and ``models.create_model(name, pretrained=...)`` read it
like an exported encoder (a head of another class count is dropped on loading). Transfer-specific entries
(``kind``, ``num_classes``, ``global_pool``, ``class_names``, the run's ``transfer`` spec) sit beside them.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from torch import nn

from common.checkpoint import CheckpointError

if TYPE_CHECKING:
    from common.transfer.encoder import EncoderSpec

CLASSIFIER_KIND = "classifier"
PROBE_HEAD_KIND = "linprobe_head"


def classifier_meta(model: nn.Module, spec: EncoderSpec) -> dict[str, Any]:
    """``encoder.json``-compatible description of a fine-tuned registry ``model`` built from ``spec``."""
    from models.checkpoint import EXPORT_FORMAT_VERSION, USAGE_KWARGS

    img_size = [int(s) for s in getattr(model, "img_size", (spec.input_size, spec.input_size))]
    kwargs = {k: v for k, v in spec.kwargs.items() if k not in USAGE_KWARGS}
    kwargs.update(img_size=img_size, in_chans=spec.in_chans)
    return {
        "format_version": EXPORT_FORMAT_VERSION,
        "kind": CLASSIFIER_KIND,
        "model": spec.model,
        "kwargs": kwargs,
        "in_chans": spec.in_chans,
        "img_size": img_size,
        "patch_size": int(getattr(model, "patch_size", 1)),
        "embed_dim": int(model.num_features),
        "num_prefix_tokens": int(getattr(model, "num_prefix_tokens", 0)),
        "normalization": {"mean": list(spec.mean), "std": list(spec.std)},
        "num_classes": int(spec.kwargs.get("num_classes", 0)),
        "global_pool": getattr(model, "global_pool", spec.kwargs.get("global_pool")),
        "source": {**spec.source, "finetuned_from": spec.checkpoint},
        "transfer": spec.to_json(),
    }


def check_reusable(meta: dict[str, Any], sidecar: str) -> None:
    """Refuse sidecars that describe no loadable encoder, with a message saying what to pass instead."""
    if meta.get("kind") == PROBE_HEAD_KIND:
        encoder = (meta.get("encoder") or {}).get("checkpoint")
        raise CheckpointError(f"{sidecar}: a linear-probe checkpoint holds only the probe head, not an encoder; "
                              f"pass its encoder ({encoder or 'the --finetune of that run'}) as --finetune, or "
                              "score the probe with linprobe --eval --resume")
    if isinstance(meta.get("model"), dict):
        raise CheckpointError(f"{sidecar}: written by an older finetune (its 'model' entry is a dict, not a "
                              "model name); run finetune --eval --resume on it, or fine-tune again to get a "
                              "reusable checkpoint-best")
