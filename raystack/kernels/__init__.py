"""Fused CPU ops for the engine's decode step and sampling, compiled from C++ once per environment (``make install``,
or the first use) and cached.

Contract:
- ``decode_attention()`` is ``torch.ops.raystack.decode_attention`` (``decode.cpp``: one layer's rotary, cache
  write and attention for a decode step, in one pass over each row's keys and values); ``decode_layers()`` is
  ``torch.ops.raystack.decode_layers`` (every block of a decode step in one call: norms, matrix products through
  ATen, or oneDNN for weights prepacked by ``raystack.model.pack_linears``, that attention, GELU, residuals);
  ``sample_rows()`` is ``torch.ops.raystack.sample_rows`` (``sample.cpp``: the CPU sampling path's filters and draw
  for every row of a batch in one call). Each is None where it cannot be
  had: switched off (``RAYSTACK_CPU_KERNELS=0``), or the build failed (no C++ compiler, say; logged once as a
  warning). Callers then run their PyTorch or NumPy path, which the ops equal within float tolerance
  (tests/unit/test_kernels.py, test_sampling.py); nothing else changes.
- The build (``torch.utils.cpp_extension``, ~30 s on 2 cores) happens once per source, torch, Python and CPU, into
  ``RAYSTACK_KERNEL_DIR`` when set, else ``<sys.prefix>/var/raystack-kernels/<key>`` (the environment the build is
  for) when writable, else ``~/.cache/raystack/kernels/<key>``. It compiles copies of the sources kept in that
  directory, not the files beside this module: a process that imports raystack from elsewhere (a Ray job's unpacked
  working_dir) would otherwise write a build file naming its own paths, and ninja would rebuild for it and again for
  the next process from the first path, each time holding the lock while requests wait. Once a build has loaded, the
  directory's ``built`` marker lets later processes load the library directly (milliseconds: no ninja, no lock).
  Processes building at once wait on one another (PyTorch's lock file; one older than 10 minutes is a killed
  build's and is removed). ``python -m raystack.kernels`` builds ahead of time (``make install`` does), so a first
  request never waits for a compiler.
- Compiled for the CPU it is built on (``-march=native``): the CPU's feature flags are part of the key, so a cache
  shared between different machines builds once per kind of CPU rather than running code a CPU cannot execute.
"""

from __future__ import annotations

import hashlib
import logging
import os
import platform
import sys
import threading
import time
from pathlib import Path
from typing import Callable, Optional

import torch

logger = logging.getLogger(__name__)

SOURCES = [Path(__file__).with_name(name) for name in ("decode.cpp", "sample.cpp")]
HEADERS = [Path(__file__).with_name("exp_nonpositive.h")]
FLAGS = ["-O3", "-march=native", "-fopenmp"]  # OpenMP: at::parallel_for runs in torch's own thread pool
STALE_LOCK_S = 600
"""A build lock older than this is a killed build's, not a running one's (a build takes ~10-60 s)."""
_lock = threading.Lock()
_state: dict = {}  # "op": the loaded op or None once decided


def enabled() -> bool:
    """Whether the fused ops may be used (``RAYSTACK_CPU_KERNELS`` is not 0, off or false)."""
    return os.environ.get("RAYSTACK_CPU_KERNELS", "1").strip().lower() not in ("0", "off", "false", "no")


def _cpu_flags() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith(("flags", "Features")):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def build_key() -> str:
    """What a build depends on: the source, torch, Python, the compiler flags and the CPU's features."""
    digest = hashlib.sha256()
    for part in (*(source.read_bytes() for source in SOURCES + HEADERS), torch.__version__.encode(), sys.version.encode(),
                 " ".join(FLAGS).encode(), _cpu_flags().encode()):
        digest.update(part)
        digest.update(b"\0")
    return digest.hexdigest()[:16]


