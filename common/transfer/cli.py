"""Command-line helpers shared by the linprobe and finetune entry points."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable
from typing import Any, TypeVar

from common.config import ConfigError, build_parser, parse_config

T = TypeVar("T")


def transfer_parser(cls: type, prog: str, description: str) -> argparse.ArgumentParser:
    """The dataclass parser plus MAE's ``--cls_token`` switch (the opposite of ``--global_pool``)."""
    parser = build_parser(cls, prog=prog, description=description)
    parser.add_argument("--cls_token", dest="global_pool", action="store_const", const=False,
                        default=argparse.SUPPRESS,
                        help="classify from the class token instead of global average pooling")
    return parser


def parse_transfer_config(cls: type[T], prog: str, description: str, argv: list[str] | None = None) -> T:
    return parse_config(cls, argv, parser=transfer_parser(cls, prog, description))


def user_errors() -> tuple[type[BaseException], ...]:
    """Exceptions that describe bad input (their messages name the file or flag), not a bug."""
    from common.checkpoint import CheckpointError
    from common.data.images import ImageDecodeError
    from common.data.source import DataSourceError
    from common.transfer.engine import NonFiniteLossError
    from common.transfer.errors import TransferUsageError

    return (ConfigError, CheckpointError, DataSourceError, ImageDecodeError, TransferUsageError,
            NonFiniteLossError)


def run_cli(prog: str, cls: type[T], description: str, argv: list[str] | None,
            run: Callable[[T], dict[str, Any]]) -> int:
    """Parse, run, print the headline numbers (main process); bad input -> one line on stderr, status 2."""
    from common.logging import is_main_process

    try:
        cfg = parse_transfer_config(cls, prog, description, argv)
        results = run(cfg)
    except user_errors() as exc:
        print(f"{prog}: error: {exc}", file=sys.stderr)
        return 2
    if is_main_process():
        shown = results["test"] or results["val"]
        where = "test" if results["test"] else "val"
        print(f"{prog} {where}: " + ", ".join(f"{k} {shown[k]:.4f}" for k in ("acc", "balanced_acc", "auc", "f1")
                                            if shown.get(k) is not None))
    return 0
