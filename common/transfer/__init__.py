"""Code shared by the ``linprobe`` and ``finetune`` entry points.

Checkpoint -> encoder building, optimizers (LARS), layer-wise LR decay groups, the LR schedule, the
train/evaluate loops, datasets adapters and results writing. Nothing here runs at import time.
"""
