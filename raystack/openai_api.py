"""The OpenAI completions protocol: strict request parsing and response shapes (no web framework, no Ray).

``decode_body(raw)`` turns the request's bytes into JSON and ``parse_completion(body, model_name, limits)`` turns
that into a ``CompletionRequest``; both raise only ``APIError``, with the HTTP status and an OpenAI-shaped error body
``{"error": {"message", "type", "param", "code"}}`` that names the offending parameter. Nothing a client sends makes
them raise anything else: invalid UTF-8, lone surrogates, deep nesting, integers of thousands of digits and numbers
that overflow are all a 400.

Ranges follow the OpenAI API (temperature [0, 2], top_p (0, 1], penalties [-2, 2], logit_bias values [-100, 100],
up to 4 stop sequences, unknown arguments refused); ``top_k``, ``min_p``, ``repetition_penalty`` and ``ignore_eos``
are the usual vLLM extensions, and so is ``logprobs`` up to 20 (OpenAI stops at 5; vLLM's default limit is 20).

Log-probabilities are those of the model's own distribution: the log-softmax of its logits *before* the logit bias,
penalties, temperature and top-k/top-p/min-p (vLLM's default, ``raw_logprobs``), so a score does not depend on how
a token was drawn and a greedy token is the top alternative. ``logprobs: k`` returns the chosen token's and the k
most likely alternatives (``top_logprobs``, which also hold the chosen token: up to k + 1 entries, as OpenAI);
``text_offset`` counts characters of the returned text (a multi-byte character's continuation bytes share its
offset). ``echo`` with ``logprobs`` scores the prompt too (its first token's log-probability is null), and
``echo`` with ``max_tokens: 0`` scores a prompt without generating. ``best_of`` > ``n`` draws best_of candidates
and returns the n with the highest total log-probability (not streamable, as OpenAI). A null prompt is OpenAI's
default, ``<|endoftext|>``: a new document.

``/v1/chat/completions`` (``parse_chat``) renders ``messages`` with the model's chat template (Jinja, as Hugging
Face renders them; ``raystack.tokenizer.DEFAULT_CHAT_TEMPLATE`` unless the artifact or the serve spec brings one)
and generates from there with the same sampling fields, ``max_completion_tokens`` as ``max_tokens``, and
``logprobs: true`` + ``top_logprobs`` in the chat shape.
Every number is checked in the precision the engine uses: integers must fit in int64 (``5.0`` is the integer 5, as
in JSON Schema), and a float closer to 0 than float32's smallest normal number (1.18e-38) is read as 0, or as
1.18e-38 where 0 is out of range (``top_p = 1e-50`` would otherwise reach the sampler as 0, or as a subnormal).
``top_k`` at or beyond the vocabulary keeps every token, like 0 and -1. ``repetition_penalty`` is in [0.01, 2] so a
penalised logit cannot overflow. The ``n`` samples of one prompt draw with seeds ``seed + j`` wrapped into int64
(``choice_seed``).

``RequestLimits`` bound the work one request can ask for: ``len(prompts) * n`` sequences at most, and prompts no
longer than the context, checked before any prompt is tokenized.
"""

from __future__ import annotations

import codecs
import dataclasses
import json
import math
import struct
import time
import uuid
from dataclasses import dataclass, field
from typing import Any, Optional

from raystack.engine import MAX_TOP_LOGPROBS, GenerationParams
from raystack.tokenizer import EOT, EOT_TEXT

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
                 type: str = "invalid_request_error", code: Optional[str] = None, headers: Optional[dict] = None):
        super().__init__(message)
        self.status, self.message, self.param, self.type, self.code = status, message, param, type, code
        self.headers = headers or {}

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
    if value != 0 and abs(value) < FLOAT32_SMALLEST_NORMAL:  # no normal float32 this close to 0: the nearest one
        value = FLOAT32_SMALLEST_NORMAL if low_open and low == 0 else 0.0  # within the range: checked above
    single = as_float32(value)  # checked against the bounds in float32 too: 0.01 is 0.00999999977 there, and fine
    if single < as_float32(low) or single > as_float32(high) or (low_open and single == as_float32(low)):
        raise _bad(name, f"'{name}' = {value!r} rounds to {single!r} in float32, outside {opening}{low}, {high}]")
    return value


