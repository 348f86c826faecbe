"""Helpers the tests share (imported, never through conftest)."""

from __future__ import annotations

import shutil
import subprocess
import tempfile
from pathlib import Path

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
    """A TCP port free right now, outside the ephemeral range (``raystack.cluster.free_local_port``)."""
    from raystack.cluster import free_local_port

    return free_local_port()


def chromium() -> str | None:
    return shutil.which("chromium") or shutil.which("chromium-browser")


def render(page: Path) -> tuple[str, str]:
    """DOM after the page's scripts ran in headless Chromium, and Chromium's log (console messages included)."""
    profile = tempfile.mkdtemp(prefix="chromium-")
    result = subprocess.run(
        [chromium(), "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
         "--disable-background-networking", "--disable-component-update", "--disable-sync",
         f"--user-data-dir={profile}", "--enable-logging=stderr", "--v=0", "--virtual-time-budget=5000",
         "--dump-dom", page.as_uri()], capture_output=True, text=True, timeout=120)
    shutil.rmtree(profile, ignore_errors=True)
    return result.stdout, result.stderr


def console_errors(log: str) -> list[str]:
    return [line for line in log.splitlines() if "CONSOLE" in line and ("Uncaught" in line or "Error" in line)]
