"""The continuous-batching engine, driven directly (no Ray) with a randomly initialised tiny model.

The correctness tests (batched == alone, stop strings, cancellation, failures that stay in their row) also run on a
CUDA GPU where one is present (``DEVICES``; the decode step from CUDA graphs): ``benchmarks/gpu_check.sh``. Those
that compare a row's tokens across batch compositions run in float32 there (``exact_engine``); bf16 has a test of its
own, which allows a batched row to part from its lone run at a near-tie."""

import asyncio
import collections
import copy
import dataclasses

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from raystack.decode_graphs import DecodeGraphs
from raystack.engine import Engine, EngineConfig, GenerationParams, SequenceFailed, generate_text
from raystack.model import GPT, ModelConfig, PackedLinear
from raystack.tokenizer import ByteTokenizer


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    return GPT(ModelConfig.from_preset("tiny", max_seq_len=96))


@pytest.fixture(scope="module")
def wide_model():
    """256 wide: on CPU the engine runs its larger linear layers prepacked by oneDNN (``model.pack_linears``)."""
    torch.manual_seed(1)
    return GPT(ModelConfig(n_layer=2, n_head=4, n_embd=256, max_seq_len=96))


DEVICES = ["cpu", pytest.param("cuda", marks=pytest.mark.gpu)]
_COPIES: dict = {}


def on(model, device: str, dtype: str = "auto"):
    """``model`` for an engine on ``device`` in ``dtype``: itself on CPU in float32; otherwise one copy per model,
    device and dtype (an engine moves its model to its device and dtype in place, the CPU tests share these fixtures,
    and a float32 copy must not carry weights once rounded to bf16)."""
    if device == "cpu" and dtype in ("auto", "float32"):
        return model
    key = (id(model), device, dtype)
    if key not in _COPIES:
        _COPIES[key] = (model, copy.deepcopy(model))  # the original is kept, so its id stays its own
    return _COPIES[key][1]


def make_engine(model, slots=8, device="cpu", dtype="auto", pack_slots=None):
    """``pack_slots``: set ``Engine.pack_slots`` (None leaves the engine's default for its device)."""
    engine = Engine(on(model, device, dtype), ByteTokenizer(),
                    EngineConfig(max_batch_size=slots, device=device, dtype=dtype))
    if pack_slots is not None:
        engine.pack_slots = pack_slots
    return engine


def exact_engine(model, slots=8, device="cpu"):
    """An engine for the tests that compare a row's tokens alone and batched: float32 on every device. In bf16 on
    CUDA, cuBLAS may pick another kernel for another batch size, and a product rounded differently can tip a near-tie
    (``test_in_bf16_...``); float32 rounds 2^16 times finer."""
    return make_engine(model, slots, device, dtype="float32")


REQUESTS = [
    ("def main():", GenerationParams(max_tokens=24, temperature=0.0)),
    ("import os\n", GenerationParams(max_tokens=30, temperature=0.8, top_k=20, seed=1)),
    ("class A:", GenerationParams(max_tokens=12, temperature=1.0, top_p=0.9, seed=2, logprobs=True)),
    ("x = ", GenerationParams(max_tokens=20, temperature=1.3, min_p=0.05, seed=3, presence_penalty=0.5)),
    ("", GenerationParams(max_tokens=16, temperature=0.7, top_k=5, top_p=0.8, seed=4, repetition_penalty=1.2)),
    ("for i in", GenerationParams(max_tokens=28, temperature=0.9, seed=5, frequency_penalty=0.4)),
]


def run(coro):
    return asyncio.run(coro)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("width", ["tiny", "wide"])
def test_batched_generation_equals_one_at_a_time(model, wide_model, width, device):
    model = wide_model if width == "wide" else model

    async def alone():
        results = []
        for prompt, params in REQUESTS:
            engine = exact_engine(model, device=device)
            results.append(await generate_text(engine, prompt, params))
            await engine.shutdown()
        return results

    async def together():
        engine = exact_engine(model, device=device)
        packed = any(type(m) is PackedLinear for m in engine.runner.model.modules())
        assert packed == (width == "wide" and device == "cpu")  # oneDNN packing is for CPU float32
        results = await asyncio.gather(*(generate_text(engine, p, g) for p, g in REQUESTS))
        assert engine.stats["steps"] < sum(g.max_tokens for _, g in REQUESTS)  # rows really shared steps
        await engine.shutdown()
        return results

    single, batched = run(alone()), run(together())
    for a, b, (_, params) in zip(single, batched, REQUESTS):
        assert a["tokens"] == b["tokens"] and a["text"] == b["text"]
        assert len(a["tokens"]) <= params.max_tokens
    assert batched[2]["logprobs"][0] is not None and batched[2]["logprobs"][0] <= 0


