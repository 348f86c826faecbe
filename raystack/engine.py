"""Continuous-batching generation over a fixed-slot KV cache (plain PyTorch + asyncio; no Ray).

Contract:
- ``Engine(model, tokenizer, EngineConfig)`` preallocates a KV cache of ``max_batch_size`` slots x ``max_model_len``
  positions: memory is fixed and known up front (``Engine.kv_cache_bytes``).
- ``engine.generate(prompt_tokens, GenerationParams)`` is an async iterator of ``TokenEvent``s, one per generated
  token (``stream=False``: the first at once, the rest together at the end), the last carrying ``finish_reason``
  (``stop``: end-of-text or a stop string; ``length``: ``max_tokens`` or the context). Text is streamed in whole
  UTF-8 characters, and text that could still become a stop string is held back until it cannot; a stop string
  itself is never emitted.
- One scheduler task per engine decides what runs: at every step it admits waiting requests into free slots, and
  the model runner (``raystack.runner``: device, weights, KV cache) prefills them, runs one batched decode forward
  over all active slots, and samples every row with its own parameters through ``raystack.sampling`` (seeded per
  request, keyed by the token's index in the completion), so a request's tokens do not depend on what else is in
  the batch. On CUDA the decode forward is replayed from CUDA graphs (``raystack.decode_graphs``,
  ``EngineConfig.cuda_graphs``). The scheduler then turns each token into text: stop strings (``_find_stop``) and
  what may be released while one could still form (``_releasable``) are pure functions. Where the forward passes run
  (``Engine.compute_inline``): on CUDA, or a CPU with one torch thread, in a worker thread, so the event loop serves
  while the model computes; on a CPU with
  more torch threads, on the event loop's own thread between its turns (PyTorch's OpenMP pool runs at full speed only
  while one thread of the process uses it: a second thread's pool makes libgomp throttle both, which measured 2-3x
  slower per forward on 2 cores); there too wherever ``Engine.inline`` is set (an engine alone in its process).
- Log-probabilities (``GenerationParams.logprobs`` / ``top_logprobs``) are the model's own: the log-softmax of its
  logits before the logit bias, penalties, temperature and filters. ``engine.score(prompt_tokens, top)`` gives the
  same for every prompt token (what ``echo`` with ``logprobs`` returns, and how evaluation harnesses score text).
- Closing the iterator (client gone, timeout: ``asyncio`` cancellation) frees the request's slot at the next step.
- ``engine.generate_ready(...)`` is ``generate`` in lists: each time the caller asks, every event made since it last
  asked (a streamed HTTP completion reads it, so a slow client takes several tokens per wake-up).
- ``engine.submit(prompt_tokens, params, sink)`` is ``generate`` without an iterator: each event goes to ``sink`` as
  the step makes it, ``after_step`` runs once a step's events are all out, and the returned function cancels
  (``raystack.engine_process`` forwards a step's tokens in one message this way).
- Who gets a slot (``generate(..., priority=, tenant=)``): a higher priority first; within a priority, the tenant
  holding the fewest slots; then first come, first served (all of it plain FIFO when every request has the same
  tenant and priority). When no slot is free, a waiting sequence preempts a running one of a lower priority, or of
  its own priority whose tenant holds more than its share (``max_batch_size`` / tenants with work) while its own
  holds less: the preempted sequence goes back to waiting and is recomputed from its prompt and the tokens it has
  generated when readmitted (vLLM's recompute preemption), so its output does not change. A high-priority request
  waits one step for a slot, however many low-priority ones fill the engine.
- Prefix caching (``EngineConfig.prefix_caching``, on by default): a free slot keeps the keys and values of the
  sequence that held it last, and a new sequence is given a free slot holding the longest start of its prompt (to
  within ``PREFIX_MIN`` tokens), whose prefill then computes only the rest: a chat's next turn, whose prompt repeats
  the conversation so far, prefills its new message, and requests that share a long instruction or few-shot preamble
  prefill it once per slot. A sequence takes its own conversation's slot, else an empty one rather than another
  conversation's, and once none is empty, the one freed longest ago (``Engine._reuse``): the conversations that spoke
  last keep their caches. Logits from a cached prefix equal a full prefill's within float tolerance (the same
  arithmetic in another order), so a seeded completion can differ in a near-tie, as vLLM's can. A slot's prefix
  serves only the tenant whose sequence left it: a tenant cannot learn another's prompts from its own time to first
  token or ``cached_tokens`` (what vLLM's ``cache_salt`` is for). ``stats`` counts ``prefilled_tokens`` and
  ``cached_tokens``. Where a decode over rows spread across the slots costs more than over packed ones (CUDA graphs,
  the PyTorch ops: ``Engine.pack_slots``), the picked slot's contents move into the lowest free slot, and where a
  sequence ends among running ones the highest running one moves down into its slot, so the running sequences stay
  packed at the front.
- One sequence never takes down another: a step that fails is retried row by row (each prefill alone, the decode
  rows one at a time, sampling one row at a time), and only the rows that fail alone end, with ``SequenceFailed``
  (``client_error`` when the op refused the request's own parameters). The rest of the batch carries on.
  ``check_health`` raises while the engine is really broken (its loop died, or every row of the last step failed)
  and passes again after the next step that succeeds; a dead loop restarts on the next request.
"""

