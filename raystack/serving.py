"""The Ray Serve application: an OpenAI-compatible HTTP API over the continuous-batching engine.

Routes: ``POST /v1/completions`` (``stream: true`` sends server-sent events ending with ``data: [DONE]``),
``GET /v1/models``, ``GET /health`` (never needs a key). One deployment, ``LLMServer``, is both the FastAPI ingress
and the engine's home, so a request costs one hop from Serve's proxy. It autoscales on ongoing requests
(``min_replicas``..``max_replicas``, ``target_ongoing_requests``); ``max_ongoing_requests`` and
``max_queued_requests`` bound the work in flight, and past them Serve answers 503 at once instead of queueing
without bound. ``check_health`` fails a replica whose engine loop died, so Serve replaces it.

API keys (optional): from the environment variable named by ``api_key_env`` (comma-separated) and/or the file
``api_key_file`` (one per line), read on each replica. When any is set, every route but ``/health`` needs
``Authorization: Bearer <key>``; keys are compared in constant time and never logged.

Every bad request gets a 4xx with an OpenAI-shaped error naming the parameter; nothing a client sends yields a 500.
"""


import asyncio
import dataclasses
import hmac
import json
import logging
import os
import time
from dataclasses import dataclass
from typing import Optional

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, StreamingResponse
from ray import serve
from starlette.exceptions import HTTPException as StarletteHTTPException