@pytest.mark.parametrize("device", DEVICES)
def test_in_bf16_a_batched_row_follows_its_lone_run_up_to_a_near_tie(model, device):
    """bf16 (the default on CUDA, an option on CPU): a row decoded beside five others (on CUDA the bucket-8 graph)
    takes the greedy tokens it takes alone (bucket 1), with the same log-probabilities to bf16's precision, until a
    step where the two runs' products, rounded differently, tip a near-tie; there each run's token is among the
    other's five most likely, and the comparison ends (the rule of vLLM's ``check_logprobs_close``)."""
    params = GenerationParams(max_tokens=24, temperature=0.0, logprobs=True, top_logprobs=5, ignore_eos=True)
    prompts = ["def main():", "import os\n", "class A:", "x = ", "", "for i in"]

    async def events(engine, prompt):
        return [e async for e in engine.generate(engine.encode_prompt(prompt), params)]

    async def scenario():
        alone = []
        for prompt in prompts:
            engine = make_engine(model, device=device, dtype="bfloat16")
            alone.append(await events(engine, prompt))
            await engine.shutdown()
        engine = make_engine(model, device=device, dtype="bfloat16")
        assert engine.runner.model.embed.weight.dtype == torch.bfloat16
        assert (engine.runner.graphs is not None) == (device == "cuda")
        together = await asyncio.gather(*(events(engine, p) for p in prompts))
        await engine.shutdown()
        return alone, together

    alone, together = run(scenario())
    compared = 0
    for prompt, a, b in zip(prompts, alone, together):
        assert len(a) == len(b) == params.max_tokens, prompt
        for x, y in zip(a, b):
            if x.token != y.token:
                assert y.token in dict(x.top_logprobs) and x.token in dict(y.top_logprobs), (prompt, compared)
                break
            assert abs(x.logprob - y.logprob) < 0.05, prompt
            compared += 1
    assert compared >= len(prompts)  # not every row parted at its first token


@pytest.mark.parametrize("device", DEVICES)
def test_logprobs_are_the_models_own_and_scores_equal_the_forward_pass(model, device):
    """Generated tokens' logprobs and top alternatives, and a scored prompt, equal log_softmax of a plain forward
    over the whole text; the logit bias steers the draw without changing what the logprobs report. On CUDA the
    engine runs bf16 (its step from CUDA graphs) and the plain forward the same bf16 model whole: values agree to
    bf16's precision, and near-ties may order the alternatives differently, so there each reported alternative's
    value is checked, not the order."""
    prompt = "def main():"
    params = GenerationParams(max_tokens=10, temperature=0.9, top_k=40, seed=3, logprobs=True, top_logprobs=5,
                              logit_bias={ord("x"): 4.0}, ignore_eos=True)

    async def scenario():
        engine = make_engine(model, device=device)
        events = [e async for e in engine.generate(engine.encode_prompt(prompt), params)]
        scored = await engine.score(engine.encode_prompt(prompt) + [e.token for e in events], top_logprobs=3)
        await engine.shutdown()
        return events, scored

    events, scored = run(scenario())
    ids = ByteTokenizer().encode(prompt) + [e.token for e in events]
    with torch.no_grad():
        expected = torch.log_softmax(on(model, device)(torch.tensor([ids], device=device))[0].float(), -1).cpu()
    tol, ordered = (1e-4, True) if device == "cpu" else (0.05, False)
    n = len(ByteTokenizer().encode(prompt))
    for i, event in enumerate(events):
        row = expected[n - 1 + i]
        assert abs(event.logprob - row[event.token].item()) < tol
        assert not ordered or [t for t, _ in event.top_logprobs] == row.topk(5).indices.tolist()
        assert len(event.top_logprobs) == 5 and all(abs(v - row[t].item()) < tol for t, v in event.top_logprobs)
    assert scored[0].logprob is None and scored[0].token == ids[0]
    for i in range(1, len(ids)):
        assert abs(scored[i].logprob - expected[i - 1, ids[i]].item()) < tol
        assert not ordered or [t for t, _ in scored[i].top_logprobs] == expected[i - 1].topk(3).indices.tolist()
        assert all(abs(v - expected[i - 1, t].item()) < tol for t, v in scored[i].top_logprobs)


def test_logit_bias_forces_and_forbids_tokens(model):
    async def scenario():
        engine = make_engine(model)
        tokens = engine.encode_prompt("a = ")
        forced = await generate_text(engine, tokens, GenerationParams(max_tokens=6, temperature=1.0, seed=1,
                                                                      logit_bias={ord("z"): 100.0}))
        greedy = await generate_text(engine, tokens, GenerationParams(max_tokens=6, temperature=0.0))
        banned = await generate_text(engine, tokens, GenerationParams(
            max_tokens=6, temperature=0.0, logit_bias={t: -100.0 for t in set(greedy["tokens"])}))
        await engine.shutdown()
        return forced, greedy, banned

    forced, greedy, banned = run(scenario())
    assert forced["text"] == "zzzzzz"
    assert not set(banned["tokens"]) & set(greedy["tokens"])


@pytest.mark.parametrize("device", DEVICES)
def test_a_request_joining_mid_batch_gets_the_tokens_it_gets_alone(model, device):
    late = ("while True:", GenerationParams(max_tokens=20, temperature=0.9, top_k=30, seed=7))

    async def scenario():
        engine = exact_engine(model, slots=4, device=device)
        long_stream = engine.generate(engine.encode_prompt("print("), GenerationParams(max_tokens=60, seed=9))
        for _ in range(10):
            await long_stream.__anext__()
        joined = await generate_text(engine, *late)
        await long_stream.aclose()
        alone_engine = exact_engine(model, slots=4, device=device)
        alone = await generate_text(alone_engine, *late)
        await engine.shutdown()
        await alone_engine.shutdown()
        return joined, alone

    joined, alone = run(scenario())
    assert joined["tokens"] == alone["tokens"]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("slack", [0, 8])
