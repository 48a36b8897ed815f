"""The one way this project starts ``pretrain/main.py`` on several processes: ``accelerate launch`` run by the current
interpreter, with a config from ``launch/accelerate/``."""

from __future__ import annotations

import shlex
import socket
import sys

PRETRAIN_SCRIPT = "pretrain/main.py"  # relative to the repository root, where launched commands run


def free_port() -> int:
    """A TCP port nobody listens on right now (for the rendezvous of one run)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def accelerate_launch_command(config_file: str, processes: int, port: int, mixed_precision: str, script: str,
                              script_args: list[str]) -> list[str]:
    """``python -m accelerate.commands.launch`` is ``accelerate launch`` run by this interpreter: ``processes``
    processes of ``script`` on this machine, meeting at ``port``."""
    return [sys.executable, "-m", "accelerate.commands.launch", "--config_file", config_file,
            "--num_processes", str(processes), "--num_machines", "1", "--main_process_port", str(port),
            "--mixed_precision", mixed_precision, script, *script_args]


def user_command(command: list[str]) -> str:
    """The same command as a user types it (``accelerate launch ...``), for reports."""
    if command[1:3] == ["-m", "accelerate.commands.launch"]:
        command = ["accelerate", "launch", *command[3:]]
    return shlex.join(command)