from __future__ import annotations

import asyncio
import codecs
import collections
import concurrent.futures
import contextlib
import heapq
import itertools
import logging
import secrets
import time
from dataclasses import dataclass, field
from typing import AsyncIterator, Optional

import torch

from raystack.checkpoint import load_artifact
from raystack.model import GPT
from raystack.runner import ModelRunner
from raystack.tokenizer import ByteTokenizer

logger = logging.getLogger(__name__)

MAX_TOP_LOGPROBS = 20
"""Most alternatives per token a request may ask for (vLLM's default limit)."""

PREFIX_MIN = 16
"""Fewest cached tokens prefix caching starts a prefill from, and the tolerance of ``Engine._reuse``: a slot where a
sequence would overwrite fewer tokens than this beyond those it reuses counts as its own, and one holding within this
many of the best serves it about as well. A prompt with fewer cached tokens is prefilled whole, so its logits are
bit for bit those without prefix caching."""


@dataclass
class EngineConfig:
    max_batch_size: int = 16
    """Sequences decoded together (KV-cache slots)."""
    max_model_len: int = 0
    """Longest prompt + completion in tokens; 0 = the model's max_seq_len (cannot exceed it)."""
    device: str = "auto"
    """``auto`` (CUDA when present), ``cpu`` or ``cuda``."""
    dtype: str = "auto"
    """``auto`` (bf16 on CUDA, float32 on CPU), ``float32``, ``bfloat16``."""
    threads: int = 0
    """torch intra-op threads for the forward passes; 0 = leave torch's default."""
    quantize: str = "none"
    """``none``, or ``int8``: the transformer's linear layers with int8 weights (PyTorch's dynamic quantization,
    CPU only; the tied output embedding stays float32). Faster where matrix work dominates (``small`` and up), not
    at tiny shapes; benchmarks/serve_vs_hf.py --int8 prints both speed and held-out loss."""
    cuda_graphs: bool = True
    """On CUDA, run the decode step as CUDA graphs captured at start-up, one per batch-size bucket
    (``raystack.decode_graphs``); False runs it eagerly (vLLM's ``enforce_eager``). No effect on CPU."""
    prefix_caching: bool = True
    """Keep a finished sequence's keys and values in its slot, and give a new sequence whose prompt starts with
    those tokens that slot, so the prefill computes only the rest (vLLM's ``enable_prefix_caching``; module doc)."""

    def __post_init__(self):
        if self.max_batch_size < 1:
            raise ValueError(f"max_batch_size must be >= 1, got {self.max_batch_size}")
        if self.max_model_len < 0:
            raise ValueError(f"max_model_len must be >= 0, got {self.max_model_len}")
        if self.device not in ("auto", "cpu", "cuda"):
            raise ValueError(f"device must be auto, cpu or cuda, got {self.device!r}")
        if self.dtype not in ("auto", "float32", "bfloat16"):
            raise ValueError(f"dtype must be auto, float32 or bfloat16, got {self.dtype!r}")
        check_quantize(self.quantize)
        check_threads(self.threads)


@dataclass
class GenerationParams:
    """One sequence's sampling parameters, and the ``sampling`` section of the serve and batch specs (the defaults
    for what a request or row leaves out). Parsed and range-checked in one place,
    ``raystack.openai_api.generation_params``; what each filter does is ``raystack.sampling``'s contract."""

    max_tokens: int = 16
    """Tokens to generate at most."""
    temperature: float = 1.0
    """In [0, 2]; 0 = greedy."""
    top_p: float = 1.0
    """Nucleus: keep the smallest set of tokens whose probability reaches top_p, in (0, 1]."""
    top_k: int = 0
    """Keep the k most likely tokens; 0 or -1 = all."""
    min_p: float = 0.0
    """Drop tokens less likely than min_p times the most likely one, in [0, 1]."""
    seed: Optional[int] = None
    """Seed of the draw (the n choices of one prompt use seed + j); null = a fresh random seed each time."""
    stop: list[str] = field(default_factory=list)
    """Up to 4 strings that end the completion (not included in it)."""
    presence_penalty: float = 0.0
    """In [-2, 2], subtracted once from the logit of every token already generated."""
    frequency_penalty: float = 0.0
    """In [-2, 2], subtracted per occurrence of a token already generated."""
    repetition_penalty: float = 1.0
    """In [0.01, 2]; > 1 makes tokens of the prompt and completion less likely (CTRL's rule)."""
    logprobs: bool = False
    """Return each generated token's log-probability under the model's own distribution: the log-softmax of its
    logits before the logit bias, penalties, temperature and filters (vLLM's default, ``raw_logprobs``), so a score
    does not depend on how the token was drawn."""
    top_logprobs: int = 0
    """With ``logprobs``: also the ``top_logprobs`` most likely tokens at each step (0 to ``MAX_TOP_LOGPROBS``)."""
    logit_bias: Optional[dict[int, float]] = None
    """Token id -> bias added to its logit before everything else (OpenAI's ``logit_bias``, in [-100, 100])."""
    ignore_eos: bool = False
    """Keep generating after the end-of-text token (vLLM's extension; benchmarks use it for a fixed length)."""

    @property
    def uses_penalties(self) -> bool:
        """Whether sampling needs the counts of generated tokens."""
        return bool(self.presence_penalty or self.frequency_penalty or self.repetition_penalty != 1.0)