def test_churning_slots_give_every_request_its_tokens_alone(model, monkeypatch, slack, device):
    """Requests of one prompt length (prefilled together) finish at different steps, leaving free slots among the
    running ones that later requests refill: with the caches read in place over the slot range (idle rows in the
    holes, slack 8) and gathered (slack 0), every request gets the tokens it gets alone."""
    import raystack.runner as runner_module

    monkeypatch.setattr(runner_module, "DECODE_SLACK", slack)
    first = [(f"ab{i}d", GenerationParams(max_tokens=3 + 5 * (i % 4), temperature=0.9, seed=i)) for i in range(6)]
    later = [(f"later {i}", GenerationParams(max_tokens=12, temperature=0.8, top_p=0.9, seed=10 + i))
             for i in range(4)]

    async def scenario():
        engine = exact_engine(model, slots=6, device=device)
        early = [asyncio.ensure_future(generate_text(engine, *r)) for r in first]
        await asyncio.sleep(0)
        while engine.active == 6:  # the first short ones finish: holes open among the running slots
            await asyncio.sleep(0.001)
        together = await asyncio.gather(*early, *(generate_text(engine, *r) for r in later))
        decodes = engine.stats["steps"]
        await engine.shutdown()
        return together, decodes

    together, _ = run(scenario())
    for (prompt, params), got in zip(first + later, together):
        alone_engine = exact_engine(model, slots=6, device=device)
        alone = run(generate_text(alone_engine, prompt, params))
        assert got["tokens"] == alone["tokens"] and got["text"] == alone["text"], prompt


@pytest.mark.parametrize("device", DEVICES)
def test_max_tokens_and_stop_strings(model, device):
    async def scenario():
        engine = make_engine(model, device=device)
        full = await generate_text(engine, "abc", GenerationParams(max_tokens=40, temperature=0.0))
        text = full["text"]
        stop = text[5:7]
        cut = await generate_text(engine, "abc", GenerationParams(max_tokens=40, temperature=0.0, stop=["zzzz", stop]))
        pieces = [e.text async for e in engine.generate(engine.encode_prompt("abc"),
                                                          GenerationParams(max_tokens=40, temperature=0.0,
                                                                           stop=[stop]))]
        short = await generate_text(engine, "abc", GenerationParams(max_tokens=5, temperature=0.0))
        await engine.shutdown()
        return full, stop, cut, pieces, short

    full, stop, cut, pieces, short = run(scenario())
    assert full["finish_reason"] in ("length", "stop")
    assert cut["finish_reason"] == "stop"
    assert cut["text"] == full["text"][: full["text"].find(stop)] and stop not in cut["text"]
    assert "".join(pieces) == cut["text"]  # streamed pieces never leak the stop string
    assert len(short["tokens"]) == 5 and short["finish_reason"] == "length"
    assert short["tokens"] == full["tokens"][:5]


@pytest.mark.parametrize("device", DEVICES)
def test_cancelled_request_frees_its_slot(model, device):
    async def scenario():
        engine = make_engine(model, slots=1, device=device)
        stream = engine.generate(engine.encode_prompt("x"), GenerationParams(max_tokens=80))
        await stream.__anext__()
        assert engine.active == 1
        await stream.aclose()  # the client went away
        # the only slot must come back: this request would wait forever otherwise
        result = await asyncio.wait_for(generate_text(engine, "y", GenerationParams(max_tokens=3)), timeout=30)
        active = engine.active
        await engine.shutdown()
        return result, active

    result, active = run(scenario())
    assert len(result["tokens"]) == 3 and active == 0


def test_context_limit_and_known_memory(model):
    engine = make_engine(model, slots=4)
    config = model.config
    assert engine.kv_cache_bytes == 2 * config.n_layer * 4 * config.max_seq_len * config.n_embd * 4
    with pytest.raises(ValueError, match="exceeds the model's context of 96"):
        engine.check_request(90, 10)
    with pytest.raises(ValueError, match="max_model_len 200 exceeds"):
        Engine(model, ByteTokenizer(), EngineConfig(max_model_len=200))


async def _outcome(engine, prompt, params):
    """``generate_text``'s result, or the ``SequenceFailed`` the request ended with."""
    try:
        return await generate_text(engine, prompt, params)
    except SequenceFailed as error:
        return error


@pytest.mark.parametrize("device", DEVICES)
def test_a_row_whose_parameters_the_sampler_refuses_fails_alone(model, device):
    """A bad parameter that slipped past the API (top_p = 0 reaches the op as an invalid row) ends that request
    with a client error; the rows batched beside it get exactly the tokens they get alone, and the engine stays up."""
    bad = GenerationParams(max_tokens=8, temperature=1.0, top_p=0.0, seed=1)

    async def go():
        engine = exact_engine(model, device=device)
        alone = [await generate_text(engine, p, g) for p, g in REQUESTS[:3]]
        together = await asyncio.gather(*(_outcome(engine, p, g) for p, g in [*REQUESTS[:3], ("oops", bad)]))
        engine.check_health()
        after = await generate_text(engine, *REQUESTS[0])
        await engine.shutdown()
        return alone, together, after

    alone, together, after = run(go())
    assert isinstance(together[3], SequenceFailed) and together[3].client_error and "top_p" in str(together[3])
    assert [r["tokens"] for r in together[:3]] == [r["tokens"] for r in alone]
    assert after["tokens"] == alone[0]["tokens"]


