"""The engine's decode step with the fused CPU op (raystack.kernels) against the same step in PyTorch ops, same run.

    python benchmarks/decode_step.py [--threads 1,2] [--positions 8,128,190] [--batch 32]

Model: issue 13's shape (4 layers x 128 wide x 4 heads, max_seq_len 256, random weights). ``GPT.decode`` with
``fused=True`` and ``fused=False`` over the same cache, interleaved in 15 rounds of 20 calls each; printed: each
path's median milliseconds per decode and the median of the per-round ratios (fused / PyTorch ops; below 1 is
faster).
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from raystack import kernels  # noqa: E402
from raystack.model import GPT, KVCache, ModelConfig  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--threads", default="1,2")
    parser.add_argument("--positions", default="8,128,190")
    parser.add_argument("--batch", type=int, default=32)
    args = parser.parse_args()
    if kernels.decode_attention() is None:
        sys.exit("the fused op is not available here (no C++ compiler, or RAYSTACK_CPU_KERNELS=0)")
    config = ModelConfig(n_layer=4, n_head=4, n_embd=128, max_seq_len=256)
    torch.manual_seed(0)
    model = GPT(config).eval()
    cache, B = KVCache(config, args.batch), args.batch
    tokens = torch.randint(0, config.vocab_size, (B,))
    print(f"{time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}; torch {torch.__version__}; batch {B}")
    for threads in (int(t) for t in args.threads.split(",")):
        torch.set_num_threads(threads)
        for position in (int(p) for p in args.positions.split(",")):
            positions = torch.full((B,), position)
            timings: dict = {True: [], False: []}
            with torch.inference_mode():
                for _ in range(10):
                    for fused in timings:
                        model.decode(tokens, positions, cache, slice(0, B), fused=fused)
                for _ in range(15):
                    for fused in timings:
                        start = time.perf_counter()
                        for _ in range(20):
                            model.decode(tokens, positions, cache, slice(0, B), fused=fused)
                        timings[fused].append((time.perf_counter() - start) / 20 * 1e3)
            ratio = statistics.median(f / p for f, p in zip(timings[True], timings[False]))
            print(f"threads {threads} position {position:4d}: fused op {statistics.median(timings[True]):6.3f} ms, "
                  f"PyTorch ops {statistics.median(timings[False]):6.3f} ms, ratio {ratio:.2f}x")


if __name__ == "__main__":
    main()
