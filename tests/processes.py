"""Servers the tests start as child processes: a free loopback port for them, and a stop for their group."""

from __future__ import annotations

import os
import signal
import socket
import subprocess

LOOPBACK = "127.0.0.1"


def free_loopback_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on right now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((LOOPBACK, 0))
        port: int = sock.getsockname()[1]
        return port


def stop_process_group(process: subprocess.Popen[bytes], *, timeout_seconds: float = 20) -> int:
    """SIGTERM to the process group of a child started in its own session, SIGKILL if it is still there
    after ``timeout_seconds``; its exit code."""
    if process.poll() is None:
        try:
            os.killpg(process.pid, signal.SIGTERM)
            return process.wait(timeout=timeout_seconds)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    return process.wait(timeout=10)