@pytest.mark.parametrize("device", DEVICES)
def test_a_forward_failure_of_one_row_fails_that_request_alone(model, monkeypatch, device):
    async def go():
        engine = exact_engine(model, device=device)
        prefill, decode = engine.runner.prefill, engine.runner.decode

        def poisoned_prefill(group):  # prompts of one length prefill together; a fault fails only its row
            if any(seq.prompt == list(b"poison") for seq in group):
                raise RuntimeError("simulated kernel fault in one row")
            return prefill(group)

        def poisoned_decode(seqs):
            if any(s.prompt == list(b"late poison") and len(s.generated) == 3 for s in seqs):
                raise RuntimeError("simulated fault mid-generation")
            return decode(seqs)

        monkeypatch.setattr(engine.runner, "prefill", poisoned_prefill)
        monkeypatch.setattr(engine.runner, "decode", poisoned_decode)
        results = await asyncio.gather(
            *(_outcome(engine, p, g) for p, g in REQUESTS[:3]),
            _outcome(engine, "poison", GenerationParams(max_tokens=8, seed=1)),
            _outcome(engine, "late poison", GenerationParams(max_tokens=8, seed=1)))
        engine.check_health()
        # Prefix caching keeps what the finished rows wrote in their slots, and nothing a failed row left.
        kept = [tokens for tokens in engine._slot_tokens if tokens]
        assert sorted(bytes(t[:4]) for t in kept) == [b"clas", b"def ", b"impo"]
        await engine.shutdown()
        return results

    results = run(go())
    for failed in results[3:]:
        assert isinstance(failed, SequenceFailed) and not failed.client_error
    expected = [run(generate_text(exact_engine(model, device=device), p, g))["tokens"] for p, g in REQUESTS[:3]]
    assert [r["tokens"] for r in results[:3]] == expected


def test_health_reflects_a_broken_engine_and_recovers(model, monkeypatch):
    async def go():
        engine = make_engine(model)
        working = engine.runner.prefill

        def broken(group):
            raise RuntimeError("device lost")

        monkeypatch.setattr(engine.runner, "prefill", broken)
        failed = await _outcome(engine, "x", GenerationParams(max_tokens=4))
        with pytest.raises(RuntimeError, match="device lost"):
            engine.check_health()
        monkeypatch.setattr(engine.runner, "prefill", working)
        healed = await generate_text(engine, "x", GenerationParams(max_tokens=4, seed=0))
        engine.check_health()
        await engine.shutdown()
        return failed, healed

    failed, healed = run(go())
    assert isinstance(failed, SequenceFailed) and len(healed["tokens"]) == 4


def test_ignore_eos_generates_past_the_end_of_text_token(model):
    """A model that always says end-of-text: stops at once, or runs to max_tokens with ignore_eos."""
    class AlwaysEot(torch.nn.Module):
        def __init__(self, inner):
            super().__init__()
            self.inner, self.config = inner, inner.config

        def forward(self, *args, **kwargs):
            return self.force_eot(self.inner(*args, **kwargs))

        def prefill(self, *args):
            return self.force_eot(self.inner.prefill(*args))

        def decode(self, *args):
            return self.force_eot(self.inner.decode(*args))

        @staticmethod
        def force_eot(logits):
            return logits.index_fill(-1, torch.tensor([ByteTokenizer().eot_id]), 1e4)

    async def scenario():
        engine = Engine(AlwaysEot(model), ByteTokenizer(), EngineConfig(max_batch_size=2))
        stops = await generate_text(engine, "a", GenerationParams(max_tokens=9, seed=0))
        runs = await generate_text(engine, "a", GenerationParams(max_tokens=9, seed=0, ignore_eos=True))
        await engine.shutdown()
        return stops, runs

    stops, runs = run(scenario())
    assert (len(stops["tokens"]), stops["finish_reason"]) == (1, "stop")
    assert (len(runs["tokens"]), runs["finish_reason"], runs["text"]) == (9, "length", "")


def test_int8_weights_keep_the_models_predictions_and_generate(model):
    """quantize: int8 swaps the linear layers for int8-weight ones; next-token log-probabilities stay close to the
    float32 model's and generation works end to end (the speed and held-out loss cost: benchmarks/serve_vs_hf.py)."""
    import copy

    import torch.nn.functional as F

    peaked = copy.deepcopy(model)  # larger weights: a confident model, so a broken quantization would show
    with torch.no_grad():
        for p in peaked.parameters():
            if p.dim() == 2:
                p.mul_(6)
    engine = Engine(peaked, ByteTokenizer(), EngineConfig(max_batch_size=2, quantize="int8", device="cpu"))  # CPU-only
    assert not any(type(m) is torch.nn.Linear for m in engine.runner.model.modules())
    assert type(peaked.blocks[0].fc) is torch.nn.Linear  # the caller's model is left as it was
    tokens = torch.tensor([list(b"def main():\n    return 1")])
    with torch.inference_mode():
        exact, quantized = F.softmax(peaked(tokens), -1), F.softmax(engine.runner.model(tokens), -1)
    assert exact.max(-1).values.mean() > 10 / 257  # far from uniform (1/257)
    assert (exact - quantized).abs().max() < 0.1 and (exact.argmax(-1) == quantized.argmax(-1)).float().mean() > 0.9
    out = run(generate_text(engine, "import ", GenerationParams(max_tokens=6, seed=0)))
    assert len(out["tokens"]) >= 1
    with pytest.raises(ValueError, match="quantize must be none or int8"):
        EngineConfig(quantize="int4")


