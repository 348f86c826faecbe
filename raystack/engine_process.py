"""The engine in a process of its own, behind the interface a replica uses (vLLM V1's engine-core split).

Why: a replica is one Python process, and its HTTP work (Serve's event loops, uvicorn, the SSE chunks) and the
engine's own Python (the step's bookkeeping, sampling) take turns on one GIL. Measured on this project's 2-core
machine (2026-12-01, 32 streams into a 2-CPU replica, per-thread CPU time from /proc): the replica used 0.8-0.9 of
a core in all, of the 2 it held. With the engine in a child process, each side has an interpreter of its own.

Contract:
- ``EngineProcess(artifact_uri, EngineConfig)`` starts ``python -m raystack.engine_process`` with one end of a
  socket pair, waits until the child has loaded the artifact and built its ``Engine`` (a bad artifact or config is
  the constructor's ``ValueError``, with the child's message), and then offers what the replica uses of an
  ``Engine``: ``generate`` (an async iterator of ``TokenEvent``), ``generate_ready`` (of lists of them), ``score``,
  ``check_request``, ``encode_prompt``, ``check_health``, ``queue_depth``, ``active``, ``tokenizer``,
  ``max_model_len``, ``kv_cache_bytes``, ``shutdown``; with the same semantics (the child runs the same
  ``Engine``: same tokens for the same seed).
- Messages are JSON lines. A step's events for every sequence travel as one message (``Engine.submit`` hands the
  child each token as the step makes it, ``Engine.after_step`` sends them), so the cost is per step, not per token.
  ``generate(..., stream=False)`` (a non-streamed completion): the first event at once (time to first token, and
  the sequence counts as started), the rest held in the child and sent with the last.
- Closing a ``generate`` iterator early (client gone) cancels the sequence in the child; its slot frees at the next
  step. A sequence the engine fails raises ``SequenceFailed`` as in process; a request the engine refuses raises
  ``ValueError``.
- ``unstreamed_threads`` (when set): the child computes with that many torch threads while no streamed sequence
  runs, and with the config's ``threads`` while one does. A streamed completion's tokens are relayed by the replica
  step by step (HTTP chunks through Serve), which needs a core the forward passes then leave free; a non-streamed
  one needs the replica only at its start and end (``raystack.serving.replica_threads``). The thread count does not
  change which token is drawn, short of a float-rounding tie (1 against 2 threads gave the same tokens on both of
  benchmarks/serve_vs_hf.py's shapes, log-probabilities within 1e-6; tests/unit/test_engine_process.py).
  ``threads``: the child's count as of its last message.
- If the child dies, every sequence in flight fails with ``SequenceFailed``, and ``check_health`` raises from then on
  (Serve replaces the replica). The child exits when its socket closes, so a replica that dies takes its engine
  with it.
"""

from __future__ import annotations

import asyncio
import dataclasses
import itertools
import json
import logging
import os
import socket
import subprocess
import sys
import time
from typing import AsyncIterator, Optional

import torch

from raystack.engine import (Engine, EngineConfig, GenerationParams, PromptLogprob, SequenceFailed, TokenEvent,
                             _Events, flatten_ready)
from raystack.tokenizer import ByteTokenizer

logger = logging.getLogger(__name__)

START_TIMEOUT_S = 600.0
"""How long the child may take to import torch and load the artifact before the constructor gives up."""


def _line(message: dict) -> bytes:
    return json.dumps(message, separators=(",", ":")).encode() + b"\n"


def _params(values: dict) -> GenerationParams:
    bias = values.get("logit_bias")
    if bias is not None:  # JSON object keys are strings
        values = {**values, "logit_bias": {int(k): v for k, v in bias.items()}}
    return GenerationParams(**values)