MAX_THREADS = 1024
"""Most torch threads a spec may ask for (a typo of a huge number would otherwise start that many OpenMP threads)."""


def check_threads(value: int) -> None:
    """The one check of a ``threads`` setting (engine, serve and batch specs)."""
    if not 0 <= value <= MAX_THREADS:
        raise ValueError(f"threads must be 0 (automatic) to {MAX_THREADS}, got {value}")


def check_quantize(value: str) -> None:
    """The one check of a ``quantize`` setting (engine, serve and batch specs)."""
    if value not in ("none", "int8"):
        raise ValueError(f"quantize must be none or int8, got {value!r}")


class SequenceFailed(RuntimeError):
    """One sequence could not be generated; the engine and every other sequence carry on."""

    def __init__(self, message: str, client_error: bool = False):
        super().__init__(message)
        self.client_error = client_error
        """True when the sequence's own parameters were refused (a 4xx, not a server fault)."""


@dataclass
class TokenEvent:
    token: int
    text: str
    """Text released by this token (may be empty while a stop string or a UTF-8 character is pending)."""
    logprob: Optional[float]
    finish_reason: Optional[str] = None
    completion_tokens: int = 0
    top_logprobs: Optional[list[tuple[int, float]]] = None
    """With ``top_logprobs``: the most likely (token, log-probability) pairs at this step, most likely first."""
    queue_wait_s: Optional[float] = None
    """On the first token only: seconds the sequence waited for a KV slot."""
    cached_tokens: Optional[int] = None
    """On the first token only: prompt tokens whose keys and values its slot held already (prefix caching)."""


@dataclass
class PromptLogprob:
    """One prompt token's log-probability given the tokens before it (None for the first: nothing precedes it)."""

    token: int
    logprob: Optional[float]
    top_logprobs: Optional[list[tuple[int, float]]] = None


class _Events:
    """A sequence's events, put by the scheduler and awaited by ``generate``, both on the event loop's thread: what
    ``asyncio.Queue`` does for one producer and one consumer, without its per-call bookkeeping (a put and a get per
    generated token). ``stream=False``: the consumer is woken for the first event and the last (or an error) only;
    what comes between waits in the deque and is taken in one go at the end (one wake-up per completion, not per
    step)."""

    __slots__ = ("_items", "_waiter", "_stream", "_first")

    def __init__(self, stream: bool = True):
        self._items: collections.deque = collections.deque()
        self._waiter: Optional[asyncio.Future] = None
        self._stream = stream
        self._first = True

    def put_nowait(self, item) -> None:
        self._items.append(item)
        first, self._first = self._first, False
        if not (self._stream or first or isinstance(item, BaseException) or item.finish_reason is not None):
            return
        waiter, self._waiter = self._waiter, None
        if waiter is not None and not waiter.done():  # done: the consumer was cancelled while it waited
            waiter.set_result(None)

    async def get_ready(self) -> list:
        """Every event put and not yet taken, in order; waits for one when there is none. An error put behind
        events is raised by the call after the one that takes them."""
        while not self._items:
            self._waiter = asyncio.get_running_loop().create_future()
            await self._waiter
        items = self._items
        if isinstance(items[0], BaseException):
            raise items.popleft()
        ready = []
        while items and not isinstance(items[0], BaseException):
            ready.append(items.popleft())
        return ready