async def _first_token_step(engine, prompt, params, **who):
    """Steps the engine took from this request's submission to its first token, and its whole completion."""
    start, first, tokens = engine.stats["steps"], None, []
    async for event in engine.generate(engine.encode_prompt(prompt), params, **who):
        if first is None:
            first = engine.stats["steps"] - start
        tokens.append(event.token)
    return first, tokens


def test_high_priority_preempts_a_low_priority_flood_without_changing_its_output(model):
    low = [GenerationParams(max_tokens=40, temperature=0.8, seed=10 + i, ignore_eos=True) for i in range(6)]
    high = GenerationParams(max_tokens=8, temperature=0.8, seed=99, ignore_eos=True)

    async def alone(params):
        engine = make_engine(model, slots=4)
        _, tokens = await _first_token_step(engine, "low ", params)
        await engine.shutdown()
        return tokens

    async def contended():
        engine = make_engine(model, slots=4)
        flood = [asyncio.ensure_future(_first_token_step(engine, "low ", p, priority=0, tenant="bulk"))
                 for p in low]
        while engine.stats["steps"] < 5:  # the flood holds every slot, two more wait
            await asyncio.sleep(0.001)
        assert engine.active == 4 and engine.queue_depth == 2
        first, _ = await _first_token_step(engine, "high", high, priority=2, tenant="vip")
        results = await asyncio.gather(*flood)
        preempted = engine.stats["preempted"]
        await engine.shutdown()
        return first, [tokens for _, tokens in results], preempted

    first, flood_tokens, preempted = run(contended())
    assert first <= 2, f"the high-priority request waited {first} steps for its first token"
    assert preempted >= 1
    expected = [run(alone(p)) for p in low]
    assert flood_tokens == expected  # preempted sequences are recomputed, not changed


@pytest.mark.parametrize("device", DEVICES)
def test_prefix_caching_prefills_only_what_the_freed_slot_does_not_hold(model, device):
    """A chat's next turn repeats the conversation so far: its prefill computes only what follows the tokens the last
    turn left in its slot (not the lowest free one), and it generates what an engine without prefix caching generates
    (greedy; log-probabilities to float tolerance). A sequence sharing only a short start with a slot takes one holding
    nothing and prefills whole."""
    greedy = GenerationParams(max_tokens=12, temperature=0.0, logprobs=True, ignore_eos=True)

    async def conversation(prefix_caching: bool):
        engine = Engine(on(model, device, "float32"), ByteTokenizer(),
                        EngineConfig(max_batch_size=4, device=device, dtype="float32", prefix_caching=prefix_caching))
        long = asyncio.ensure_future(generate_text(engine, "x" * 30, dataclasses.replace(greedy, max_tokens=40)))
        while engine.active == 0:
            await asyncio.sleep(0)
        first = await generate_text(engine, "def parse(line):\n    ", greedy)  # slot 1: the long one holds slot 0
        await long
        # 10 tokens in common with slot 1, none with slot 0: too few to leave the lowest free slot
        short = await generate_text(engine, "def parse(x): pass", greedy)
        assert engine.stats["cached_tokens"] == 0
        turn = engine.encode_prompt("def parse(line):\n    ") + first["tokens"] + list(b"\n\ndef main():\n    ")
        second = await generate_text(engine, turn, greedy)
        stats = dict(engine.stats)
        await engine.shutdown()
        return first, short, second, stats

    first, short, second, stats = run(conversation(True))
    # all of the first turn but its last token, which was sampled and never fed
    assert stats["cached_tokens"] == len(b"def parse(line):\n    ") + len(first["tokens"]) - 1
    _, plain_short, plain_second, plain = run(conversation(False))
    assert plain["cached_tokens"] == 0
    assert plain["prefilled_tokens"] == stats["prefilled_tokens"] + stats["cached_tokens"]
    assert second["tokens"] == plain_second["tokens"] and short["tokens"] == plain_short["tokens"]
    assert max(abs(a - b) for a, b in zip(second["logprobs"], plain_second["logprobs"])) < 1e-4


@pytest.mark.parametrize("pack", [False, True])
def test_prefix_caching_never_serves_one_tenant_what_another_left_in_a_slot(model, pack):
    """A slot's keys and values serve only the tenant whose sequence left them: another tenant sending the same
    conversation prefills it whole (its time to first token and ``cached_tokens`` say nothing of others' prompts),
    while the same tenant's next request finds it."""
    params = GenerationParams(max_tokens=4, temperature=0.0, ignore_eos=True)
    prompt = list(b"system: the secret is 1234\nuser: hi\nassistant:")

    async def first_event(engine, tenant):
        return [e async for e in engine.generate(prompt + list(b" more"), params, tenant=tenant)][0]

    async def main():
        engine = make_engine(model, slots=2, pack_slots=pack)
        firsts = await asyncio.gather(first_event(engine, "a"), first_event(engine, "a"))  # slots 0 and 1: a's
        other_tenant = await first_event(engine, "b")  # both slots hold a's: b may use neither
        same_tenant = await first_event(engine, "a")  # slot 1 still holds a's
        await engine.shutdown()
        return [e.cached_tokens for e in firsts], other_tenant.cached_tokens, same_tenant.cached_tokens

    firsts, other_tenant, same_tenant = run(main())
    assert firsts == [0, 0] and other_tenant == 0 and same_tenant >= len(prompt)