def _as_int(value: Any) -> Optional[int]:
    """``value`` as an integer where JSON Schema calls it one: an int, or a float without a fraction (``5.0``: JSON
    has one number type, and some clients write every number so); None for anything else, booleans included."""
    if isinstance(value, bool):
        return None
    if isinstance(value, int):
        return value
    if isinstance(value, float) and value.is_integer():  # False for inf and nan
        return int(value)
    return None


def _integer(body: dict, name: str, default: Optional[int], low: int, high: int = INT64_MAX) -> Optional[int]:
    value = body.get(name)
    if value is None:
        return default
    number = _as_int(value)
    if number is None:
        got = type(value).__name__
        if isinstance(value, float):
            got = ("NaN" if math.isnan(value) else "a number beyond a double's range" if math.isinf(value)
                   else "a number with a fraction")
        raise _bad(name, f"'{name}' must be an integer, got {got}")
    value = number
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
    best_of: int = 1
    """Candidates drawn per prompt (>= n); the ``n`` with the highest total log-probability are returned."""

    def __post_init__(self):
        self.best_of = max(self.best_of, self.n)
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
        return [[EOT]]  # OpenAI's default prompt, <|endoftext|>: the model starts a new document
    if isinstance(value, str):
        return [_text_prompt(value, limits)]
    if isinstance(value, list) and value:
        if all(isinstance(x, str) for x in value):
            return [_text_prompt(x, limits) for x in value]
        if all(_as_int(x) is not None for x in value):
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
    ids = [_as_int(i) for i in ids]
    if not ids or not all(i is not None and 0 <= i < vocab_size for i in ids):
        raise _bad("prompt", f"token-id prompts must be non-empty lists of integers in [0, {vocab_size})")
    return ids


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
    _known_fields(body, KNOWN_FIELDS)
    model = _model(body, model_name)
    n = _integer(body, "n", 1, 1, MAX_N)
    best_of = _integer(body, "best_of", None, 1, MAX_N)
    if best_of is not None and best_of < n:
        raise _bad("best_of", f"'best_of' ({best_of}) must be at least 'n' ({n})")
    best_of = best_of or n
    sequences = _prompt_count(body.get("prompt")) * best_of
    if sequences > limits.max_sequences:
        raise _bad("n", f"this request asks for {sequences} sequences (prompts x n); this server takes at most "
                        f"{limits.max_sequences} per request: send fewer prompts or a smaller 'n'",
                   code="too_many_sequences")
    prompts = _prompts(body.get("prompt"), limits)
    if body.get("suffix") not in (None, ""):
        raise _bad("suffix", "'suffix' is not supported by this model (it has no fill-in-the-middle training)")
    _check_user(body)
    stream = _boolean(body, "stream")
    if stream and best_of > n:
        raise _bad("best_of", "'best_of' greater than 'n' cannot be streamed (the best are known only at the end)")
    options = body.get("stream_options")
    include_usage = _stream_options(options, stream)
    logprobs = _integer(body, "logprobs", None, 0, MAX_TOP_LOGPROBS)
    echo = _boolean(body, "echo")
    stop = None if body.get("stop") is None else _stop(body["stop"])
    score_only = echo and body.get("max_tokens") == 0 and not isinstance(body.get("max_tokens"), bool)
    values = {**body, "max_tokens": 1} if score_only else body  # echo + max_tokens 0: score the prompt only
    params = generation_params(values, limits, defaults, stop=stop, logprobs=logprobs is not None or best_of > n)
    params = dataclasses.replace(params, max_tokens=0 if score_only else params.max_tokens,
                                 top_logprobs=logprobs or 0, logit_bias=_logit_bias(body, limits.vocab_size))
    return CompletionRequest(model, prompts, params, n=n, stream=stream, include_usage=include_usage, echo=echo,
                             logprobs=logprobs, best_of=best_of)


def _known_fields(body: Any, fields: set) -> None:
    """A JSON object holding only ``fields`` (OpenAI refuses unknown arguments, naming the first)."""
    if not isinstance(body, dict):
        raise APIError(400, "the request body must be a JSON object")
    unknown = sorted(set(body) - fields)
    if unknown:
        raise _bad(unknown[0][:200], f"Unrecognized request argument supplied: {unknown[0][:200]}")