class _Sequence:
    _ids = itertools.count()

    def __init__(self, prompt: list[int], params: GenerationParams, seed: int, vocab_size: int,
                 priority: int = 0, tenant: str = "", sink=None):
        self.id = next(self._ids)
        self.prompt = prompt
        self.params = params
        self.seed = seed
        self.priority, self.tenant = priority, tenant
        self.enqueued = time.monotonic()
        self.queue_wait: Optional[float] = None  # set when first admitted
        self.generated: list[int] = []
        self.slot: Optional[int] = None
        self.cached = 0  # tokens of ``context`` its slot held when it was admitted (``Engine._take_slot``)
        self.put = sink  # each TokenEvent, or the SequenceFailed that ends the sequence
        self.cancelled = False
        self.finished = False
        self.counts: Optional[torch.Tensor] = None
        self.bias: Optional[torch.Tensor] = None  # the logit bias as a dense row, built once
        if params.logit_bias:
            self.bias = torch.zeros(vocab_size)
            for token, value in params.logit_bias.items():
                self.bias[token] = value
        self.decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
        self.text = ""  # decoded completion so far
        self.emitted = 0  # characters of self.text already released

    @property
    def position(self) -> int:
        """Cache position of the next token to feed."""
        return len(self.prompt) + len(self.generated) - 1

    @property
    def context(self) -> list[int]:
        """What a prefill feeds: the prompt, and what was generated before a preemption."""
        return self.prompt + self.generated if self.generated else self.prompt

    def written(self) -> list[int]:
        """The tokens whose keys and values are in its slot at positions 0..position-1 (all but the last sampled
        token, which was never fed; after a cancel mid-step, perhaps one fewer than are there)."""
        return (self.prompt + self.generated)[:max(0, self.position)]


