"""The engine's decode step with the fused CPU ops (raystack.kernels) against the same step in PyTorch ops, same run.

    python benchmarks/decode_step.py [--threads 1,2] [--positions 8,128,190] [--batch 32] [--presets issue,small]

Models: issue 13's shape (4 layers x 128 wide x 4 heads, max_seq_len 256) and the ``small`` preset, random weights.
Four paths over the same cache, interleaved in 15 rounds of 20 calls each: ``GPT.decode`` with every block in one
op (``decode_layers``) over the weights prepacked by oneDNN (``pack_linears``, what the engine runs on CPU; a
128-wide model has none packed, so it equals the next), the same op over plain weights (ATen's matrix products),
with only each layer's attention fused (``decode_attention``, what int8 weights run), and with ``fused=False``
(PyTorch ops). Printed: each path's median milliseconds per decode and the
median of the per-round ratios to PyTorch ops (below 1 is faster).
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
from raystack.model import GPT, KVCache, ModelConfig, pack_linears  # noqa: E402


PRESETS = {"issue": dict(n_layer=4, n_head=4, n_embd=128, max_seq_len=256), "small": dict(max_seq_len=256)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--threads", default="1,2")
    parser.add_argument("--positions", default="8,128,190")
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--presets", default="issue,small")
    args = parser.parse_args()
    if kernels.decode_attention() is None or kernels.decode_layers() is None:
        sys.exit("the fused ops are not available here (no C++ compiler, or RAYSTACK_CPU_KERNELS=0)")
    print(f"{time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}; torch {torch.__version__}; batch {args.batch}")
    for preset in args.presets.split(","):
        if preset not in PRESETS:
            sys.exit(f"unknown preset {preset!r}; known: {', '.join(PRESETS)}")
        config = ModelConfig(**PRESETS[preset]) if preset == "issue" else ModelConfig.from_preset(preset,
                                                                                                   **PRESETS[preset])
        torch.manual_seed(0)
        model = GPT(config).eval()
        packed_model = pack_linears(model)
        cache, B = KVCache(config, args.batch), args.batch
        tokens = torch.randint(0, config.vocab_size, (B,))
        weights = model._block_weights

        def packed(positions):
            return packed_model.decode(tokens, positions, cache, slice(0, B))

        def layers(positions):
            return model.decode(tokens, positions, cache, slice(0, B))

        def attention(positions):
            model._block_weights = lambda: None  # what a model with int8 linear layers gets
            try:
                return model.decode(tokens, positions, cache, slice(0, B))
            finally:
                model._block_weights = weights

        def pytorch(positions):
            return model.decode(tokens, positions, cache, slice(0, B), fused=False)

        for threads in (int(t) for t in args.threads.split(",")):
            torch.set_num_threads(threads)
            for position in (int(p) for p in args.positions.split(",")):
                positions = torch.full((B,), position)
                timings: dict = {packed: [], layers: [], attention: [], pytorch: []}
                with torch.inference_mode():
                    for _ in range(10):
                        for path in timings:
                            path(positions)
                    for _ in range(15):
                        for path in timings:
                            start = time.perf_counter()
                            for _ in range(20):
                                path(positions)
                            timings[path].append((time.perf_counter() - start) / 20 * 1e3)
                base = timings[pytorch]
                line = f"{preset:5s} threads {threads} position {position:4d}:"
                for path in (packed, layers, attention):
                    ratio = statistics.median(f / p for f, p in zip(timings[path], base))
                    line += f" {path.__name__} op {statistics.median(timings[path]):7.3f} ms ({ratio:.2f}x),"
                print(f"{line} PyTorch ops {statistics.median(base):7.3f} ms", flush=True)


if __name__ == "__main__":
    main()
