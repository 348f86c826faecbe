"""Request parsing at the door: every hostile body is a 400 naming the field, checked in the engine's precision."""

import json
import time

import pytest

from raystack.openai_api import (INT64_MAX, INT64_MIN, APIError, RequestLimits, as_float32, choice_seed, decode_body,
                                 parse_completion)
from raystack.api_keys import load_api_keys, parse_key_file

LIMITS = RequestLimits(vocab_size=257, max_model_len=256, max_sequences=64)


def parse(**fields):
    return parse_completion({"model": "raystack", "prompt": "def f(", **fields}, "raystack", LIMITS)


def refused(raw: bytes) -> APIError:
    with pytest.raises(APIError) as error:
        parse_completion(decode_body(raw), "raystack", LIMITS)
    assert error.value.status == 400, error.value.message
    return error.value


def test_an_integer_written_as_a_float_is_read_as_the_integer():
    """``5.0`` is an integer to JSON Schema (JSON has one number type) and to pydantic-based servers such as vLLM;
    it reaches the engine as the int 5. ``5.5``, ``1e400`` (inf), and booleans are refused."""
    request = parse(max_tokens=5.0, n=2.0, seed=1e3, top_k=4.0, prompt=[1.0, 2.0])
    assert (request.params.max_tokens, request.n, request.params.seed, request.params.top_k) == (5, 2, 1000, 4)
    assert request.prompts == [[1, 2]] and all(type(x) is int for x in request.prompts[0])
    assert type(request.params.max_tokens) is int and type(request.params.seed) is int
    for value in (5.5, True):
        with pytest.raises(APIError, match="'max_tokens' must be an integer"):
            parse(max_tokens=value)
    assert refused(b'{"model": "raystack", "prompt": "x", "max_tokens": 1e400}').param == "max_tokens"


@pytest.mark.parametrize("fields, param", [
    ({"top_k": 2**63}, "top_k"),                      # beyond int64: took the engine down before
    ({"repetition_penalty": 1e-40}, "repetition_penalty"),
    ({"repetition_penalty": 1e-50}, "repetition_penalty"),
    ({"top_p": -1e-50}, "top_p"),
    ({"min_p": -1e-300}, "min_p"),
    ({"temperature": 10**400}, "temperature"),        # OverflowError in float() before
    ({"max_tokens": 2**64}, "max_tokens"),
    ({"seed": 2**63}, "seed"),
    ({"n": 10**30}, "n"),
])
def test_numbers_outside_the_engines_precision_are_refused(fields, param):
    with pytest.raises(APIError) as error:
        parse(**fields)
    assert error.value.status == 400 and error.value.param == param


@pytest.mark.parametrize("field, value, read", [
    ("top_p", 1e-50, 1.1754943508222875e-38),  # 0 in float32, then a division by 0 in the sampler: its least normal
    ("top_p", 1e-45, 1.1754943508222875e-38),  # a float32 subnormal
    ("temperature", 1e-40, 0.0),               # greedy
    ("min_p", 1e-300, 0.0),
    ("presence_penalty", 5e-324, 0.0),
    ("frequency_penalty", -1e-39, 0.0),
    ("top_p", 1.1754943508222875e-38, 1.1754943508222875e-38),
])
def test_a_float_closer_to_0_than_float32_holds_is_read_as_the_nearest_safe_one(field, value, read):
    """JSON Schema (and OpenAI) call these valid; float32 has no normal number there, so the parser rounds."""
    assert getattr(parse(**{field: value}).params, field) == read
    assert parse(logit_bias={"5": 1e-40}).params.logit_bias == {5: 0.0}


def test_values_that_fit_the_engine_are_kept_in_range():
    assert parse(top_k=10**6).params.top_k == 0  # beyond the vocabulary: the filter is off
    assert parse(top_k=256).params.top_k == 256
    assert parse(top_p=1e-30).params.top_p == 1e-30 and as_float32(1e-30) > 0
    assert parse(temperature=0).params.temperature == 0.0
    assert parse(seed=INT64_MAX, n=2).params.seed == INT64_MAX