class Engine:
    def __init__(self, model: GPT, tokenizer: ByteTokenizer, config: EngineConfig | None = None):
        self.config = config or EngineConfig()
        limit = model.config.max_seq_len
        self.max_model_len = self.config.max_model_len or limit
        if self.max_model_len > limit:
            raise ValueError(f"max_model_len {self.max_model_len} exceeds the model's max_seq_len {limit}")
        self.runner = ModelRunner(model, self.config)
        """Runs each step on the model (``raystack.runner``): device, weights, KV cache, sampling."""
        self.tokenizer = tokenizer
        self._free_slots = list(range(self.config.max_batch_size))  # a heap: the lowest free slot first, so the
        # running sequences stay packed at the front and a decode step reads their caches in place
        # (``ModelRunner.decode``)
        self._slot_tokens: list[list[int]] = [[] for _ in self._free_slots]
        """Per free slot, the tokens whose keys and values it holds from position 0 (prefix caching)."""
        self._slot_tenant: list[str] = ["" for _ in self._free_slots]
        """Per free slot, the tenant whose sequence held it last: only that tenant's sequences reuse what it holds."""
        self._slot_freed: list[int] = [0 for _ in self._free_slots]
        """Per free slot, when it was freed holding tokens (a count of such frees): the least recent is reused first."""
        self._frees = itertools.count(1)
        self._waiting: collections.deque[_Sequence] = collections.deque()
        self._running: dict[int, _Sequence] = {}
        self._wakeup: Optional[asyncio.Event] = None
        self._loop_task: Optional[asyncio.Task] = None
        self._executor = concurrent.futures.ThreadPoolExecutor(max_workers=1, thread_name_prefix="engine-step")
        self.error: Optional[BaseException] = None
        """Set while the engine is broken (loop died, or a whole step failed); cleared by a step that succeeds."""
        self.after_step = None
        """Called (no arguments) on the event loop's thread after each step has delivered its tokens (``submit``)."""
        self.pack_slots = self.runner.spread_rows_cost
        """Keep the running sequences in the lowest slots: where prefix caching picks another free slot, the picked
        slot's cached prefix moves into the lowest free one, and what that one held into the picked one
        (``ModelRunner.swap_slots``); where a sequence ended among running ones and no admission took its slot, the
        highest running sequence moves down into it, and what the ended one left there up (``_compact``). What stays
        cached is as without. On by default where a decode step over spread rows costs more than over packed ones
        (``ModelRunner.spread_rows_cost``: CUDA graphs, which run slots 0 up to the highest running one; the PyTorch
        ops, which gather spread rows); under least-recently-used reuse a chat server's rows spread over the slots
        (``benchmarks/decode_graphs.py --parts chats``)."""
        self.inline = False
        """Run the steps on the event loop's thread whatever the device and threads: for a process whose event loop
        has nothing else to do meanwhile (``raystack.engine_process``), which then pays no thread hand-off per step."""
        self.stats = {"steps": 0, "generated_tokens": 0, "requests": 0, "failed_sequences": 0, "preempted": 0,
                      "prefilled_tokens": 0, "cached_tokens": 0, "moved_rows": 0}

    @classmethod
    def from_artifact(cls, uri: str, config: EngineConfig | None = None) -> "Engine":
        model, tokenizer = load_artifact(uri)
        return cls(model, tokenizer, config)

    # -- public ------------------------------------------------------------------------------------------------

    @property
    def kv_cache_bytes(self) -> int:
        return self.runner.cache.nbytes

    @property
    def queue_depth(self) -> int:
        return len(self._waiting)

    @property
    def active(self) -> int:
        return len(self._running)

    def check_health(self) -> None:
        if self.error is not None:
            raise RuntimeError(f"engine unhealthy: {self.error!r}")
        if self._loop_task is not None and self._loop_task.done() and not self._loop_task.cancelled():
            raise RuntimeError(f"engine loop died: {self._loop_task.exception()!r}")

    def encode_prompt(self, prompt: str | list[int]) -> list[int]:
        tokens = self.tokenizer.encode(prompt) if isinstance(prompt, str) else list(prompt)
        return tokens or [self.tokenizer.eot_id]  # an empty prompt starts a new document

    def generate(self, prompt_tokens: list[int], params: GenerationParams, priority: int = 0,
                 tenant: str = "", stream: bool = True) -> AsyncIterator[TokenEvent]:
        """Stream the completion of ``prompt_tokens``; the caller validated lengths (``check_request``).
        ``priority`` (higher first) and ``tenant`` decide who gets a slot when they are scarce (module doc).
        ``stream=False`` (a caller that wants the whole completion): the same events, but after the first they are
        handed over together when the sequence ends, so the caller wakes twice, not once per token."""
        return flatten_ready(self.generate_ready(prompt_tokens, params, priority, tenant, stream))

    async def generate_ready(self, prompt_tokens: list[int], params: GenerationParams, priority: int = 0,
                             tenant: str = "", stream: bool = True) -> AsyncIterator[list[TokenEvent]]:
        """``generate``'s events in lists: each time the caller asks, every event made since it last asked (one at
        least), in order. A caller slower than the engine (a stream whose client reads slowly) takes several tokens
        in one go, without a timer and without a wake-up per token."""
        events = _Events(stream)
        cancel = self.submit(prompt_tokens, params, events.put_nowait, priority, tenant)
        try:
            while True:
                ready = await events.get_ready()
                yield ready
                if ready[-1].finish_reason is not None:
                    return
        finally:
            cancel()

    def submit(self, prompt_tokens: list[int], params: GenerationParams, sink, priority: int = 0,
               tenant: str = ""):
        """``generate`` without an iterator (for a caller that forwards a step's tokens together, like
        ``raystack.engine_process``): ``sink(item)`` is called on the event loop's thread with each ``TokenEvent``
        (the last one carries ``finish_reason``) or the ``SequenceFailed`` that ends the sequence, as the steps make
        them, and ``after_step`` (when set) once every step's items are out. Returns a function that cancels the
        sequence (its slot frees at the next step); calling it after the end does nothing."""
        self.check_request(len(prompt_tokens), params.max_tokens)
        seed = params.seed if params.seed is not None else secrets.randbits(63)
        seq = _Sequence(list(prompt_tokens), params, seed, self.tokenizer.vocab_size, priority, tenant, sink)
        self._ensure_loop()
        self._waiting.append(seq)
        self.stats["requests"] += 1
        self._wakeup.set()

        def cancel() -> None:
            if not seq.finished:
                seq.cancelled = True  # the scheduler frees its slot at the next step
                if self._wakeup is not None:
                    self._wakeup.set()

        return cancel

    async def score(self, prompt_tokens: list[int], top_logprobs: int = 0) -> list[PromptLogprob]:
        """The log-probability of each prompt token given those before it (the model's own distribution, as
        ``GenerationParams.logprobs``), with the ``top_logprobs`` most likely alternatives: one forward over the
        prompt where the steps run, between two of them, outside the KV cache."""
        if not 1 <= len(prompt_tokens) <= self.max_model_len:
            raise ValueError(f"a scored prompt needs 1 to {self.max_model_len} tokens, got {len(prompt_tokens)}")
        rows = await self._compute(self.runner.score, list(prompt_tokens), top_logprobs)
        return [PromptLogprob(*row) for row in rows]

    @property
    def compute_inline(self) -> bool:
        """Whether the forward passes run on the event loop's thread (a CPU engine with more than one torch thread,
        or ``inline`` set) rather than on the engine's worker thread (module doc)."""
        return self.inline or (self.runner.device.type == "cpu" and torch.get_num_threads() > 1)

    async def _compute(self, fn, *args):
        if self.compute_inline:
            await asyncio.sleep(0)  # the consumers of the last step's tokens run first
            return fn(*args)
        return await asyncio.get_running_loop().run_in_executor(self._executor, fn, *args)

    def check_request(self, prompt_len: int, max_tokens: int) -> None:
        if max_tokens < 1:
            raise ValueError("max_tokens must be >= 1")
        if prompt_len + max_tokens > self.max_model_len:
            raise ValueError(
                f"prompt ({prompt_len} tokens) + max_tokens ({max_tokens}) exceeds the model's context of "
                f"{self.max_model_len} tokens")

    async def shutdown(self) -> None:
        if self._loop_task is not None:
            self._loop_task.cancel()
            try:
                await self._loop_task
            except (asyncio.CancelledError, Exception):
                pass
        self._executor.shutdown(wait=False)

    # -- scheduler -------------------------------------------------------------------------------------------

    def _ensure_loop(self) -> None:
        if self._loop_task is None or self._loop_task.done():
            self._wakeup = asyncio.Event()
            self._loop_task = asyncio.get_running_loop().create_task(self._run())

    async def _run(self) -> None:
        while True:
            try:
                await self._schedule_once()
            except (asyncio.CancelledError, GeneratorExit):  # shutdown, or the event loop closing under us
                raise
            except Exception as e:  # a bug in the bookkeeping: fail what is in flight, keep the loop alive
                logger.exception("engine step failed; failing the sequences in flight")
                self.error = e
                for seq in [*self._running.values(), *self._waiting]:
                    self._fail(seq, SequenceFailed(f"generation failed: {e!r}"))
                self._waiting.clear()
                if self.after_step is not None:
                    self.after_step()

    async def _schedule_once(self) -> None:
        self._drop_cancelled()
        if not self._running and not self._waiting:
            self._wakeup.clear()
            await self._wakeup.wait()
            return
        prefills = self._admit()
        if self.pack_slots:
            self._compact(prefills)
        decodes = sorted((s for s in self._running.values() if s not in prefills), key=lambda s: s.slot)
        results, failures = await self._compute(self.runner.step, prefills, decodes)
        self.stats["steps"] += 1
        failures = [(seq, SequenceFailed(message, client_error)) for seq, message, client_error in failures]
        for seq, error in failures:
            self._fail(seq, error)
        for seq, token, logprobs in results:
            try:
                self._advance(seq, token, logprobs)
            except Exception as e:
                logger.exception("sequence %d failed after sampling", seq.id)
                self._fail(seq, SequenceFailed(f"generation failed: {e!r}"))
        if results:
            self.error = None
        elif failures and not any(error.client_error for _, error in failures):
            self.error = failures[0][1]  # nothing ran: the engine itself is broken until a step succeeds
        if self.after_step is not None:
            self.after_step()

    def _admit(self) -> list[_Sequence]:
        """Move waiting sequences into slots, in the order of ``_next``, preempting where ``_victim`` allows."""
        admitted: list[_Sequence] = []
        classes = {(s.priority, s.tenant) for s in itertools.chain(self._waiting, self._running.values())}
        if len(classes) <= 1:  # one tenant, one priority: first come, first served, never a preemption
            while self._waiting and self._free_slots:
                seq = self._waiting.popleft()
                self._admitted(seq)
                seq.slot = self._take_slot(seq)
                self._running[seq.id] = seq
                admitted.append(seq)
            return admitted
        held = collections.Counter(s.tenant for s in self._running.values())
        while self._waiting:
            seq = self._next(held)
            if not self._free_slots:
                victim = self._victim(seq, held, admitted)
                if victim is None:
                    break
                self._preempt(victim, held)
            self._waiting.remove(seq)
            self._admitted(seq)
            seq.slot = self._take_slot(seq)
            self._running[seq.id] = seq
            held[seq.tenant] += 1
            admitted.append(seq)
        return admitted

    def _take_slot(self, seq: _Sequence) -> int:
        """A free slot for ``seq`` (there is one): the lowest, or with ``prefix_caching`` the one ``_reuse`` picks
        (with ``pack_slots``, the lowest with that one's contents moved in). Sets ``seq.cached``, the tokens of its
        ``context`` the slot holds from its tenant's last sequence there (0 below ``PREFIX_MIN``): at most all but the
        last, which the prefill feeds for the logits."""
        slot, cached = self._free_slots[0], 0
        if self.config.prefix_caching:
            context = seq.context
            held = {s: _common_prefix(self._slot_tokens[s], context, len(context) - 1)
                    if self._slot_tenant[s] == seq.tenant else 0 for s in self._free_slots}
            slot = self._reuse(held, len(context) - 1)
            cached = held[slot] if held[slot] >= PREFIX_MIN else 0
            lowest = self._free_slots[0]
            if self.pack_slots and slot != lowest:  # the picked slot's prefix into the lowest, and back
                self._swap_slots(slot, lowest, cached)
                slot = lowest
        if slot == self._free_slots[0]:
            heapq.heappop(self._free_slots)
        else:
            self._free_slots.remove(slot)
            heapq.heapify(self._free_slots)
        self._slot_tokens[slot] = []  # overwritten from ``cached`` on; what it holds is recorded at its release
        seq.cached = cached
        self.stats["cached_tokens"] += cached
        self.stats["prefilled_tokens"] += len(seq.context) - cached
        return slot

    def _compact(self, prefills: list[_Sequence]) -> None:
        """With ``pack_slots``, move the highest running sequences down into the free slots below them: where a
        sequence ended among running ones and no admission filled its slot, the rows stay packed at the front. What the
        free slot held for prefix caching moves up into the slot left (``_swap_slots``): nothing cached is lost."""
        while self._free_slots and self._free_slots[0] < len(self._running):  # else slots 0..running-1 run
            seq, lowest = max(self._running.values(), key=lambda s: s.slot), self._free_slots[0]
            held = seq.cached if seq in prefills else seq.position  # what its slot holds of it so far
            self._swap_slots(seq.slot, lowest, held)
            heapq.heapreplace(self._free_slots, seq.slot)
            seq.slot = lowest
            self.stats["moved_rows"] += 1

    def _swap_slots(self, a: int, b: int, held: int) -> None:
        """Exchange what slots ``a`` and ``b`` hold (``ModelRunner.swap_slots``) and their tables: ``a`` is a running
        sequence's (``held``: the positions it has written) or a free slot picked for one (``held``: the positions it
        finds cached there), ``b`` a free slot, all of whose cached tokens move."""
        self.runner.swap_slots(a, b, max(held, len(self._slot_tokens[b])))
        for table in (self._slot_tokens, self._slot_tenant, self._slot_freed):
            table[a], table[b] = table[b], table[a]

    def _reuse(self, held: dict[int, int], whole: int) -> int:
        """The free slot a sequence takes, given how many tokens of its context each holds (``held``; ``whole``: all
        but the context's last). A slot loses the tokens it holds beyond those.

        - Of the slots it loses under ``PREFIX_MIN`` tokens of (an empty one; its own conversation's, where the client
          may have sent the last reply back a little differently) or that hold its whole context (whose completion it
          regenerates; ``PREFIX_MIN`` tokens at least, not a short prompt that starts a long conversation), the one
          holding the most, then the lowest (the running sequences stay packed). So a new chat prefills a shared
          system prompt into an empty slot rather than take another conversation's slot for it: the cache grows to
          hold every chat it can.
        - Once every free slot holds another's conversation, of those holding within ``PREFIX_MIN`` tokens of the
          most any holds (serving it about as well), the one freed longest ago (least recently used, as vLLM evicts):
          the conversations that spoke last keep their caches."""
        spare = [s for s in self._free_slots
                 if len(self._slot_tokens[s]) - held[s] < PREFIX_MIN or held[s] == whole >= PREFIX_MIN]
        if spare:
            return max(spare, key=lambda s: (held[s], -s))
        longest = max(held.values())
        return min((s for s in self._free_slots if held[s] > longest - PREFIX_MIN),
                   key=lambda s: (self._slot_freed[s], s))

    @staticmethod
    def _admitted(seq: _Sequence) -> None:
        if seq.queue_wait is None:  # first admission (a preempted sequence keeps its first wait)
            seq.queue_wait = time.monotonic() - seq.enqueued

    def _next(self, held: collections.Counter) -> _Sequence:
        """The waiting sequence to admit next: highest priority, then the tenant holding fewest slots, then oldest."""
        return min(self._waiting, key=lambda s: (-s.priority, held[s.tenant], s.id))

    def _victim(self, seq: _Sequence, held: collections.Counter, admitted: list) -> Optional[_Sequence]:
        """A running sequence ``seq`` may take the slot of: the newest of the lowest priority below its own; else,
        when its tenant holds less than its share and another tenant of its priority more, that tenant's newest."""
        running = [s for s in self._running.values() if s not in admitted]
        lower = [s for s in running if s.priority < seq.priority]
        if lower:
            return max(lower, key=lambda s: (-s.priority, s.id))
        tenants = {s.tenant for s in running} | {s.tenant for s in self._waiting} | {s.tenant for s in admitted}
        share = self.config.max_batch_size // len(tenants)
        if held[seq.tenant] >= share:
            return None
        over = [s for s in running if s.priority == seq.priority and held[s.tenant] > share]
        return max(over, key=lambda s: (held[s.tenant], s.id)) if over else None

    def _preempt(self, seq: _Sequence, held: collections.Counter) -> None:
        """Free ``seq``'s slot and put it back to waiting; it is recomputed (``context``) when readmitted."""
        self._running.pop(seq.id)
        heapq.heappush(self._free_slots, seq.slot)
        if self.config.prefix_caching:  # readmitted, it finds them there if no one took the slot meanwhile
            self._keep(seq)
        seq.slot = None
        held[seq.tenant] -= 1
        self._waiting.appendleft(seq)  # older than what waits (mostly): first again in its class
        self.stats["preempted"] += 1

    def _fail(self, seq: _Sequence, error: "SequenceFailed") -> None:
        self.stats["failed_sequences"] += 1
        seq.put(error)
        self._release(seq, kept=False)  # what a failed step left in its slot is not to be trusted

    def _drop_cancelled(self) -> None:
        for seq in [s for s in self._running.values() if s.cancelled]:
            self._release(seq)
        if any(s.cancelled for s in self._waiting):
            self._waiting = collections.deque(s for s in self._waiting if not s.cancelled)

    def _release(self, seq: _Sequence, kept: bool = True) -> None:
        seq.finished = True
        if seq.slot is not None:
            self._running.pop(seq.id, None)
            heapq.heappush(self._free_slots, seq.slot)
            if kept and self.config.prefix_caching:
                self._keep(seq)
            else:
                self._slot_tokens[seq.slot] = []
            seq.slot = None

    def _keep(self, seq: _Sequence) -> None:
        """Record what ``seq``, leaving its slot, wrote there, for a later sequence of its tenant to reuse."""
        self._slot_tokens[seq.slot], self._slot_tenant[seq.slot] = seq.written(), seq.tenant
        self._slot_freed[seq.slot] = next(self._frees)

    def _advance(self, seq: _Sequence, token: int, logprobs: tuple) -> None:
        if seq.cancelled:
            self._release(seq)
            return
        seq.generated.append(token)
        self.stats["generated_tokens"] += 1
        if seq.counts is None and seq.params.uses_penalties:
            seq.counts = torch.zeros(self.tokenizer.vocab_size, dtype=torch.int32)
        if seq.counts is not None:
            seq.counts[token] += 1
        finish = None
        searched = len(seq.text)  # the text before this token held no stop string
        if token == self.tokenizer.eot_id and not seq.params.ignore_eos:
            finish = "stop"
        else:
            seq.text += seq.decoder.decode(self.tokenizer.decode_bytes([token]))
        stop_at = _find_stop(seq.text, seq.params.stop, searched)
        if stop_at is not None:
            seq.text = seq.text[:stop_at]
            finish = "stop"
        elif finish is None and (len(seq.generated) >= seq.params.max_tokens
                                 or len(seq.prompt) + len(seq.generated) >= self.max_model_len):
            finish = "length"
        if finish is not None and token != self.tokenizer.eot_id and stop_at is None:
            seq.text += seq.decoder.decode(b"", final=True)
        release_to = _releasable(seq.text, seq.emitted, seq.params.stop, finish is not None)
        delta = seq.text[seq.emitted:release_to]
        seq.emitted = max(seq.emitted, release_to)
        first = len(seq.generated) == 1
        seq.put(TokenEvent(token, delta, logprobs[0], finish, len(seq.generated), logprobs[1],
                           seq.queue_wait if first else None, seq.cached if first else None))
        if finish is not None:
            self._release(seq)


