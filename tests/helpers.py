"""Helpers the tests share (imported, never through conftest)."""

from __future__ import annotations

import socket

# A fast tiny run on a small slice of the default corpus.
TINY_OVERRIDES = [
    "data.max_documents=30",
    "data.block_size=64",
    "schedule.batch_size=8",
    "schedule.micro_batch_size=4",
    "schedule.warmup_steps=5",
    "eval.blocks=32",
]


def free_port() -> int:
    """A TCP port free on loopback right now."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]