def test_per_choice_seeds_wrap_inside_int64():
    assert choice_seed(INT64_MAX, 1) == INT64_MIN
    assert choice_seed(INT64_MAX, 0) == INT64_MAX and choice_seed(None, 3) is None
    assert choice_seed(-5, 2) == -3
    assert all(INT64_MIN <= choice_seed(s, j) <= INT64_MAX for s in (INT64_MIN, -1, 0, INT64_MAX) for j in range(16))


@pytest.mark.parametrize("raw, what", [
    (b'{"model": "raystack", "prompt": "\\ud800"}', "surrogate"),
    (b'{"model": "\\udfff", "prompt": "x"}', "surrogate"),
    (b'{"model": "raystack", "prompt": "x", "\\ud800": 1}', "surrogate"),
    (b"[" * 100_000, "nested"),
    (b'{"model": "raystack", "prompt": "x", "stop": ' + b"[" * 200 + b"]" * 200 + b"}", "nested"),
    (b'{"model": "raystack", "prompt": "x", "seed": ' + b"9" * 5000 + b"}", "JSON"),
    (b'{"model": "raystack", "prompt": "x", "temperature": NaN}', "finite"),
    (b'{"model": "raystack", "prompt": "x", "temperature": Infinity}', "finite"),
    (b"\xff\xfe{}", "UTF-8"),
])
def test_hostile_bodies_are_400_not_a_crash(raw, what):
    assert what in refused(raw).message


def test_fan_out_is_refused_before_any_prompt_is_read():
    started = time.perf_counter()
    with pytest.raises(APIError) as error:
        parse_completion({"model": "raystack", "prompt": ["a"] * 100_000, "n": 16}, "raystack", LIMITS)
    assert error.value.status == 400 and error.value.param == "n" and error.value.code == "too_many_sequences"
    assert "1600000 sequences" in error.value.message
    assert time.perf_counter() - started < 0.5
    assert len(parse(prompt=["a"] * 4, n=16).prompts) == 4  # exactly at the limit


def test_a_huge_prompt_is_refused_without_tokenizing_it():
    for prompt in ("x" * 10_000_000, [1] * 1_000_000):
        started = time.perf_counter()
        with pytest.raises(APIError) as error:
            parse(prompt=prompt)
        assert error.value.code == "context_length_exceeded"
        assert time.perf_counter() - started < 0.5


def test_echoed_values_are_bounded():
    with pytest.raises(APIError) as error:
        parse_completion(decode_body(json.dumps({"model": "m" * 100_000, "prompt": "x"}).encode()), "raystack",
                         LIMITS)
    assert error.value.status == 404 and len(error.value.message) < 400


def test_key_files_keep_keys_that_start_with_a_hash(tmp_path):
    assert parse_key_file(["# comment", "", "#", "#k3y-with-hash", "  sk-plain  "], "f") == ["#k3y-with-hash",
                                                                                            "sk-plain"]
    with pytest.raises(ValueError, match="line 2") as error:
        parse_key_file(["sk-a", "sk secret"], "f")
    assert "secret" not in str(error.value)


def test_api_keys_fail_closed(tmp_path, monkeypatch):
    monkeypatch.delenv("RAYSTACK_API_KEYS", raising=False)
    assert load_api_keys("RAYSTACK_API_KEYS") == []
    with pytest.raises(ValueError, match="require_api_key"):
        load_api_keys("RAYSTACK_API_KEYS", required=True)
    with pytest.raises(ValueError, match="cannot be read"):
        load_api_keys("RAYSTACK_API_KEYS", str(tmp_path / "missing"))
    (tmp_path / "empty").write_text("# no keys yet\n")
    with pytest.raises(ValueError, match="holds no key"):
        load_api_keys("RAYSTACK_API_KEYS", str(tmp_path / "empty"))
    monkeypatch.setenv("RAYSTACK_API_KEYS", "sk-1, sk-2")
    assert load_api_keys("RAYSTACK_API_KEYS", required=True) == [b"sk-1", b"sk-2"]


