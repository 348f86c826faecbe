"""The OpenAI completions protocol: strict request parsing and response shapes (no web framework, no Ray).

``decode_body(raw)`` turns the request's bytes into JSON and ``parse_completion(body, model_name, limits)`` turns
that into a ``CompletionRequest``; both raise only ``APIError``, with the HTTP status and an OpenAI-shaped error body
``{"error": {"message", "type", "param", "code"}}`` that names the offending parameter. Nothing a client sends makes
them raise anything else: invalid UTF-8, lone surrogates, deep nesting, integers of thousands of digits and numbers
that overflow are all a 400.

Ranges follow the OpenAI API (temperature [0, 2], top_p (0, 1], penalties [-2, 2], logprobs 0-5, up to 4 stop
sequences, unknown arguments refused); ``top_k``, ``min_p``, ``repetition_penalty`` and ``ignore_eos`` are the usual
vLLM extensions.
Every number is checked in the precision the engine uses: integers must fit in int64, and a non-zero float must
stay non-zero and normal as a float32 (``|x| >= 1.18e-38``), since ``top_p = 1e-50`` would otherwise reach the
sampler as 0. ``top_k`` at or beyond the vocabulary keeps every token, like 0 and -1. ``repetition_penalty`` is in
[0.01, 2] so a penalised logit cannot overflow. The ``n`` samples of one prompt draw with seeds ``seed + j``
wrapped into int64 (``choice_seed``).

``RequestLimits`` bound the work one request can ask for: ``len(prompts) * n`` sequences at most, and prompts no
longer than the context, checked before any prompt is tokenized.
"""

from __future__ import annotations

import json
import math
import struct
import time
import uuid
from dataclasses import dataclass, field
from typing import Any, Optional

from raystack.engine import GenerationParams
from raystack.tokenizer import EOT

KNOWN_FIELDS = {
    "model", "prompt", "max_tokens", "temperature", "top_p", "n", "stream", "stream_options", "logprobs", "echo",
    "stop", "presence_penalty", "frequency_penalty", "best_of", "logit_bias", "user", "seed", "suffix",
    "top_k", "min_p", "repetition_penalty", "ignore_eos",
}
MAX_N = 16
INT64_MIN, INT64_MAX = -(2**63), 2**63 - 1
FLOAT32_SMALLEST_NORMAL = 1.1754943508222875e-38
MAX_NESTING = 64
"""Deepest JSON nesting a completion body may have (a token-id prompt list of lists needs 2)."""


@dataclass(frozen=True)
class RequestLimits:
    """What one request may ask of a replica; checked before anything is tokenized or queued."""

    vocab_size: int
    max_model_len: int
    """Prompt + completion tokens per sequence."""
    max_sequences: int = 64
    """``len(prompts) * n`` per request."""


class APIError(Exception):
    def __init__(self, status: int, message: str, param: Optional[str] = None,
                 type: str = "invalid_request_error", code: Optional[str] = None):
        super().__init__(message)
        self.status, self.message, self.param, self.type, self.code = status, message, param, type, code

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}


def _bad(param: str, message: str, code: Optional[str] = None) -> APIError:
    return APIError(400, message, param=param, code=code)


def as_float32(value: float) -> float:
    """``value`` rounded to the nearest float32 (what the sampler will see); overflow gives +-inf."""
    try:
        return struct.unpack("f", struct.pack("f", value))[0]
    except OverflowError:
        return math.copysign(math.inf, value)


def _number(body: dict, name: str, default: float, low: float, high: float, low_open=False) -> float:
    value = body.get(name)
    if value is None:
        return default
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise _bad(name, f"'{name}' must be a number, got {type(value).__name__}")
    opening = "(" if low_open else "["
    try:
        value = float(value)  # a 400-digit integer overflows here
    except OverflowError:
        raise _bad(name, f"'{name}' must be in {opening}{low}, {high}], got a number too large for a double") from None
    if not math.isfinite(value):
        raise _bad(name, f"'{name}' must be a finite number")
    if value < low or value > high or (low_open and value == low):
        raise _bad(name, f"'{name}' must be in {opening}{low}, {high}], got {value!r}")
    if value != 0 and abs(value) < FLOAT32_SMALLEST_NORMAL:
        raise _bad(name, f"'{name}' = {value!r} is too close to 0 for float32, the precision the sampler uses; "
                         f"use 0 or a magnitude of at least 1.2e-38")
    single = as_float32(value)
    if single < low or single > high or (low_open and single == low):
        raise _bad(name, f"'{name}' = {value!r} rounds to {single!r} in float32, outside {opening}{low}, {high}]")
    return value