@pytest.mark.parametrize("pack", [False, True])
def test_prefix_caching_keeps_the_conversations_that_ended_last(model, pack):
    """A prompt with nothing cached takes an empty slot while there is one, else the one freed longest ago: three
    chats taking turns one after another on three slots each find their whole conversation every turn, and a fourth
    chat evicts the one that spoke longest ago, not the lowest slot's."""
    params = GenerationParams(max_tokens=4, temperature=0.0, ignore_eos=True)

    async def turn(engine, chats, name):
        """One turn of chat ``name``: (tokens found cached, all but the last of what its last turn left)."""
        held = max(len(chats[name]) - 1, 0)
        prompt = chats[name] + list(f"{name} turn {len(chats[name]) // 19}, go on:".encode())  # 19 tokens a turn
        events = [e async for e in engine.generate(prompt, params)]
        chats[name] = prompt + [e.token for e in events]
        return events[0].cached_tokens, held

    async def main():
        engine = make_engine(model, slots=3, pack_slots=pack)
        chats = {name: [] for name in "abcd"}
        cached = {}
        for round_, names in enumerate(["abc", "abc", "cba"]):  # slots 0, 1, 2; c's is then the least recent
            for name in names:
                cached[round_, name] = await turn(engine, chats, name)
        cached["d"] = await turn(engine, chats, "d")
        for name in "abc":
            cached[3, name] = await turn(engine, chats, name)
        await engine.shutdown()
        return cached

    cached = run(main())
    assert [cached[0, name][0] for name in "abc"] == [0, 0, 0] and cached["d"][0] == 0
    reused = [(r, name) for r in (1, 2, 3) for name in "abc" if (r, name) != (3, "c")]
    assert [cached[key][0] for key in reused] == [cached[key][1] for key in reused]
    assert all(cached[key][0] >= 16 for key in reused)
    assert cached[3, "c"][0] == 0  # d took c's slot; lowest-first would have taken a's


@pytest.mark.parametrize("pack", [False, True])
def test_prefix_caching_keeps_a_conversation_over_a_shared_system_prompt(model, pack):
    """Two chats share a system prompt. The second takes an empty slot rather than the first's, whose system prompt
    it would reuse at the cost of a longer conversation; each one's next turn takes its own slot, which it reuses
    whole; a regenerated turn (the same prompt again) takes its own slot, losing only the completion it replaces, and
    a short prompt that starts like a conversation takes an empty slot."""
    params = GenerationParams(max_tokens=3, temperature=0.0, ignore_eos=True)
    system = list(b"system: answer briefly\n")  # 23 tokens, less than either conversation's own

    async def turn(engine, prompt):
        """(tokens found cached, the prompt of the conversation's next turn)."""
        events = [e async for e in engine.generate(prompt, params)]
        return events[0].cached_tokens, prompt + [e.token for e in events] + list(b"\nmore\n")

    async def main():
        engine = make_engine(model, slots=3, pack_slots=pack)
        chats = [system + list(f"{name}: please say something short\n".encode()) for name in "yx"]
        first = [await turn(engine, chat) for chat in chats]  # slots 0 and 1
        then = [await turn(engine, nxt) for _, nxt in reversed(first)]
        again, _ = await turn(engine, first[0][1])  # y's last turn again: slot 0, though slot 2 is empty
        await turn(engine, system[:8])  # all of it but one in slot 0 too: too short to count as regenerating y's
        once_more, _ = await turn(engine, first[0][1])
        await engine.shutdown()
        return ([len(chat) for chat in chats], [c for c, _ in first], [c for c, _ in then], [again, once_more],
                len(first[0][1]))

    lengths, first, then, again, regenerated = run(main())
    assert first == [0, 0]  # x prefilled the system prompt again rather than evict y's longer conversation
    assert then == [lengths[1] + 2, lengths[0] + 2]  # each chat's slot held its prompt and 2 of its 3 tokens
    assert again == [regenerated - 1] * 2  # all but the last token of the prompt of the turn it regenerates


