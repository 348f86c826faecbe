"""Prefix caching: multi-turn chats through the engine with it on and off, side by side in one run.

    python benchmarks/prefix_caching.py [--preset small] [--conversations 8] [--turns 3] [--threads 2] [--repeats 3]
        [--stagger 0] [--think 0]

A chat client sends the whole conversation again on every turn. Here ``--conversations`` chats run, each ``--turns``
turns: a shared system prompt (``--system`` bytes), then per turn a user message (``--user`` bytes) and
``--new-tokens`` generated tokens (end-of-text ignored, top_p 0.9, seeded), rendered as raystack's default chat
template renders them (``role: content`` lines, then ``assistant:``). Each turn's prompt is the last turn's prompt
tokens, its completion's tokens and the new user line: what a client that sends the assistant's reply back as it
came gets from the template (with random weights the reply is not valid UTF-8 text, so the benchmark works in
tokens). Random weights, byte vocabulary, ``--threads`` torch threads, the engine in process. By default every chat
starts at once and sends each turn as the last one ends; ``--stagger`` starts them that many seconds apart and
``--think`` waits between turns (exponential, that mean, seeded), so chats come and go as users' do and a new chat
finds others' conversations in the free slots.

Printed per mode (``off``: ``EngineConfig(prefix_caching=False)``, the baseline; ``lowest``: prefix caching that
gives a prompt with nothing better the lowest free slot, whatever it holds, as the engine first did; ``on``: the
default, which keeps what it can, ``Engine._reuse``): prompt tokens prefilled and found cached, TTFT p50/p99 of
the later turns (those with a conversation to reuse) and of the first, and the whole run's wall time; then on/off and
on/lowest as ratios. The modes alternate ``--repeats`` times (the machines are noisy); the latencies are over the
requests of all repeats, the wall time the best repeat's, the token counts the repeats' mean (with ``--stagger`` or
``--think`` they depend on timing).
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

from benchmarks.stats import percentile  # noqa: E402
from raystack.engine import PREFIX_MIN, Engine, EngineConfig, GenerationParams  # noqa: E402
from raystack.model import GPT, ModelConfig  # noqa: E402
from raystack.tokenizer import ByteTokenizer  # noqa: E402


def text(length: int, seed: int) -> bytes:
    """``length`` bytes of printable filler (a line of a prompt), different for each ``seed``."""
    words = [b"alpha", b"beta", b"gamma", b"delta", b"epsilon", b"zeta", b"eta", b"theta"]
    out, i = b"", seed
    while len(out) < length:
        out += words[i % len(words)] + b" "
        i = i * 7 + 3
    return out[:length]


class LowestFirst(Engine):
    """Prefix caching as the engine first did it: the free slot holding the most of a prompt where that is
    ``PREFIX_MIN`` tokens more than the lowest free slot holds, else the lowest, whatever its cache holds
    (``Engine._reuse`` keeps what it can)."""

    def _reuse(self, held: dict[int, int], whole: int) -> int:
        best, lowest = max(self._free_slots, key=lambda s: (held[s], -s)), self._free_slots[0]
        return best if held[best] - held[lowest] >= PREFIX_MIN else lowest


async def conversation(engine: Engine, args, index: int, clock: list) -> None:
    """One chat of ``args.turns`` turns; appends ``(turn, ttft_s)`` per turn to ``clock``. It starts
    ``index * args.stagger`` seconds in, and waits a think time (exponential, mean ``args.think`` s) between turns."""
    pause = random.Random(index)
    await asyncio.sleep(index * args.stagger)
    tokens = list(b"system: " + text(args.system, 0) + b"\n")
    for turn in range(args.turns):
        if turn and args.think:
            await asyncio.sleep(pause.expovariate(1 / args.think))
        tokens += list(b"user: " + text(args.user, 1000 * index + turn) + b"\nassistant:")
        params = GenerationParams(max_tokens=args.new_tokens, top_p=0.9, seed=100 * index + turn, ignore_eos=True)
        start, first, reply = time.perf_counter(), None, []
        async for event in engine.generate(tokens, params):
            if first is None:
                first = time.perf_counter() - start
            reply.append(event.token)
        clock.append((turn, first))
        tokens += reply + list(b"\n")


MODES = {"off": (Engine, False), "lowest": (LowestFirst, True), "on": (Engine, True)}
"""What each mode runs: the engine class and ``prefix_caching``."""


async def run_mode(model: GPT, args, mode: str) -> dict:
    engine_class, prefix_caching = MODES[mode]
    engine = engine_class(model, ByteTokenizer(), EngineConfig(max_batch_size=args.slots, threads=args.threads,
                                                               prefix_caching=prefix_caching))
    await conversation(engine, argparse.Namespace(**{**vars(args), "turns": 1, "stagger": 0}), 999, [])  # warm-up
    engine.stats.update(prefilled_tokens=0, cached_tokens=0)
    clock: list = []
    start = time.perf_counter()
    await asyncio.gather(*(conversation(engine, args, i, clock) for i in range(args.conversations)))
    wall = time.perf_counter() - start
    stats = dict(engine.stats)
    await engine.shutdown()
    return {"wall": wall, "clock": clock, "prefilled": stats["prefilled_tokens"], "cached": stats["cached_tokens"]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--preset", default="small", choices=["issue", "small"],
                        help="issue: 4 layers x 128 wide (issue 13's shape); small: raystack's small preset")
    parser.add_argument("--conversations", type=int, default=8)
    parser.add_argument("--turns", type=int, default=3)
    parser.add_argument("--system", type=int, default=192, help="system prompt bytes, shared by every chat")
    parser.add_argument("--user", type=int, default=40, help="bytes per user message")
    parser.add_argument("--new-tokens", type=int, default=32)
    parser.add_argument("--slots", type=int, default=16, help="the engine's max_batch_size")
    parser.add_argument("--stagger", type=float, default=0.0, help="seconds between one chat's start and the next's")
    parser.add_argument("--think", type=float, default=0.0, help="mean seconds a chat waits between turns")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    if args.stagger < 0 or args.think < 0:
        parser.error("--stagger and --think are seconds: 0 or more")
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    shape = (dict(n_layer=4, n_head=4, n_embd=128, max_seq_len=512) if args.preset == "issue"
             else ModelConfig.from_preset("small").to_dict())
    model = GPT(ModelConfig(**shape)).eval()
    longest = (len(b"system: \n") + args.system + args.turns * (len(b"user: \nassistant:") + args.user)
               + (args.turns - 1) * (args.new_tokens + 1) + args.new_tokens)
    if longest > model.config.max_seq_len:
        parser.error(f"the last turn needs {longest} tokens; the model holds {model.config.max_seq_len}: "
                     "fewer --turns or shorter messages")
    runs: dict = {mode: [] for mode in MODES}
    for _ in range(args.repeats):
        for mode in MODES:
            runs[mode].append(asyncio.run(run_mode(model, args, mode)))
    print(f"{time.strftime('%Y-%m-%d %H:%M')}; torch {torch.__version__}; {args.threads} threads; preset "
          f"{args.preset}; {args.conversations} chats x {args.turns} turns, system {args.system} B, user "
          f"{args.user} B, {args.new_tokens} new tokens; {args.slots} slots; starts {args.stagger} s apart, think time "
          f"{args.think} s; {args.repeats} repeats, modes alternating")
    summary = {}
    for mode, results in runs.items():
        later = [t for r in results for turn, t in r["clock"] if turn > 0]
        first = [t for r in results for turn, t in r["clock"] if turn == 0]
        summary[mode] = s = {"later_p50": statistics.median(later), "later_p99": percentile(later, 0.99),
                             "first_p50": statistics.median(first), "wall": min(r["wall"] for r in results),
                             "prefilled": round(statistics.mean(r["prefilled"] for r in results)),
                             "cached": round(statistics.mean(r["cached"] for r in results))}
        print(f"prefix caching {mode:6}  prefilled {s['prefilled']:6} tokens, cached {s['cached']:6}   later turns "
              f"TTFT p50 {s['later_p50'] * 1e3:7.1f} ms p99 {s['later_p99'] * 1e3:7.1f} ms   first turns TTFT p50 "
              f"{s['first_p50'] * 1e3:7.1f} ms   wall {s['wall']:6.2f} s")
    for base in ("off", "lowest"):
        on, off = summary["on"], summary[base]
        print(f"on / {base}: later-turn TTFT p50 {on['later_p50'] / off['later_p50']:.2f}x (p99 "
              f"{on['later_p99'] / off['later_p99']:.2f}x), wall time {on['wall'] / off['wall']:.2f}x, prefilled "
              f"tokens {on['prefilled'] / off['prefilled']:.2f}x")


if __name__ == "__main__":
    main()