def _integer(body: dict, name: str, default: Optional[int], low: int, high: int = INT64_MAX) -> Optional[int]:
    value = body.get(name)
    if value is None:
        return default
    if isinstance(value, bool) or not isinstance(value, int):
        raise _bad(name, f"'{name}' must be an integer, got {type(value).__name__}")
    if value < low or value > high:
        shown = str(value) if abs(value) < 10**30 else f"an integer of {len(str(abs(value)))} digits"
        raise _bad(name, f"'{name}' must be between {low} and {high}, got {shown}")
    return value


def _boolean(body: dict, name: str) -> bool:
    value = body.get(name)
    if value is None:
        return False
    if not isinstance(value, bool):
        raise _bad(name, f"'{name}' must be a boolean, got {type(value).__name__}")
    return value


@dataclass
class CompletionRequest:
    model: str
    prompts: list  # each a str or a list of token ids
    params: GenerationParams
    n: int = 1
    stream: bool = False
    include_usage: bool = False
    echo: bool = False
    logprobs: Optional[int] = None
    request_id: str = field(default_factory=lambda: f"cmpl-{uuid.uuid4().hex}")
    created: int = field(default_factory=lambda: int(time.time()))


def choice_seed(seed: Optional[int], j: int) -> Optional[int]:
    """Seed of the j-th of ``n`` samples of one prompt: ``seed + j`` wrapped into int64, so it never overflows."""
    if seed is None or j == 0:
        return seed
    return (seed + j - INT64_MIN) % 2**64 + INT64_MIN


def decode_body(raw: bytes) -> Any:
    """The request body as JSON; anything that is not (invalid UTF-8, too deep, a 5000-digit integer) is a 400."""
    try:
        text = raw.decode("utf-8")
        body = json.loads(text)
    except UnicodeDecodeError as e:
        raise APIError(400, f"the request body is not valid UTF-8: {e.reason} at byte {e.start}") from None
    except RecursionError:
        raise APIError(400, "the request body is nested too deeply") from None
    except ValueError as e:  # JSONDecodeError, and int() refusing integers of more than 4300 digits
        raise APIError(400, f"the request body is not valid JSON: {str(e)[:200]}") from None
    _check_strings(body)
    return body


def _check_strings(body: Any) -> None:
    """Refuse nesting deeper than ``MAX_NESTING`` and strings that are not Unicode text (lone surrogates, which
    JSON's ``\\ud800`` escapes can carry), naming the top-level field they sit in."""
    stack = [(body, None, 0)]
    while stack:
        value, param, depth = stack.pop()
        if depth > MAX_NESTING:
            raise APIError(400, f"the request body is nested more than {MAX_NESTING} levels deep", param=param)
        if isinstance(value, str):
            if not _is_text(value):
                raise _bad(param or "body", f"'{param or 'body'}' holds a lone surrogate (\\ud800-\\udfff); "
                                            "send valid Unicode text")
        elif isinstance(value, dict):
            for key, item in value.items():
                if not _is_text(key):
                    raise APIError(400, "a key of the request body holds a lone surrogate; send valid Unicode text",
                                   param=param)
                stack.append((item, key if depth == 0 else param, depth + 1))
        elif isinstance(value, list):
            stack.extend((item, param, depth + 1) for item in value)


def _is_text(value: str) -> bool:
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def _prompts(value: Any, limits: RequestLimits) -> list:
    if value is None:
        raise _bad("prompt", "you must provide a 'prompt' parameter")
    if isinstance(value, str):
        return [_text_prompt(value, limits)]
    if isinstance(value, list) and value:
        if all(isinstance(x, str) for x in value):
            return [_text_prompt(x, limits) for x in value]
        if all(isinstance(x, int) and not isinstance(x, bool) for x in value):
            return [_token_ids(value, limits)]
        if all(isinstance(x, list) for x in value):
            return [_token_ids(x, limits) for x in value]
    raise _bad("prompt", "'prompt' must be a string, a list of strings, a list of token ids or a list of such lists")


def _text_prompt(text: str, limits: RequestLimits) -> str:
    # Every character is at least one byte token, so this bounds the tokens before any tokenizing.
    if len(text) >= limits.max_model_len:
        raise context_error(len(text), 1, limits.max_model_len, at_least=True)
    return text


