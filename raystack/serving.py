"""The Ray Serve application: an OpenAI-compatible HTTP API over the continuous-batching engine.

Routes: ``POST /v1/completions`` and ``POST /v1/chat/completions`` (OpenAI's shapes; ``stream: true`` sends
server-sent events ending with ``data: [DONE]``; ``raystack.openai_api`` says what each field does),
``POST /tokenize`` and ``POST /detokenize`` (vLLM's), ``GET /v1/models`` and ``GET /v1/models/{model}`` (OpenAI's
list and retrieve), ``GET /health`` (never needs a key).
One deployment, ``LLMServer``, is both the FastAPI ingress and the engine's home, so a request costs one hop from
Serve's proxy. It autoscales between ``min_replicas`` and ``max_replicas`` on the engine's own load, KV-slot
occupancy and waiting sequences (``raystack.autoscale``; ``autoscaling_policy: requests`` for Serve's request count);
``max_ongoing_requests`` and ``max_queued_requests`` bound the work in flight, and past them Serve answers 503 at
once instead of queueing without bound. ``check_health`` fails a replica whose engine loop died, so Serve replaces it.

API keys: from the environment variable named by ``api_key_env`` (comma-separated) and/or the file
``api_key_file`` (one per line), read on each replica. When any is set, every route but ``/health`` needs
``Authorization: Bearer <key>`` — the docs routes (``/docs``, ``/redoc``, ``/openapi.json``) too; keys are compared
in constant time and never logged. Fails closed: a named key file that is missing or holds no key stops the
replica, and so does ``require_api_key`` with no key at all.

Limits, enforced before any work is queued (every one a field of ``ServeConfig``): a body of at most
``max_body_bytes`` (413), at most ``max_sequences_per_request`` sequences (``len(prompts) * n``, 400), prompts no
longer than the context (400, checked before tokenizing), and at most ``max_queued_sequences`` sequences waiting for
a KV slot on the replica (beyond it: 503 with ``Retry-After`` at once).

Tenants (``tenants_file``, written by ``raystack keys``; ``raystack.tenants`` has the format): each key belongs to a
tenant with a priority class and limits — requests and tokens per minute, sequences in flight, ``max_tokens`` per
request — enforced across all replicas by one Ray actor (``raystack.quota`` says how exactly, and what happens when
that actor is gone: each replica enforces the limits alone and keeps serving). Over a limit: 429 with OpenAI's body
(``code: rate_limit_exceeded``, ``type``: requests, tokens or concurrency), ``Retry-After`` (and
``retry-after-ms``) and the ``x-ratelimit-*`` headers, which every answer to a limited tenant carries. A request whose
``max_tokens`` passes its tenant's limit is a 400 (one that leaves ``max_tokens`` out gets the limit). Priorities
reach the engine: a higher class is admitted first and preempts a lower one, and no tenant keeps more than its share
of slots while another waits. Usage per tenant (requests by status, prompt and completion tokens, errors) goes to
Ray's Prometheus endpoint (``raystack_tenant_*``, labelled by tenant name, never the key) and to ``raystack usage``.
The file is re-read when it changes (checked at most every ``tenants_reload_s``); a broken version is logged and the
last good one kept. Keys from ``api_key_env``/``api_key_file`` still work beside it, as tenant ``default``
(no limits, normal priority).

Every bad request gets a 4xx with an OpenAI-shaped error naming the parameter; nothing a client sends yields a 5xx.
A sequence that fails in the engine fails its own request alone (an error body, or an error event and ``[DONE]``
mid-stream); everyone else's requests carry on.
"""


import asyncio
import contextlib
import contextvars
import dataclasses
import json
import logging
import math
import os
import time
from dataclasses import dataclass, field
from typing import Optional

import torch
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.openapi.docs import get_redoc_html, get_swagger_ui_html
from fastapi.responses import JSONResponse, StreamingResponse
from ray import serve
from starlette.exceptions import HTTPException as StarletteHTTPException

from raystack import api_schema as schema
from raystack.api_keys import key_matches, load_api_keys
from raystack.autoscale import deployment_autoscaling
from raystack.checkpoint import artifact_model_config
from raystack.config import from_dict
from raystack.quota import Quota
from raystack.rollout import OutcomeReporter
from raystack.tenants import Tenant, TenantsFile, read_tenants
from raystack.tokenizer import DEFAULT_CHAT_TEMPLATE
from raystack.engine import (Engine, EngineConfig, GenerationParams, SequenceFailed, TokenEvent, check_quantize,
                             check_threads)
from raystack.engine_process import EngineProcess
from raystack.openai_api import (APIError, ChatTemplate, CompletionRequest, RequestLimits, chat_logprobs_content,
                                 check_sampling_section, choice_seed, chunk_body, completion_body, context_error,
                                 decode_body, logprobs_object, model_body, model_not_found, models_body,
                                 parse_chat, parse_completion, parse_detokenize, parse_tokenize, TextOffsets,
                                 token_string, usage_body)

logger = logging.getLogger(__name__)