def _model(body: dict, model_name: str, required: bool = True) -> Optional[str]:
    """The body's ``model``: this server's model name (404 for another; None when optional and absent)."""
    model = body.get("model")
    if model is None and not required:
        return None
    if not isinstance(model, str):
        raise _bad("model", "you must provide a 'model' parameter (a string)")
    if model != model_name:
        raise model_not_found(model, model_name)
    return model


def model_not_found(model: str, model_name: str) -> APIError:
    """OpenAI's 404 for a model this server does not serve."""
    return APIError(404, f"The model '{model[:200]}' does not exist; this server serves '{model_name}'",
                    param="model", code="model_not_found")


def _check_user(body: dict) -> None:
    if body.get("user") is not None and not isinstance(body["user"], str):
        raise _bad("user", "'user' must be a string")


def _stream_options(options: Any, stream: bool) -> bool:
    """``include_usage`` of a request's ``stream_options``."""
    if options is None:
        return False
    if not stream:
        raise _bad("stream_options", "'stream_options' is only allowed when 'stream' is true")
    if not isinstance(options, dict) or set(options) - {"include_usage", "continuous_usage_stats"}:
        raise _bad("stream_options", "'stream_options' must be an object with only 'include_usage'")
    return _boolean(options, "include_usage")


def _logit_bias(body: dict, vocab_size: int) -> Optional[dict[int, float]]:
    """OpenAI's ``logit_bias``: an object from token ids (as strings, JSON's only keys) to a bias in [-100, 100]."""
    value = body.get("logit_bias")
    if value is None:
        return None
    if not isinstance(value, dict):
        raise _bad("logit_bias", "'logit_bias' must be an object mapping token ids to a bias in [-100, 100]")
    bias = {}
    for key, amount in value.items():
        token = int(key) if isinstance(key, str) and key.isascii() and key.isdigit() and len(key) < 19 else -1
        if not 0 <= token < vocab_size:
            raise _bad("logit_bias", f"'logit_bias' keys must be token ids in [0, {vocab_size}), got {key[:40]!r}")
        if amount is None:
            raise _bad("logit_bias", f"'logit_bias' values must be numbers in [-100, 100], got null for {key[:40]!r}")
        bias[token] = _number({"logit_bias": amount}, "logit_bias", 0.0, -100.0, 100.0)
    return bias or None


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
    for name in ("top_logprobs", "logit_bias"):
        if getattr(section, name):
            raise ValueError(f"{where}.{name}: set per request (its own '{name}' field), not as a default; "
                             f"remove {where}.{name}")


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


class TextOffsets:
    """``text_offset`` of byte tokens: the index, in characters of the returned text, of the character each token's
    byte belongs to, decoded as the engine decodes (UTF-8, invalid bytes as U+FFFD). Keeps its decoder between calls,
    so a stream's chunks continue where the previous one ended; special tokens sit at the current offset."""

    def __init__(self, start: int = 0):
        self.restart(start)

    def restart(self, start: int) -> None:
        """Count from ``start`` with a fresh decoder (the completion after an echoed prompt)."""
        self.decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
        self.decided = start

    @property
    def end(self) -> int:
        """Characters of the text so far, a pending partial character counted (it decodes to one at the end)."""
        return self.decided + bool(self.decoder.getstate()[0])

    def __call__(self, tokens: list[int]) -> list[int]:
        offsets = []
        for token in tokens:
            if token < 256:
                self.decided += len(self.decoder.decode(bytes([token])))
                offsets.append(self.decided if self.decoder.getstate()[0] else self.decided - 1)
            else:
                offsets.append(self.decided)
        return offsets


def top_logprobs_dict(token: int, logprob: Optional[float], top: Optional[list]) -> Optional[dict]:
    """OpenAI's per-token ``top_logprobs`` entry: the alternatives and the chosen token (up to k + 1 entries)."""
    if logprob is None:
        return None
    entries = {token_string(t): v for t, v in top or []}
    entries.setdefault(token_string(token), logprob)
    return entries


def logprobs_object(tokens: list[int], logprobs: list, tops: Optional[list], offsets: list[int]) -> dict:
    """The completions ``logprobs`` object for ``tokens``; ``tops`` holds each token's alternatives (or None) and
    ``offsets`` their ``text_offset`` (``TextOffsets``)."""
    tops = tops if tops is not None else [None] * len(tokens)
    return {"tokens": [token_string(t) for t in tokens], "token_logprobs": list(logprobs),
            "top_logprobs": [top_logprobs_dict(t, lp, top) for t, lp, top in zip(tokens, logprobs, tops)],
            "text_offset": offsets}


