"""Why the engine computes on the thread that owns PyTorch's OpenMP pool, and its decode forward against HF's.

    python benchmarks/forward_threads.py [--threads 2] [--batch 32] [--past 128]

One decode step (``batch`` rows, ``past`` cached positions, issue 13's shape: 4 layers x 128 wide x 4 heads, byte
vocabulary, random weights) timed three ways in one process, best of 5 x 50 steps:

- raystack's forward on the main thread, the only thread that ever used OpenMP;
- the same forward on a second thread while the main thread has a pool too (the engine's layout before
  2026-11-30: forward passes on a worker thread, model built and HF run on the main thread). libgomp then manages
  more threads than there are cores and throttles its spinning, so every parallel region pays a wake-up;
- Hugging Face ``GPT2LMHeadModel`` (``transformers``, the ``bench`` extra), one step over its own ``past`` cache, on
  the main thread.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import copy
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks.serve_vs_hf import SHAPES, hf_model  # noqa: E402
from raystack.model import GPT, KVCache, ModelConfig  # noqa: E402


def best_ms(step, reps: int = 5, steps: int = 50, before=None) -> float:
    times = []
    with torch.inference_mode():
        for _ in range(reps):
            if before is not None:
                before()
            for _ in range(3):
                step()
            start = time.perf_counter()
            for _ in range(steps):
                step()
            times.append((time.perf_counter() - start) / steps * 1e3)
    return min(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--past", type=int, default=128)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    config = ModelConfig(**SHAPES["issue"])
    model = GPT(config).eval()
    cache = KVCache(config, args.batch)
    tokens = torch.randint(0, 256, (args.batch,))
    positions = torch.full((args.batch,), args.past)

    def ours():  # the engine's decode step
        return model.decode(tokens, positions, cache, slice(0, args.batch))

    main_thread = best_ms(ours)
    with concurrent.futures.ThreadPoolExecutor(1) as pool:
        pool.submit(torch.set_num_threads, args.threads).result()
        second_thread = pool.submit(best_ms, ours).result()

    hf = hf_model(config)
    state = {}
    with torch.inference_mode():
        past = hf(torch.randint(0, 256, (args.batch, args.past)), use_cache=True).past_key_values

    def fresh_past():
        state["past"] = copy.deepcopy(past)  # HF's cache grows by a position each step

    def theirs():
        return hf(tokens[:, None], past_key_values=state["past"], use_cache=True).logits[:, -1]

    hf_ms = best_ms(theirs, before=fresh_past)
    print(f"{time.strftime('%Y-%m-%d')}; torch {torch.__version__}; {args.threads} threads; decode step of "
          f"{args.batch} rows over {args.past} cached positions; best of 5 x 50 steps")
    print(f"raystack forward, main thread (one OpenMP pool)        {main_thread:7.2f} ms   1.00x")
    print(f"raystack forward, second thread beside the main pool   {second_thread:7.2f} ms   "
          f"{second_thread / main_thread:.2f}x the time")
    print(f"HF GPT2LMHeadModel forward, main thread                 {hf_ms:7.2f} ms   "
          f"raystack is {hf_ms / main_thread:.2f}x as fast")


if __name__ == "__main__":
    main()
