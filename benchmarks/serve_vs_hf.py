"""raystack's engine against Hugging Face ``generate``: in process and over HTTP, side by side in one run.

    python benchmarks/serve_vs_hf.py [--presets issue,small] [--concurrency 1,8,32,64] [--threads 2] [--no-http]

For each model shape (``issue``: 4 layers x 128 wide x 4 heads, the shape issue 13 measured; ``small``: raystack's
``small`` preset), random weights, byte vocabulary, 64-token prompts, 128 new tokens (end-of-text ignored on every
path, so all do the same work), top_p 0.9:

- ``hf``: ``transformers.GPT2LMHeadModel.generate``, a static batch of ``c`` prompts, in process (the baseline);
- ``engine``: raystack's ``Engine``, ``c`` concurrent requests, in process;
- ``http`` / ``http-stream``: ``c`` concurrent requests to raystack on Ray Serve over loopback HTTP, non-streamed and
  streamed (one replica holding the same CPU budget), through HAProxy and the replica's own HTTP server where
  ``raystack.cluster`` switches Serve's throughput mode on (``--ingress proxy``: Serve's proxy actor instead), sent
  with ``aiohttp`` as ``vllm bench serve`` does (``--clients aiohttp,httpx`` adds the same paths with ``httpx``, the
  client before 2026-12-01, as ``http/httpx``: the client shares the machine's cores with the server);
- ``engine-int8`` (``--int8``): the engine with int8 weights in its linear layers, with the quality cost: loss (nats
  per byte) and perplexity of both on held-out text, the standard library modules ``raystack.data`` keeps out of
  training at its defaults (``held_out_blocks``). Random weights unless ``--model``: pass a model trained on the
  default corpus (``make demo``'s, say) for the cost on a model that has learned something.

Each run sends ``max(c, --min-requests)`` requests, ``c`` at a time (``vllm bench serve``'s ``--num-prompts`` with
``--max-concurrency``; HF: static batches of ``c`` one after another), so a p50 at c=1 is over 8 requests a run; each
run's prompts are new random bytes (``prompts``), so prefix caching finds none of them in the KV cache.
Printed per path and concurrency: output tokens/s and its ratio to ``hf`` at the same concurrency, TTFT p50/p99,
TPOT (time per output token after the first), ITL p99 (between streamed chunks, or steps for ``hf``), and goodput
(share of requests with TTFT < 1 s and TPOT < 50 ms): the metrics of ``vllm bench serve``. Every path gets the
same cores: HF and the engine run ``--threads`` intra-op threads; the HTTP replica holds ``--threads`` CPUs. Each path
runs ``--repeats`` times, the paths interleaved (the machines are noisy); tokens/s is the best run's, the latency
figures are over the requests of all runs (``summarize``); ratios are what to read, not absolute times.
"""

from __future__ import annotations

import argparse
import asyncio
import itertools
import json
import math
import os
import statistics
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks.sse import sse_chunks  # noqa: E402
from benchmarks.stats import percentile  # noqa: E402
from raystack.checkpoint import save_artifact  # noqa: E402
from raystack.engine import Engine, EngineConfig, GenerationParams  # noqa: E402
from raystack.model import GPT, ModelConfig  # noqa: E402
from raystack.tokenizer import ByteTokenizer  # noqa: E402

SHAPES = {"issue": dict(n_layer=4, n_head=4, n_embd=128, max_seq_len=256),
          "small": ModelConfig.from_preset("small").to_dict()}


@dataclass
class Request:
    """One request's clock: start, each output event's arrival (a token, or a chunk of tokens), tokens."""
    start: float
    events: list[float] = field(default_factory=list)
    tokens: int = 0


@dataclass
class Run:
    seconds: float
    requests: list[Request]

    @property
    def tokens(self) -> int:
        return sum(r.tokens for r in self.requests)

    def tokens_per_s(self) -> float:
        return self.tokens / self.seconds


def summarize(runs: list[Run]) -> dict:
    """Output tokens/s of the best run (the machine's noise only ever slows a run down); the latency figures over
    every request of every run (a p50 of one run's 8 requests at c=1 moves with that run's luck by more than the
    10 ms the c=1 goal is about)."""
    requests = [r for run in runs for r in run.requests]
    ttft = [r.events[0] - r.start for r in requests if r.events]
    tpot = [(r.events[-1] - r.events[0]) / (r.tokens - 1) for r in requests if r.tokens > 1]
    itl = [b - a for r in requests for a, b in zip(r.events, r.events[1:])]
    good = sum(1 for r in requests if r.events and r.events[0] - r.start < 1.0
               and (r.tokens <= 1 or (r.events[-1] - r.events[0]) / (r.tokens - 1) < 0.05))
    return {"tokens_per_s": max(run.tokens_per_s() for run in runs), "ttft_p50": percentile(ttft, 0.5),
            "ttft_p99": percentile(ttft, 0.99), "tpot": statistics.mean(tpot) if tpot else float("nan"),
            "itl_p99": percentile(itl, 0.99), "goodput": good / len(requests)}


