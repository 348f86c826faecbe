"""Batch inference throughput: the Ray Data job against a plain loop generating one row at a time, same run.

    python benchmarks/batch_infer.py [--rows 512] [--max-tokens 32] [--threads 1] [--actors 1]

Both sides use the same model (default: a freshly initialised ``tiny``), prompts, sampling and torch thread count,
and by default one model replica (the Ray job runs one actor), so the ratio is what batching buys; ``--actors 2``
runs the job on a pool of two over the same single input file. The Ray figure is end to
end (Ray Data start-up, reading and writing parquet included). Goal on a 2-core machine: >= 4x rows/s.

A job's fixed cost (planning, starting the actor, loading the model: seconds) hides the engine's speed at a few
hundred rows, so after that first job (the end-to-end figure, on a fresh Ray) the job runs over one batch of rows and
over all of them again, both on warm workers, and the rows/s past start-up is printed too:
(rows - batch) / (time of the second full job - time of the one-batch job).
"""

from __future__ import annotations

import argparse
import asyncio
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", help="model artifact (default: a freshly initialised tiny model)")
    parser.add_argument("--rows", type=int, default=512)
    parser.add_argument("--baseline-rows", type=int, default=48, help="rows timed for the one-at-a-time loop")
    parser.add_argument("--max-tokens", type=int, default=32)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--actors", type=int, default=1, help="actors in the job's pool (the loop stays one process)")
    args = parser.parse_args()
    if args.actors < 1:
        parser.error(f"--actors must be >= 1, got {args.actors}")

    import pyarrow as pa
    import pyarrow.parquet as pq
    import ray
    import torch

    from raystack.batch import BatchConfig, run_batch
    from raystack.checkpoint import save_artifact
    from raystack.config import from_dict
    from raystack.engine import Engine, EngineConfig, GenerationParams, generate_text
    from raystack.model import GPT, ModelConfig

    work = Path(tempfile.mkdtemp(prefix="raystack-bench-"))
    model = args.model
    if not model:
        torch.manual_seed(0)
        config = ModelConfig.from_preset("tiny")
        model = save_artifact(str(work / "model"), config, GPT(config).state_dict())
    prompts = [f"def function_{i}(" for i in range(args.rows)]
    pq.write_table(pa.table({"id": list(range(args.rows)), "prompt": prompts}), work / "in.parquet")

    # Baseline: one row at a time through the same engine and sampler.
    torch.set_num_threads(args.threads)
    engine = Engine.from_artifact(model, EngineConfig(max_batch_size=1))
    params = GenerationParams(max_tokens=args.max_tokens, temperature=0.8, seed=0)

    async def one_at_a_time():
        tokens = 0
        for prompt in prompts[: args.baseline_rows]:
            tokens += len((await generate_text(engine, prompt, params))["tokens"])
        return tokens

    start = time.perf_counter()
    base_tokens = asyncio.run(one_at_a_time())
    base_seconds = time.perf_counter() - start
    base_rows_per_s, base_tokens_per_s = args.baseline_rows / base_seconds, base_tokens / base_seconds

    ray.init(num_cpus=2 + args.actors, include_dashboard=False, object_store_memory=200 * 1024**2, log_to_driver=False)

    def job(rows: int, name: str) -> tuple[dict, float]:
        source = work / "in.parquet"
        if rows < args.rows:
            source = work / f"{name}.parquet"
            pq.write_table(pq.read_table(work / "in.parquet").slice(0, rows), source)
        config = from_dict(BatchConfig, {
            "model": model, "input": str(source),
            "output": str(work / name), "sampling": {"max_tokens": args.max_tokens, "temperature": 0.8},
            "batch_size": args.batch_size, "min_actors": args.actors, "max_actors": args.actors, "num_cpus": 1,
            "threads": args.threads})
        start = time.perf_counter()
        summary = run_batch(config)
        return summary, time.perf_counter() - start

    summary, ray_seconds = job(args.rows, "out")
    one_batch = min(args.batch_size, args.rows - 1)
    _, small_seconds = job(one_batch, "one-batch")
    _, warm_seconds = job(args.rows, "again")
    out = pq.read_table(work / "out", columns=["completion_tokens"])
    ray_tokens = sum(v for v in out.column("completion_tokens").to_pylist() if v)
    ray.shutdown()
    steady = (summary["rows"] - one_batch) / max(warm_seconds - small_seconds, 1e-9)

    print(f"model {model}; {args.max_tokens} tokens per row; {args.threads} torch thread(s); "
          f"{args.actors} actor(s) in the job, one process in the loop")
    print(f"plain loop, one row at a time (baseline, {args.baseline_rows} rows): {base_rows_per_s:8.2f} rows/s "
          f"{base_tokens_per_s:9.1f} output tokens/s")
    print(f"Ray Data job, batch {args.batch_size} ({summary['rows']} rows, end to end):  "
          f"{summary['rows'] / ray_seconds:8.2f} rows/s {ray_tokens / ray_seconds:9.1f} output tokens/s")
    print(f"ratio Ray Data / plain loop: {summary['rows'] / ray_seconds / base_rows_per_s:.2f}x rows/s, "
          f"{ray_tokens / ray_seconds / base_tokens_per_s:.2f}x output tokens/s (goal >= 4x)")
    print(f"Ray Data job past start-up ({summary['rows']} - {one_batch} rows over {warm_seconds:.2f} - "
          f"{small_seconds:.2f} s): {steady:8.2f} rows/s; ratio to the plain loop {steady / base_rows_per_s:.2f}x")


if __name__ == "__main__":
    main()
