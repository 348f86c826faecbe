"""Training throughput: raystack's Ray Train loop against a plain single-process PyTorch loop.

Both run the same model, global batch, data blocks, step function and torch thread count, in the same process
tree and the same run, so the ratio isolates what Ray Train costs (worker group, reports, checkpoint barriers).
Model FLOPs utilisation is given against a float32 matmul peak measured here, now, with the same thread count.

    python benchmarks/train_throughput.py [--preset tiny --n-embd 128 --steps 60 --threads 2]

Prints tokens/s for both loops, their ratio (goal: Ray overhead under 10%, i.e. ratio >= 0.90) and MFU; then the
same run with 2 data-parallel workers splitting the same threads (``--threads`` in all: 1 worker x N threads against
2 workers x N/2 threads), and the 2-worker / 1-worker ratio. On one machine the two workers share its cores, so that
figure is the cost of data parallelism (gradient all-reduce, halved per-worker batches), not a speed-up; on a
cluster each worker brings its own cores or GPU.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import numpy as np  # noqa: E402
import torch  # noqa: E402


def matmul_peak_flops(threads: int, n: int = 1024, repeats: int = 20) -> float:
    torch.set_num_threads(threads)
    a, b = torch.randn(n, n), torch.randn(n, n)
    for _ in range(3):
        a @ b
    start = time.perf_counter()
    for _ in range(repeats):
        a @ b
    return 2 * n**3 * repeats / (time.perf_counter() - start)


def plain_loop(config, data_uri: str, threads: int) -> float:
    """tokens/s of the same step function without Ray: one process, no reports, no checkpoints."""
    from raystack.data import batch_indices, load_blocks
    from raystack.model import GPT
    from raystack.train import build_optimizer, lr_at, train_step

    torch.set_num_threads(threads)
    torch.manual_seed(config.seed)
    model = GPT(config.model.build())
    optimizer = build_optimizer(model, config.optimizer)
    train_blocks, _, _ = load_blocks(data_uri)
    schedule = config.schedule
    warmup = min(5, schedule.steps // 4)
    for step in range(schedule.steps):
        if step == warmup:
            start = time.perf_counter()
        for group in optimizer.param_groups:
            group["lr"] = lr_at(step, config.optimizer.lr, schedule)
        ids = batch_indices(step, schedule.batch_size, len(train_blocks), config.seed)
        blocks = torch.from_numpy(train_blocks[ids].astype(np.int64))
        train_step(model, optimizer, blocks, schedule, config.optimizer.grad_clip, 1, contextlib.nullcontext)
    elapsed = time.perf_counter() - start
    return (schedule.steps - warmup) * schedule.batch_size * (train_blocks.shape[1] - 1) / elapsed


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--preset", default="tiny")
    parser.add_argument("--n-embd", type=int, default=128)
    parser.add_argument("--n-layer", type=int, default=4)
    parser.add_argument("--block-size", type=int, default=128)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--steps", type=int, default=60)
    parser.add_argument("--log-every", type=int, default=20)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()

    import ray

    from raystack.data import prepare_blocks
    from raystack.train import load_train_config

    storage = tempfile.mkdtemp(prefix="raystack-bench-")
    overrides = [
        f"storage_path={storage}", "name=bench", f"model.preset={args.preset}", f"model.n_embd={args.n_embd}",
        f"model.n_layer={args.n_layer}", f"data.block_size={args.block_size}", "data.max_documents=60",
        f"schedule.batch_size={args.batch_size}", f"schedule.micro_batch_size={args.batch_size}",
        f"schedule.steps={args.steps}", f"logging.every={args.log_every}", "eval.every=0",
        f"checkpoint.every={args.steps}", f"scaling.threads_per_worker={args.threads}",
        "scaling.num_workers=1", f"scaling.cpus_per_worker={args.threads}",
    ]
    config = load_train_config(None, overrides)
    ray.init(num_cpus=args.threads + 1, include_dashboard=False, object_store_memory=200 * 1024**2,
             log_to_driver=False)
    data_uri = prepare_blocks(config.data, os.path.join(config.run_dir, "data"))

    peak = matmul_peak_flops(args.threads)
    plain = plain_loop(config, data_uri, args.threads)
    ray_tokens_per_s = ray_train_tokens_per_s(overrides, [])
    two_workers = None
    if args.threads >= 2:
        two_workers = ray_train_tokens_per_s(overrides, [
            "name=bench-2w", "scaling.num_workers=2", f"scaling.cpus_per_worker={args.threads // 2}",
            f"scaling.threads_per_worker={args.threads // 2}",
            f"schedule.micro_batch_size={max(1, args.batch_size // 2)}"])
    ray.shutdown()

    from raystack.model import GPT

    flops_per_token = GPT(config.model.build()).flops_per_token(args.block_size)
    ratio = ray_tokens_per_s / plain
    print(f"model: {args.preset} n_layer={args.n_layer} n_embd={args.n_embd} "
          f"({GPT(config.model.build()).num_parameters() / 1e6:.2f} M params), batch {args.batch_size} x "
          f"{args.block_size} tokens, {args.threads} threads, {args.steps} steps")
    print(f"plain PyTorch loop (baseline): {plain:12,.0f} tokens/s   MFU {plain * flops_per_token / peak:6.1%}")
    print(f"raystack on Ray Train:         {ray_tokens_per_s:12,.0f} tokens/s   "
          f"MFU {ray_tokens_per_s * flops_per_token / peak:6.1%}")
    print(f"matmul peak (fp32, {args.threads} threads): {peak / 1e9:.1f} GFLOP/s")
    print(f"ratio raystack / plain: {ratio:.3f}  (Ray overhead {1 - ratio:+.1%}; goal: overhead under 10%)")
    if two_workers is not None:
        print(f"raystack, 2 workers x {args.threads // 2} threads: {two_workers:12,.0f} tokens/s   "
              f"scaling 1 -> 2 workers: {two_workers / ray_tokens_per_s:.3f}x  (the same {args.threads} cores: "
              "data-parallel overhead, not speed-up)")


def ray_train_tokens_per_s(overrides: list[str], extra: list[str]) -> float:
    """Steady-state tokens/s of a ``fit`` run: the mean of its reports after the first window (worker warm-up)."""
    from raystack.train import fit, load_train_config

    config = load_train_config(None, [*overrides, *extra])
    fit(config)
    reports = [json.loads(line) for line in Path(config.run_dir, "metrics.jsonl").read_text().splitlines()]
    steady = reports[1:] or reports  # reports and checkpoint included
    return float(np.mean([r["tokens_per_s"] for r in steady]))


if __name__ == "__main__":
    main()
