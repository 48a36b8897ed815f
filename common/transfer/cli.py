"""Command-line helpers shared by the linprobe and finetune entry points."""

from __future__ import annotations

import argparse
from typing import TypeVar

from common.config import build_parser, parse_config

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