def token_bytes(token: int) -> list[int]:
    return [] if token >= 256 else [token]


def chat_logprobs_content(tokens: list[int], logprobs: list, tops: list, k: int) -> list[dict]:
    """The chat ``logprobs.content`` list: token, logprob, bytes and ``top_logprobs`` (k entries) per token."""
    return [{"token": token_string(t), "logprob": lp, "bytes": token_bytes(t),
             "top_logprobs": [{"token": token_string(a), "logprob": v, "bytes": token_bytes(a)}
                              for a, v in (top or [])[:k]]}
            for t, lp, top in zip(tokens, logprobs, tops)]


def usage_body(prompt_tokens: int, completion_tokens: int, cached_tokens: int = 0) -> dict:
    """OpenAI's ``usage``, with ``prompt_tokens_details.cached_tokens``: the prompt tokens the engine found in its
    KV cache (prefix caching) and did not compute again."""
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens,
            "prompt_tokens_details": {"cached_tokens": cached_tokens}}


def completion_body(request: CompletionRequest, choices: list[dict], prompt_tokens: int, completion_tokens: int,
                    cached_tokens: int = 0):
    return {"id": request.request_id, "object": "text_completion", "created": request.created,
            "model": request.model, "choices": choices,
            "usage": usage_body(prompt_tokens, completion_tokens, cached_tokens)}


def chunk_body(request: CompletionRequest, choices: list[dict], usage: Optional[dict] = None) -> dict:
    body = {"id": request.request_id, "object": "text_completion", "created": request.created,
            "model": request.model, "choices": choices}
    if request.include_usage:
        body["usage"] = usage
    return body


def model_body(model_name: str, created: int) -> dict:
    """The model object of ``GET /v1/models/{model}`` (OpenAI's retrieve)."""
    return {"id": model_name, "object": "model", "created": created, "owned_by": "raystack"}


def models_body(model_name: str, created: int) -> dict:
    """``GET /v1/models`` (OpenAI's list): the one model this server serves."""
    return {"object": "list", "data": [model_body(model_name, created)]}


# -- chat completions ----------------------------------------------------------------------------------------------

CHAT_FIELDS = {
    "model", "messages", "max_tokens", "max_completion_tokens", "temperature", "top_p", "n", "stream",
    "stream_options", "stop", "seed", "presence_penalty", "frequency_penalty", "logit_bias", "logprobs",
    "top_logprobs", "user", "top_k", "min_p", "repetition_penalty", "ignore_eos",
    # OpenAI fields accepted only at their no-op value (anything else: a 400 saying it is unsupported)
    "tools", "tool_choice", "parallel_tool_calls", "response_format", "store", "metadata", "modalities",
}
CHAT_NO_OPS = {"tools": ([],), "tool_choice": ("none",), "parallel_tool_calls": (True, False),
               "response_format": ({"type": "text"},), "store": (False,), "modalities": (["text"],)}
CHAT_ROLES = ("system", "developer", "user", "assistant")
# Fields a message may carry only at their empty value: what an assistant message from a response holds besides
# role and content (``messages.append(completion.choices[0].message)`` in the official SDK sends ``refusal: null``).
MESSAGE_NO_OPS = {"refusal": (None,), "tool_calls": (None, []), "function_call": (None,), "audio": (None,),
                  "annotations": (None, [])}
MAX_MESSAGES = 1024


@dataclass
class ChatRequest(CompletionRequest):
    """A chat completion: ``prompts`` holds the one rendered conversation; ``logprobs`` the top count or None."""

    request_id: str = field(default_factory=lambda: f"chatcmpl-{uuid.uuid4().hex}")


