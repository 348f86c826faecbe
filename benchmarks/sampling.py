"""Sampling op latency: raystack's sort-free paths against the usual sort-based PyTorch sampler, same run.

    python benchmarks/sampling.py [--threads 2] [--repeats 5] [--cuda-only]

For B in {1, 8, 64, 256} and V in {32k, 128k} it prints the CPU fast path's latency next to the sort-based path
(sort, softmax, cumulative sum, mask, sample) on the same logits and parameters, their ratio, and the memory-read
floor (bytes of logits / copy bandwidth measured now). Parameters: temperature 0.7, top_k 50, top_p 0.9 (common
serving defaults); one extra line gives top_p 0.9 alone at B=64, V=128k. Goal: >= 3x at B=64, V=128k. Where a CUDA
GPU is present the same table is printed for the Triton kernel against the sort-based path on the GPU. First, for the
engine's byte vocabulary (V=257): the C++ sampling op (raystack.kernels.sample_rows) against the NumPy path and the
sort-based sampler, interleaved, as ratios (below 1 is faster). ``--cuda-only`` prints the GPU table alone
(``benchmarks/gpu_check.sh``, where device time is short).
"""

from __future__ import annotations

import argparse
import dataclasses
import itertools
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch  # noqa: E402

from raystack.sampling import SamplingParams, sample  # noqa: E402


def sort_based(logits: torch.Tensor, temperature: torch.Tensor, top_k: torch.Tensor, top_p: torch.Tensor):
    """The usual PyTorch sampler (as in HF/vLLM fallbacks): sort, softmax, cumsum, mask, multinomial."""
    z = logits.float() / temperature[:, None]
    values, order = torch.sort(z, dim=-1, descending=True)
    ranks = torch.arange(z.shape[1], device=z.device)[None]
    values = values.masked_fill((top_k[:, None] > 0) & (ranks >= top_k[:, None]), float("-inf"))
    probs = torch.softmax(values, dim=-1)
    cumulative = torch.cumsum(probs, dim=-1)
    values = values.masked_fill(cumulative - probs > top_p[:, None], float("-inf"))
    choice = torch.multinomial(torch.softmax(values, dim=-1), 1)
    return order.gather(1, choice)[:, 0]


def timed(fn, repeats: int, sync=lambda: None) -> float:
    fn()
    sync()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        sync()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def copy_bandwidth(device: str, sync) -> float:
    src = torch.empty(64 * 1024**2, dtype=torch.float32, device=device).uniform_()
    dst = torch.empty_like(src)
    seconds = timed(lambda: dst.copy_(src), 5, sync)
    return 2 * src.nbytes / seconds  # bytes read + written


def table(device: str, repeats: int, backend: str) -> None:
    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
    bandwidth = copy_bandwidth(device, sync)
    print(f"\n{backend} path on {device}; copy bandwidth {bandwidth / 1e9:.1f} GB/s")
    print(f"{'B':>4} {'V':>7} {'raystack ms':>12} {'sort-based ms':>14} {'speed-up':>9} {'read floor ms':>14}")
    rows = [(b, v, 50) for v in (32_768, 131_072) for b in (1, 8, 64, 256)] + [(64, 131_072, 0)]
    for B, V, k in rows:
        logits = torch.randn(B, V, device=device) * 3
        t = torch.full((B,), 0.7, device=device)
        top_k = torch.full((B,), k, dtype=torch.int64, device=device)
        top_p = torch.full((B,), 0.9, device=device)
        params = SamplingParams.build(B, temperature=0.7, top_k=k, top_p=0.9, seed=list(range(B)), device=device)
        ours = timed(lambda: sample(logits, params, backend=backend), repeats, sync)
        base = timed(lambda: sort_based(logits, t, top_k, top_p), repeats, sync)
        floor = logits.nbytes / bandwidth
        note = "" if k else "   (top_p 0.9 only)"
        print(f"{B:>4} {V:>7} {ours * 1e3:>12.2f} {base * 1e3:>14.2f} {base / ours:>8.1f}x {floor * 1e3:>14.3f}{note}")


def byte_vocabulary(repeats: int) -> None:
    """The engine's own vocabulary (257 bytes): the C++ op against the NumPy path it replaced there, and the sort-based
    sampler; median of ``repeats`` rounds of 200 calls each, the paths interleaved."""
    from raystack.sampling import cpu

    if cpu._sample_rows_op(257) is None:
        print("\nthe C++ sampling op is not available here (no C++ compiler, or RAYSTACK_CPU_KERNELS=0)")
        return
    print("\nbyte vocabulary (V=257), temperature 1.0, top_p 0.9 (issue 13's settings); ms per call, 200 calls a round")
    print(f"{'B':>4} {'C++ op':>8} {'NumPy':>8} {'sort-based':>11} {'op / NumPy':>11} {'op / sort-based':>16}")
    limit = cpu.SAMPLE_ROWS_MAX_VOCAB
    for B in (1, 8, 32, 64):
        logits = torch.randn(B, 257) * 3
        params = SamplingParams.build(B, temperature=1.0, top_p=0.9, seed=list(range(B)))
        t, top_k, top_p = torch.ones(B), torch.zeros(B, dtype=torch.int64), torch.full((B,), 0.9)
        steps = itertools.count()  # each call one decode step further, as in the engine (uniforms drawn ahead)

        def op():
            sample(logits, dataclasses.replace(params, step=torch.full((B,), next(steps))), backend="cpu")

        def numpy():
            cpu.SAMPLE_ROWS_MAX_VOCAB = 0
            try:
                sample(logits, dataclasses.replace(params, step=torch.full((B,), next(steps))), backend="cpu")
            finally:
                cpu.SAMPLE_ROWS_MAX_VOCAB = limit

        def sort():
            sort_based(logits, t, top_k, top_p)

        times: dict = {op: [], numpy: [], sort: []}
        for _ in range(repeats):
            for path in times:
                start = time.perf_counter()
                for _ in range(200):
                    path()
                times[path].append((time.perf_counter() - start) / 200 * 1e3)
        ms = {path: statistics.median(v) for path, v in times.items()}
        ratio = statistics.median(a / b for a, b in zip(times[op], times[numpy]))
        ratio_sort = statistics.median(a / b for a, b in zip(times[op], times[sort]))
        print(f"{B:>4} {ms[op]:>8.3f} {ms[numpy]:>8.3f} {ms[sort]:>11.3f} {ratio:>10.2f}x {ratio_sort:>15.2f}x")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--cuda-only", action="store_true", help="only the Triton kernel's table on a CUDA GPU")
    args = parser.parse_args()
    if args.cuda_only and not torch.cuda.is_available():
        sys.exit("--cuda-only: no CUDA GPU here")
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    print(f"torch {torch.__version__}, {args.threads} CPU threads, median of {args.repeats} runs")
    if not args.cuda_only:
        byte_vocabulary(args.repeats)
        table("cpu", args.repeats, "cpu")
    if torch.cuda.is_available():
        table("cuda", args.repeats * 4, "triton")
    else:
        print("\nno CUDA GPU here: the Triton kernel is not timed (its tests run through TRITON_INTERPRET=1)")


if __name__ == "__main__":
    main()
