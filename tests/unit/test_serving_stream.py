"""The deployment's response paths driven without Ray: a sequence that fails mid-stream or mid-request ends its own
request with an OpenAI-shaped error (an error event, then ``data: [DONE]``), and the engine serves on."""

import asyncio
import json

import pytest
import torch
from starlette.requests import Request

from raystack.engine import Engine, EngineConfig
from raystack.model import GPT, ModelConfig
from raystack.openai_api import ChatTemplate, RequestLimits
from raystack.rollout import OutcomeReporter
from raystack.serving import LLMServer, ServeConfig
from raystack.tokenizer import DEFAULT_CHAT_TEMPLATE, ByteTokenizer


class _NoMetrics:
    def __getattr__(self, name):
        return self

    def __call__(self, *args, **kwargs):
        return None


def make_server(poison_after: int):
    """The deployment's class without Serve, over an engine whose decode fails for prompts starting with 'poison'
    once ``poison_after`` tokens were generated."""
    torch.manual_seed(0)
    engine = Engine(GPT(ModelConfig.from_preset("tiny", max_seq_len=96)), ByteTokenizer(), EngineConfig(8))
    decode = engine.runner.decode

    def faulty(seqs):
        if any(bytes(t for t in s.prompt if t < 256).startswith(b"poison") and len(s.generated) >= poison_after
               for s in seqs):
            raise RuntimeError("simulated fault")
        return decode(seqs)

    engine.runner.decode = faulty
    server = object.__new__(LLMServer.func_or_class)
    server.config, server.engine, server.metrics = ServeConfig(model="unused"), engine, _NoMetrics()
    server.limits = RequestLimits(vocab_size=257, max_model_len=96)
    server.keys, server.tenants, server.quota = [], None, None
    server.outcomes, server._background = OutcomeReporter("unit", "unused"), set()
    server.chat_template = ChatTemplate(DEFAULT_CHAT_TEMPLATE)
    return server