def _token_ids(ids: list, limits: RequestLimits) -> list[int]:
    if len(ids) >= limits.max_model_len:
        raise context_error(len(ids), 1, limits.max_model_len)
    vocab_size = limits.vocab_size
    if not ids or not all(isinstance(i, int) and not isinstance(i, bool) and 0 <= i < vocab_size for i in ids):
        raise _bad("prompt", f"token-id prompts must be non-empty lists of integers in [0, {vocab_size})")
    return list(ids)


def _prompt_count(value: Any) -> int:
    """How many prompts ``value`` holds, read without looking inside them (for the fan-out limit)."""
    if isinstance(value, list) and value and all(isinstance(x, (str, list)) for x in value):
        return len(value)
    return 1


def _stop(value: Any) -> list[str]:
    if value is None:
        return []
    stops = [value] if isinstance(value, str) else value
    if not isinstance(stops, list) or not all(isinstance(s, str) for s in stops):
        raise _bad("stop", "'stop' must be a string or a list of strings")
    if len(stops) > 4:
        raise _bad("stop", f"'stop' takes at most 4 sequences, got {len(stops)}")
    if any(s == "" for s in stops):
        raise _bad("stop", "'stop' sequences must not be empty")
    return stops


def parse_completion(body: Any, model_name: str, limits: RequestLimits,
                     defaults: Optional[GenerationParams] = None) -> CompletionRequest:
    """``body`` as a ``CompletionRequest``; sampling fields it leaves out come from ``defaults`` (the serve spec's
    ``sampling`` section)."""
    if not isinstance(body, dict):
        raise APIError(400, "the request body must be a JSON object")
    unknown = sorted(set(body) - KNOWN_FIELDS)
    if unknown:
        raise _bad(unknown[0][:200], f"Unrecognized request argument supplied: {unknown[0][:200]}")
    model = body.get("model")
    if not isinstance(model, str):
        raise _bad("model", "you must provide a 'model' parameter (a string)")
    if model != model_name:
        raise APIError(404, f"The model '{model[:200]}' does not exist; this server serves '{model_name}'",
                       param="model", code="model_not_found")
    n = _integer(body, "n", 1, 1, MAX_N)
    sequences = _prompt_count(body.get("prompt")) * n
    if sequences > limits.max_sequences:
        raise _bad("n", f"this request asks for {sequences} sequences (prompts x n); this server takes at most "
                        f"{limits.max_sequences} per request: send fewer prompts or a smaller 'n'",
                   code="too_many_sequences")
    prompts = _prompts(body.get("prompt"), limits)
    best_of = _integer(body, "best_of", None, 1, MAX_N)
    if best_of is not None and best_of != n:
        raise _bad("best_of", "'best_of' is supported only equal to 'n'")
    if body.get("suffix") not in (None, ""):
        raise _bad("suffix", "'suffix' is not supported by this model")
    logit_bias = body.get("logit_bias")
    if logit_bias not in (None, {}):
        raise _bad("logit_bias", "'logit_bias' is not supported by this server")
    if body.get("user") is not None and not isinstance(body["user"], str):
        raise _bad("user", "'user' must be a string")
    stream = _boolean(body, "stream")
    options = body.get("stream_options")
    include_usage = False
    if options is not None:
        if not stream:
            raise _bad("stream_options", "'stream_options' is only allowed when 'stream' is true")
        if not isinstance(options, dict) or set(options) - {"include_usage"}:
            raise _bad("stream_options", "'stream_options' must be an object with only 'include_usage'")
        include_usage = _boolean(options, "include_usage")
    logprobs = _integer(body, "logprobs", None, 0, 5)
    echo = _boolean(body, "echo")
    if echo and logprobs is not None:
        raise _bad("echo", "'echo' together with 'logprobs' is not supported")
    stop = None if body.get("stop") is None else _stop(body["stop"])
    params = generation_params(body, limits, defaults, stop=stop, logprobs=logprobs is not None)
    return CompletionRequest(model, prompts, params, n=n, stream=stream, include_usage=include_usage, echo=echo,
                             logprobs=logprobs)


SAMPLING_FIELDS = ("max_tokens", "temperature", "top_p", "top_k", "min_p", "seed", "presence_penalty",
                   "frequency_penalty", "repetition_penalty", "ignore_eos")
"""The per-sequence sampling fields a request body or a batch row may carry, by OpenAI's (and vLLM's) names."""