def _common_prefix(a: list[int], b: list[int], limit: int) -> int:
    """Length of the longest common start of ``a`` and ``b``, at most ``limit`` (list slices compare in C: a binary
    search over them, not a Python loop over the tokens)."""
    n = min(len(a), len(b), limit)
    if n <= 0 or a[0] != b[0]:
        return 0
    if a[:n] == b[:n]:
        return n
    same, differ = 1, n  # a[:same] == b[:same], a[:differ] != b[:differ]
    while differ - same > 1:
        mid = (same + differ) // 2
        if a[:mid] == b[:mid]:
            same = mid
        else:
            differ = mid
    return same


def _find_stop(text: str, stops: list[str], searched: int = 0) -> Optional[int]:
    """Where the first stop string starts in ``text``, whose first ``searched`` characters held none (so only a
    match ending after them is looked for: each token costs its stop strings' length, not the text's)."""
    if not stops:
        return None
    hits = [i for i in (text.find(s, max(0, searched - len(s) + 1)) for s in stops if s) if i >= 0]
    return min(hits) if hits else None


def _releasable(text: str, emitted: int, stops: list[str], finished: bool) -> int:
    """How many characters of a completion's ``text`` (which holds no stop string) may have been released: all of
    it once the completion has finished; before that, all but the last ``len(s) - 1`` characters for the longest
    stop string ``s`` (they could still become the start of one), and never fewer than the ``emitted`` already."""
    if finished:
        return len(text)
    hold = max((len(s) - 1 for s in stops), default=0)
    return max(emitted, len(text) - hold)


async def flatten_ready(batches: AsyncIterator[list[TokenEvent]]) -> AsyncIterator[TokenEvent]:
    """A ``generate_ready`` iterator's events one by one (``generate``); closing this closes ``batches``."""
    async with contextlib.aclosing(batches):
        async for events in batches:
            for event in events:
                yield event


async def generate_text(engine: Engine, prompt: str | list[int], params: GenerationParams) -> dict:
    """Whole completion: ``{"text", "tokens", "logprobs", "finish_reason", "prompt_tokens"}``."""
    tokens = engine.encode_prompt(prompt)
    text, out_tokens, logprobs, finish = [], [], [], None
    async for event in engine.generate(tokens, params, stream=False):
        text.append(event.text)
        out_tokens.append(event.token)
        logprobs.append(event.logprob)
        finish = event.finish_reason
    return {"text": "".join(text), "tokens": out_tokens, "logprobs": logprobs, "finish_reason": finish,
            "prompt_tokens": len(tokens)}


__all__ = ["Engine", "EngineConfig", "GenerationParams", "MAX_TOP_LOGPROBS", "PromptLogprob", "SequenceFailed",
           "TokenEvent", "check_quantize", "check_threads", "generate_text"]
