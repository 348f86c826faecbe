"""The decode step as CUDA graphs (raystack.decode_graphs): buckets, the static-buffer fixed-shape step against the
eager decode, and the engine running on it. Capture itself needs a CUDA device (the last test); everything else
runs the same step eagerly (``capture=False``)."""

import asyncio
import copy

import pytest
import torch

from raystack.decode_graphs import DecodeGraphs, bucket_sizes
from raystack.engine import Engine, EngineConfig, GenerationParams, generate_text
from raystack.model import GPT, KVCache, ModelConfig
from raystack.tokenizer import ByteTokenizer

cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs need a CUDA device")


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    return GPT(ModelConfig.from_preset("tiny", max_seq_len=64)).eval()


def test_buckets_cover_every_batch_size_with_the_smallest_fitting_one():
    assert bucket_sizes(1) == [1]
    assert bucket_sizes(6) == [1, 2, 4, 6]
    assert bucket_sizes(16) == [1, 2, 4, 8, 16]
    assert bucket_sizes(20) == [1, 2, 4, 8, 16, 20]
    with pytest.raises(ValueError, match="slots must be >= 1"):
        bucket_sizes(0)
    config = ModelConfig.from_preset("tiny", max_seq_len=16)
    graphs = DecodeGraphs(GPT(config).eval(), KVCache(config, slots=20), capture=False)
    assert [graphs.bucket(n) for n in (1, 2, 3, 5, 8, 9, 16, 17, 20)] == [1, 2, 4, 8, 8, 16, 16, 20, 20]
    for bad in (0, 21):
        with pytest.raises(ValueError, match="rows must be in 1..20"):
            graphs.bucket(bad)
    with pytest.raises(ValueError, match="span must be in 1..16"):
        graphs.model.decode(torch.zeros(1, dtype=torch.long), torch.zeros(1, dtype=torch.long), graphs.cache,
                            slice(0, 1), fused=False, span=17)


def _prefilled(model, lengths, slots):
    cache = KVCache(model.config, slots=slots)
    for slot, length in enumerate(lengths):
        prompt = torch.randint(0, 257, (1, length))
        model.prefill(prompt, cache, torch.tensor([slot]))
    return cache


@torch.inference_mode()
def test_the_padded_fixed_shape_step_equals_the_eager_decode(model):
    """Steps of 7, 3, 5 and 1 rows (buckets 8, 4, 8, 1: padded with idle rows), some rows idle themselves, and a
    new sequence in slot 3 between the first two (a padding row there must not write the last step's token): the
    live rows' logits and every cache position a sequence can read equal ``GPT.decode`` over just those slots."""
    torch.manual_seed(1)
    graphed = _prefilled(model, [5, 9, 2, 14, 7, 3, 11, 4], slots=8)
    eager = copy.deepcopy(graphed)
    runner = DecodeGraphs(model, graphed, capture=False)
    positions = [5, 9, 2, 14, 7, 3, 11, 4]
    for n, idle in ((7, {0, 6}), (3, {1}), (5, set()), (1, set())):
        if n == 3:  # slot 3's sequence ended; a new one, longer than it, was prefilled there
            prompt = torch.randint(0, 257, (1, 20))
            for cache in (graphed, eager):
                model.prefill(prompt, cache, torch.tensor([3]))
            positions[3] = 20
        tokens = torch.randint(0, 257, (n,)).tolist()
        pos = [-1 if i in idle else positions[i] for i in range(n)]
        got = runner.run(tokens, pos)
        expected = model.decode(torch.tensor(tokens), torch.tensor(pos), eager, slice(0, n))
        assert got.shape == (n, model.config.vocab_size)
        live = [i for i in range(n) if i not in idle]
        torch.testing.assert_close(got[live], expected[live], rtol=1e-5, atol=1e-5)
        assert torch.isfinite(got).all()
        for i in live:
            positions[i] += 1
    last = model.config.max_seq_len - 1  # where idle and padding rows write; no sequence reads it
    torch.testing.assert_close(graphed.k[..., :last, :], eager.k[..., :last, :])
    torch.testing.assert_close(graphed.v[..., :last, :], eager.v[..., :last, :])
    with pytest.raises(ValueError, match="2 tokens but 1 positions"):
        runner.run([1, 2], [3])