@pytest.mark.parametrize("device", DEVICES)
def test_packed_slots_move_a_reused_conversation_into_the_lowest_free_slot(model, device):
    """With ``pack_slots`` (the default where the decode step runs as CUDA graphs, which compute slots 0 up to the
    highest running one), a chat whose conversation a higher slot holds decodes in the lowest free slot, its keys and
    values moved there: every admission takes the lowest free slot, the tokens found cached are those found unpacked,
    and every completion is what an engine without prefix caching generates (greedy, float32), through the graph step
    (on CPU run eagerly)."""
    greedy = GenerationParams(max_tokens=6, temperature=0.0, ignore_eos=True, logprobs=True)
    slots = 6

    async def main(prefix_caching: bool, pack: bool):
        engine = Engine(on(model, device, "float32"), ByteTokenizer(), EngineConfig(
            max_batch_size=slots, device=device, dtype="float32", prefix_caching=prefix_caching))
        if engine.runner.graphs is None:
            engine.runner.graphs = DecodeGraphs(engine.runner.model, engine.runner.cache, capture=False)
        engine.pack_slots = pack
        taken, take = [], engine._take_slot

        def recorded(seq):
            lowest = engine._free_slots[0]
            taken.append((take(seq), lowest))
            return taken[-1][0]

        engine._take_slot = recorded
        chats = [list(f"chat {i}: the first message is here\n".encode()) for i in range(slots)]

        async def turn(i: int, max_tokens: int) -> dict:
            out = await generate_text(engine, chats[i], dataclasses.replace(greedy, max_tokens=max_tokens))
            chats[i] += out["tokens"] + list(b"\nmore\n")
            return out

        # First turns, ending in a scrambled order (0, 5, 4, 3, 2, 1): each slot is left holding one conversation.
        outs = list(await asyncio.gather(*(turn(i, 2 + i * 5 % slots) for i in range(slots))))
        for pair in ([4, 1], [5, 0], [2, 3], [1, 4]):  # next turns, two at a time, from anywhere
            outs += await asyncio.gather(*(turn(i, 6) for i in pair))
        stats = dict(engine.stats)
        await engine.shutdown()
        return outs, taken, stats

    packed, taken, stats = run(main(True, True))
    unpacked, spread, unpacked_stats = run(main(True, False))
    plain, _, plain_stats = run(main(False, False))
    assert all(slot == lowest for slot, lowest in taken)
    assert any(slot != lowest for slot, lowest in spread)  # unpacked, the rows spread: what packing changes
    assert stats["cached_tokens"] == unpacked_stats["cached_tokens"] > 8 * 16 and plain_stats["cached_tokens"] == 0
    assert [o["tokens"] for o in packed] == [o["tokens"] for o in unpacked] == [o["tokens"] for o in plain]
    assert max(abs(a - b) for p, q in zip(packed, plain) for a, b in zip(p["logprobs"], q["logprobs"])) < 1e-4


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("prefix_caching", [False, True])
def test_packed_slots_move_running_rows_down_into_the_slots_of_rows_that_ended(model, device, prefix_caching):
    """With ``pack_slots``, a sequence that ends among running ones leaves no hole: the highest running row moves
    down into its slot (keys and values with it), so every decode step runs slots 0 up to the rows running. Its
    completion is what it is unpacked (greedy, float32, through the graph step; on CPU run eagerly), and with prefix
    caching what the ended row left there moves up with the swap: the next turns find as many tokens cached."""
    greedy = GenerationParams(max_tokens=6, temperature=0.0, ignore_eos=True, logprobs=True)
    slots = 6

    async def main(pack: bool):
        engine = Engine(on(model, device, "float32"), ByteTokenizer(), EngineConfig(
            max_batch_size=slots, device=device, dtype="float32", prefix_caching=prefix_caching))
        if engine.runner.graphs is None:
            engine.runner.graphs = DecodeGraphs(engine.runner.model, engine.runner.cache, capture=False)
        engine.pack_slots = pack
        decoded, decode = [], engine.runner.decode

        def recorded(decodes):
            decoded.append([s.slot for s in decodes])
            return decode(decodes)

        engine.runner.decode = recorded
        chats = [list(f"row {i}: the prompt of this row\n".encode()) for i in range(slots)]

        async def turn(i: int, max_tokens: int) -> dict:
            out = await generate_text(engine, chats[i], dataclasses.replace(greedy, max_tokens=max_tokens))
            chats[i] += out["tokens"] + list(b"\nmore\n")
            return out

        # Lengths that end among running rows (in the order 1, 3, 0, 5, 2, 4), then next turns in another order.
        outs = list(await asyncio.gather(*(turn(i, (4, 2, 9, 3, 12, 5)[i]) for i in range(slots))))
        outs += await asyncio.gather(*(turn(i, (7, 3, 10, 2, 6, 4)[n]) for n, i in enumerate((3, 0, 5, 1, 4, 2))))
        stats = dict(engine.stats)
        await engine.shutdown()
        return outs, decoded, stats

    packed, packed_steps, stats = run(main(True))
    unpacked, unpacked_steps, unpacked_stats = run(main(False))
    assert all(step == list(range(len(step))) for step in packed_steps) and stats["moved_rows"] >= 4
    assert any(step != list(range(len(step))) for step in unpacked_steps) and unpacked_stats["moved_rows"] == 0
    assert [o["tokens"] for o in packed] == [o["tokens"] for o in unpacked]
    assert max(abs(a - b) for p, q in zip(packed, unpacked) for a, b in zip(p["logprobs"], q["logprobs"])) < 1e-4
    assert stats["cached_tokens"] == unpacked_stats["cached_tokens"]
    assert (stats["cached_tokens"] > 6 * 16) == prefix_caching


