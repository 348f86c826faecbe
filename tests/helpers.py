"""Helpers the tests share (imported, never through conftest)."""

from __future__ import annotations

import shutil
import subprocess
import sys
import tempfile
import threading
from concurrent.futures import Future
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


TOOLS = {
    # name: (pinned requirements, the binary a test runs)
    "lm-eval": (("lm-eval[api]==0.4.13", "transformers==5.24.0", "tokenizers==0.23.3"), "lm_eval"),
    "schemathesis": (("schemathesis==4.32.5",), "schemathesis"),
}
"""Client tools the tests drive, as users do, each in a venv of its own (a tool's dependencies never touch the
project's pins). A test that runs one carries ``@pytest.mark.tools(name)`` and calls ``tool(name)``."""

_tool_builds: dict[str, Future] = {}
_tool_lock = threading.Lock()


def _build_tool(name: str) -> str:
    """The venv under .venv/, reused while its pins are unchanged. ``--no-compile``: bytecode for the few modules a
    tool imports is written when it runs; compiling all of transformers would be a third of the install."""
    import hashlib

    requirements, binary = TOOLS[name]
    tag = hashlib.sha256(" ".join(requirements).encode()).hexdigest()[:10]
    venv = Path(__file__).resolve().parents[1] / ".venv" / f"{name}-{tag}"
    if not (venv / ".installed").exists():
        subprocess.run([sys.executable, "-m", "venv", "--clear", str(venv)], check=True, capture_output=True)
        pip = subprocess.run([str(venv / "bin" / "pip"), "install", "--quiet", "--no-compile", *requirements],
                             capture_output=True, text=True, timeout=1200)  # in the background: its output kept
        if pip.returncode != 0:
            raise RuntimeError(f"installing {name} ({' '.join(requirements)}) failed:\n{pip.stderr[-3000:]}")
        (venv / ".installed").touch()
    return str(venv / "bin" / binary)


def prepare_tools(names) -> None:
    """Start installing ``names`` in one background thread, one after another (conftest calls this when the
    session's tests are collected, so the installs overlap the tests that run before the ones that need them)."""
    with _tool_lock:
        todo = [n for n in names if n not in _tool_builds]
        for name in todo:
            _tool_builds[name] = Future()
    if not todo:
        return

    def build_all() -> None:
        for name in todo:
            try:
                _tool_builds[name].set_result(_build_tool(name))
            except BaseException as e:  # the test that needs it reports it
                _tool_builds[name].set_exception(e)

    threading.Thread(target=build_all, name="tool-venvs", daemon=True).start()


def tool(name: str) -> str:
    """The path of tool ``name``'s binary, once its venv is built (started now if it was not yet)."""
    prepare_tools([name])
    return _tool_builds[name].result(timeout=1800)