from raystack.config import from_dict
from raystack.engine import Engine, EngineConfig, GenerationParams
from raystack.openai_api import (APIError, CompletionRequest, chunk_body, completion_body, context_error,
                                 logprobs_object, models_body, parse_completion)

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
    api_key_env: str = "RAYSTACK_API_KEYS"
    api_key_file: Optional[str] = None
    num_cpus: float = 1.0
    num_gpus: float = 0.0
    """GPUs per replica (0 on CPU machines)."""
    threads: int = 0
    """torch threads per replica; 0 = ``num_cpus``."""
    min_replicas: int = 1
    max_replicas: int = 2
    target_ongoing_requests: float = 16.0
    max_ongoing_requests: int = 64
    max_queued_requests: int = 64

    def __post_init__(self):
        if not self.model:
            raise ValueError("model: the path or URI of a model artifact is required (e.g. --model ~/raystack_runs/"
                             "raystack-tiny/model)")
        if not 1 <= self.min_replicas <= self.max_replicas:
            raise ValueError(f"need 1 <= min_replicas <= max_replicas, got {self.min_replicas}, {self.max_replicas}")
        for name in ("max_batch_size", "max_ongoing_requests", "max_queued_requests"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.request_timeout_s <= 0 or self.target_ongoing_requests <= 0:
            raise ValueError("request_timeout_s and target_ongoing_requests must be > 0")
        if self.num_cpus < 0 or self.num_gpus < 0:
            raise ValueError("num_cpus and num_gpus must be >= 0")


def load_api_keys(config: ServeConfig) -> list[bytes]:
    keys = [k.strip() for k in os.environ.get(config.api_key_env, "").split(",") if k.strip()]
    if config.api_key_file:
        with open(os.path.expanduser(config.api_key_file)) as f:
            keys += [line.strip() for line in f if line.strip() and not line.startswith("#")]
    return [k.encode() for k in keys]


def key_matches(presented: bytes, keys: list[bytes]) -> bool:
    """Constant time in the presented key: every configured key is compared, with ``hmac.compare_digest``."""
    match = False
    for key in keys:
        match |= hmac.compare_digest(presented, key)
    return match


app = FastAPI(title="raystack", description="OpenAI-compatible completions over raystack's engine")


def _error_response(error: APIError) -> JSONResponse:
    return JSONResponse(error.body(), status_code=error.status)


@app.exception_handler(APIError)
async def _api_error(request: Request, error: APIError):
    return _error_response(error)


@app.exception_handler(StarletteHTTPException)
async def _http_error(request: Request, error: StarletteHTTPException):
    return _error_response(APIError(error.status_code, str(error.detail), type="invalid_request_error"))


@app.exception_handler(RequestValidationError)
async def _validation_error(request: Request, error: RequestValidationError):
    return _error_response(APIError(400, f"invalid request: {error.errors()}"))


class _Metrics:
    def __init__(self, model_name: str):
        from ray.util import metrics

        tags = {"model": model_name}
        self.requests = metrics.Counter("raystack_requests_total", "Completion requests by status code.",
                                        tag_keys=("model", "status"))
        self.requests.set_default_tags(tags)
        self.tokens = metrics.Counter("raystack_generated_tokens_total", "Generated tokens.", tag_keys=("model",))
        self.tokens.set_default_tags(tags)
        self.ttft = metrics.Histogram("raystack_time_to_first_token_seconds", "Time to first token.",
                                      boundaries=[0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2, 5, 10],
                                      tag_keys=("model",))
        self.ttft.set_default_tags(tags)
        self.queue = metrics.Gauge("raystack_queue_depth", "Requests waiting for a KV-cache slot.",
                                   tag_keys=("model",))
        self.queue.set_default_tags(tags)
        self.occupancy = metrics.Gauge("raystack_batch_occupancy", "Share of KV-cache slots in use.",
                                       tag_keys=("model",))
        self.occupancy.set_default_tags(tags)


@serve.deployment(name="LLMServer", health_check_period_s=5, health_check_timeout_s=30)
@serve.ingress(app)
class LLMServer:
    def __init__(self, config: ServeConfig):
        import torch

        self.config = config
        threads = config.threads or max(1, int(config.num_cpus))
        torch.set_num_threads(threads)
        self.engine = Engine.from_artifact(config.model, EngineConfig(
            max_batch_size=config.max_batch_size, max_model_len=config.max_model_len, threads=threads))
        self.keys = load_api_keys(config)
        self.metrics = _Metrics(config.model_name)
        self.created = int(time.time())
        logger.info("serving %s as %r: %d KV slots, %.1f MiB KV cache, API keys %s", config.model,
                    config.model_name, config.max_batch_size, self.engine.kv_cache_bytes / 2**20,
                    "on" if self.keys else "off")

    async def check_health(self):
        self.engine.check_health()

    def _authorize(self, request: Request) -> None:
        if not self.keys:
            return
        header = request.headers.get("authorization", "")
        scheme, _, token = header.partition(" ")
        if scheme.lower() != "bearer" or not key_matches(token.strip().encode(), self.keys):
            raise APIError(401, "Incorrect or missing API key: send 'Authorization: Bearer <key>'.",
                           type="invalid_request_error", code="invalid_api_key")

    def _record_gauges(self) -> None:
        self.metrics.queue.set(self.engine.queue_depth)
        self.metrics.occupancy.set(self.engine.active / self.config.max_batch_size)

    @app.get("/health")
    async def health(self):
        self.engine.check_health()
        return {"status": "ok"}

    @app.get("/v1/models")
    async def models(self, request: Request):
        self._authorize(request)
        return models_body(self.config.model_name, self.created)

    @app.post("/v1/completions")
    async def completions(self, request: Request):
        try:
            self._authorize(request)
            try:
                body = json.loads(await request.body())
            except (json.JSONDecodeError, UnicodeDecodeError) as e:
                raise APIError(400, f"the request body is not valid JSON: {e}") from None
            parsed = parse_completion(body, self.config.model_name, self.engine.tokenizer.vocab_size)
            prompts = [self.engine.encode_prompt(p) for p in parsed.prompts]
            for tokens in prompts:
                if len(tokens) + parsed.params.max_tokens > self.engine.max_model_len:
                    raise context_error(len(tokens), parsed.params.max_tokens, self.engine.max_model_len)
        except APIError as error:
            self.metrics.requests.inc(tags={"status": str(error.status)})
            return _error_response(error)
        jobs = [(i * parsed.n + j, prompt, tokens, self._params_for(parsed, j))
                for i, (prompt, tokens) in enumerate(zip(parsed.prompts, prompts)) for j in range(parsed.n)]
        if parsed.stream:
            self.metrics.requests.inc(tags={"status": "200"})
            return StreamingResponse(self._stream(parsed, jobs), media_type="text/event-stream")
        try:
            async with asyncio.timeout(self.config.request_timeout_s):
                results = await asyncio.gather(*(self._complete(job, parsed) for job in jobs))
        except TimeoutError:
            self.metrics.requests.inc(tags={"status": "504"})
            return _error_response(APIError(504, f"generation exceeded the request timeout of "
                                                 f"{self.config.request_timeout_s} s", type="timeout"))
        self.metrics.requests.inc(tags={"status": "200"})
        choices = [r[0] for r in results]
        prompt_tokens = sum(len(t) for t in prompts)
        return completion_body(parsed, choices, prompt_tokens, sum(r[1] for r in results))

    @staticmethod
    def _params_for(parsed: CompletionRequest, j: int) -> GenerationParams:
        params = parsed.params
        if params.seed is None or j == 0:
            return params
        return dataclasses.replace(params, seed=params.seed + j)  # n samples of one prompt: distinct, still reproducible

    async def _complete(self, job, parsed: CompletionRequest):
        index, prompt, tokens, params = job
        start = time.monotonic()
        text, out_tokens, logprobs, finish = [], [], [], None
        self._record_gauges()
        async for event in self.engine.generate(tokens, params):
            if not out_tokens:
                self.metrics.ttft.observe(time.monotonic() - start)
            text.append(event.text)
            out_tokens.append(event.token)
            logprobs.append(event.logprob)
            finish = event.finish_reason
        self.metrics.tokens.inc(len(out_tokens))
        self._record_gauges()
        prefix = prompt if parsed.echo and isinstance(prompt, str) else ""
        choice = {"text": prefix + "".join(text), "index": index, "finish_reason": finish,
                  "logprobs": logprobs_object(out_tokens, logprobs, 0) if parsed.logprobs is not None else None}
        return choice, len(out_tokens)

    async def _stream(self, parsed: CompletionRequest, jobs):
        """SSE: one chunk per released piece of text per choice, then usage (on request) and ``[DONE]``."""
        queue: asyncio.Queue = asyncio.Queue()
        usage = {"prompt_tokens": sum(len(t) for _, _, t, _ in jobs[:: parsed.n]), "completion_tokens": 0}

        async def pump(job):
            index, prompt, tokens, params = job
            start, first = time.monotonic(), True
            if parsed.echo and isinstance(prompt, str):
                await queue.put({"text": prompt, "index": index, "logprobs": None, "finish_reason": None})
            async for event in self.engine.generate(tokens, params):
                if first:
                    self.metrics.ttft.observe(time.monotonic() - start)
                    first = False
                usage["completion_tokens"] += 1
                self.metrics.tokens.inc()
                lp = (logprobs_object([event.token], [event.logprob], 0) if parsed.logprobs is not None else None)
                if event.text or event.finish_reason or lp:
                    await queue.put({"text": event.text, "index": index, "logprobs": lp,
                                     "finish_reason": event.finish_reason})

        async def run_all():
            try:
                await asyncio.gather(*(pump(job) for job in jobs))
            finally:
                await queue.put(None)

        task = asyncio.create_task(run_all())
        try:
            async with asyncio.timeout(self.config.request_timeout_s):
                while (choice := await queue.get()) is not None:
                    yield f"data: {json.dumps(chunk_body(parsed, [choice]))}\n\n"
        except TimeoutError:
            error = APIError(504, f"generation exceeded the request timeout of {self.config.request_timeout_s} s",
                             type="timeout")
            yield f"data: {json.dumps(error.body())}\n\n"
        finally:
            task.cancel()  # a client that went away cancels its sequences; their slots free at the next step
        if parsed.include_usage:
            usage["total_tokens"] = usage["prompt_tokens"] + usage["completion_tokens"]
            yield f"data: {json.dumps(chunk_body(parsed, [], usage))}\n\n"
        yield "data: [DONE]\n\n"


def deployment_options(config: ServeConfig) -> dict:
    return {
        "autoscaling_config": {"min_replicas": config.min_replicas, "max_replicas": config.max_replicas,
                               "target_ongoing_requests": config.target_ongoing_requests},
        "max_ongoing_requests": config.max_ongoing_requests,
        "max_queued_requests": config.max_queued_requests,
        "ray_actor_options": {"num_cpus": config.num_cpus, "num_gpus": config.num_gpus},
    }


def build_app(args: dict):
    """Serve application builder (``import_path: serve_apps.llm:app`` with ``args``)."""
    config = from_dict(ServeConfig, dict(args))
    return LLMServer.options(**deployment_options(config)).bind(config)
