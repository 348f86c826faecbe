"""Serving under load: continuous batching against one-request-at-a-time generation, same run, same model.

    python benchmarks/serve_load.py [--model ARTIFACT] [--max-tokens 64] [--threads 1]

Starts a local Ray and Serve with two apps of one replica each on the same artifact (default: a freshly initialised
``tiny`` model): ``batched`` (max_batch_size 32) and ``baseline`` (max_batch_size 1: one request at a time). An
asyncio HTTP client streams completions at concurrency 1, 8 and 32 and prints output tokens/s, time to first token
(p50, p99; time to the first SSE chunk) and time per output token, then the ratio of batched tokens/s at concurrency
32 to the baseline's. Goal on a 2-core machine: >= 4x, with p99 time to first token under 2 s for ``tiny``.
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks.sse import sse_chunks  # noqa: E402
from benchmarks.stats import percentile  # noqa: E402


async def one_request(client, url: str, i: int, max_tokens: int) -> tuple[float, float, int]:
    start = time.perf_counter()
    first = None
    tokens = 0
    body = {"model": "raystack", "prompt": f"def function_{i}(", "max_tokens": max_tokens, "temperature": 0.8,
            "seed": i, "stream": True, "stream_options": {"include_usage": True}}
    async with client.stream("POST", f"{url}/v1/completions", json=body) as response:
        response.raise_for_status()
        async for chunk in sse_chunks(response):
            if first is None:
                first = time.perf_counter() - start
            if chunk.get("usage"):
                tokens = chunk["usage"]["completion_tokens"]
    return first, time.perf_counter() - start, tokens


async def load(url: str, concurrency: int, requests: int, max_tokens: int) -> dict:
    import httpx

    results = []
    counter = iter(range(requests))

    async def worker(client):
        for i in counter:
            results.append(await one_request(client, url, i, max_tokens))

    async with httpx.AsyncClient(timeout=600) as client:
        start = time.perf_counter()
        await asyncio.gather(*(worker(client) for _ in range(concurrency)))
        wall = time.perf_counter() - start
    ttft = [r[0] for r in results]
    tpot = [(r[1] - r[0]) / (r[2] - 1) for r in results if r[2] > 1]
    return {"tokens_per_s": sum(r[2] for r in results) / wall, "ttft_p50": percentile(ttft, 0.5),
            "ttft_p99": percentile(ttft, 0.99), "tpot": statistics.median(tpot), "requests": len(results)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", help="model artifact (default: a freshly initialised tiny model)")
    parser.add_argument("--max-tokens", type=int, default=64)
    parser.add_argument("--threads", type=int, default=1, help="torch threads per replica")
    args = parser.parse_args()

    import ray
    import torch
    from ray import serve

    from raystack.checkpoint import save_artifact
    from raystack.cluster import apply_local_ray_env, free_local_port, start_serve
    from raystack.model import GPT, ModelConfig
    from raystack.serving import build_app

    model = args.model
    if not model:
        torch.manual_seed(0)
        config = ModelConfig.from_preset("tiny")
        model = save_artifact(tempfile.mkdtemp(prefix="raystack-bench-") + "/model", config, GPT(config).state_dict())
    port = free_local_port()
    apply_local_ray_env()  # as raystack starts a local Ray: HAProxy ingress where a binary is there, niceness 0
    ray.init(num_cpus=4, include_dashboard=False, object_store_memory=200 * 1024**2, log_to_driver=False)
    _, port = start_serve({"host": "127.0.0.1", "port": port})
    common = {"model": model, "num_cpus": 1, "threads": args.threads, "min_replicas": 1, "max_replicas": 1,
              "max_ongoing_requests": 64, "max_queued_requests": 256}
    serve.run(build_app({**common, "max_batch_size": 32}), name="batched", route_prefix="/batched")
    serve.run(build_app({**common, "max_batch_size": 1}), name="baseline", route_prefix="/baseline")
    base_url = f"http://127.0.0.1:{port}"

    print(f"model {model}, max_tokens {args.max_tokens}, {args.threads} torch thread(s) per replica, 1 replica each")
    print(f"{'app':>9} {'conc':>5} {'reqs':>5} {'out tok/s':>10} {'TTFT p50':>9} {'TTFT p99':>9} {'TPOT ms':>8}")
    asyncio.run(load(f"{base_url}/batched", 4, 8, 8))  # warm-up
    baseline = asyncio.run(load(f"{base_url}/baseline", 1, 6, args.max_tokens))
    print(f"{'baseline':>9} {1:>5} {baseline['requests']:>5} {baseline['tokens_per_s']:>10.1f} "
          f"{baseline['ttft_p50']:>8.3f}s {baseline['ttft_p99']:>8.3f}s {baseline['tpot'] * 1e3:>8.2f}")
    batched = {}
    for concurrency in (1, 8, 32):
        r = batched[concurrency] = asyncio.run(load(f"{base_url}/batched", concurrency, max(6, 2 * concurrency),
                                                    args.max_tokens))
        print(f"{'batched':>9} {concurrency:>5} {r['requests']:>5} {r['tokens_per_s']:>10.1f} "
              f"{r['ttft_p50']:>8.3f}s {r['ttft_p99']:>8.3f}s {r['tpot'] * 1e3:>8.2f}")
    ratio = batched[32]["tokens_per_s"] / baseline["tokens_per_s"]
    print(f"ratio batched@32 / baseline: {ratio:.2f}x output tokens/s (goal >= 4x); "
          f"p99 TTFT at 32: {batched[32]['ttft_p99']:.3f} s (goal < 2 s)")
    serve.shutdown()
    ray.shutdown()


if __name__ == "__main__":
    main()