def test_capture_needs_a_cuda_cache(model):
    with pytest.raises(ValueError, match="CUDA graphs need a CUDA cache"):
        DecodeGraphs(model, KVCache(model.config, slots=2))
    engine = Engine(model, ByteTokenizer(), EngineConfig(max_batch_size=2, device="cpu"))
    assert engine.runner.graphs is None  # CPU: eager decode (and the fused op), whatever cuda_graphs says


REQUESTS = [
    ("def main():", GenerationParams(max_tokens=20, temperature=0.0)),
    ("import os\n", GenerationParams(max_tokens=26, temperature=0.8, top_k=20, seed=1)),
    ("class A:", GenerationParams(max_tokens=6, temperature=1.0, top_p=0.9, seed=2)),
    ("x = ", GenerationParams(max_tokens=16, temperature=1.3, min_p=0.05, seed=3, presence_penalty=0.5)),
    ("for i in", GenerationParams(max_tokens=24, temperature=0.9, seed=5)),
]


def test_the_engine_on_the_graph_step_gives_every_request_its_eager_tokens(model):
    """Requests finishing at different steps (holes among the running slots, idle rows in the graph's batch) get
    the same tokens from the engine decoding through ``DecodeGraphs`` as from its eager decode."""

    async def serve(graphed: bool):
        engine = Engine(model, ByteTokenizer(), EngineConfig(max_batch_size=6))
        if graphed:
            engine.runner.graphs = DecodeGraphs(engine.runner.model, engine.runner.cache, capture=False)
            calls = []
            run = engine.runner.graphs.run
            engine.runner.graphs.run = lambda t, p: calls.append(len(t)) or run(t, p)
        out = await asyncio.gather(*(generate_text(engine, p, g) for p, g in REQUESTS))
        await engine.shutdown()
        if graphed:
            assert calls and max(calls) == len(REQUESTS)  # the decode steps went through the graph step
        return out

    eager, graphed = asyncio.run(serve(False)), asyncio.run(serve(True))
    for (prompt, _), a, b in zip(REQUESTS, eager, graphed):
        assert a["tokens"] == b["tokens"] and a["text"] == b["text"], prompt


@cuda
@torch.inference_mode()
def test_captured_graphs_replay_the_eager_step_on_cuda():
    torch.manual_seed(3)
    model = GPT(ModelConfig.from_preset("tiny", max_seq_len=64)).cuda().eval()
    graphed = KVCache(model.config, slots=8, device="cuda")
    for slot, length in enumerate([5, 9, 2, 14, 7]):
        model.prefill(torch.randint(0, 257, (1, length), device="cuda"), graphed, torch.tensor([slot], device="cuda"))
    eager = copy.deepcopy(graphed)
    runner, reference = DecodeGraphs(model, graphed), DecodeGraphs(model, eager, capture=False)
    assert sorted(runner._graphs) == runner.buckets == [1, 2, 4, 8]
    positions = [5, 9, 2, 14, 7]
    for _ in range(3):
        tokens = torch.randint(0, 257, (5,)).tolist()
        torch.testing.assert_close(runner.run(tokens, positions), reference.run(tokens, positions),
                                   rtol=1e-4, atol=1e-4)
        positions = [p + 1 for p in positions]
    engine = Engine(model, ByteTokenizer(), EngineConfig(max_batch_size=4))
    assert engine.runner.graphs is not None and engine.runner.graphs.buckets == [1, 2, 4]
    assert Engine(model, ByteTokenizer(), EngineConfig(max_batch_size=4, cuda_graphs=False)).runner.graphs is None
    out = asyncio.run(generate_text(engine, "def main():", GenerationParams(max_tokens=8, temperature=0.0,
                                                                                 ignore_eos=True)))
    assert len(out["tokens"]) == 8
