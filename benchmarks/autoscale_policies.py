"""Autoscaling on engine load against Serve's request count, on a load of few long generations (same run).

    python benchmarks/autoscale_policies.py [--concurrency 8] [--max-tokens 400] [--load-s 40]

Starts a local Ray and Serve and deploys the same artifact (a freshly initialised ``tiny`` model, 1024 positions)
twice, one after the other: ``autoscaling_policy: requests`` (Serve's ongoing-request count, target 16 per replica)
and ``engine_load`` (KV occupancy and waiting sequences, ``raystack.autoscale``), each with 4 KV slots per replica,
1..2 replicas, upscale delay 2 s, downscale delay 5 s, look-back 10.5 s (Serve wants it above its 10 s metrics
interval), replicas reporting every 2 s as on a Ray raystack starts. The load: ``--concurrency`` clients streaming
``--max-tokens``-token completions back to back for ``--load-s`` seconds — few requests (under the request target),
more sequences than one replica's slots. Prints per policy: when the new replica was asked for and when it served
(from the load's start), time to scale back down (from its end), queue wait p50/p99 (time to first token), output
tokens/s, and replicas over time. The engine-load policy must scale up where the request-count one does not, and
come back down after the load.
"""

from __future__ import annotations

import argparse
import asyncio
import sys
import tempfile
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks.sse import sse_chunks  # noqa: E402
from benchmarks.stats import percentile  # noqa: E402

POLICY_SETTINGS = {"min_replicas": 1, "max_replicas": 2, "max_batch_size": 4, "upscale_delay_s": 2,
                   "downscale_delay_s": 5, "autoscaling_look_back_s": 10.5, "target_ongoing_requests": 16,
                   "max_ongoing_requests": 64, "max_queued_requests": 256}


def replica_counts(app: str) -> tuple[int, int]:
    """``(running, running + starting)`` replicas of the app's deployment."""
    from ray import serve

    application = serve.status().applications.get(app)
    if application is None or "LLMServer" not in application.deployments:
        return 0, 0
    states = application.deployments["LLMServer"].replica_states
    running = states.get("RUNNING", 0)
    return running, running + states.get("STARTING", 0) + states.get("PENDING_MIGRATION", 0)


class ReplicaWatch:
    """Samples an app's replica counts twice a second in a thread: ``(seconds since start, running, wanted)``
    (wanted: running + starting, i.e. what the autoscaler decided)."""

    def __init__(self, app: str):
        self.app, self.samples, self._stop = app, [], threading.Event()
        self.start = time.monotonic()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self):
        while not self._stop.is_set():
            try:
                self.samples.append((time.monotonic() - self.start, *replica_counts(self.app)))
            except Exception:  # the controller busy for a moment: skip a sample
                pass
            self._stop.wait(0.5)

    def first(self, predicate, after: float = 0.0, wanted: bool = False):
        return next((t for t, n, w in self.samples if t >= after and predicate(w if wanted else n)), None)

    def stop(self):
        self._stop.set()
        self._thread.join()


async def _stream(client, url: str, seed: int, max_tokens: int) -> tuple[float, int]:
    start, first, tokens = time.monotonic(), None, 0
    body = {"model": "raystack", "prompt": f"def f{seed}(", "max_tokens": max_tokens, "ignore_eos": True,
            "seed": seed, "stream": True, "stream_options": {"include_usage": True}}
    async with client.stream("POST", f"{url}/v1/completions", json=body) as response:
        response.raise_for_status()
        async for chunk in sse_chunks(response):
            if first is None:
                first = time.monotonic() - start
            if chunk.get("usage"):
                tokens = chunk["usage"]["completion_tokens"]
    return first, tokens


async def drive(url: str, concurrency: int, max_tokens: int, load_s: float) -> dict:
    """``concurrency`` clients streaming back to back until ``load_s`` has passed (each finishes its last one)."""
    import httpx

    results, deadline = [], time.monotonic() + load_s
    seeds = iter(range(10**6))

    async def client_loop(client):
        while time.monotonic() < deadline:
            results.append(await _stream(client, url, next(seeds), max_tokens))

    async with httpx.AsyncClient(timeout=600) as client:
        start = time.monotonic()
        await asyncio.gather(*(client_loop(client) for _ in range(concurrency)))
        wall = time.monotonic() - start
    waits = [r[0] for r in results]
    return {"requests": len(results), "tokens_per_s": sum(r[1] for r in results) / wall, "wall_s": wall,
            "wait_p50": percentile(waits, 0.5), "wait_p99": percentile(waits, 0.99)}