def generation_params(values: dict, limits: RequestLimits, defaults: Optional[GenerationParams] = None,
                      stop: Optional[list] = None, logprobs: Optional[bool] = None) -> GenerationParams:
    """The sampling fields of ``values`` (an API body or a batch row, OpenAI's names), absent or null ones taken
    from ``defaults`` (a serve or batch spec's ``sampling`` section; OpenAI's defaults when None), all checked in
    the engine's precision: the one parser of every sampling parameter. ``APIError`` (400) names the first bad
    one; ``stop`` and ``logprobs``, when not None, replace the defaults' (the API parses them itself)."""
    base = defaults or GenerationParams()
    values = {**{name: getattr(base, name) for name in SAMPLING_FIELDS},
              **{name: values[name] for name in SAMPLING_FIELDS if values.get(name) is not None}}
    max_tokens = _integer(values, "max_tokens", 16, 1)
    if max_tokens >= limits.max_model_len:
        raise context_error(1, max_tokens, limits.max_model_len)
    return GenerationParams(
        max_tokens=max_tokens,
        temperature=_number(values, "temperature", 1.0, 0.0, 2.0),
        top_p=_number(values, "top_p", 1.0, 0.0, 1.0, low_open=True),
        top_k=_top_k(values, limits.vocab_size),
        min_p=_number(values, "min_p", 0.0, 0.0, 1.0),
        seed=_integer(values, "seed", None, INT64_MIN, INT64_MAX),
        stop=list(base.stop if stop is None else stop),
        presence_penalty=_number(values, "presence_penalty", 0.0, -2.0, 2.0),
        frequency_penalty=_number(values, "frequency_penalty", 0.0, -2.0, 2.0),
        repetition_penalty=_number(values, "repetition_penalty", 1.0, 0.01, 2.0),
        logprobs=base.logprobs if logprobs is None else logprobs,
        ignore_eos=_boolean(values, "ignore_eos"),
    )


def check_sampling_section(section: GenerationParams, where: str = "sampling") -> None:
    """``ValueError`` naming the key when a spec's ``sampling`` section breaks the rules a request obeys."""
    anything = RequestLimits(vocab_size=2**62, max_model_len=2**62)  # the model's own limits apply per request
    try:
        generation_params({name: getattr(section, name) for name in SAMPLING_FIELDS}, anything,
                          stop=_stop(section.stop))
    except APIError as e:
        raise ValueError(f"{where}.{e.param}: {e.message}" if e.param else f"{where}: {e.message}") from None


def _top_k(body: dict, vocab_size: int) -> int:
    top_k = _integer(body, "top_k", 0, -1)
    return 0 if top_k >= vocab_size else top_k  # the whole vocabulary: the filter is off


def context_error(prompt_tokens: int, max_tokens: int, limit: int, at_least: bool = False) -> APIError:
    more = "at least " if at_least else ""
    return APIError(
        400, f"This model's maximum context length is {limit} tokens, however you requested {more}"
        f"{prompt_tokens + max_tokens} tokens ({more}{prompt_tokens} in your prompt; {max_tokens} for the "
        "completion). Please reduce your prompt; or completion length.", param="max_tokens",
        code="context_length_exceeded")


def token_string(token: int) -> str:
    """OpenAI's spelling of one byte token: the character for ASCII, ``bytes:\\xNN`` otherwise."""
    if token == EOT:
        return "<|endoftext|>"
    return chr(token) if token < 128 else f"bytes:\\x{token:02x}"


def logprobs_object(tokens: list[int], logprobs: list[float], text_offset_start: int) -> dict:
    offsets, offset = [], text_offset_start
    for token in tokens:
        offsets.append(offset)
        offset += 1 if token < 128 else 0
    return {"tokens": [token_string(t) for t in tokens], "token_logprobs": logprobs, "top_logprobs": None,
            "text_offset": offsets}


def completion_body(request: CompletionRequest, choices: list[dict], prompt_tokens: int, completion_tokens: int):
    return {"id": request.request_id, "object": "text_completion", "created": request.created,
            "model": request.model, "choices": choices,
            "usage": {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
                      "total_tokens": prompt_tokens + completion_tokens}}


def chunk_body(request: CompletionRequest, choices: list[dict], usage: Optional[dict] = None) -> dict:
    body = {"id": request.request_id, "object": "text_completion", "created": request.created,
            "model": request.model, "choices": choices}
    if request.include_usage:
        body["usage"] = usage
    return body


def models_body(model_name: str, created: int) -> dict:
    return {"object": "list", "data": [{"id": model_name, "object": "model", "created": created,
                                        "owned_by": "raystack"}]}