class EngineProcess:
    def __init__(self, artifact: str, config: EngineConfig, start_timeout_s: float = START_TIMEOUT_S,
                 unstreamed_threads: int = 0):
        self.config = config
        self._sock, child = socket.socketpair()
        try:
            # The child imports what this process imports (a Ray job's working_dir is on sys.path, not installed).
            env = {**os.environ, "PYTHONPATH": os.pathsep.join(p for p in sys.path if p)}
            self.process = subprocess.Popen([sys.executable, "-m", "raystack.engine_process", str(child.fileno())],
                                            pass_fds=(child.fileno(),), env=env)
        finally:
            child.close()
        self._sock.settimeout(start_timeout_s)
        try:
            self._sock.sendall(_line({"artifact": artifact, "config": dataclasses.asdict(config),
                                      "unstreamed_threads": unstreamed_threads}))
            ready = json.loads(self._read_line_blocking() or b'{"op": "failed", "error": "the engine process exited"}')
        except (OSError, ValueError) as e:
            self._kill()
            raise RuntimeError(f"the engine process did not start: {e!r}") from None
        if ready.get("op") != "ready":
            self._kill()
            raise ValueError(f"the engine process could not start: {ready.get('error')}")
        self._sock.settimeout(None)
        self.max_model_len: int = ready["max_model_len"]
        self.kv_cache_bytes: int = ready["kv_cache_bytes"]
        self.tokenizer = ByteTokenizer.from_dict(ready["tokenizer"])
        self.threads: int = ready["threads"]
        self._ids = itertools.count()
        self._streams: dict[int, _Events] = {}
        self._started: set[int] = set()  # streams that got their first token (so are not waiting for a slot)
        self._scores: dict[int, asyncio.Future] = {}
        self._writer: Optional[asyncio.StreamWriter] = None
        self._connecting: Optional[asyncio.Task] = None
        self._reader_task: Optional[asyncio.Task] = None
        self._error: Optional[str] = None  # the child's engine reported itself unhealthy
        self._dead: Optional[str] = None  # why the child is gone

    def _read_line_blocking(self) -> bytes:
        data = b""
        while not data.endswith(b"\n"):
            chunk = self._sock.recv(1)  # the handshake only: nothing else is in flight yet
            if not chunk:
                return b""
            data += chunk
        return data

    def _kill(self) -> None:
        self._sock.close()
        try:
            self.process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()

    # -- what the replica uses ---------------------------------------------------------------------------------

    @property
    def queue_depth(self) -> int:
        """Sequences sent to the engine that have no token yet (waiting for a slot, or being prefilled)."""
        return len(self._streams) - len(self._started)

    @property
    def active(self) -> int:
        return len(self._started)

    def check_health(self) -> None:
        if self._dead is not None:
            raise RuntimeError(f"engine process gone: {self._dead}")
        if self.process.poll() is not None:
            raise RuntimeError(f"engine process exited with code {self.process.returncode}")
        if self._error is not None:
            raise RuntimeError(f"engine unhealthy: {self._error}")

    encode_prompt = Engine.encode_prompt
    check_request = Engine.check_request

    def generate(self, prompt_tokens: list[int], params: GenerationParams, priority: int = 0,
                 tenant: str = "", stream: bool = True) -> AsyncIterator[TokenEvent]:
        return flatten_ready(self.generate_ready(prompt_tokens, params, priority, tenant, stream))

    async def generate_ready(self, prompt_tokens: list[int], params: GenerationParams, priority: int = 0,
                             tenant: str = "", stream: bool = True) -> AsyncIterator[list[TokenEvent]]:
        self.check_request(len(prompt_tokens), params.max_tokens)
        await self._connect()
        if self._dead is not None:
            raise SequenceFailed(f"generation failed: the engine process is gone ({self._dead})")
        key = next(self._ids)
        events = self._streams[key] = _Events(stream)
        self._send({"op": "add", "id": key, "prompt": list(prompt_tokens), "params": dataclasses.asdict(params),
                    "priority": priority, "tenant": tenant, "stream": stream})
        finished = False
        try:
            while True:
                try:
                    ready = await events.get_ready()
                except Exception:  # the sequence's error, from the child (cancellation is no Exception)
                    finished = True
                    raise
                self._started.add(key)
                yield ready
                if ready[-1].finish_reason is not None:
                    finished = True
                    return
        finally:
            self._streams.pop(key, None)
            self._started.discard(key)
            if not finished and self._dead is None:
                self._send({"op": "cancel", "id": key})

    async def score(self, prompt_tokens: list[int], top_logprobs: int = 0) -> list[PromptLogprob]:
        if not 1 <= len(prompt_tokens) <= self.max_model_len:
            raise ValueError(f"a scored prompt needs 1 to {self.max_model_len} tokens, got {len(prompt_tokens)}")
        await self._connect()
        if self._dead is not None:
            raise RuntimeError(f"the engine process is gone ({self._dead})")
        key = next(self._ids)
        done = self._scores[key] = asyncio.get_running_loop().create_future()
        self._send({"op": "score", "id": key, "prompt": list(prompt_tokens), "top": top_logprobs})
        try:
            rows = await done
        finally:
            self._scores.pop(key, None)
        return [PromptLogprob(t, lp, [tuple(x) for x in top] if top is not None else None) for t, lp, top in rows]

    async def shutdown(self) -> None:
        if self._writer is not None:
            self._writer.close()
        if self._reader_task is not None:
            self._reader_task.cancel()
        await asyncio.get_running_loop().run_in_executor(None, self._kill)

    # -- the socket --------------------------------------------------------------------------------------------

    async def _connect(self) -> None:
        """The asyncio side of the socket, made once, on the loop that serves requests (the constructor may run
        elsewhere); concurrent first callers wait for the same connection."""
        if self._connecting is None:
            self._connecting = asyncio.get_running_loop().create_task(self._open())
        await asyncio.shield(self._connecting)

    async def _open(self) -> None:
        self._sock.setblocking(False)
        reader, self._writer = await asyncio.open_unix_connection(sock=self._sock, limit=2**26)
        self._reader_task = asyncio.get_running_loop().create_task(self._read(reader))

    def _send(self, message: dict) -> None:
        self._writer.write(_line(message))

    async def _read(self, reader: asyncio.StreamReader) -> None:
        why = "its socket closed"
        try:
            while line := await reader.readline():
                self._dispatch(json.loads(line))
        except Exception as e:  # a broken message is a bug on one side: stop trusting the channel
            logger.exception("engine process channel failed")
            why = repr(e)
        code = await asyncio.get_running_loop().run_in_executor(None, self._wait_exit)
        self._dead = f"{why}; exit code {code}"
        logger.error("engine process gone: %s", self._dead)
        for events in self._streams.values():
            events.put_nowait(SequenceFailed(f"generation failed: the engine process is gone ({self._dead})"))
        for done in self._scores.values():
            if not done.done():
                done.set_exception(RuntimeError(f"the engine process is gone ({self._dead})"))

    def _wait_exit(self) -> Optional[int]:
        try:
            return self.process.wait(timeout=5)
        except subprocess.TimeoutExpired:
            return None

    def _dispatch(self, message: dict) -> None:
        op = message["op"]
        if op == "events":
            for key, *fields in message["events"]:
                events = self._streams.get(key)
                if events is None:  # cancelled meanwhile
                    continue
                if fields[0] == "failed":
                    events.put_nowait(SequenceFailed(fields[1], client_error=fields[2]))
                elif fields[0] == "refused":
                    events.put_nowait(ValueError(fields[1]))
                else:
                    token, text, logprob, finish, completion_tokens, top, queue_wait, cached = fields
                    events.put_nowait(TokenEvent(token, text, logprob, finish, completion_tokens,
                                                 [tuple(x) for x in top] if top is not None else None, queue_wait,
                                                 cached))
            self._error = message.get("error")
            self.threads = message["threads"]
        elif op == "scored":
            done = self._scores.get(message["id"])
            if done is not None and not done.done():
                if "error" in message:
                    kind = ValueError if message["refused"] else RuntimeError
                    done.set_exception(kind(f"scoring failed in the engine process: {message['error']}"))
                else:
                    done.set_result(message["rows"])