class ChatTemplate:
    """A Jinja chat template compiled once, rendered as ``transformers``' ``apply_chat_template`` does (sandboxed,
    ``trim_blocks``/``lstrip_blocks``, ``raise_exception``); ``ValueError`` at start for one that does not compile."""

    def __init__(self, source: str):
        import jinja2
        from jinja2.sandbox import ImmutableSandboxedEnvironment

        def raise_exception(message):
            raise jinja2.exceptions.TemplateError(message)

        env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)
        env.globals["raise_exception"] = raise_exception
        try:
            self.template = env.from_string(source)
        except jinja2.exceptions.TemplateError as e:
            raise ValueError(f"chat_template does not compile: {e}") from None
        self.source = source

    def render(self, messages: list[dict]) -> str:
        import jinja2

        try:
            return self.template.render(messages=messages, add_generation_prompt=True, bos_token=EOT_TEXT,
                                        eos_token=EOT_TEXT)
        except jinja2.exceptions.TemplateError as e:  # the template refused these messages
            raise _bad("messages", f"the chat template refused these messages: {str(e)[:300]}") from None


def _messages(value: Any) -> list[dict]:
    if not isinstance(value, list) or not value:
        raise _bad("messages", "'messages' must be a non-empty list of {role, content} objects")
    if len(value) > MAX_MESSAGES:
        raise _bad("messages", f"'messages' holds {len(value)} messages; at most {MAX_MESSAGES}")
    out = []
    for i, message in enumerate(value):
        where = f"messages[{i}]"
        if not isinstance(message, dict):
            raise _bad(where, f"'{where}' must be an object with 'role' and 'content'")
        unknown = sorted(set(message) - {"role", "content", "name"} - set(MESSAGE_NO_OPS))
        if unknown:
            raise _bad(f"{where}.{unknown[0][:100]}", f"'{where}' has an unsupported field {unknown[0][:100]!r} "
                                                      "(this server takes role, content and name)")
        for key, empty in MESSAGE_NO_OPS.items():
            if key in message and not _one_of(message[key], empty):
                raise _bad(f"{where}.{key}", f"'{where}.{key}' is not supported by this server (only "
                                             f"{' or '.join(json.dumps(e) for e in empty)})")
        role = message.get("role")
        if role is None:
            raise _bad(f"{where}.role", f"'{where}.role' is required: one of {', '.join(CHAT_ROLES)}")
        if role not in CHAT_ROLES:
            shown = role[:40] if isinstance(role, str) else type(role).__name__
            raise _bad(f"{where}.role", f"'{where}.role' must be one of {', '.join(CHAT_ROLES)}, got {shown!r}"
                                        + (" (tool calls are not supported)" if role in ("tool", "function") else ""))
        name = message.get("name")
        if name is not None and not isinstance(name, str):
            raise _bad(f"{where}.name", f"'{where}.name' must be a string")
        out.append({"role": role, "content": _content(message.get("content"), f"{where}.content"),
                    **({"name": name} if name is not None else {})})
    return out


def _content(value: Any, where: str) -> str:
    """A message's text: a string, or a list of ``{"type": "text", "text": ...}`` parts joined."""
    if isinstance(value, str):
        return value
    if isinstance(value, list) and value:
        texts = []
        for j, part in enumerate(value):
            if not isinstance(part, dict) or part.get("type") != "text" or not isinstance(part.get("text"), str):
                kind = part.get("type") if isinstance(part, dict) else type(part).__name__
                raise _bad(f"{where}[{j}]", f"'{where}[{j}]' must be a text part {{\"type\": \"text\", \"text\": "
                                            f"...}}; this model reads text only, got {str(kind)[:40]!r}")
            texts.append(part["text"])
        return "".join(texts)
    if value is None:
        raise _bad(where, f"'{where}' is required (a string)")
    raise _bad(where, f"'{where}' must be a string or a list of text parts, got {type(value).__name__}")


def _one_of(value: Any, allowed: tuple) -> bool:
    """``value`` is one of ``allowed`` as JSON sees it: ``0`` is not ``false`` (Python's ``0 == False``)."""
    return any(type(value) is type(a) and value == a for a in allowed)


def _metadata(value: Any) -> None:
    """OpenAI's ``metadata`` (accepted, unused): at most 16 pairs, keys of at most 64 characters, string values of at
    most 512."""
    if value is None:
        return
    if not isinstance(value, dict) or len(value) > 16:
        raise _bad("metadata", "'metadata' must be an object of at most 16 key-value pairs")
    for key, text in value.items():
        if len(key) > 64 or not isinstance(text, str) or len(text) > 512:
            raise _bad("metadata", f"'metadata' keys must have at most 64 characters and values be strings of at "
                                   f"most 512, got {key[:64]!r}")