def prompts(count: int, length: int, draw: int = 0) -> list[list[int]]:
    """``count`` random prompts of ``length`` bytes, the ``draw``-th set: every run gets a set of its own, as ``vllm
    bench serve``'s random dataset does, so no prompt meets the keys and values an earlier run left in the engine's
    KV cache (prefix caching would skip its prefill, which HF's static batch does not have to match)."""
    g = torch.Generator().manual_seed(1234 + draw)
    return torch.randint(0, 256, (count, length), generator=g).tolist()


# ----------------------------------------------------------------------------------------------------------------
# The paths


def run_hf(model, batch: list[list[int]], new_tokens: int, concurrency: int) -> Run:
    """Static batches of ``concurrency`` prompts through ``generate``, one after another; a streamer records when
    each step's tokens exist."""
    from transformers.generation.streamers import BaseStreamer

    class Clock(BaseStreamer):
        def __init__(self):
            self.times = []

        def put(self, value):
            self.times.append(time.perf_counter())

        def end(self):
            pass

    start, requests = time.perf_counter(), []
    for wave in range(0, len(batch), concurrency):
        ids = torch.tensor(batch[wave:wave + concurrency])
        clock = Clock()
        began = time.perf_counter()
        with torch.inference_mode():
            out = model.generate(ids, attention_mask=torch.ones_like(ids), do_sample=True, top_p=0.9, top_k=0,
                                 max_new_tokens=new_tokens, min_new_tokens=new_tokens, pad_token_id=256,
                                 streamer=clock)
        steps = clock.times[1:]  # the first put is the prompt
        produced = out.shape[1] - ids.shape[1]
        requests += [Request(began, list(steps), produced) for _ in range(len(ids))]
    return Run(time.perf_counter() - start, requests)


async def run_engine(engine: Engine, batch: list[list[int]], new_tokens: int, concurrency: int) -> Run:
    slots = asyncio.Semaphore(concurrency)

    async def one(i: int, prompt: list[int]) -> Request:
        async with slots:
            request = Request(time.perf_counter())
            params = GenerationParams(max_tokens=new_tokens, top_p=0.9, seed=i, ignore_eos=True)
            async for _ in engine.generate(prompt, params):
                request.events.append(time.perf_counter())
                request.tokens += 1
            return request

    start = time.perf_counter()
    requests = await asyncio.gather(*(one(i, p) for i, p in enumerate(batch)))
    return Run(time.perf_counter() - start, list(requests))


async def run_http(url: str, batch: list[list[int]], new_tokens: int, stream: bool, concurrency: int,
                   client_kind: str = "aiohttp") -> Run:
    """``batch`` over HTTP, ``concurrency`` at a time, with ``aiohttp`` (what ``vllm bench serve`` sends with) or
    ``httpx`` (this benchmark's client before 2026-12-01; ~0.4 of this machine's 2 cores at 32 streams)."""
    slots = asyncio.Semaphore(concurrency)

    async def one(client, i: int, prompt: list[int]) -> Request:
        async with slots:
            return await request_once(client, i, prompt)

    def record(request: Request, chunk: dict) -> None:
        if chunk.get("usage"):
            request.tokens = chunk["usage"]["completion_tokens"]
        elif chunk["choices"]:  # a chunk may carry several tokens (coalesced)
            request.events.append(time.perf_counter())

    async def request_once(client, i: int, prompt: list[int]) -> Request:
        body = {"model": "raystack", "prompt": prompt, "max_tokens": new_tokens, "top_p": 0.9, "seed": i,
                "ignore_eos": True, "stream": stream}
        if stream:
            body["stream_options"] = {"include_usage": True}
        request = Request(time.perf_counter())
        if client_kind == "aiohttp":
            async with client.post(f"{url}/v1/completions", json=body) as response:
                response.raise_for_status()
                if not stream:
                    request.events.append(time.perf_counter())  # non-streamed: the first token comes with the last
                    request.tokens = (await response.json())["usage"]["completion_tokens"]
                    return request
                async for line in response.content:  # SSE: one "data: {json}" line per event
                    if line.startswith(b"data: {"):
                        record(request, json.loads(line[6:]))
            return request
        if not stream:
            response = await client.post(f"{url}/v1/completions", json=body)
            response.raise_for_status()
            request.events.append(time.perf_counter())
            request.tokens = response.json()["usage"]["completion_tokens"]
            return request
        async with client.stream("POST", f"{url}/v1/completions", json=body) as response:
            response.raise_for_status()
            async for chunk in sse_chunks(response):
                record(request, chunk)
        return request

    if client_kind == "aiohttp":
        import aiohttp

        session = aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=concurrency + 4),
                                        timeout=aiohttp.ClientTimeout(total=600))
    else:
        import httpx

        limits = httpx.Limits(max_connections=concurrency + 4, max_keepalive_connections=concurrency + 4)
        session = httpx.AsyncClient(timeout=600, limits=limits)
    async with session as client:
        start = time.perf_counter()
        requests = await asyncio.gather(*(one(client, i, p) for i, p in enumerate(batch)))
    return Run(time.perf_counter() - start, list(requests))


