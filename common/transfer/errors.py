"""Errors the transfer CLIs report as a one-line message (exit status 2) instead of a traceback."""

from __future__ import annotations


class TransferUsageError(ValueError):
    """The settings, the data or the checkpoint do not fit the run; the message names the file or flag."""


class TransferDataError(TransferUsageError):
    """The data does not fit the run (missing split, label-space mismatch); the message names the path."""