def build_dir() -> Path:
    key = build_key()
    if os.environ.get("RAYSTACK_KERNEL_DIR"):
        return Path(os.environ["RAYSTACK_KERNEL_DIR"]) / key
    prefix = Path(sys.prefix) / "var" / "raystack-kernels"
    try:
        prefix.mkdir(parents=True, exist_ok=True)
        if os.access(prefix, os.W_OK):
            return prefix / key
    except OSError:
        pass
    return Path.home() / ".cache" / "raystack" / "kernels" / key


def _staged_sources(directory: Path) -> list[Path]:
    """The sources and headers copied into ``directory/src`` (once: the key names their content, so a copy there
    never changes, nor does its modification time, which is what ninja compares); the sources' paths."""
    staged = directory / "src"
    staged.mkdir(exist_ok=True)
    for source in SOURCES + HEADERS:
        target = staged / source.name
        content = source.read_bytes()
        if not target.exists() or target.read_bytes() != content:
            partial = staged / f".{source.name}.{os.getpid()}"
            partial.write_bytes(content)
            os.replace(partial, target)  # whole or absent, for a process compiling beside us
    return [staged / source.name for source in SOURCES]


def _load() -> Callable:
    directory = build_dir()
    directory.mkdir(parents=True, exist_ok=True)
    library, built = directory / "raystack_kernels.so", directory / "built"
    if built.exists() and library.exists():
        torch.ops.load_library(str(library))
    else:
        from torch.utils.cpp_extension import load

        lock = directory / "lock"  # PyTorch's build lock; one left by a build that was killed would block us forever
        try:
            if time.time() - lock.stat().st_mtime > STALE_LOCK_S:
                lock.unlink()
        except FileNotFoundError:
            pass
        if not library.exists():
            logger.warning("building raystack's CPU kernels into %s (once; ~30 s)", directory)
        load(name="raystack_kernels", sources=[str(source) for source in _staged_sources(directory)],
             build_directory=str(directory), extra_cflags=FLAGS, extra_ldflags=["-fopenmp"], is_python_module=False,
             verbose=False)
        built.touch()
    ops = torch.ops.raystack
    return {"decode_attention": ops.decode_attention, "decode_layers": ops.decode_layers,
            "sample_rows": ops.sample_rows}


def _op(name: str) -> Optional[Callable]:
    """One of the ops, all built or loaded on the first call; None where they cannot be used."""
    if not enabled():
        return None
    if "ops" not in _state:
        with _lock:
            if "ops" not in _state:
                try:
                    _state["ops"] = _load()
                except Exception as e:  # no compiler, a read-only cache, a failed build: the PyTorch path runs
                    logger.warning("raystack's CPU kernels are not available (%s); decode runs on PyTorch ops",
                                   str(e).strip().splitlines()[-1] if str(e).strip() else type(e).__name__)
                    _state["ops"] = None
    return None if _state["ops"] is None else _state["ops"][name]


def decode_attention() -> Optional[Callable]:
    """``torch.ops.raystack.decode_attention(qkv, cos, sin, positions, slots, k_cache, v_cache, scale)``: one
    layer's attention for a decode step (``decode.cpp``), or None."""
    return _op("decode_attention")


def decode_layers() -> Optional[Callable]:
    """``torch.ops.raystack.decode_layers(x, weights, cos, sin, positions, slots, k_cache, v_cache, scale, eps)``:
    every block of a decode step (6 weights per layer: attn_norm, qkv, proj, mlp_norm, fc, fc_proj; the caches
    ``[layers, slots, heads, positions, head_dim]``), or None."""
    return _op("decode_layers")


def sample_rows() -> Optional[Callable]:
    """``torch.ops.raystack.sample_rows(logits, temperature, top_k, top_p, neg_log_min_p, uniform)`` -> ``(tokens,
    logprobs)``: the CPU sampling path's draw for every row in one call (``sample.cpp``; ``raystack.sampling.cpu``
    uses it for vocabularies up to ``SAMPLE_ROWS_MAX_VOCAB``), or None."""
    return _op("sample_rows")