# ----------------------------------------------------------------------------------------------------------------
# Driver


def held_out_blocks(block: int, budget: int) -> torch.Tensor:
    """About ``budget`` tokens of text that no model trained on raystack's default corpus has seen: that corpus's
    validation split at the data defaults (``raystack.data``: the standard library's top-level modules held out by
    content hash), packed as training packs it into ``[n, block + 1]`` blocks, of which ``budget // (block + 1)``
    spread evenly over all of them (every held-out module has its share, as training's own evaluation picks)."""
    from raystack.data import DataConfig, pack_documents, resolve_sources

    config = DataConfig()
    (fs, paths), = resolve_sources(config).text
    documents = []
    for path in paths:
        with fs.open_input_file(path) as f:
            documents.append(f.readall())
    blocks = torch.from_numpy(pack_documents(documents, block, config.val_fraction)["val"].astype("int64"))
    if not len(blocks):
        sys.exit(f"serve_vs_hf.py: error: the default corpus ({paths[0].rsplit('/', 1)[0]}) holds out fewer than "
                 f"{block + 1} tokens (one block); pass a smaller --heldout-block")
    take = min(len(blocks), max(1, budget // (block + 1)))
    return blocks[torch.linspace(0, len(blocks) - 1, take).round().long()]


def held_out_loss(model, blocks: torch.Tensor) -> float:
    """Mean next-token loss (nats per byte) over ``blocks`` (``held_out_blocks``)."""
    from raystack.model import causal_lm_loss

    with torch.inference_mode():
        return sum(causal_lm_loss(model, chunk, reduction="sum").item() for chunk in blocks.split(16)) / (
            blocks.shape[0] * (blocks.shape[1] - 1))


def hf_model(config: ModelConfig):
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    hf = GPT2Config(vocab_size=config.vocab_size, n_positions=config.max_seq_len, n_embd=config.n_embd,
                    n_layer=config.n_layer, n_head=config.n_head, bos_token_id=256, eos_token_id=256)
    return GPT2LMHeadModel(hf).eval()


def start_http(artifact: str, cpus: int, slots: int, threads: int = 0) -> str:
    import ray
    from ray import serve

    from raystack.cluster import free_local_port, init_ray, start_serve
    from raystack.serving import build_app

    port = free_local_port()
    if not ray.is_initialized():
        init_ray(num_cpus=cpus + 2, include_dashboard=False, object_store_memory=200 * 1024**2)
    host, port = start_serve({"host": "127.0.0.1", "port": port})
    serve.run(build_app({"model": artifact, "max_batch_size": slots, "num_cpus": cpus, "threads": threads,
                         "min_replicas": 1,
                         "max_replicas": 1, "max_ongoing_requests": 4 * slots, "max_queued_requests": 4 * slots,
                         "max_sequences_per_request": slots, "max_queued_sequences": 8 * slots}),
              name="bench", route_prefix="/")
    return f"http://{host}:{port}"


def measure_shape(name: str, args, rows: list) -> None:
    if args.model:
        from raystack.checkpoint import load_artifact

        model = load_artifact(args.model)[0]
        config = model.config
    else:
        config = ModelConfig(**SHAPES[name])
        torch.manual_seed(0)
        model = GPT(config)
    if args.prompt_tokens + args.new_tokens > config.max_seq_len:
        sys.exit(f"serve_vs_hf.py: error: --prompt-tokens {args.prompt_tokens} + --new-tokens {args.new_tokens} "
                 f"exceed the {name} model's context of {config.max_seq_len} tokens; pass smaller ones")
    hf = hf_model(config)
    slots = max(args.concurrency)
    torch.set_num_threads(args.threads)
    engine_threads = args.threads if args.engine_threads is None else args.engine_threads
    engine = Engine(model, ByteTokenizer(), EngineConfig(max_batch_size=slots, threads=engine_threads))
    url = None
    if args.http:
        with tempfile.TemporaryDirectory() as tmp:
            artifact = save_artifact(str(Path(tmp) / "model"), config, model.state_dict())
            url = start_http(artifact, args.threads, slots, args.replica_threads)
            asyncio.run(run_http(url, prompts(2, args.prompt_tokens), 4, stream=True, concurrency=2))  # warm up
    loop = asyncio.new_event_loop()
    loop.run_until_complete(run_engine(engine, prompts(2, args.prompt_tokens), 4, 2))
    paths = {"hf": lambda batch, c: run_hf(hf, batch, args.new_tokens, c),
             "engine": lambda batch, c: loop.run_until_complete(run_engine(engine, batch, args.new_tokens, c))}
    if args.int8:
        engine8 = Engine(model, ByteTokenizer(), EngineConfig(max_batch_size=slots, threads=engine_threads,
                                                              quantize="int8"))
        loop.run_until_complete(run_engine(engine8, prompts(2, args.prompt_tokens), 4, 2))
        paths["engine-int8"] = lambda batch, c: loop.run_until_complete(run_engine(engine8, batch, args.new_tokens,
                                                                                   c))
        blocks = held_out_blocks(min(config.max_seq_len, args.heldout_block), args.heldout_tokens)
        exact, quantized = held_out_loss(engine.runner.model, blocks), held_out_loss(engine8.runner.model, blocks)
        print(f"{name}: held-out text ({blocks.numel() - blocks.shape[0]} tokens predicted, {blocks.shape[0]} blocks"
              f" of {blocks.shape[1] - 1}): loss float32 {exact:.4f} nats/byte, int8 {quantized:.4f} "
              f"({(quantized / exact - 1) * 100:+.2f}%); perplexity {math.exp(exact):.4f} against "
              f"{math.exp(quantized):.4f} ({(math.exp(quantized - exact) - 1) * 100:+.2f}%)", flush=True)
    if url:
        for n, kind in enumerate(args.clients.split(",")):  # the first client's paths are the goals' paths
            suffix = "" if n == 0 else f"/{kind}"
            paths["http" + suffix] = lambda batch, c, kind=kind: asyncio.run(
                run_http(url, batch, args.new_tokens, False, c, kind))
            paths["http-stream" + suffix] = lambda batch, c, kind=kind: asyncio.run(
                run_http(url, batch, args.new_tokens, True, c, kind))
    draws = itertools.count(1)  # 0: the warm-ups'
    for c in args.concurrency:
        runs: dict = {path: [] for path in paths}
        for _ in range(args.repeats):  # interleaved, so a slow spell of the machine hits every path alike
            for path, measure in paths.items():
                torch.set_num_threads(args.threads if path == "hf" else engine_threads)
                runs[path].append(measure(prompts(max(c, args.min_requests), args.prompt_tokens, next(draws)), c))
                time.sleep(0.2)  # let the last path's OpenMP threads go idle before the next starts
        results = {path: summarize(r) for path, r in runs.items()}
        base = results["hf"]["tokens_per_s"]
        for path, figures in results.items():
            rows.append((name, path, c, figures, figures["tokens_per_s"] / base))
            print_row(rows[-1])
    if engine.stats["cached_tokens"]:  # a prompt met an earlier run's: the runs would not be alike
        print(f"{name}: warning: the engine found {engine.stats['cached_tokens']} prompt tokens in its KV cache",
              flush=True)
    loop.run_until_complete(engine.shutdown())
    if args.int8:
        loop.run_until_complete(engine8.shutdown())
    if url:
        from ray import serve

        serve.delete("bench")


def print_row(row) -> None:
    """Non-streamed HTTP has no per-token clock: its TTFT is the whole latency, TPOT and ITL are not defined."""
    name, path, c, f, ratio = row
    per_token = not path.startswith("http") or path.startswith("http-stream")
    tpot = f"{f['tpot'] * 1e3:6.2f} ms" if per_token else "     -   "
    itl = f"{f['itl_p99'] * 1e3:7.1f} ms" if per_token else "      -   "
    goodput = f"{f['goodput']:.0%}" if per_token else "-"
    print(f"{name:6s} {path:17s} c={c:<3d} {f['tokens_per_s']:9,.0f} tok/s  {ratio:5.2f}x hf   "
          f"TTFT p50 {f['ttft_p50'] * 1e3:7.1f} ms p99 {f['ttft_p99'] * 1e3:7.1f} ms   TPOT {tpot}   "
          f"ITL p99 {itl}   goodput {goodput}", flush=True)


def verdicts(rows: list) -> None:
    """The goals of issue 13, from this run's figures."""
    at = {(name, path, c): (f, ratio) for name, path, c, f, ratio in rows}
    for name in sorted({r[0] for r in rows}):
        checks = [("engine", 32, 1.5), ("http-stream", 32, 1.0), ("http", 32, 1.2)]
        for path, c, goal in checks:
            if (name, path, c) in at:
                ratio = at[(name, path, c)][1]
                print(f"goal {name} {path} c=32 >= {goal}x hf: {ratio:.2f}x  {'met' if ratio >= goal else 'NOT met'}")
        if (name, "http-stream", 1) in at and (name, "engine", 1) in at:
            gap = (at[(name, "http-stream", 1)][0]["ttft_p50"] - at[(name, "engine", 1)][0]["ttft_p50"]) * 1e3
            print(f"goal {name} c=1 HTTP TTFT p50 within 10 ms of the engine's: {gap:+.1f} ms  "
                  f"{'met' if gap <= 10 else 'NOT met'}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--presets", default="issue,small", help=f"comma-separated, of {sorted(SHAPES)}")
    parser.add_argument("--concurrency", default="1,8,32,64")
    parser.add_argument("--prompt-tokens", type=int, default=64)
    parser.add_argument("--new-tokens", type=int, default=128)
    parser.add_argument("--threads", type=int, default=2, help="cores per path")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--min-requests", type=int, default=8,
                        help="requests per run at least (c at a time): a p50 of one request is no p50")
    parser.add_argument("--no-http", dest="http", action="store_false")
    parser.add_argument("--int8", action="store_true", help="add the engine with int8 weights, and its quality cost")
    parser.add_argument("--heldout-tokens", type=int, default=32768, help="--int8: tokens of held-out text scored")
    parser.add_argument("--heldout-block", type=int, default=128,
                        help="--int8: the held-out text's block length (at most the model's context; default: "
                             "training's default data.block_size, the length a model trained at the defaults knows)")
    parser.add_argument("--engine-threads", type=int, help="the engine's intra-op threads (default: --threads)")
    parser.add_argument("--replica-threads", type=int, default=0,
                        help="the HTTP replica's torch threads (serve spec ``threads``; 0: its default)")
    parser.add_argument("--model", help="a model artifact to measure instead of random weights (one shape)")
    parser.add_argument("--ingress", choices=["auto", "proxy"], default="auto",
                        help="auto: HAProxy in front of direct-ingress replicas where raystack.cluster enables it; "
                             "proxy: Serve's Python proxy actor (Ray's default)")
    parser.add_argument("--clients", default="aiohttp",
                        help="HTTP clients, comma-separated, of aiohttp (vllm bench serve's) and httpx; the first "
                             "one's paths are the goals', the others' are printed as http/<client>")
    args = parser.parse_args()
    if args.heldout_tokens < 1 or args.heldout_block < 1:
        parser.error(f"--heldout-tokens and --heldout-block must be >= 1, got {args.heldout_tokens} and "
                     f"{args.heldout_block}")
    unknown = set(args.clients.split(",")) - {"aiohttp", "httpx"}
    if unknown:
        parser.error(f"--clients: unknown {', '.join(sorted(unknown))}; known: aiohttp, httpx")
    if args.ingress == "proxy":
        os.environ["RAY_SERVE_ENABLE_HA_PROXY"] = "0"  # before the local Ray starts (raystack.cluster)
    from raystack.cluster import apply_local_ray_env

    apply_local_ray_env()
    ingress = ("HAProxy + direct ingress" if os.environ.get("RAY_SERVE_ENABLE_HA_PROXY") == "1"
               else "Serve's proxy actor")
    args.concurrency = [int(c) for c in args.concurrency.split(",")]
    print(f"{time.strftime('%Y-%m-%d')}; torch {torch.__version__}; {args.threads} cores per path; prompts "
          f"{args.prompt_tokens} tokens, {args.new_tokens} new, top_p 0.9; {args.repeats} runs per path (tokens/s: the "
          f"best; latencies: all their requests); HTTP through {ingress}, client {args.clients}", flush=True)
    rows: list = []
    for name in args.presets.split(","):
        measure_shape(name, args, rows)
    verdicts(rows)


if __name__ == "__main__":
    main()
