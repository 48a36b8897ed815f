"""Which tokens feed the head: the class token (``"token"``) or the mean of the patch tokens (``"avg"``).

Encoders without a class token (MedMamba, MambaMIC, Vim built with ``cls_token=False``) can only average, so
the default pooling falls back to ``"avg"`` for them, and asking for the class token is a usage error.
"""

from __future__ import annotations

import inspect
from typing import Any

import torch

from common.checkpoint import CheckpointError
from common.logging import get_logger
from common.transfer.errors import TransferUsageError

POOLS = ("token", "avg")


def accepted_kwargs(name: str, kwargs: dict[str, Any]) -> dict[str, Any]:
    """Drop interface kwargs a model's constructor does not take (e.g. ``global_pool`` of a CNN-style
    classifier); anything else unknown is left in so that the builder reports it."""
    from models.registry import REGISTRY

    builder = REGISTRY.spec(name).builder
    try:
        params = inspect.signature(builder).parameters
    except (TypeError, ValueError):
        return kwargs
    if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values()):
        return kwargs
    optional = {"global_pool", "drop_path_rate"}
    return {k: v for k, v in kwargs.items() if k in params or k not in optional}


def has_class_token(name: str, kwargs: dict[str, Any]) -> bool | None:
    """Whether registry model ``name`` built with ``kwargs`` has a class token; None when it cannot be
    built (the real build then reports why). Built on the meta device: no memory, no initialisation cost."""
    import models
    from models.registry import REGISTRY

    try:
        REGISTRY.spec(name)
    except KeyError as exc:
        raise CheckpointError(f"--model: {exc.args[0] if exc.args else exc}") from exc
    probe_kwargs = accepted_kwargs(name, {**kwargs, "global_pool": "avg", "num_classes": 0})
    try:
        with torch.device("meta"):
            model = models.build_model(name, **probe_kwargs)
    except (TypeError, ValueError, RuntimeError):
        return None
    return int(getattr(model, "num_prefix_tokens", 1)) > 0


def choose_pool(name: str, kwargs: dict[str, Any], requested: bool | None, recorded: str | None,
                default_pool: str) -> str:
    """The pooling to build ``name`` with.

    ``requested``: True = ``--global_pool``, False = ``--cls_token``, None = not given; then the pooling a
    fine-tuned checkpoint recorded (``recorded``) or the command's default is used, replaced by ``"avg"``
    (logged) when the model has no class token.
    """
    if default_pool not in POOLS:
        raise ValueError(f"default_pool must be one of {POOLS}, got {default_pool!r}")
    with_token = has_class_token(name, kwargs)
    if requested is True:
        return "avg"
    if requested is False:
        if with_token is False:
            raise TransferUsageError(f"--cls_token: model '{name}' has no class token (its tokens are patch / "
                                     "feature-map positions); drop --cls_token to average them")
        return "token"
    pool = recorded if recorded in POOLS else default_pool
    if pool == "token" and with_token is False:
        get_logger("scanmae.transfer").info(f"model '{name}' has no class token: pooling by the average of "
                                            "its tokens")
        return "avg"
    return pool