def run_policy(policy: str, model: str, base_url: str, concurrency: int, max_tokens: int, load_s: float,
               down_timeout_s: float = 60.0, **overrides) -> dict:
    """Deploy ``model`` under ``policy``, drive the load, wait for the scale-down; the figures, and the app removed."""
    from ray import serve

    from raystack.serving import build_app

    app = f"scale-{policy.replace('_', '-')}"
    serve.run(build_app({"model": model, "num_cpus": 0.5, **POLICY_SETTINGS, "autoscaling_policy": policy,
                         **overrides}), name=app, route_prefix=f"/{app}")
    watch = ReplicaWatch(app)
    try:
        figures = asyncio.run(drive(f"{base_url}/{app}", concurrency, max_tokens, load_s))
        load_end = time.monotonic() - watch.start
        deadline = time.monotonic() + down_timeout_s
        while time.monotonic() < deadline and (watch.samples[-1][2] if watch.samples else 0) != 1:
            time.sleep(0.5)
        time.sleep(1)
    finally:
        watch.stop()
        serve.delete(app)
    decided = watch.first(lambda n: n >= 2, wanted=True)
    up = watch.first(lambda n: n >= 2)
    down = watch.first(lambda n: n == 1, after=max(load_end, up or 0.0), wanted=True)
    return {**figures, "policy": policy, "decided_s": decided, "scale_up_s": up,
            "max_replicas": max(n for _, n, _ in watch.samples),
            "scale_down_s": None if up is None or down is None else down - load_end,
            "timeline": [(t, n) for t, n, _ in watch.samples]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--concurrency", type=int, default=8)
    parser.add_argument("--max-tokens", type=int, default=400)
    parser.add_argument("--load-s", type=float, default=40.0)
    args = parser.parse_args()

    import ray
    import torch
    from ray import serve

    from raystack.checkpoint import save_artifact
    from raystack.cluster import apply_local_ray_env, free_local_port, start_serve
    from raystack.model import GPT, ModelConfig

    torch.manual_seed(0)
    config = ModelConfig.from_preset("tiny", max_seq_len=1024)
    model = save_artifact(tempfile.mkdtemp(prefix="raystack-bench-") + "/model", config, GPT(config).state_dict())
    port = free_local_port()
    apply_local_ray_env()  # as raystack starts Ray: replicas report their load every 2 s
    ray.init(num_cpus=4, include_dashboard=False, object_store_memory=200 * 1024**2, log_to_driver=False)
    _, port = start_serve({"host": "127.0.0.1", "port": port})
    base_url = f"http://127.0.0.1:{port}"
    print(f"load: {args.concurrency} clients streaming {args.max_tokens}-token completions for {args.load_s:.0f} s; "
          f"per replica 4 KV slots, 1..2 replicas, upscale delay 2 s, downscale delay 5 s")
    print(f"{'policy':>12} {'decided':>8} {'scale up':>9} {'scale down':>11} {'max repl':>9} {'wait p50':>9} {'wait p99':>9} "
          f"{'out tok/s':>10} {'requests':>9}")
    results = {}
    for policy in ("requests", "engine_load"):
        r = results[policy] = run_policy(policy, model, base_url, args.concurrency, args.max_tokens, args.load_s)
        up = f"{r['scale_up_s']:.1f}s" if r["scale_up_s"] is not None else "never"
        decided = f"{r['decided_s']:.1f}s" if r["decided_s"] is not None else "never"
        down = f"{r['scale_down_s']:.1f}s" if r["scale_down_s"] is not None else "-"
        print(f"{policy:>12} {decided:>8} {up:>9} {down:>11} {r['max_replicas']:>9} {r['wait_p50']:>8.2f}s {r['wait_p99']:>8.2f}s "
              f"{r['tokens_per_s']:>10.1f} {r['requests']:>9}")
        print(f"{'':>12} replicas over time: " + " ".join(
            f"{t:.0f}s:{n}" for i, (t, n) in enumerate(r["timeline"]) if i == 0 or n != r["timeline"][i - 1][1]))
    ratio = results["engine_load"]["tokens_per_s"] / results["requests"]["tokens_per_s"]
    print(f"engine_load vs requests: {ratio:.2f}x output tokens/s; median queue wait "
          f"{results['engine_load']['wait_p50']:.2f} s vs {results['requests']['wait_p50']:.2f} s")
    serve.shutdown()
    ray.shutdown()


if __name__ == "__main__":
    main()
