"""The engine's decode step as CUDA graphs: one graph per batch-size bucket, captured once and replayed with the step's
inputs copied into static buffers (vLLM's approach), so a GPU decode step is one graph launch rather than ~15 kernel
launches per layer from Python, and has no host sync of its own.

Contract:
- ``DecodeGraphs(model, cache)`` covers slots ``0..n-1`` of ``cache`` for any ``n`` up to its slot count. Buckets:
  1, 2, 4, 8, then every multiple of 8, and the slot count itself (``buckets``). ``run(tokens, positions)`` takes
  host lists with one entry per slot ``0..n-1`` (position -1 for a slot with nothing to decode) and returns logits
  ``[n, vocab]``: the smallest bucket of at least ``n`` rows runs, its extra rows idle (position -1: they write the
  cache's last position, which no sequence reads, and their outputs are dropped).
- The step is ``GPT.decode(..., fused=False, span=<cache length>)``: attention over the whole cache length, masked
  per row, so every call has the same shapes and no host sync; equal to the engine's eager decode within float
  tolerance (tests/unit/test_decode_graphs.py).
- Inputs reach the device from pinned host buffers with non-blocking copies, ordered on the stream before the
  replay. A copy reads its buffer when the stream reaches it, so ``run`` refills the buffers only once an event
  recorded after the last copies says they are made: at once when the engine has read the previous step's sampled
  tokens back, a short wait when it retries rows one at a time.
- ``capture=True`` (CUDA only) captures every bucket at construction, largest first, in one shared memory pool, each
  after a warm-up run on a side stream (what capture needs), then checks each graph's replay against the same step
  run eagerly (a ``RuntimeError`` if they differ; ``Engine`` then logs a warning and decodes eagerly).
  ``capture=False`` runs the same static-buffer, fixed-shape step eagerly: the path the CPU tests exercise, as CUDA
  graphs need a CUDA device.
- A captured graph reads the model's weights and the cache in place: neither may be replaced (``model.to``, a new
  cache) after construction; make a new ``DecodeGraphs`` instead.
"""

from __future__ import annotations

import bisect
import logging

import torch

from raystack.model import GPT, KVCache

logger = logging.getLogger(__name__)


def bucket_sizes(slots: int) -> list[int]:
    """The batch sizes captured for a cache of ``slots`` slots: 1, 2, 4, 8, every multiple of 8, and ``slots``."""
    if slots < 1:
        raise ValueError(f"slots must be >= 1, got {slots}")
    sizes = {n for n in (1, 2, 4) if n < slots} | set(range(8, slots, 8)) | {slots}
    return sorted(sizes)


class DecodeGraphs:
    def __init__(self, model: GPT, cache: KVCache, capture: bool = True):
        device = cache.k.device
        if capture and device.type != "cuda":
            raise ValueError(f"CUDA graphs need a CUDA cache, this one is on {device}; use capture=False")
        self.model, self.cache, self.capture = model, cache, capture
        self.buckets = bucket_sizes(cache.slots)
        self.span = cache.k.shape[3]
        largest = self.buckets[-1]
        pin = device.type == "cuda"
        self._host_tokens = torch.zeros(largest, dtype=torch.int64, pin_memory=pin)
        self._host_positions = torch.full((largest,), -1, dtype=torch.int64, pin_memory=pin)
        self._tokens = torch.zeros(largest, dtype=torch.int64, device=device)
        self._positions = torch.full((largest,), -1, dtype=torch.int64, device=device)
        self._copied = torch.cuda.Event() if pin else None
        self._graphs: dict[int, tuple[torch.cuda.CUDAGraph, torch.Tensor]] = {}
        if capture:
            self._capture_all()

    @property
    def max_rows(self) -> int:
        return self.buckets[-1]

    def bucket(self, n: int) -> int:
        """The batch size that runs ``n`` rows."""
        if not 0 < n <= self.max_rows:
            raise ValueError(f"rows must be in 1..{self.max_rows}, got {n}")
        return self.buckets[bisect.bisect_left(self.buckets, n)]

    def _step(self, n: int) -> torch.Tensor:
        return self.model.decode(self._tokens[:n], self._positions[:n], self.cache, slice(0, n),
                                 fused=False, span=self.span)

    @torch.inference_mode()
    def _capture_all(self) -> None:
        pool = torch.cuda.graph_pool_handle()
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):  # warm-up (allocator, cuBLAS workspaces) outside capture, idle rows only
            for n in reversed(self.buckets):
                self._step(n)
        torch.cuda.current_stream().wait_stream(side)
        for n in reversed(self.buckets):  # largest first: the smaller graphs reuse its pool
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph, pool=pool):
                out = self._step(n)
            self._graphs[n] = (graph, out)
        torch.cuda.synchronize()
        for n, (graph, out) in self._graphs.items():  # all rows idle: nothing a sequence reads is written
            graph.replay()
            if not torch.allclose(out.float(), self._step(n).float(), rtol=2e-2, atol=2e-2):
                raise RuntimeError(f"the captured decode step for {n} rows differs from the eager one")
        logger.info("captured the decode step as CUDA graphs for batch sizes %s", self.buckets)

    def run(self, tokens: list[int], positions: list[int]) -> torch.Tensor:
        """Logits ``[len(tokens), vocab]`` of one decode step for slots ``0..len(tokens)-1`` (see the module doc)."""
        n = len(tokens)
        if len(positions) != n:
            raise ValueError(f"{n} tokens but {len(positions)} positions")
        b = self.bucket(n)
        if self._copied is not None:
            self._copied.synchronize()  # the last run's copies have read the buffers
        self._host_tokens[:n] = torch.tensor(tokens, dtype=torch.int64)
        self._host_positions[:n] = torch.tensor(positions, dtype=torch.int64)
        self._host_positions[n:b] = -1
        self._tokens[:b].copy_(self._host_tokens[:b], non_blocking=True)
        self._positions[:b].copy_(self._host_positions[:b], non_blocking=True)
        if self._copied is not None:
            self._copied.record()
        if not self.capture:
            return self._step(b)[:n]
        graph, out = self._graphs[b]
        graph.replay()
        return out[:n].clone()  # the graph's output buffer is overwritten by the next replay