def test_a_tenant_over_its_share_yields_slots_to_one_of_the_same_priority(model):
    async def main():
        engine = make_engine(model, slots=4)
        params = GenerationParams(max_tokens=48, temperature=0.0, ignore_eos=True)
        hog = [asyncio.ensure_future(_first_token_step(engine, "a", params, tenant="a")) for _ in range(8)]
        while engine.stats["steps"] < 3:
            await asyncio.sleep(0.001)
        assert engine.active == 4
        other = [asyncio.ensure_future(_first_token_step(engine, "b", dataclasses.replace(params, max_tokens=4),
                                                         tenant="b")) for _ in range(2)]
        await asyncio.sleep(0)
        while engine.queue_depth and not all(s.tenant == "a" for s in engine._waiting):
            await asyncio.sleep(0.001)
        held = collections.Counter(s.tenant for s in engine._running.values())
        firsts = [first for first, _ in await asyncio.gather(*other)]
        await asyncio.gather(*hog)
        await engine.shutdown()
        return held, firsts

    held, firsts = run(main())
    assert held == {"a": 2, "b": 2}  # share = 4 slots / 2 tenants with work
    assert max(firsts) <= 2


def test_the_first_token_says_how_long_its_sequence_waited_for_a_slot(model):
    async def main():
        engine = make_engine(model, slots=1)
        params = GenerationParams(max_tokens=20, temperature=0.0, ignore_eos=True)

        async def waits(prompt):
            return [e.queue_wait_s async for e in engine.generate(engine.encode_prompt(prompt), params)]

        first, second = await asyncio.gather(waits("a"), waits("b"))
        await engine.shutdown()
        return first, second

    first, second = run(main())
    assert first[0] is not None and second[0] is not None and all(w is None for w in first[1:] + second[1:])
    assert second[0] > first[0]  # it waited for the one slot while "a" generated 20 tokens


@pytest.fixture
def torch_threads():
    """Sets torch's intra-op threads for one test and puts the process's setting back after it."""
    before = torch.get_num_threads()
    yield torch.set_num_threads
    torch.set_num_threads(before)


def test_steps_run_on_the_loop_thread_with_several_torch_threads_and_give_the_same_tokens(model, torch_threads):
    """With more than one torch thread a CPU engine computes on the event loop's thread (one OpenMP pool in the
    process), with one on its worker thread (the loop stays free); the tokens do not depend on where."""
    import threading

    def generate(threads: int):
        torch_threads(threads)
        seen = set()
        hook = model.embed.register_forward_hook(lambda *_: seen.add(threading.get_ident()))  # every step embeds

        async def scenario():
            engine = make_engine(model)
            assert engine.compute_inline == (threads > 1)
            results = await asyncio.gather(*(generate_text(engine, p, g) for p, g in REQUESTS))
            await engine.shutdown()
            return results, threading.get_ident()

        try:
            results, loop_thread = run(scenario())
        finally:
            hook.remove()
        return results, seen, loop_thread

    inline, inline_threads, loop_thread = generate(2)
    worker, worker_threads, worker_loop = generate(1)
    assert inline_threads == {loop_thread}
    assert worker_threads and worker_loop not in worker_threads
    assert [r["tokens"] for r in inline] == [r["tokens"] for r in worker]


@given(st.lists(st.integers(0, 2), max_size=40), st.integers(0, 40), st.lists(st.integers(0, 2), max_size=10),
       st.integers(-1, 45))
@settings(max_examples=500, deadline=None)
def test_the_common_prefix_search_finds_what_a_token_by_token_loop_finds(a, shared, tail, limit):
    """Prefix caching's match (a binary search over list slices) against the plain loop it stands for, over lists
    that share a start of any length."""
    from raystack.engine import _common_prefix

    b = a[:shared] + tail
    n = 0
    while n < min(len(a), len(b), limit) and a[n] == b[n]:
        n += 1
    assert _common_prefix(a, b, limit) == n


@given(st.lists(st.text(alphabet="ab\u00e9\n", max_size=3), max_size=30),
       st.lists(st.text(alphabet="ab\u00e9\n", min_size=1, max_size=4), max_size=4))
@settings(max_examples=300, deadline=None)
def test_stop_search_over_the_new_text_finds_what_a_whole_search_finds(pieces, stops):
    """_advance searches only where a stop string could end in the newly decoded text; token by token that finds
    the first stop string exactly where a search of the whole text does."""
    from raystack.engine import _find_stop

    text = ""
    for piece in pieces:
        searched, text = len(text), text + piece
        whole = _find_stop(text, stops)
        assert _find_stop(text, stops, searched) == whole
        if whole is not None:
            break


@given(st.text(alphabet="ab\n", max_size=12), st.text(alphabet="ab\n", max_size=8),
       st.lists(st.text(alphabet="ab\n", min_size=1, max_size=4), max_size=3))
@settings(max_examples=500, deadline=None)
def test_released_text_never_holds_the_start_of_a_later_stop_string(text, more, stops):
    """Whatever text comes next, a stop string found later starts after what ``_releasable`` let out before it
    (the text so far holds none: ``_advance`` cuts at the first); once finished, everything is released."""
    from raystack.engine import _find_stop, _releasable

    if _find_stop(text, stops) is not None:
        return
    released = _releasable(text, 0, stops, finished=False)
    assert released <= len(text)
    later = _find_stop(text + more, stops)
    assert later is None or later >= released
    assert _releasable(text, released, stops, finished=False) == released  # asking again releases nothing new
    assert _releasable(text, released, stops, finished=True) == len(text)
