"""The decode step as CUDA graphs (raystack.decode_graphs) against the same step run eagerly, same run, on a GPU.

    python benchmarks/decode_graphs.py [--presets issue,small] [--parts step,engine,chats] [--batch 1,8,32]
        [--requests 32] [--chat-slots 64] [--chat-rows 8] [--repeats 3]

Per preset (``issue``: 4 layers x 128 wide x 4 heads, issue 13's shape; ``small``), bfloat16 on CUDA, random weights:
- step: one decode step of ``batch`` rows at mid-context as the engine runs it (inputs built from host lists, logits
  back), ``DecodeGraphs.run`` against ``GPT.decode`` with the inputs built the same way; median milliseconds of 15
  interleaved rounds of 20 steps, and the median of the per-round ratios (graphs / eager; below 1 is faster);
- engine: ``requests`` concurrent requests (64-token prompts, 128 new tokens, top_p 0.9) through an ``Engine`` with
  ``cuda_graphs`` on and off, interleaved, best of 3; output tokens/s and the ratio (graphs / eager; above 1 is
  faster);
- chats: the slots of a server that chats came and went on. ``--chat-slots`` chats' first turns (a shared 64-byte
  system prompt and a user message; 8 to 55 new tokens, so they end in a scrambled order) leave one conversation in
  each slot; then ``--chat-rows`` chats at a time send their second turn (the conversation so far and a new message;
  16 to 48 new tokens, so rows end among running ones; top_p 0.9), in a shuffled order, each finding its
  conversation in its slot. Through the engine as it runs on the device (on CUDA, the graphs), with
  ``Engine.pack_slots`` on (a turn's cached conversation moves into the lowest free slot, and a running row moves
  down into the slot of one that ended) and off (it decodes where its conversation was: the rows spread over the
  slots, and rows that end leave holes). Per mode, interleaved, best of ``--repeats``: the second turns' output
  tokens/s, per decode step the rows decoded and the slots 0 up to the highest running one (what a graph runs,
  rounded up to its bucket), the running rows moved down, and the ratio (packed / unpacked; above 1 is faster).

``--device cpu``: the step and engine parts run the graph step eagerly (``capture=False``; capture needs CUDA), a
check that the script works, not a figure to quote. The chats part runs the CPU engine as it is: the fused decode op,
which reads any slot in place, or with ``RAYSTACK_CPU_KERNELS=0`` the PyTorch ops, which gather spread rows.
"""

from __future__ import annotations

import argparse
import asyncio
import random
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


async def chat_run(model: GPT, device: torch.device, pack: bool, args) -> dict:
    """One run of the chats part (module doc): second turns' output tokens/s, rows and slots spanned per decode."""
    engine = Engine(model, ByteTokenizer(), EngineConfig(max_batch_size=args.chat_slots, device=device.type))
    engine.pack_slots = pack
    runner, rows, spans = engine.runner, [], []
    decode = runner.decode

    def counted(decodes):
        rows.append(len(decodes))
        spans.append(decodes[-1].slot + 1)  # in slot order
        return decode(decodes)

    runner.decode = counted
    system = list(b"system: " + bytes(range(97, 123)) * 2 + b"0123456789ab\n")  # 64 bytes of content

    def prompt(chat: int, turn: int) -> list[int]:
        return list(f"user: chat {chat:3d} turn {turn} says hello\nassistant:".encode())

    async def turn(tokens: list[int], max_tokens: int, seed: int) -> list[int]:
        """The conversation after this turn: ``tokens`` and the reply."""
        params = GenerationParams(max_tokens=max_tokens, top_p=0.9, seed=seed, ignore_eos=True)
        return tokens + (await generate_text(engine, tokens, params))["tokens"]

    # First turns, all at once, ending in a scrambled order: each slot is left holding one conversation.
    chats = await asyncio.gather(*(turn(system + prompt(i, 1), 8 + i * 29 % 48, i) for i in range(args.chat_slots)))
    order = random.Random(0).sample(range(args.chat_slots), args.chat_slots)

    async def worker(w: int) -> int:
        generated = 0
        for chat in order[w::args.chat_rows]:
            length = 16 + chat * 37 % 33  # 16 to 48 tokens, so rows end among running ones
            await turn(chats[chat] + prompt(chat, 2), length, 1000 + chat)
            generated += length  # end-of-text ignored: every reply is as long as asked
        return generated

    rows.clear(), spans.clear()
    moved_before = engine.stats["moved_rows"]
    start = time.perf_counter()
    generated = sum(await asyncio.gather(*(worker(w) for w in range(args.chat_rows))))
    elapsed = time.perf_counter() - start
    cached = engine.stats["cached_tokens"]
    moved = engine.stats["moved_rows"] - moved_before
    graphs = runner.graphs is not None
    await engine.shutdown()
    return {"tok_s": generated / elapsed, "rows": statistics.mean(rows), "span": statistics.mean(spans),
            "cached": cached, "graphs": graphs, "moved": moved}