def test_a_sampling_section_fills_only_what_a_request_leaves_out():
    """The serve spec's ``sampling`` section (GenerationParams) is the default of every field a body omits or
    sends as null; a body's own values win and are checked the same way."""
    from raystack.engine import GenerationParams

    defaults = GenerationParams(max_tokens=7, temperature=0.0, top_k=3, stop=["\n\n"], seed=11)
    request = parse_completion({"model": "raystack", "prompt": "x", "top_k": None}, "raystack", LIMITS, defaults)
    assert (request.params.max_tokens, request.params.temperature, request.params.top_k, request.params.stop,
            request.params.seed) == (7, 0.0, 3, ["\n\n"], 11)
    own = parse_completion({"model": "raystack", "prompt": "x", "max_tokens": 2, "temperature": 0.5, "stop": "a"},
                           "raystack", LIMITS, defaults)
    assert (own.params.max_tokens, own.params.temperature, own.params.top_k, own.params.stop) == (2, 0.5, 3, ["a"])
    with pytest.raises(APIError, match="'temperature' must be in"):
        parse_completion({"model": "raystack", "prompt": "x", "temperature": 9}, "raystack", LIMITS, defaults)


@pytest.mark.parametrize("override, message", [
    ("sampling.temperature=3", r"sampling.temperature: 'temperature' must be in \[0.0, 2.0\]"),
    ("sampling.top_p=0", r"sampling.top_p: 'top_p' must be in \(0.0, 1.0\]"),
    ("sampling.logprobs=true", "sampling.logprobs: log-probabilities are asked for per request"),
    ("sampling.tempreature=1", r"unknown config key 'sampling.tempreature' \(did you mean 'temperature'\?\)"),
])
def test_a_serve_specs_bad_sampling_section_is_refused_naming_the_key(override, message):
    from raystack.config import ConfigError, load_config
    from raystack.serving import ServeConfig

    with pytest.raises(ConfigError, match=message):
        load_config(ServeConfig, None, [override, "model=m"])


def test_ignore_eos_is_a_boolean_extension():
    assert parse(ignore_eos=True).params.ignore_eos is True and parse().params.ignore_eos is False
    with pytest.raises(APIError, match="'ignore_eos' must be a boolean"):
        parse(ignore_eos=1)


@pytest.mark.parametrize("fields, param", [
    ({"logprobs": 21}, "logprobs"),
    ({"logit_bias": {"300": 1}}, "logit_bias"),         # beyond the vocabulary
    ({"logit_bias": {"-1": 1}}, "logit_bias"),
    ({"logit_bias": {"a": 1}}, "logit_bias"),
    ({"logit_bias": {"5": 101}}, "logit_bias"),
    ({"logit_bias": {"5": "x"}}, "logit_bias"),
    ({"logit_bias": [1, 2]}, "logit_bias"),
    ({"logit_bias": {"9" * 400: 1}}, "logit_bias"),
    ({"best_of": 1, "n": 2}, "best_of"),
    ({"best_of": 3, "stream": True}, "best_of"),
    ({"max_tokens": 0}, "max_tokens"),                  # 0 only scores an echoed prompt
    ({"suffix": "x"}, "suffix"),
])
def test_client_fields_are_checked(fields, param):
    with pytest.raises(APIError) as error:
        parse(**fields)
    assert error.value.status == 400 and error.value.param == param, error.value.message


def test_logprobs_echo_logit_bias_best_of_and_a_null_prompt_parse():
    request = parse(logprobs=20, echo=True, logit_bias={"65": 100, "10": -100.0}, best_of=3, n=2)
    assert request.logprobs == 20 and request.params.top_logprobs == 20 and request.params.logprobs
    assert request.params.logit_bias == {65: 100.0, 10: -100.0} and request.best_of == 3 and request.n == 2
    assert parse(best_of=3).params.logprobs  # best_of ranks by log-probability, asked for or not
    assert parse(echo=True, max_tokens=0, logprobs=1).params.max_tokens == 0
    null = parse_completion({"model": "raystack", "prompt": None}, "raystack", LIMITS)
    assert null.prompts == [[256]]  # OpenAI's default prompt: <|endoftext|>
    with pytest.raises(APIError, match="sequences"):  # best_of counts towards the fan-out limit
        parse_completion({"model": "raystack", "prompt": ["a"] * 8, "n": 1, "best_of": 16}, "raystack", LIMITS)