@dataclass
class ServeConfig:
    model: str = ""
    """Model artifact: a local path or object-store URI (required)."""
    model_name: str = "raystack"
    """The id clients pass as ``model`` and ``GET /v1/models`` lists."""
    max_batch_size: int = 16
    max_model_len: int = 0
    """0 = the model's max_seq_len."""
    request_timeout_s: float = 120.0
    """Longest a request may run (504 beyond it); also how long a replica being replaced (a rollout, a scale-down)
    drains its in-flight requests and streams before it stops."""
    constructor_retries: int = 20
    """Times Serve retries starting a replica that failed to (a bad artifact) before the deploy fails."""
    max_sequences_per_request: int = 64
    """Sequences one request may ask for (``len(prompts) * n``); more is a 400."""
    max_queued_sequences: int = 256
    """Sequences waiting for a KV slot on a replica; a request that would pass it gets a 503 with Retry-After."""
    max_body_bytes: int = 1 << 20
    """Largest request body in bytes (413 beyond it)."""
    api_key_env: str = "RAYSTACK_API_KEYS"
    """Environment variable on the replicas holding comma-separated API keys."""
    api_key_file: Optional[str] = None
    """A file on every node with one key per line (``# `` starts a comment line); missing or empty is an error."""
    require_api_key: bool = False
    """Refuse to start a replica that finds no API key (fail closed instead of serving openly)."""
    tenants_file: Optional[str] = None
    """A tenants file on every node (``raystack keys add TENANT --file PATH`` writes it): per-key tenants, limits,
    priorities. Unset = no tenants (every key is equal and unlimited)."""
    tenants_reload_s: float = 5.0
    """How often at most the tenants file is checked for changes (a revoked key is refused within this)."""
    docs: bool = True
    """Serve ``/docs``, ``/redoc`` and ``/openapi.json`` (behind the API key when keys are on)."""
    num_cpus: float = 1.0
    num_gpus: float = 0.0
    """GPUs per replica (0 on CPU machines)."""
    threads: int = 0
    """torch threads per replica; 0 = automatic: ``num_cpus`` - 1 (at least 1) for a small model, whose serving work
    needs the core, else ``num_cpus`` (``replica_threads``); with ``engine_process``, a small model's engine takes
    every CPU while no streamed completion runs (``unstreamed_threads``)."""
    quantize: str = "none"
    """``none`` or ``int8`` (int8 weights in the linear layers, CPU replicas; ``raystack.engine.EngineConfig``)."""
    prefix_caching: bool = True
    """Reuse the keys and values a finished sequence left in its KV slot for a prompt that starts with its tokens
    (a chat's next turn, a shared preamble): only the rest is prefilled, a tenant's slots for that tenant alone
    (``raystack.engine``; vLLM's ``enable_prefix_caching``). False prefills every prompt whole, so a seeded
    completion never depends on what ran before it."""
    engine_process: bool = True
    """Run the engine in a child process of the replica (``raystack.engine_process``), so the HTTP side and the
    engine do not share one GIL (vLLM's engine-core split); false keeps it in the replica's process. The same
    tokens either way; on 2 cores the child streamed ~1.4x the tokens/s at 32 streams (README, "Measured")."""
    min_replicas: int = 1
    max_replicas: int = 2
    autoscaling_policy: str = "engine_load"
    """``engine_load``: scale on KV-slot occupancy and waiting sequences (``raystack.autoscale``); ``requests``:
    Serve's count of ongoing requests (``target_ongoing_requests``). engine_load falls back to requests on a Ray
    without custom autoscaling policies, and the replica log says which is in use."""
    target_kv_occupancy: float = 0.8
    """engine_load: the share of each replica's KV slots that demand (running + waiting sequences) should fill."""
    upscale_delay_s: float = 10.0
    """How long the policy must want more replicas before Serve adds them."""
    downscale_delay_s: float = 120.0
    """How long the policy must want fewer replicas before Serve removes them."""
    autoscaling_look_back_s: float = 15.0
    """Window over which Serve averages the load it scales on."""
    target_ongoing_requests: float = 16.0
    max_ongoing_requests: int = 64
    max_queued_requests: int = 64
    sampling: GenerationParams = field(default_factory=GenerationParams)
    """Defaults for the sampling fields a request leaves out (OpenAI's unless set here); a request's own values
    win. ``logprobs``, ``top_logprobs`` and ``logit_bias`` are per request only."""
    chat_template: str = ""
    """Jinja chat template of ``/v1/chat/completions`` (Hugging Face's format: ``messages``,
    ``add_generation_prompt``); empty = the artifact's (its tokenizer_config.json), else raystack's plain
    ``role: content`` lines (``raystack.tokenizer.DEFAULT_CHAT_TEMPLATE``)."""
    chat_stop: list[str] = field(default_factory=lambda: ["\nuser:", "\nsystem:", "\nassistant:"])
    """Stop strings added to every chat request: the template's turn markers, so a base model ends its turn
    instead of writing the next speaker's."""

    def __post_init__(self):
        if not self.model:
            raise ValueError("model: the path or URI of a model artifact is required (e.g. --model ~/raystack_runs/"
                             "raystack-tiny/model)")
        if not 1 <= self.min_replicas <= self.max_replicas:
            raise ValueError(f"need 1 <= min_replicas <= max_replicas, got {self.min_replicas}, {self.max_replicas}")
        for name in ("constructor_retries", "max_batch_size", "max_ongoing_requests", "max_queued_requests", "max_sequences_per_request",
                     "max_queued_sequences", "max_body_bytes"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.request_timeout_s <= 0 or self.target_ongoing_requests <= 0 or self.tenants_reload_s <= 0:
            raise ValueError("request_timeout_s, target_ongoing_requests and tenants_reload_s must be > 0")
        if self.autoscaling_policy not in ("engine_load", "requests"):
            raise ValueError(f"autoscaling_policy must be engine_load or requests, got {self.autoscaling_policy!r}")
        if not 0 < self.target_kv_occupancy <= 1:
            raise ValueError(f"target_kv_occupancy must be in (0, 1], got {self.target_kv_occupancy}")
        if self.upscale_delay_s < 0 or self.downscale_delay_s < 0 or self.autoscaling_look_back_s <= 10:
            raise ValueError("upscale_delay_s and downscale_delay_s must be >= 0, autoscaling_look_back_s > 10 (Serve "
                             "requires the window to exceed its 10 s metrics interval)")
        if self.num_cpus < 0 or self.num_gpus < 0:
            raise ValueError("num_cpus and num_gpus must be >= 0")
        check_sampling_section(self.sampling)
        check_quantize(self.quantize)
        check_threads(self.threads)
        if self.sampling.logprobs:
            raise ValueError("sampling.logprobs: log-probabilities are asked for per request (its 'logprobs' field); "
                             "remove sampling.logprobs")
        if self.chat_template:
            ChatTemplate(self.chat_template)  # refuse one that does not compile before any replica starts
        if not all(isinstance(s, str) and s for s in self.chat_stop):
            raise ValueError("chat_stop must be a list of non-empty strings")


# FastAPI's own docs routes would answer without a key; the deployment serves them itself, behind _authorize.
app = FastAPI(title="raystack", description="OpenAI-compatible completions over raystack's engine",
              docs_url=None, redoc_url=None, openapi_url=None)


def _error_response(error: APIError) -> JSONResponse:
    headers = {"Retry-After": "1"} if error.status == 503 else {}
    return JSONResponse(error.body(), status_code=error.status, headers={**headers, **error.headers})


def _rate_limited(grant) -> APIError:
    """OpenAI's 429: ``rate_limit_exceeded``, the ``x-ratelimit-*`` headers, and when to retry (none for a request
    that no wait would let through)."""
    headers = dict(grant.headers)
    if grant.retry_after > 0:
        headers["Retry-After"] = str(max(1, math.ceil(grant.retry_after)))
        headers["retry-after-ms"] = str(max(1, math.ceil(grant.retry_after * 1000)))
    return APIError(429, grant.message, type=grant.kind, code="rate_limit_exceeded", headers=headers)


DEFAULT_TENANT = Tenant("default")
"""Who a key from ``api_key_env``/``api_key_file`` is when a tenants file is in use too."""


def _sse(body: dict) -> str:
    return f"data: {json.dumps(body)}\n\n"


def _sequence_error(error: SequenceFailed) -> APIError:
    if error.client_error:
        return APIError(400, str(error))
    return APIError(500, "the server failed while generating this completion; other requests are unaffected, "
                         "retry it", type="server_error")


@app.exception_handler(APIError)
async def _api_error(request: Request, error: APIError):
    return _error_response(error)


@app.exception_handler(StarletteHTTPException)
async def _http_error(request: Request, error: StarletteHTTPException):
    headers = dict(error.headers or {})  # a 405's Allow (RFC 9110 requires it)
    message = str(error.detail)
    if error.status_code == 405 and headers.get("Allow"):
        message = f"{request.method[:20]} is not allowed on {request.url.path[:200]}; use {headers['Allow']}"
    return _error_response(APIError(error.status_code, message, type="invalid_request_error", headers=headers))


@app.exception_handler(RequestValidationError)
async def _validation_error(request: Request, error: RequestValidationError):
    return _error_response(APIError(400, f"invalid request: {error.errors()}"))


@app.exception_handler(Exception)
async def _internal_error(request: Request, error: Exception):
    if type(error).__name__ == "TaskCancelledError":  # Serve cancelled it: the client went away mid-stream
        logger.info("%s %s: the client went away before the end", request.method, request.url.path)
        return _error_response(APIError(499, "client closed request", type="server_error"))
    # A bug, not the client's doing: keep the traceback in the replica's log, send an OpenAI-shaped body.
    logger.error("unhandled error serving %s %s", request.method, request.url.path, exc_info=error)
    return _error_response(APIError(500, "internal server error", type="server_error"))


async def _ready_pieces(queue: asyncio.Queue):
    """The pieces of several choices (``queue`` holds lists of them) in batches: the next list (waited for), plus
    every piece already queued behind it: the first token goes out at once, and a consumer slower than the engine
    gets fewer, fuller chunks without a timer. Ends at the ``None`` sentinel; a ``SequenceFailed`` is yielded alone."""
    while (pieces := await queue.get()) is not None:
        if isinstance(pieces, SequenceFailed):
            yield pieces
            return
        ready = list(pieces)
        while not queue.empty():
            pieces = queue.get_nowait()
            if pieces is None or isinstance(pieces, SequenceFailed):
                yield ready
                if pieces is not None:
                    yield pieces
                return
            ready.extend(pieces)
        yield ready


@dataclass
class _Job:
    """One sequence of a request: its slot ``index`` among the request's candidates, and its prompt."""

    index: int
    prompt: object  # the prompt as sent: text or token ids
    tokens: list
    params: GenerationParams
    priority: int = 1
    tenant: str = ""


@dataclass
class _Piece:
    """Text of one choice released together, with its tokens' log-probabilities when they were asked for."""

    index: int
    text: str
    finish_reason: Optional[str]
    tokens: list = field(default_factory=list)
    logprobs: list = field(default_factory=list)
    tops: list = field(default_factory=list)
    echoed: int = 0
    """How many of ``tokens`` are the echoed prompt's (their text is the prompt's, decoded apart)."""
    generated: int = 0
    cumulative: float = 0.0
    """Total log-probability of the generated tokens (``best_of``'s ranking)."""
    cached: int = 0
    """Prompt tokens the engine found in its KV cache (``usage.prompt_tokens_details.cached_tokens``)."""

    def add(self, token: int, logprob: Optional[float], top) -> None:
        self.tokens.append(token)
        self.logprobs.append(logprob)
        self.tops.append(top)


def _coalesce(pieces: list[_Piece]) -> list[_Piece]:
    """One piece per choice for a batch of ready pieces: a choice's texts and tokens joined in order, its
    finish_reason kept."""
    if len(pieces) == 1:  # the usual batch at one token per step: nothing to join
        return pieces
    merged: dict[int, _Piece] = {}
    for piece in pieces:
        into = merged.get(piece.index)
        if into is None:
            merged[piece.index] = dataclasses.replace(piece, tokens=list(piece.tokens),
                                                      logprobs=list(piece.logprobs), tops=list(piece.tops))
            continue
        into.text += piece.text
        into.finish_reason = piece.finish_reason or into.finish_reason
        into.tokens += piece.tokens
        into.logprobs += piece.logprobs
        into.tops += piece.tops
    return list(merged.values())


def _best(results: list[_Piece], n: int, best_of: int) -> list[_Piece]:
    """Per prompt, the ``n`` of its ``best_of`` candidates with the highest total log-probability (all of them, in
    order, when best_of == n), numbered ``prompt * n + rank`` as the response's choice indices."""
    chosen = []
    for start in range(0, len(results), best_of):
        candidates = results[start:start + best_of]
        if best_of > n:
            candidates = sorted(candidates, key=lambda r: -r.cumulative)[:n]
        for rank, result in enumerate(candidates):
            chosen.append(dataclasses.replace(result, index=start // best_of * n + rank))
    return chosen


class _Shape:
    """The response shapes of one request: OpenAI's completions or chat completions, whole or streamed."""

    def __init__(self, parsed: CompletionRequest, chat: bool):
        self.parsed, self.chat = parsed, chat
        self.offsets: dict[int, TextOffsets] = {}  # per streamed choice, carried from chunk to chunk

    def _logprobs(self, piece: _Piece, streamed: bool):
        if self.parsed.logprobs is None:
            return None
        if self.chat:
            return {"content": chat_logprobs_content(piece.tokens, piece.logprobs, piece.tops, self.parsed.logprobs)}
        counter = self.offsets.setdefault(piece.index, TextOffsets()) if streamed else TextOffsets()
        offsets = counter(piece.tokens[:piece.echoed])
        if piece.echoed:
            counter.restart(counter.end)  # the completion's text is decoded apart from the prompt's
        offsets += counter(piece.tokens[piece.echoed:])
        return logprobs_object(piece.tokens, piece.logprobs, piece.tops, offsets)

    def choice(self, piece: _Piece) -> dict:
        if self.chat:
            return {"index": piece.index, "message": {"role": "assistant", "content": piece.text, "refusal": None},
                    "logprobs": self._logprobs(piece, False), "finish_reason": piece.finish_reason}
        return {"text": piece.text, "index": piece.index, "logprobs": self._logprobs(piece, False),
                "finish_reason": piece.finish_reason}

    def body(self, choices: list[dict], prompt_tokens: int, completion_tokens: int, cached_tokens: int = 0) -> dict:
        body = completion_body(self.parsed, choices, prompt_tokens, completion_tokens, cached_tokens)
        if self.chat:
            body["object"] = "chat.completion"
        return body

    def opening(self, indices: list[int]) -> str:
        """What a stream sends before any token: the chat role of every choice (nothing for completions)."""
        if not self.chat:
            return ""
        return "".join(_sse(self._chunk([{"index": i, "delta": {"role": "assistant", "content": ""},
                                          "logprobs": None, "finish_reason": None}])) for i in indices)

    def chunk(self, pieces: list[_Piece], usage: Optional[dict] = None) -> dict:
        if self.chat:
            choices = [{"index": p.index, "delta": {"content": p.text} if p.text else {},
                        "logprobs": self._logprobs(p, True), "finish_reason": p.finish_reason} for p in pieces]
        else:
            choices = [{"text": p.text, "index": p.index, "logprobs": self._logprobs(p, True),
                        "finish_reason": p.finish_reason} for p in pieces]
        return self._chunk(choices, usage)

    def _chunk(self, choices: list[dict], usage: Optional[dict] = None) -> dict:
        body = chunk_body(self.parsed, choices, usage)
        if self.chat:
            body["object"] = "chat.completion.chunk"
        return body


def _app_name() -> str:
    """The Serve application this replica belongs to (the quota actor is per application)."""
    try:
        return serve.get_replica_context().app_name
    except Exception:  # not in a replica: a deployment class driven by hand
        return "default"


def _artifact_chat_template(model: str) -> str:
    """The chat template an artifact brings (tokenizer_config.json), or raystack's default."""
    from raystack.checkpoint import artifact_tokenizer_files

    config = json.loads(artifact_tokenizer_files(model)["tokenizer_config.json"])
    return config.get("chat_template") or DEFAULT_CHAT_TEMPLATE


class _Metrics:
    def __init__(self, model_name: str):
        from ray.util import metrics

        tags = {"model": model_name}
        self.requests = metrics.Counter("raystack_requests_total", "Completion requests by status code (a stream "
                                        "once, when it ends: 200, its error event's status, or 499 when the "
                                        "client left first).",
                                        tag_keys=("model", "status"))
        self.requests.set_default_tags(tags)
        self.tokens = metrics.Counter("raystack_generated_tokens_total", "Generated tokens.", tag_keys=("model",))
        self.tokens.set_default_tags(tags)
        self.prompt_tokens = metrics.Counter("raystack_prompt_tokens_total", "Prompt tokens of the sequences started "
                                             "(each choice's).", tag_keys=("model",))
        self.prompt_tokens.set_default_tags(tags)
        self.cached_tokens = metrics.Counter("raystack_prompt_tokens_cached_total", "Of those, the tokens found in "
                                             "the KV cache and not prefilled again (prefix caching).",
                                             tag_keys=("model",))
        self.cached_tokens.set_default_tags(tags)
        self.ttft = metrics.Histogram("raystack_time_to_first_token_seconds", "Time to first token.",
                                      boundaries=[0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2, 5, 10],
                                      tag_keys=("model",))
        self.ttft.set_default_tags(tags)
        self.queue_wait = metrics.Histogram("raystack_queue_wait_seconds", "Time a sequence waited for a KV slot.",
                                            boundaries=[0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2, 5, 10, 30],
                                            tag_keys=("model",))
        self.queue_wait.set_default_tags(tags)
        self.queue = metrics.Gauge("raystack_queue_depth", "Requests waiting for a KV-cache slot.",
                                   tag_keys=("model",))
        self.queue.set_default_tags(tags)
        self.occupancy = metrics.Gauge("raystack_batch_occupancy", "Share of KV-cache slots in use.",
                                       tag_keys=("model",))
        self.occupancy.set_default_tags(tags)
        self.replica_up = metrics.Gauge("raystack_replica_up", "1 per running replica (their sum: replicas serving).",
                                        tag_keys=("model",))
        self.replica_up.set_default_tags(tags)
        self.replicas_max = metrics.Gauge("raystack_replicas_max", "The deployment's max_replicas.",
                                          tag_keys=("model",))
        self.replicas_max.set_default_tags(tags)
        per_tenant = ("model", "tenant")
        self.tenant_requests = metrics.Counter("raystack_tenant_requests_total", "Completion requests per tenant by "
                                               "status code.", tag_keys=(*per_tenant, "status"))
        self.tenant_prompt = metrics.Counter("raystack_tenant_prompt_tokens_total", "Prompt tokens per tenant.",
                                             tag_keys=per_tenant)
        self.tenant_completion = metrics.Counter("raystack_tenant_completion_tokens_total",
                                                 "Generated tokens per tenant.", tag_keys=per_tenant)
        self.tenant_errors = metrics.Counter("raystack_tenant_errors_total", "Requests per tenant that ended in an "
                                             "error (4xx, 5xx, or a stream's error event).", tag_keys=per_tenant)
        for counter in (self.tenant_requests, self.tenant_prompt, self.tenant_completion, self.tenant_errors):
            counter.set_default_tags(tags)


def _autoscaling(config: ServeConfig) -> tuple[dict, str]:
    return deployment_autoscaling(config.autoscaling_policy, config.min_replicas, config.max_replicas,
                                  config.target_ongoing_requests, config.target_kv_occupancy, config.upscale_delay_s,
                                  config.downscale_delay_s, config.autoscaling_look_back_s)


def deployment_autoscaling_line(config: ServeConfig) -> str:
    return _autoscaling(config)[1]


LEAVE_A_CORE_BELOW = 4_000_000
"""Block weights (12 x layers x width^2, the matrix work per token) below which a replica's default leaves a core to
serving (``replica_threads``)."""


def replica_threads(config: ServeConfig, block_weights: int = 0) -> int:
    """torch threads of a replica: ``threads``, or by default, for a model of fewer ``block_weights`` than
    ``LEAVE_A_CORE_BELOW``, one fewer than its CPUs (at least one): the core left over runs what serves the tokens
    (the replica's event loop, Serve's threads, the proxy beside it), and for a small model that work is a large
    share of a token's cost; a larger model's matrix work dominates, and it gets every CPU. Measured with
    benchmarks/serve_vs_hf.py on 2 cores, c=32, two runs each (2026-12-01): issue 13's shape (0.8 M block weights)
    streamed 1.15x / 1.33x HF with 1 thread against 0.99x / 0.96x with 2 (non-streamed 1.32x / 1.60x against 1.70x
    / 1.86x; c=1 streamed at half the speed with 2); the ``small`` preset (19 M) 1.06x streamed and 1.12x
    non-streamed with 1 thread against 1.32x and 1.60x with 2 (vLLM's CPU backend keeps cores for its API server
    likewise)."""
    if config.threads:
        return config.threads
    cpus = max(1, int(config.num_cpus))
    return cpus if block_weights >= LEAVE_A_CORE_BELOW else max(1, cpus - 1)


def unstreamed_threads(config: ServeConfig, threads: int) -> int:
    """torch threads of the engine process while no streamed completion runs (``EngineProcess``): every CPU where
    the default (``replica_threads``) left one to relay the streams' tokens, which a non-streamed completion does not
    need; 0 (keep ``threads``) otherwise, and always when ``threads`` is set. Measured with
    benchmarks/serve_vs_hf.py, issue 13's shape, c=32, 2 cores (2026-12-02): non-streamed 1.33x HF with 1 thread
    against 2.02x with 2, streamed 1.18x against 0.88x."""
    cpus = max(1, int(config.num_cpus))
    return cpus if not config.threads and threads < cpus else 0


@serve.deployment(name="LLMServer", health_check_period_s=5, health_check_timeout_s=30)
@serve.ingress(app)
class LLMServer:
    def __init__(self, config: ServeConfig):
        self.config = config
        model = artifact_model_config(config.model)
        threads = replica_threads(config, 12 * model.n_layer * model.n_embd ** 2)
        torch.set_num_threads(threads)
        engine_config = EngineConfig(max_batch_size=config.max_batch_size, max_model_len=config.max_model_len,
                                     threads=threads, quantize=config.quantize,
                                     prefix_caching=config.prefix_caching)
        if config.engine_process:
            self.engine = EngineProcess(config.model, engine_config,
                                        unstreamed_threads=unstreamed_threads(config, threads))
        else:
            self.engine = Engine.from_artifact(config.model, engine_config)
        self.tenants = TenantsFile(config.tenants_file, config.tenants_reload_s) if config.tenants_file else None
        tenant_keys = sum(len(t.keys) for t in self.tenants.book().tenants.values()) if self.tenants else 0
        self.keys = load_api_keys(config.api_key_env, config.api_key_file, config.require_api_key and not tenant_keys)
        self.quota = Quota(_app_name()) if self.tenants else None
        self.limits = RequestLimits(vocab_size=self.engine.tokenizer.vocab_size,
                                    max_model_len=self.engine.max_model_len,
                                    max_sequences=config.max_sequences_per_request)
        if config.sampling.max_tokens >= self.engine.max_model_len:
            raise ValueError(f"sampling.max_tokens ({config.sampling.max_tokens}) leaves no room for a prompt in this "
                             f"model's context of {self.engine.max_model_len} tokens; lower it")
        self.chat_template = ChatTemplate(config.chat_template or _artifact_chat_template(config.model))
        self.metrics = _Metrics(config.model_name)
        self._background: set = set()
        self.metrics.replica_up.set(1)
        self.outcomes = OutcomeReporter(_app_name(), config.model)
        self.metrics.replicas_max.set(config.max_replicas)
        self.created = int(time.time())
        logger.info(deployment_autoscaling_line(config))
        logger.info("serving %s as %r: %d KV slots, %.1f MiB KV cache, API keys %s", config.model,
                    config.model_name, config.max_batch_size, self.engine.kv_cache_bytes / 2**20,
                    f"on ({len(self.keys)})" if self.keys else "off")
        if self.tenants:
            logger.info("tenants from %s: %d tenants, %d keys, re-read on change (every %.0f s at most)",
                        self.tenants.path, len(self.tenants.book().tenants), tenant_keys, config.tenants_reload_s)
        elif not self.keys:
            logger.warning("no API key configured (%s unset, no api_key_file): every route is open to anyone who "
                           "reaches this port; set keys, or require_api_key to refuse to start without them",
                           config.api_key_env)

    async def check_health(self):
        self.engine.check_health()

    async def rollout_info(self) -> dict:
        """This replica's spec (for ``raystack rollout``: what to redeploy with a new artifact); a handle call, not
        an HTTP route."""
        return {"config": dataclasses.asdict(self.config), "api_keys": len(self.keys)}

    async def heldout_loss(self, texts: list[str]) -> dict:
        """Mean negative log-likelihood per token of ``texts`` under this replica's model (the rollout's quality
        gate): each text scored by the engine, cut to the context."""
        total, count = 0.0, 0
        for text in texts:
            tokens = self.engine.tokenizer.encode(text)[:self.engine.max_model_len]
            if len(tokens) < 2:
                continue
            scored = await self.engine.score(tokens)
            total -= sum(s.logprob for s in scored[1:])
            count += len(tokens) - 1
        return {"nats_per_token": total / count if count else float("nan"), "tokens": count}

    async def smoke(self) -> str:
        """A short greedy generation (the rollout's smoke gate); raises if the engine cannot generate."""
        from raystack.rollout import SMOKE_PROMPT

        params = GenerationParams(max_tokens=8, temperature=0.0)
        return "".join([e.text async for e in self.engine.generate(self.engine.encode_prompt(SMOKE_PROMPT), params)])

    async def record_autoscaling_stats(self) -> dict:
        """The engine's load for ``raystack.autoscale.EngineLoadPolicy`` (Serve's custom-metrics hook)."""
        slots = self.config.max_batch_size
        return {"kv_slots": slots, "kv_occupancy": self.engine.active / slots,
                "waiting_sequences": self.engine.queue_depth}

    def _authorize(self, request: Request) -> Optional[Tenant]:
        """The caller's tenant (None without a tenants file), or a 401."""
        book = self.tenants.book() if self.tenants else None
        if not self.keys and book is None:
            return None
        scheme, _, token = request.headers.get("authorization", "").partition(" ")
        presented = token.strip().encode()
        if scheme.lower() == "bearer":
            tenant = book.identify(presented) if book is not None else None
            if tenant is not None:
                return tenant
            if self.keys and key_matches(presented, self.keys):
                return DEFAULT_TENANT if book is not None else None
        raise APIError(401, "Incorrect or missing API key: send 'Authorization: Bearer <key>'.",
                       type="invalid_request_error", code="invalid_api_key",
                       headers={"WWW-Authenticate": "Bearer"})  # RFC 9110: a 401 names the scheme it wants

    def _record_gauges(self) -> None:
        self.metrics.queue.set(self.engine.queue_depth)
        self.metrics.occupancy.set(self.engine.active / self.config.max_batch_size)

    @app.get("/health")
    async def health(self):
        try:
            self.engine.check_health()
        except RuntimeError as e:
            return _error_response(APIError(503, f"engine unhealthy: {e}", type="server_error"))
        return {"status": "ok"}

    @app.get("/openapi.json", include_in_schema=False)
    async def openapi(self, request: Request):
        self._docs_allowed(request)
        document = schema.for_deployment(schema.add_request_schemas(app.openapi()), self.config.model_name,
                                         self.limits.max_model_len, self.limits.max_sequences)
        root = request.scope.get("root_path", "")
        return JSONResponse({**document, "servers": [{"url": root}]} if root else document)  # as FastAPI's route

    @app.get("/docs", include_in_schema=False)
    async def swagger_docs(self, request: Request):
        self._docs_allowed(request)
        return get_swagger_ui_html(openapi_url=f"{request.scope.get('root_path', '')}/openapi.json",
                                   title="raystack - Swagger UI")

    @app.get("/redoc", include_in_schema=False)
    async def redoc_docs(self, request: Request):
        self._docs_allowed(request)
        return get_redoc_html(openapi_url=f"{request.scope.get('root_path', '')}/openapi.json",
                              title="raystack - ReDoc")

    def _docs_allowed(self, request: Request) -> None:
        if not self.config.docs:
            raise APIError(404, "Not Found (the docs routes are off: docs: false)")
        self._authorize(request)

    @app.get("/v1/models", responses={200: {"model": schema.ModelList}, **schema.error_responses(401)})
    async def models(self, request: Request):
        self._authorize(request)
        return models_body(self.config.model_name, self.created)

    @app.get("/v1/models/{model:path}",  # a path: model ids may hold slashes ("org/name")
             responses={200: {"model": schema.Model}, **schema.error_responses(401, 404)})
    async def model(self, request: Request, model: str):
        self._authorize(request)
        if model != self.config.model_name:
            raise model_not_found(model, self.config.model_name)
        return model_body(self.config.model_name, self.created)

    async def _read_body(self, request: Request) -> bytes:
        """The body, refused with a 413 as soon as it passes ``max_body_bytes`` (declared or streamed)."""
        limit = self.config.max_body_bytes
        too_large = APIError(413, f"the request body exceeds this server's limit of {limit} bytes",
                             code="request_too_large")
        declared = request.headers.get("content-length")
        if declared is not None and declared.strip().isdigit() and int(declared) > limit:
            raise too_large
        chunks, size = [], 0
        async for chunk in request.stream():
            size += len(chunk)
            if size > limit:
                raise too_large
            chunks.append(chunk)
        return b"".join(chunks)

    @app.post("/v1/completions", openapi_extra=schema.request_body(schema.CompletionRequest),
              responses={200: {"model": schema.CompletionResponse, "content": {"text/event-stream": {}}},
                         **schema.error_responses()})
    async def completions(self, request: Request):
        return await self._serve(request, chat=False)

    @app.post("/v1/chat/completions", openapi_extra=schema.request_body(schema.ChatCompletionRequest),
              responses={200: {"model": schema.ChatCompletionResponse, "content": {"text/event-stream": {}}},
                         **schema.error_responses()})
    async def chat_completions(self, request: Request):
        return await self._serve(request, chat=True)

    @app.post("/tokenize", openapi_extra=schema.request_body(schema.TokenizeRequest),
              responses={200: {"model": schema.TokenizeResponse}, **schema.error_responses()})
    async def tokenize(self, request: Request):
        try:
            self._authorize(request)
            text, strings = parse_tokenize(decode_body(await self._read_body(request)), self.config.model_name,
                                           self.limits, self.chat_template)
        except APIError as error:
            return _error_response(error)
        tokens = self.engine.tokenizer.encode(text)
        body = {"count": len(tokens), "max_model_len": self.engine.max_model_len, "tokens": tokens}
        if strings:
            body["token_strs"] = [token_string(t) for t in tokens]
        return body

    @app.post("/detokenize", openapi_extra=schema.request_body(schema.DetokenizeRequest),
              responses={200: {"model": schema.DetokenizeResponse}, **schema.error_responses()})
    async def detokenize(self, request: Request):
        try:
            self._authorize(request)
            tokens = parse_detokenize(decode_body(await self._read_body(request)), self.config.model_name,
                                      self.limits)
        except APIError as error:
            return _error_response(error)
        return {"prompt": self.engine.tokenizer.decode(tokens)}

    def _parse(self, body, chat: bool) -> CompletionRequest:
        if chat:
            return parse_chat(body, self.config.model_name, self.limits, self.chat_template, self.config.sampling,
                              stop=tuple(self.config.chat_stop))
        return parse_completion(body, self.config.model_name, self.limits, self.config.sampling)

    async def _serve(self, request: Request, chat: bool):
        tenant, grant, where = None, None, ""
        try:
            tenant = self._authorize(request)
            body = decode_body(await self._read_body(request))
            parsed = self._parse(body, chat)
            if tenant is not None:
                self._tenant_max_tokens(tenant, parsed, body)
            prompts = [self.engine.encode_prompt(p) for p in parsed.prompts]
            for tokens in prompts:
                if len(tokens) + parsed.params.max_tokens > self.engine.max_model_len:
                    raise context_error(len(tokens), parsed.params.max_tokens, self.engine.max_model_len)
            sequences = len(prompts) * parsed.best_of
            if self.engine.queue_depth + sequences > self.config.max_queued_sequences:
                raise APIError(503, f"this replica has {self.engine.queue_depth} sequences waiting for a slot (limit "
                                    f"{self.config.max_queued_sequences}); retry shortly", type="server_error",
                               code="overloaded")
            prompt_tokens = sum(len(t) for t in prompts)
            if tenant is not None and tenant.limits.requests_per_minute + tenant.limits.tokens_per_minute + \
                    tenant.limits.max_concurrent_sequences:
                answer, where = await self.quota.acquire(
                    tenant.name, tenant.limits, prompt_tokens + sequences * parsed.params.max_tokens, sequences,
                    ttl=self.config.request_timeout_s + 60)
                if not answer.allowed:  # the limiter counted it in the tenant's usage already
                    self._finish(None, None, "", "429", tenant_metrics=tenant)
                    return _error_response(_rate_limited(answer))
                grant = answer
        except APIError as error:
            self._finish(tenant, None, "", str(error.status))
            return _error_response(error)
        headers = grant.headers if grant is not None else None
        shape = _Shape(parsed, chat)
        jobs = [_Job(i * parsed.best_of + j, prompt, tokens, self._params_for(parsed, j),
                     tenant.rank if tenant else 1, tenant.name if tenant else "")
                for i, (prompt, tokens) in enumerate(zip(parsed.prompts, prompts)) for j in range(parsed.best_of)]
        if parsed.stream:  # counted in raystack_requests_total once it ends, by its outcome
            return StreamingResponse(self._stream(parsed, shape, jobs, tenant, grant, where),
                                     media_type="text/event-stream", headers=headers)
        tasks = [asyncio.ensure_future(self._complete(job, parsed)) for job in jobs]
        error, status = None, "499"  # the status counted if the client goes away first
        try:
            async with asyncio.timeout(self.config.request_timeout_s):
                results = await asyncio.gather(*tasks)
            status = "200"
        except TimeoutError:
            error = APIError(504, f"generation exceeded the request timeout of {self.config.request_timeout_s} s",
                             type="timeout")
        except SequenceFailed as failed:
            error = _sequence_error(failed)
        finally:
            for task in tasks:
                task.cancel()  # one choice failed or timed out: free the others' slots too
            generated = sum(task.result().generated for task in tasks
                            if task.done() and not task.cancelled() and task.exception() is None)
            self._finish(tenant, grant, where, str(error.status) if error else status, prompt_tokens, generated)
        if error is not None:
            return _error_response(error)
        choices = [shape.choice(result) for result in _best(results, parsed.n, parsed.best_of)]
        # Counted once per prompt, as prompt_tokens is: its first draw's (the others' share that prompt).
        cached = sum(result.cached for result in results[::parsed.best_of])
        body = shape.body(choices, prompt_tokens, generated, cached)
        return JSONResponse(body, headers=headers) if headers else body

    def _tenant_max_tokens(self, tenant: Tenant, parsed: CompletionRequest, body) -> None:
        """A tenant's ``max_tokens_per_request``: a request asking for more is a 400; one that left max_tokens out
        gets the limit when the server's default is larger."""
        limit = tenant.limits.max_tokens_per_request
        if not limit or parsed.params.max_tokens <= limit:
            return
        for name in ("max_tokens", "max_completion_tokens"):
            if isinstance(body, dict) and body.get(name) is not None:
                raise APIError(400, f"{name} is too large: {parsed.params.max_tokens}. This API key's tenant may ask "
                                    f"for at most {limit} tokens per request; lower {name}.", param=name)
        parsed.params = dataclasses.replace(parsed.params, max_tokens=limit)

    def _finish(self, tenant: Optional[Tenant], grant, where: str, status: str, prompt_tokens: int = 0,
                completion_tokens: int = 0, tenant_metrics: Optional[Tenant] = None) -> None:
        """Count a request that ended: Serve-wide and per tenant in Prometheus, and in the quota's usage (settling
        its grant, off the request's path)."""
        self.metrics.requests.inc(tags={"status": status})
        due = self.outcomes.outcome(status)
        if due is not None:
            self._background_call(self.outcomes.send(due))
        tenant_metrics = tenant_metrics or tenant
        if tenant_metrics is None:
            return
        tags = {"tenant": tenant_metrics.name}
        self.metrics.tenant_requests.inc(tags={**tags, "status": status})
        if status != "200":
            self.metrics.tenant_errors.inc(tags=tags)
        if prompt_tokens:
            self.metrics.tenant_prompt.inc(prompt_tokens, tags=tags)
        if completion_tokens:
            self.metrics.tenant_completion.inc(completion_tokens, tags=tags)
        if tenant is None:
            return
        ok = status == "200"
        if grant is not None:
            self._background_call(self.quota.settle(where, grant.lease, prompt_tokens, completion_tokens, ok))
        else:
            self._background_call(self.quota.record(tenant.name, ok, prompt_tokens, completion_tokens))

    def _background_call(self, call) -> None:
        """Run ``call`` off the request's path, in a fresh context: not a child of this request's Ray task, which Ray
        cancels (with its children) when the client goes away before the stream ends."""
        task = asyncio.get_running_loop().create_task(call, context=contextvars.Context())
        self._background.add(task)
        task.add_done_callback(self._background.discard)

    @staticmethod
    def _params_for(parsed: CompletionRequest, j: int) -> GenerationParams:
        # n samples of one prompt: distinct, still reproducible, and never an int64 overflow
        return dataclasses.replace(parsed.params, seed=choice_seed(parsed.params.seed, j))

    async def _echo(self, job: "_Job", parsed: CompletionRequest) -> Optional[_Piece]:
        """The echoed prompt as the first piece of a completion (with its scores when logprobs are asked)."""
        if not parsed.echo:
            return None
        text = job.prompt if isinstance(job.prompt, str) else self.engine.tokenizer.decode(job.tokens)
        piece = _Piece(job.index, text, None)
        if parsed.logprobs is not None:
            for scored in await self.engine.score(job.tokens, parsed.logprobs):
                piece.add(scored.token, scored.logprob, scored.top_logprobs)
            piece.echoed = len(piece.tokens)
        return piece

    async def _complete(self, job: "_Job", parsed: CompletionRequest) -> "_Piece":
        start = time.monotonic()
        result = await self._echo(job, parsed) or _Piece(job.index, "", None)
        result.generated, result.finish_reason = 0, "length"  # max_tokens 0 (echo only): nothing generated
        self._record_gauges()
        if job.params.max_tokens:
            async for event in self.engine.generate(job.tokens, job.params, job.priority, job.tenant, stream=False):
                if not result.generated:
                    result.cached = self._first_token(job, event, start)
                result.text += event.text
                result.add(event.token, event.logprob, event.top_logprobs)
                result.generated += 1
                result.cumulative += event.logprob or 0.0
                result.finish_reason = event.finish_reason
        if result.generated:
            self.metrics.tokens.inc(result.generated)  # Ray's counters refuse 0
        self._record_gauges()
        return result

    def _first_token(self, job: "_Job", event: TokenEvent, start: float) -> int:
        """Account a sequence's first token (time to it, its wait for a slot, its prompt tokens and how many of them
        the KV cache held); returns that last count."""
        self.metrics.ttft.observe(time.monotonic() - start)
        self.metrics.queue_wait.observe(event.queue_wait_s or 0.0)
        self.outcomes.ttft(time.monotonic() - start)
        cached = event.cached_tokens or 0
        self.metrics.prompt_tokens.inc(len(job.tokens))
        if cached:  # Ray's counters refuse 0
            self.metrics.cached_tokens.inc(cached)
        return cached

    async def _job_pieces(self, job: "_Job", parsed: CompletionRequest, usage: dict):
        """One choice's pieces, in lists of those ready together (``Engine.generate_ready``): the echoed prompt first
        when asked, then the text of every token the engine made since the stream last asked for more."""
        start = time.monotonic()
        echoed = await self._echo(job, parsed)
        if echoed is not None:
            yield [echoed]
        if not job.params.max_tokens:
            yield [_Piece(job.index, "", "length")]
            return
        first = True
        async with contextlib.aclosing(self.engine.generate_ready(job.tokens, job.params, job.priority,
                                                                  job.tenant)) as batches:
            async for events in batches:
                if first:
                    cached = self._first_token(job, events[0], start)
                    if job.index % parsed.best_of == 0:  # once per prompt, as prompt_tokens
                        usage["cached_tokens"] += cached
                    first = False
                usage["completion_tokens"] += len(events)  # into raystack_generated_tokens_total once per chunk
                pieces = []
                for event in events:
                    piece = _Piece(job.index, event.text, event.finish_reason)
                    if parsed.logprobs is not None:
                        piece.add(event.token, event.logprob, event.top_logprobs)
                    if event.text or event.finish_reason or piece.tokens:
                        pieces.append(piece)
                if pieces:
                    yield pieces

    async def _ready(self, parsed: CompletionRequest, jobs: list["_Job"], usage: dict):
        """The stream's pieces in lists of those ready together, ending with a ``SequenceFailed`` if a choice fails.
        One choice (the usual request) comes straight from the engine; several are pumped into one queue."""
        if len(jobs) == 1:
            try:
                async with contextlib.aclosing(self._job_pieces(jobs[0], parsed, usage)) as pieces:
                    async for ready in pieces:
                        yield ready
            except SequenceFailed as failed:
                yield failed
            except Exception as e:  # a bug: logged here, and the client still gets an error event, not a hang
                logger.exception("stream %s failed", parsed.request_id)
                yield SequenceFailed(repr(e))
            return
        queue: asyncio.Queue = asyncio.Queue()

        async def pump(job: _Job):
            async with contextlib.aclosing(self._job_pieces(job, parsed, usage)) as pieces:
                async for ready in pieces:
                    await queue.put(ready)

        async def run_all():
            pumps = [asyncio.ensure_future(pump(job)) for job in jobs]
            try:
                await asyncio.gather(*pumps)
            except SequenceFailed as failed:
                await queue.put(failed)
            except Exception as e:  # a bug: logged here, and the client still gets an error event, not a hang
                logger.exception("stream %s failed", parsed.request_id)
                await queue.put(SequenceFailed(repr(e)))
            finally:
                for p in pumps:
                    p.cancel()  # one choice failed: the others stop too
                await queue.put(None)

        task = asyncio.create_task(run_all())
        try:
            async for ready in _ready_pieces(queue):
                yield ready
        finally:
            task.cancel()  # a client that went away cancels its sequences; their slots free at the next step

    async def _stream(self, parsed: CompletionRequest, shape: "_Shape", jobs: list["_Job"],
                      tenant: Optional[Tenant] = None, grant=None, where: str = ""):
        """SSE: the chat role first, then chunks of ready text per choice, then usage (on request) and ``[DONE]``;
        the last text goes out with usage and ``[DONE]`` as one message."""
        usage = {"prompt_tokens": sum(len(job.tokens) for job in jobs[:: parsed.best_of]), "completion_tokens": 0,
                 "cached_tokens": 0}
        error, status = None, "499"  # the status counted if the client goes away before the end (nginx's code)
        counted = 0

        def count_tokens():  # a Ray counter increment per chunk, not per token (it was ~2% of a busy replica)
            nonlocal counted
            if usage["completion_tokens"] > counted:  # Ray's counters refuse 0
                self.metrics.tokens.inc(usage["completion_tokens"] - counted)
                counted = usage["completion_tokens"]

        accounted = False

        def account():  # once: before the last message when there is one, else when the client went away
            nonlocal accounted
            if not accounted:
                accounted = True
                count_tokens()
                self._finish(tenant, grant, where, status, usage["prompt_tokens"], usage["completion_tokens"])

        try:
            try:
                opening = shape.opening([job.index for job in jobs])
                if opening:
                    yield opening
                last, finished = "", 0
                async with asyncio.timeout(self.config.request_timeout_s), \
                        contextlib.aclosing(self._ready(parsed, jobs, usage)) as stream:
                    async for ready in stream:
                        if isinstance(ready, SequenceFailed):
                            error = _sequence_error(ready)
                            break
                        # Everything ready goes out together: one message through Serve's proxy, not one per token.
                        chunks = "".join(_sse(shape.chunk([choice])) for choice in _coalesce(ready))
                        count_tokens()
                        finished += sum(1 for piece in ready if piece.finish_reason)
                        if finished < len(jobs):
                            yield chunks
                        else:  # every choice has ended: these go out with the stream's tail, in one message
                            last = chunks
            except TimeoutError:
                error = APIError(504, f"generation exceeded the request timeout of {self.config.request_timeout_s} s",
                                 type="timeout")
            status = str(error.status) if error is not None else "200"
            if error is not None:  # OpenAI's mid-stream shape: an error event, then [DONE]
                tail = _sse(error.body())
            elif parsed.include_usage:
                tail = _sse(shape.chunk([], usage_body(usage["prompt_tokens"], usage["completion_tokens"],
                                                       usage["cached_tokens"])))
            else:
                tail = ""
            # The request is counted before its last message leaves: that bookkeeping runs before the client sees
            # the end, not beside the client's next request on the same cores.
            account()
            yield last + tail + "data: [DONE]\n\n"
        finally:
            account()


def deployment_options(config: ServeConfig) -> dict:
    return {
        "autoscaling_config": _autoscaling(config)[0],
        "max_ongoing_requests": config.max_ongoing_requests,
        "max_queued_requests": config.max_queued_requests,
        # Replacements (rollouts) start beside the old replicas, which keep serving until the new ones are up and
        # then drain for as long as a request may run.
        "max_surge_percent": 100,
        "graceful_shutdown_timeout_s": config.request_timeout_s,
        "max_constructor_retry_count": config.constructor_retries,
        "ray_actor_options": {"num_cpus": config.num_cpus, "num_gpus": config.num_gpus},
    }


def build_app(args: dict):
    """Serve application builder (``import_path: serve_apps.llm:app`` with ``args``)."""
    config = from_dict(ServeConfig, dict(args))
    if config.tenants_file and os.path.exists(os.path.expanduser(config.tenants_file)):
        read_tenants(os.path.expanduser(config.tenants_file))  # a bad file fails here, not in every replica
    logger.info("%s: %s", config.model_name, deployment_autoscaling_line(config))
    return LLMServer.options(**deployment_options(config)).bind(config)