def http_request(body: dict) -> Request:
    """A real Starlette request for ``POST /v1/completions`` with ``body``."""
    raw, sent = json.dumps(body).encode(), []

    async def receive():
        if sent:
            return {"type": "http.disconnect"}
        sent.append(True)
        return {"type": "http.request", "body": raw, "more_body": False}

    return Request({"type": "http", "method": "POST", "path": "/v1/completions", "root_path": "", "query_string": b"",
                    "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(raw)).encode())]},
                   receive)


def sse_payloads(messages: list[str]) -> list[str]:
    """The ``data:`` payloads of an SSE stream, however its events were split into messages."""
    events = "".join(messages).split("\n\n")
    assert events[-1] == "" and all(e.startswith("data: ") for e in events[:-1])
    return [e[len("data: "):] for e in events[:-1]]


@pytest.mark.parametrize("prompts", [["def a"], ["def a", "def b"]], ids=["one-choice", "two-choices"])
def test_a_slow_reader_gets_every_ready_token_in_one_message_and_the_same_text(prompts):
    """The first token goes out alone and at once; after that, a message carries every piece that was ready when
    the previous one had gone, so a reader slower than the engine gets fewer, fuller messages. Each event is still
    one OpenAI chunk of one choice, and the text is the non-streamed text. One choice is read straight from the
    engine; several through one queue."""
    server = make_server(poison_after=10**6)
    body = {"model": "raystack", "prompt": prompts, "n": 1, "max_tokens": 30, "seed": 3, "stream": True,
            "stream_options": {"include_usage": True}}

    async def go():
        response = await server.completions(http_request(body))
        messages = []
        async for message in response.body_iterator:
            messages.append(message)
            await asyncio.sleep(0.05)  # a slow client (or proxy): the engine runs ahead meanwhile
        whole = await server.completions(http_request({**body, "stream": False, "stream_options": None}))
        await server.engine.shutdown()
        return messages, whole

    messages, whole = asyncio.run(go())
    payloads = sse_payloads(messages)
    chunks = [json.loads(p) for p in payloads[:-1]]
    assert payloads[-1] == "[DONE]" and chunks[-1]["usage"]["completion_tokens"] == 30 * len(prompts)
    assert messages[0].count("data: ") <= len(prompts)  # the first step's tokens (one per prompt) go out at once
    assert len(messages) < 15 * len(prompts), len(messages)  # coalesced: far fewer messages than tokens
    assert all(len(c["choices"]) == 1 for c in chunks[:-1])
    for index in range(len(prompts)):
        streamed = "".join(c["choices"][0]["text"] for c in chunks[:-1] if c["choices"][0]["index"] == index)
        assert streamed == whole["choices"][index]["text"]
        finals = [c["choices"][0]["finish_reason"] for c in chunks[:-1] if c["choices"][0]["index"] == index]
        assert finals[-1] == "length" and set(finals[:-1]) == {None}


def test_a_stream_that_fails_midway_sends_an_error_event_then_done():
    server = make_server(poison_after=3)
    body = {"model": "raystack", "prompt": "poison pill", "max_tokens": 12, "stream": True, "seed": 1,
            "temperature": 0}

    async def go():
        response = await server.completions(http_request(body))
        events = [e async for e in response.body_iterator]
        after = await server.completions(http_request({**body, "prompt": "fine", "stream": False}))
        server.engine.check_health()
        await server.engine.shutdown()
        return events, after

    events, after = asyncio.run(go())
    assert all(e.startswith("data: ") and e.endswith("\n\n") for e in events)
    payloads = sse_payloads(events)
    assert payloads[-1] == "[DONE]"
    error = json.loads(payloads[-2])["error"]
    assert error["type"] == "server_error" and error["message"] and set(error) == {"message", "type", "param", "code"}
    assert len(payloads) > 2 and all("choices" in json.loads(p) for p in payloads[:-2])  # tokens before the fault
    assert after["choices"][0]["finish_reason"] in ("length", "stop")  # a dict: FastAPI serializes it


def test_a_failing_choice_fails_its_request_and_frees_the_other_choices():
    server = make_server(poison_after=2)

    async def go():
        response = await server.completions(http_request(
            {"model": "raystack", "prompt": ["fine", "poison"], "n": 2, "max_tokens": 40, "temperature": 0}))
        await asyncio.sleep(0.2)  # a scheduler step frees the cancelled choices' slots
        free = len(server.engine._free_slots)
        await server.engine.shutdown()
        return response, free

    response, free = asyncio.run(go())
    assert response.status_code == 500 and json.loads(response.body)["error"]["type"] == "server_error"
    assert free == 8  # the two 'fine' choices were cancelled, not left generating


class _CountedRequests:
    """Records ``raystack_requests_total`` increments by status; every other metric is a no-op."""

    def __init__(self):
        self.statuses = []

    def __getattr__(self, name):
        return _NoMetrics()

    @property
    def requests(self):
        recorder = self

        class Counter:
            def inc(self, value=1.0, tags=None):
                recorder.statuses.append(tags["status"])
        return Counter()


def test_each_request_is_counted_once_by_its_outcome_streamed_or_not():
    server = make_server(poison_after=3)
    server.metrics = counted = _CountedRequests()
    base = {"model": "raystack", "max_tokens": 6, "seed": 1, "temperature": 0}

    async def go():
        for body in ({**base, "prompt": "fine", "stream": True}, {**base, "prompt": "poison", "stream": True},
                     {**base, "prompt": "fine"}, {**base, "prompt": "poison"}, {**base, "prompt": 5}):
            response = await server.completions(http_request(body))
            if hasattr(response, "body_iterator"):
                [e async for e in response.body_iterator]
        stream = await server.completions(http_request({**base, "prompt": "fine", "stream": True,
                                                        "max_tokens": 40}))
        iterator = stream.body_iterator
        await iterator.__anext__()
        await iterator.aclose()  # the client went away mid-stream
        await server.engine.shutdown()

    asyncio.run(go())
    assert counted.statuses == ["200", "500", "200", "500", "400", "499"]


@pytest.mark.parametrize("prompts", [["def a"], ["def a", "def b"]], ids=["one-choice", "two-choices"])
def test_a_stream_ends_in_one_message_counted_before_it_leaves(prompts):
    """The last tokens, the usage chunk and ``[DONE]`` leave together (one message through the proxy, not three),
    and the request is counted by then, not after the client has seen its end."""
    server = make_server(poison_after=10**6)
    server.metrics = counted = _CountedRequests()
    body = {"model": "raystack", "prompt": prompts, "max_tokens": 9, "seed": 2, "stream": True,
            "stream_options": {"include_usage": True}}

    async def go():
        response = await server.completions(http_request(body))
        seen = []
        async for message in response.body_iterator:
            seen.append((message, list(counted.statuses)))
        await server.engine.shutdown()
        return seen

    seen = asyncio.run(go())
    *before, (last, counted_by_then) = seen
    assert all(statuses == [] for _, statuses in before) and counted_by_then == ["200"]
    assert counted.statuses == ["200"]
    payloads = sse_payloads([last])
    assert payloads[-1] == "[DONE]" and json.loads(payloads[-2])["usage"]["completion_tokens"] == 9 * len(prompts)
    assert json.loads(payloads[-3])["choices"][0]["finish_reason"] == "length"  # the last tokens, in the same message
    chunks = [json.loads(p) for p in sse_payloads([m for m, _ in seen])[:-2]]
    assert sorted(c["choices"][0]["index"] for c in chunks if c["choices"][0]["finish_reason"]) == \
        list(range(len(prompts)))


def test_a_replica_leaves_one_of_its_cores_to_serving_unless_told_or_its_model_is_large():
    from raystack.model import ModelConfig
    from raystack.serving import replica_threads

    def weights(preset):
        config = ModelConfig.from_preset(preset)
        return 12 * config.n_layer * config.n_embd ** 2

    small_model = weights("tiny")
    assert [replica_threads(ServeConfig(model="m", num_cpus=c), small_model) for c in (0.5, 1, 2, 3, 8)] == \
        [1, 1, 1, 2, 7]
    assert [replica_threads(ServeConfig(model="m", num_cpus=c), weights("small")) for c in (0.5, 1, 2, 8)] == \
        [1, 1, 2, 8]
    assert replica_threads(ServeConfig(model="m", num_cpus=2, threads=2), small_model) == 2
    assert replica_threads(ServeConfig(model="m", num_cpus=4, threads=1), weights("gpt2")) == 1


def test_the_engine_process_takes_the_core_left_to_streams_while_none_runs_unless_threads_are_set():
    from raystack.model import ModelConfig
    from raystack.serving import replica_threads, unstreamed_threads

    def both(preset, **config):
        config = ServeConfig(model="m", **config)
        model = ModelConfig.from_preset(preset)
        threads = replica_threads(config, 12 * model.n_layer * model.n_embd ** 2)
        return threads, unstreamed_threads(config, threads)

    assert [both("tiny", num_cpus=c) for c in (1, 2, 8)] == [(1, 0), (1, 2), (7, 8)]
    assert both("small", num_cpus=2) == (2, 0)  # a large model already computes on every CPU
    assert both("tiny", num_cpus=2, threads=1) == (1, 0)  # set by the spec: kept as it is


@pytest.mark.parametrize("threads", [-1, 10**9])
def test_serve_and_batch_specs_refuse_torch_threads_out_of_range(threads):
    from raystack.batch import BatchConfig
    from raystack.config import ConfigError, from_dict

    for cls, base in ((ServeConfig, {"model": "m"}), (BatchConfig, {"model": "m", "input": "i", "output": "o"})):
        with pytest.raises(ConfigError, match=r"threads must be 0 \(automatic\) to 1024"):
            from_dict(cls, {**base, "threads": threads})


class _TokenCounter:
    """The generated-tokens counter, keeping what was added to it."""

    def __init__(self):
        self.generated = 0

    def inc(self, value=1.0):
        assert value > 0  # Ray's counters refuse 0
        self.generated += value


def test_streamed_tokens_are_all_counted_including_those_held_back_for_a_stop_string():
    """raystack_generated_tokens_total is incremented per chunk, not per token, and still counts every generated
    token: those whose text was held back (a possible stop string) and never sent included."""
    server = make_server(poison_after=10**6)
    server.metrics = _NoMetrics()
    server.metrics.tokens = counter = _TokenCounter()
    body = {"model": "raystack", "prompt": ["def a", "def b"], "max_tokens": 25, "seed": 5, "stream": True,
            "stop": ["zzzz"], "stream_options": {"include_usage": True}}

    async def go():
        response = await server.completions(http_request(body))
        messages = [m async for m in response.body_iterator]
        await server.engine.shutdown()
        return messages

    payloads = sse_payloads(asyncio.run(go()))
    usage = json.loads(payloads[-2])["usage"]["completion_tokens"]
    assert usage == 50 and counter.generated == usage


def test_usage_counts_the_prompt_tokens_the_kv_cache_held_streamed_and_not():
    """A chat's second turn repeats the first: ``usage.prompt_tokens_details.cached_tokens`` says how many of its
    prompt tokens the engine found in its KV cache (at least the whole first prompt), in a non-streamed body and in
    a stream's usage chunk alike, and 0 where it found none."""
    server = make_server(poison_after=10**6)
    system = {"role": "system", "content": "Answer in Python."}  # the test model holds 96 tokens
    first_turn = {"model": "raystack", "messages": [system, {"role": "user", "content": "hi"}], "max_tokens": 4,
                  "seed": 1}

    async def go():
        first = await server.chat_completions(http_request(first_turn))
        reply = {"role": "assistant", "content": first["choices"][0]["message"]["content"]}
        body = {**first_turn, "messages": [*first_turn["messages"], reply, {"role": "user", "content": "more"}],
                "stream": True, "stream_options": {"include_usage": True}}
        response = await server.chat_completions(http_request(body))
        second = json.loads(sse_payloads([m async for m in response.body_iterator])[-2])
        third = await server.chat_completions(http_request({**body, "stream": False, "stream_options": None}))
        await server.engine.shutdown()
        return first, second, third

    first, second, third = asyncio.run(go())
    assert first["usage"]["prompt_tokens_details"] == {"cached_tokens": 0}
    first_prompt = first["usage"]["prompt_tokens"]
    for later in (second, third):  # the third repeats the second's prompt: all of it but its last token at least
        cached = later["usage"]["prompt_tokens_details"]["cached_tokens"]
        assert first_prompt <= cached < later["usage"]["prompt_tokens"], later["usage"]
    assert third["usage"]["prompt_tokens_details"]["cached_tokens"] == third["usage"]["prompt_tokens"] - 1