def parse_chat(body: Any, model_name: str, limits: RequestLimits, template: ChatTemplate,
               defaults: Optional[GenerationParams] = None, stop: tuple = ()) -> ChatRequest:
    """``body`` of ``POST /v1/chat/completions`` as a ``ChatRequest`` whose one prompt is the rendered conversation;
    ``stop`` (the template's turn markers) is added to the request's own stop strings."""
    _known_fields(body, CHAT_FIELDS)
    for name, allowed in CHAT_NO_OPS.items():
        if body.get(name) is not None and not _one_of(body[name], allowed):
            raise _bad(name, f"'{name}' is not supported by this server (only {json.dumps(allowed[0])})")
    _metadata(body.get("metadata"))
    model = _model(body, model_name)
    n = _integer(body, "n", 1, 1, MAX_N)
    if n > limits.max_sequences:
        raise _bad("n", f"this request asks for {n} sequences; this server takes at most {limits.max_sequences}",
                   code="too_many_sequences")
    prompt = _text_prompt(template.render(_messages(body.get("messages"))), limits)
    _check_user(body)
    stream = _boolean(body, "stream")
    include_usage = _stream_options(body.get("stream_options"), stream)
    logprobs = _boolean(body, "logprobs")
    top = _integer(body, "top_logprobs", None, 0, MAX_TOP_LOGPROBS)
    if top is not None and not logprobs:
        raise _bad("top_logprobs", "'top_logprobs' needs 'logprobs': true")
    values = dict(body)
    if body.get("max_completion_tokens") is not None:
        values["max_tokens"] = _integer(body, "max_completion_tokens", None, 1)
    own_stop = [] if body.get("stop") is None else _stop(body["stop"])
    base = defaults or GenerationParams()
    params = generation_params(values, limits, defaults, stop=[*(own_stop or base.stop), *stop], logprobs=logprobs)
    params = dataclasses.replace(params, top_logprobs=top or 0, logit_bias=_logit_bias(body, limits.vocab_size))
    return ChatRequest(model, [prompt], params, n=n, stream=stream, include_usage=include_usage,
                       logprobs=(top or 0) if logprobs else None, best_of=n)


# -- /tokenize and /detokenize (vLLM's routes) ---------------------------------------------------------------------

def _optional_model(body: Any, model_name: str, fields: set) -> dict:
    _known_fields(body, fields)
    _model(body, model_name, required=False)
    return body


def parse_tokenize(body: Any, model_name: str, limits: RequestLimits, template: ChatTemplate) -> tuple[str, bool]:
    """vLLM's ``POST /tokenize`` body: ``prompt`` (text) or ``messages`` (rendered with the chat template), and
    ``return_token_strs``; returns the text to tokenize and whether to return token strings."""
    body = _optional_model(body, model_name, {"model", "prompt", "messages", "add_special_tokens",
                                              "add_generation_prompt", "return_token_strs"})
    for name in ("add_special_tokens", "add_generation_prompt"):
        _boolean(body, name)  # accepted; the byte tokenizer adds no special tokens, the template always prompts
    if (body.get("prompt") is None) == (body.get("messages") is None):
        raise _bad("prompt", "send exactly one of 'prompt' (a string) and 'messages' (a chat)")
    if body.get("messages") is not None:
        text = template.render(_messages(body["messages"]))
    elif isinstance(body["prompt"], str):
        text = body["prompt"]
    else:
        raise _bad("prompt", "'prompt' must be a string")
    if len(text) > 4 * limits.max_model_len:  # bounds the work; the count says how far over the context it is
        raise _bad("prompt", f"'prompt' is longer than {4 * limits.max_model_len} characters")
    return text, _boolean(body, "return_token_strs")


def parse_detokenize(body: Any, model_name: str, limits: RequestLimits) -> list[int]:
    """vLLM's ``POST /detokenize`` body: ``tokens``, a list of token ids."""
    body = _optional_model(body, model_name, {"model", "tokens"})
    tokens = body.get("tokens")
    tokens = [_as_int(t) for t in tokens] if isinstance(tokens, list) else None
    if tokens is None or not all(t is not None and 0 <= t < limits.vocab_size for t in tokens):
        raise _bad("tokens", f"'tokens' must be a list of token ids in [0, {limits.vocab_size})")
    if len(tokens) > 4 * limits.max_model_len:
        raise _bad("tokens", f"'tokens' holds more than {4 * limits.max_model_len} ids")
    return tokens