def test_text_offsets_count_characters_of_the_returned_text():
    from raystack.openai_api import TextOffsets

    text = "aé€\U0001F600b"
    tokens = list(text.encode())
    assert TextOffsets()(tokens) == [0, 1, 1, 2, 2, 2, 3, 3, 3, 3, 4]
    broken = [ord("9"), 0xA9, 0x81, 0xE1, 0xC9, ord("{")]  # lone continuations and cut characters: one U+FFFD each
    assert bytes(broken).decode("utf-8", errors="replace") == "9\ufffd\ufffd\ufffd\ufffd{"
    assert TextOffsets()(broken) == [0, 1, 2, 3, 4, 5]
    counter = TextOffsets(10)  # a stream: chunks continue where the last one ended, mid-character too
    assert counter(tokens[:2]) + counter(tokens[2:5]) + counter(tokens[5:]) == [i + 10 for i in TextOffsets()(tokens)]


def chat(template=None, **fields):
    from raystack.openai_api import ChatTemplate, parse_chat
    from raystack.tokenizer import DEFAULT_CHAT_TEMPLATE

    body = {"model": "raystack", "messages": [{"role": "user", "content": "hi"}], **fields}
    return parse_chat(body, "raystack", LIMITS, ChatTemplate(template or DEFAULT_CHAT_TEMPLATE), stop=("\nuser:",))


def test_chat_messages_render_with_the_template_and_fields_map_to_the_engine():
    request = chat(messages=[{"role": "system", "content": "be brief"},
                             {"role": "user", "content": [{"type": "text", "text": "hi "}, {"type": "text",
                                                                                           "text": "there"}]}],
                   max_completion_tokens=7, max_tokens=3, logprobs=True, top_logprobs=4, stop="END")
    assert request.prompts == ["system: be brief\nuser: hi there\nassistant:"]
    assert request.params.max_tokens == 7 and request.logprobs == 4 and request.params.top_logprobs == 4
    assert request.params.stop == ["END", "\nuser:"] and request.request_id.startswith("chatcmpl-")
    assert chat(template="{{ messages[0]['content'] | upper }}").prompts == ["HI"]


@pytest.mark.parametrize("fields, param", [
    ({"messages": []}, "messages"),
    ({"messages": "hi"}, "messages"),
    ({"messages": [{"content": "hi"}]}, "messages[0].role"),
    ({"messages": [{"role": "robot", "content": "hi"}]}, "messages[0].role"),
    ({"messages": [{"role": "tool", "content": "hi"}]}, "messages[0].role"),
    ({"messages": [{"role": "user", "content": 5}]}, "messages[0].content"),
    ({"messages": [{"role": "user"}]}, "messages[0].content"),
    ({"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {}}]}]},
     "messages[0].content[0]"),
    ({"messages": [{"role": "user", "content": "x", "tool_call_id": "1"}]}, "messages[0].tool_call_id"),
    ({"messages": [{"role": "assistant", "content": "x", "tool_calls": [{"id": "1"}]}]}, "messages[0].tool_calls"),
    ({"messages": [{"role": "assistant", "content": "x", "refusal": "no"}]}, "messages[0].refusal"),
    ({"top_logprobs": 3}, "top_logprobs"),               # without logprobs: true
    ({"logprobs": True, "top_logprobs": 21}, "top_logprobs"),
    ({"tools": [{"type": "function"}]}, "tools"),
    ({"response_format": {"type": "json_object"}}, "response_format"),
    ({"max_completion_tokens": 0}, "max_completion_tokens"),
    ({"prompt": "x"}, "prompt"),
])
def test_bad_chat_requests_name_the_field(fields, param):
    with pytest.raises(APIError) as error:
        chat(**fields)
    assert error.value.status == 400 and error.value.param == param, error.value.message


def test_a_template_that_refuses_the_messages_is_a_400_and_one_that_does_not_compile_is_refused_at_start():
    from raystack.openai_api import ChatTemplate

    with pytest.raises(APIError, match="no system role"):
        chat(template="{% if messages[0]['role'] == 'user' %}{{ raise_exception('no system role') }}{% endif %}")
    with pytest.raises(ValueError, match="does not compile"):
        ChatTemplate("{% for %}")
    with pytest.raises(APIError) as error:  # the sandbox: no reaching into Python from a template
        chat(template="{{ messages.__class__.__mro__[1].__subclasses__() }}")
    assert error.value.status == 400