def chats_line(model: GPT, device: torch.device, args) -> str:
    runs: dict = {True: [], False: []}
    for _ in range(args.repeats):
        for pack in runs:
            runs[pack].append(asyncio.run(chat_run(model, device, pack, args)))
    on, off = (max(runs[pack], key=lambda r: r["tok_s"]) for pack in (True, False))
    path = "graphs" if on["graphs"] else device.type
    return (f"{args.chat_slots} slots holding a chat each, {args.chat_rows} chats' next turns at a time ({path}): "
            f"packed {on['tok_s']:,.0f} tok/s, {on['rows']:.2f} rows a decode step over slots 0-{on['span'] - 1:.2f} "
            f"({on['moved']} rows moved down); "
            f"unpacked {off['tok_s']:,.0f} tok/s, {off['rows']:.2f} rows over slots 0-{off['span'] - 1:.2f}; "
            f"ratio {on['tok_s'] / off['tok_s']:.2f}x (cached tokens {on['cached']:,} / {off['cached']:,})")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--presets", default="issue,small")
    parser.add_argument("--batch", default="1,8,32")
    parser.add_argument("--requests", type=int, default=32)
    parser.add_argument("--device", default="cuda", choices=["cuda", "cpu"])
    parser.add_argument("--parts", default="step,engine,chats", help="of step, engine, chats")
    parser.add_argument("--chat-slots", type=int, default=64, help="the chats part's engine slots (and chats)")
    parser.add_argument("--chat-rows", type=int, default=8, help="the chats part's chats at a time")
    parser.add_argument("--repeats", type=int, default=3, help="interleaved runs of each chats mode")
    args = parser.parse_args()
    parts = set(args.parts.split(","))
    if not parts <= {"step", "engine", "chats"}:
        parser.error(f"--parts takes step, engine and chats, got {args.parts!r}")
    if args.chat_slots < 1 or args.repeats < 1 or not 1 <= args.chat_rows <= args.chat_slots:
        parser.error("--chat-slots and --repeats must be >= 1, --chat-rows from 1 to --chat-slots")
    if args.device == "cuda" and not torch.cuda.is_available():
        sys.exit("no CUDA device here: CUDA graphs need one (--device cpu checks the script, without capture)")
    device = torch.device(args.device)
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    name = torch.cuda.get_device_name() if device.type == "cuda" else "cpu (step, engine: graph step run eagerly)"
    print(f"{time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}; torch {torch.__version__}; {name}; {dtype}")
    for preset in args.presets.split(","):
        if preset not in PRESETS:
            sys.exit(f"unknown preset {preset!r}; known: {', '.join(PRESETS)}")
        torch.manual_seed(0)
        model = GPT(ModelConfig(**PRESETS[preset])).to(device=device, dtype=dtype).eval()
        if "step" in parts:
            print(f"[{preset}] step")
            for batch in (int(b) for b in args.batch.split(",")):
                print("  " + step_ratio(model, batch, device))
        if "engine" in parts:
            rates: dict = {True: [], False: []}
            for _ in range(3):
                for graphs in rates:
                    rates[graphs].append(asyncio.run(engine_tokens_per_s(model, graphs, args.requests, device)))
            on, off = max(rates[True]), max(rates[False])
            print(f"[{preset}] engine, {args.requests} concurrent requests: graphs {on:,.0f} tok/s, "
                  f"eager {off:,.0f} tok/s, ratio {on / off:.2f}x")
        if "chats" in parts:
            print(f"[{preset}] chats: " + chats_line(model, device, args))

if __name__ == "__main__":
    main()