# -- the child ---------------------------------------------------------------------------------------------------


async def _serve(sock: socket.socket) -> None:
    reader, writer = await asyncio.open_unix_connection(sock=sock, limit=2**26)
    hello = json.loads(await reader.readline())
    try:
        engine = Engine.from_artifact(hello["artifact"], EngineConfig(**hello["config"]))
    except Exception as e:  # the replica's constructor reports it
        writer.write(_line({"op": "failed", "error": f"{e}"}))
        await writer.drain()
        return
    # Nothing else runs here while a step computes (new requests and cancels act between steps anyway), so the steps
    # run on the event loop's thread: no hand-off to a worker thread and back, twice per step, which cost most when
    # the CPUs are busy with the replica and its clients.
    engine.inline = True
    streamed: set = set()  # the streamed sequences running (module doc: ``unstreamed_threads``)
    reserved, unstreamed = engine.config.threads, hello.get("unstreamed_threads") or 0

    def fit_threads() -> None:  # between steps, on this (the computing) thread
        want = reserved if streamed or not unstreamed else unstreamed
        if want and want != torch.get_num_threads():
            torch.set_num_threads(want)

    fit_threads()
    writer.write(_line({"op": "ready", "max_model_len": engine.max_model_len, "kv_cache_bytes": engine.kv_cache_bytes,
                        "tokenizer": engine.tokenizer.to_dict(), "threads": torch.get_num_threads()}))
    loop = asyncio.get_running_loop()
    outbox: list = []
    cancels: dict = {}  # sequence id -> its cancel function, while it runs
    tasks: set = set()  # scores in flight (a reference keeps them alive)

    def flush() -> None:  # after each step: its tokens, for every sequence, in one message
        fit_threads()  # the step's ended streams are out of ``streamed``
        if not outbox:
            return
        try:
            engine.check_health()
            error = None
        except RuntimeError as e:
            error = str(e)
        writer.write(_line({"op": "events", "events": outbox[:], "error": error, "threads": torch.get_num_threads()}))
        outbox.clear()

    engine.after_step = flush

    def sink(key: int, stream: bool):
        held: list = []  # stream=False: the events after the first, sent with the last

        def put(item) -> None:
            if isinstance(item, SequenceFailed):
                record = [key, "failed", str(item), item.client_error]
            else:
                record = [key, item.token, item.text, item.logprob, item.finish_reason, item.completion_tokens,
                          item.top_logprobs, item.queue_wait_s, item.cached_tokens]
            ended = isinstance(item, SequenceFailed) or item.finish_reason is not None
            if not (stream or ended or item.completion_tokens == 1):
                held.append(record)
                return
            outbox.extend(held)
            held.clear()
            outbox.append(record)
            if ended:
                cancels.pop(key, None)
                streamed.discard(key)
        return put

    async def score(key: int, prompt: list[int], top: int) -> None:
        try:
            rows = [[p.token, p.logprob, p.top_logprobs] for p in await engine.score(prompt, top)]
            writer.write(_line({"op": "scored", "id": key, "rows": rows}))
        except Exception as e:  # the engine's refusal (ValueError) stays one; anything else is the server's fault
            writer.write(_line({"op": "scored", "id": key, "error": str(e), "refused": isinstance(e, ValueError)}))
        finally:
            tasks.discard(asyncio.current_task())

    while line := await reader.readline():
        message = json.loads(line)
        op = message["op"]
        key = message.get("id")
        if op == "add":
            try:
                cancels[key] = engine.submit(message["prompt"], _params(message["params"]),
                                             sink(key, message["stream"]), message["priority"], message["tenant"])
            except ValueError as e:  # the parent checked the request already; this is the engine's word on it
                writer.write(_line({"op": "events", "events": [[key, "refused", str(e)]], "error": None,
                                    "threads": torch.get_num_threads()}))
                continue
            if message["stream"]:
                streamed.add(key)
                fit_threads()
        elif op == "cancel":
            cancel = cancels.pop(key, None)
            if cancel is not None:
                cancel()
            streamed.discard(key)  # its slot frees at the next step; the threads follow after it
        elif op == "score":
            tasks.add(loop.create_task(score(key, message["prompt"], message["top"])))
    await engine.shutdown()  # the parent is gone


def main() -> None:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s engine-process %(levelname)s %(message)s")
    sock = socket.socket(fileno=int(sys.argv[1]))
    started = time.monotonic()
    asyncio.run(_serve(sock))
    logger.info("engine process exits after %.0f s", time.monotonic() - started)
    os._exit(0)  # no interpreter teardown: torch's thread pools can hang it


if __name__ == "__main__":
    main()
