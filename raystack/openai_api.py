"""The OpenAI completions protocol: strict request parsing and response shapes (no web framework, no Ray).

``parse_completion(body, ...)`` turns a decoded JSON body into a ``CompletionRequest`` or raises ``APIError`` with
the HTTP status and an OpenAI-shaped error body ``{"error": {"message", "type", "param", "code"}}`` that names the
offending parameter. Ranges follow the OpenAI API (temperature [0, 2], top_p (0, 1], penalties [-2, 2], logprobs
0-5, up to 4 stop sequences, unknown arguments refused); ``top_k``, ``min_p`` and ``repetition_penalty`` are the
usual vLLM extensions. ``logprobs`` returns the chosen tokens' log-probabilities; ``top_logprobs`` is null.
"""

from __future__ import annotations

import math
import time
import uuid
from dataclasses import dataclass, field
from typing import Any, Optional

from raystack.engine import GenerationParams
from raystack.tokenizer import EOT

KNOWN_FIELDS = {
    "model", "prompt", "max_tokens", "temperature", "top_p", "n", "stream", "stream_options", "logprobs", "echo",
    "stop", "presence_penalty", "frequency_penalty", "best_of", "logit_bias", "user", "seed", "suffix",
    "top_k", "min_p", "repetition_penalty",
}
MAX_N = 16


class APIError(Exception):
    def __init__(self, status: int, message: str, param: Optional[str] = None,
                 type: str = "invalid_request_error", code: Optional[str] = None):
        super().__init__(message)
        self.status, self.message, self.param, self.type, self.code = status, message, param, type, code

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}


def _bad(param: str, message: str, code: Optional[str] = None) -> APIError:
    return APIError(400, message, param=param, code=code)


def _number(body: dict, name: str, default: float, low: float, high: float, low_open=False) -> float:
    value = body.get(name)
    if value is None:
        return default
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise _bad(name, f"'{name}' must be a number, got {type(value).__name__}")
    if not math.isfinite(value):
        raise _bad(name, f"'{name}' must be a finite number")
    if value < low or value > high or (low_open and value == low):
        opening = "(" if low_open else "["
        raise _bad(name, f"'{name}' must be in {opening}{low}, {high}], got {value}")
    return float(value)


def _integer(body: dict, name: str, default: Optional[int], low: int, high: Optional[int] = None) -> Optional[int]:
    value = body.get(name)
    if value is None:
        return default
    if isinstance(value, bool) or not isinstance(value, int):
        raise _bad(name, f"'{name}' must be an integer, got {type(value).__name__}")
    if value < low or (high is not None and value > high):
        bound = f"between {low} and {high}" if high is not None else f">= {low}"
        raise _bad(name, f"'{name}' must be {bound}, got {value}")
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


def _prompts(value: Any, vocab_size: int) -> list:
    if value is None:
        raise _bad("prompt", "you must provide a 'prompt' parameter")
    if isinstance(value, str):
        return [value]
    if isinstance(value, list) and value:
        if all(isinstance(x, str) for x in value):
            return list(value)
        if all(isinstance(x, int) and not isinstance(x, bool) for x in value):
            return [_token_ids(value, vocab_size)]
        if all(isinstance(x, list) for x in value):
            return [_token_ids(x, vocab_size) for x in value]
    raise _bad("prompt", "'prompt' must be a string, a list of strings, a list of token ids or a list of such lists")


def _token_ids(ids: list, vocab_size: int) -> list[int]:
    if not ids or not all(isinstance(i, int) and not isinstance(i, bool) and 0 <= i < vocab_size for i in ids):
        raise _bad("prompt", f"token-id prompts must be non-empty lists of integers in [0, {vocab_size})")
    return list(ids)


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


def parse_completion(body: Any, model_name: str, vocab_size: int) -> CompletionRequest:
    if not isinstance(body, dict):
        raise APIError(400, "the request body must be a JSON object")
    unknown = sorted(set(body) - KNOWN_FIELDS)
    if unknown:
        raise _bad(unknown[0], f"Unrecognized request argument supplied: {unknown[0]}")
    model = body.get("model")
    if not isinstance(model, str):
        raise _bad("model", "you must provide a 'model' parameter (a string)")
    if model != model_name:
        raise APIError(404, f"The model '{model}' does not exist; this server serves '{model_name}'",
                       param="model", code="model_not_found")
    prompts = _prompts(body.get("prompt"), vocab_size)
    n = _integer(body, "n", 1, 1, MAX_N)
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
    seed = _integer(body, "seed", None, -(2**63), 2**63 - 1)
    params = GenerationParams(
        max_tokens=_integer(body, "max_tokens", 16, 1),
        temperature=_number(body, "temperature", 1.0, 0.0, 2.0),
        top_p=_number(body, "top_p", 1.0, 0.0, 1.0, low_open=True),
        top_k=_integer(body, "top_k", 0, -1),
        min_p=_number(body, "min_p", 0.0, 0.0, 1.0),
        seed=seed,
        stop=_stop(body.get("stop")),
        presence_penalty=_number(body, "presence_penalty", 0.0, -2.0, 2.0),
        frequency_penalty=_number(body, "frequency_penalty", 0.0, -2.0, 2.0),
        repetition_penalty=_number(body, "repetition_penalty", 1.0, 0.0, 2.0, low_open=True),
        logprobs=logprobs is not None,
    )
    return CompletionRequest(model, prompts, params, n=n, stream=stream, include_usage=include_usage, echo=echo,
                             logprobs=logprobs)


def context_error(prompt_tokens: int, max_tokens: int, limit: int) -> APIError:
    return APIError(
        400, f"This model's maximum context length is {limit} tokens, however you requested "
        f"{prompt_tokens + max_tokens} tokens ({prompt_tokens} in your prompt; {max_tokens} for the completion). "
        "Please reduce your prompt; or completion length.", param="max_tokens", code="context_length_exceeded")


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
