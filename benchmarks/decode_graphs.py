"""The decode step as CUDA graphs (raystack.decode_graphs) against the same step run eagerly, same run, on a GPU.

    python benchmarks/decode_graphs.py [--presets issue,small] [--batch 1,8,32] [--requests 32]

Per preset (``issue``: 4 layers x 128 wide x 4 heads, issue 13's shape; ``small``), bfloat16, random weights:
- step: one decode step of ``batch`` rows at mid-context as the engine runs it (inputs built from host lists, logits
  back), ``DecodeGraphs.run`` against ``GPT.decode`` with the inputs built the same way; median milliseconds of 15
  interleaved rounds of 20 steps, and the median of the per-round ratios (graphs / eager; below 1 is faster);
- engine: ``requests`` concurrent requests (64-token prompts, 128 new tokens, top_p 0.9) through an ``Engine`` with
  ``cuda_graphs`` on and off, interleaved, best of 3; output tokens/s and the ratio (graphs / eager; above 1 is
  faster).

``--device cpu`` runs the script's logic with the graph step run eagerly (``capture=False``; capture needs CUDA):
a check that the script works, not a figure to quote.
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from raystack.decode_graphs import DecodeGraphs  # noqa: E402
from raystack.engine import Engine, EngineConfig, GenerationParams, generate_text  # noqa: E402
from raystack.model import GPT, KVCache, ModelConfig  # noqa: E402
from raystack.tokenizer import ByteTokenizer  # noqa: E402

PRESETS = {
    "issue": dict(n_layer=4, n_head=4, n_embd=128, max_seq_len=256),
    "small": dict(ModelConfig.from_preset("small").to_dict(), max_seq_len=256),
}


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


@torch.inference_mode()
def step_ratio(model: GPT, batch: int, device: torch.device) -> str:
    cache = KVCache(model.config, batch, device=device, dtype=next(model.parameters()).dtype)
    graphs = DecodeGraphs(model, cache, capture=device.type == "cuda")
    tokens = torch.randint(0, model.config.vocab_size, (batch,)).tolist()
    positions = [model.config.max_seq_len // 2] * batch

    def eager():
        t = torch.tensor(tokens, device=device)
        p = torch.tensor(positions, device=device)
        return model.decode(t, p, cache, slice(0, batch)).float().cpu()

    def graphed():
        return graphs.run(tokens, positions).float().cpu()

    timings: dict = {eager: [], graphed: []}
    for _ in range(10):
        for fn in timings:
            fn()
    for _ in range(15):
        for fn in timings:
            sync(device)
            start = time.perf_counter()
            for _ in range(20):
                fn()
            sync(device)
            timings[fn].append((time.perf_counter() - start) / 20 * 1e3)
    ratio = statistics.median(g / e for g, e in zip(timings[graphed], timings[eager]))
    return (f"batch {batch:3d}: graphs {statistics.median(timings[graphed]):7.3f} ms, "
            f"eager {statistics.median(timings[eager]):7.3f} ms, ratio {ratio:.2f}x")


async def engine_tokens_per_s(model: GPT, graphs: bool, requests: int, device: torch.device) -> float:
    engine = Engine(model, ByteTokenizer(), EngineConfig(max_batch_size=requests, device=device.type,
                                                         cuda_graphs=graphs))
    if device.type != "cuda" and graphs:
        engine.runner.graphs = DecodeGraphs(engine.runner.model, engine.runner.cache, capture=False)
    prompt = list(range(1, 65))
    params = [GenerationParams(max_tokens=128, temperature=1.0, top_p=0.9, seed=i, ignore_eos=True)
              for i in range(requests)]
    await generate_text(engine, prompt, params[0])  # warm-up
    start = time.perf_counter()
    outs = await asyncio.gather(*(generate_text(engine, prompt, p) for p in params))
    elapsed = time.perf_counter() - start
    await engine.shutdown()
    return sum(len(o["tokens"]) for o in outs) / elapsed


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--presets", default="issue,small")
    parser.add_argument("--batch", default="1,8,32")
    parser.add_argument("--requests", type=int, default=32)
    parser.add_argument("--device", default="cuda", choices=["cuda", "cpu"])
    args = parser.parse_args()
    if args.device == "cuda" and not torch.cuda.is_available():
        sys.exit("no CUDA device here: CUDA graphs need one (--device cpu checks the script, without capture)")
    device = torch.device(args.device)
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    name = torch.cuda.get_device_name() if device.type == "cuda" else "cpu (graph step run eagerly)"
    print(f"{time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}; torch {torch.__version__}; {name}; {dtype}")
    for preset in args.presets.split(","):
        if preset not in PRESETS:
            sys.exit(f"unknown preset {preset!r}; known: {', '.join(PRESETS)}")
        torch.manual_seed(0)
        model = GPT(ModelConfig(**PRESETS[preset])).to(device=device, dtype=dtype).eval()
        print(f"[{preset}] step")
        for batch in (int(b) for b in args.batch.split(",")):
            print("  " + step_ratio(model, batch, device))
        rates: dict = {True: [], False: []}
        for _ in range(3):
            for graphs in rates:
                rates[graphs].append(asyncio.run(engine_tokens_per_s(model, graphs, args.requests, device)))
        on, off = max(rates[True]), max(rates[False])
        print(f"[{preset}] engine, {args.requests} concurrent requests: graphs {on:,.0f} tok/s, "
              f"eager {off:,.0f} tok/s, ratio {on / off:.2f}x")


if __name__ == "__main__":
    main()
