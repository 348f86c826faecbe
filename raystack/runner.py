"""The model runner: what one engine step computes, for the rows ``raystack.engine``'s scheduler chose.

The scheduler decides what runs (who gets a KV-cache slot, who waits, who is preempted) and what the tokens mean
(text, stop strings, finish reasons); the runner runs it on the model and knows nothing of queues or text.

Contract:
- ``ModelRunner(model, config)`` (an ``EngineConfig``) puts ``model`` on the config's device and dtype, with int8
  linear weights (``quantize: int8``) or, on CPU in float32, oneDNN-prepacked ones (``raystack.model.pack_linears``);
  preallocates the KV cache (``max_batch_size`` slots x the model's ``max_seq_len`` positions); on CUDA captures the
  decode step as CUDA graphs (``raystack.decode_graphs``; a capture that fails leaves eager decode).
- ``step(prefills, decodes)``: one forward per prompt length for the new rows (their ``context`` written to the cache
  from position ``cached`` of their ``slot``: what the scheduler found there already is not recomputed), one batched
  decode forward for the rest (their last generated token at ``position``), and one sampling call over every row with
  its own parameters (``raystack.sampling``, seeded per row and keyed by the token's index in its completion). Returns
  ``(results, failures)``: ``(row, token, (logprob, top_logprobs))`` for the rows that ran, ``(row, message,
  client_error)`` for those that failed on their own: a failing batch is retried one row at a time, so one row's
  failure never costs the others theirs.
- ``score(tokens, top)``: each token's log-probability given those before it, outside the KV cache.
- ``swap_slots(a, b, length)``: exchange what two slots hold in their first ``length`` positions (the scheduler
  moves a cached prefix into the slot it wants its sequence in, and a running sequence down into a free slot).
- A row is the engine's sequence: the runner reads its ``id``, ``slot``, ``cached``, ``context``, ``position``,
  ``generated``, ``params``, ``seed``, ``bias`` and ``counts``, and writes none of them.
"""

from __future__ import annotations

import logging
import warnings
from dataclasses import replace
from typing import Optional

import torch

from raystack.decode_graphs import DecodeGraphs
from raystack.model import GPT, KVCache, decode_reads_in_place, pack_linears
from raystack.sampling import SamplingParamError, SamplingParams, sample, to_device, validate

logger = logging.getLogger(__name__)

DECODE_SLACK = 4
"""Free slots a decode step may compute over to read the running sequences' caches in place instead of gathering
them (an idle row costs one token's forward; a gather copies every running row's whole cache, every layer)."""


class ModelRunner:
    def __init__(self, model: GPT, config):
        if config.device == "auto":
            device = "cuda" if torch.cuda.is_available() else "cpu"
        else:
            device = config.device
        dtype = {"float32": torch.float32, "bfloat16": torch.bfloat16}.get(
            config.dtype, torch.bfloat16 if device == "cuda" else torch.float32)
        self.device = torch.device(device)
        if config.threads:
            torch.set_num_threads(config.threads)  # process-wide: once, not on every decode step
        self.model = model.to(device=self.device, dtype=dtype).eval()
        if config.quantize == "int8":
            self.model = quantize_int8(self.model)
        elif self.device.type == "cpu" and dtype == torch.float32:
            self.model = pack_linears(self.model)  # oneDNN-prepacked weights: faster matrix products
        self.cache = KVCache(model.config, config.max_batch_size, device=self.device, dtype=dtype)
        self.graphs: Optional[DecodeGraphs] = None
        """The decode step's CUDA graphs (``EngineConfig.cuda_graphs``), or None: eager decode."""
        if self.device.type == "cuda" and config.cuda_graphs:
            try:
                self.graphs = DecodeGraphs(self.model, self.cache)
            except Exception as e:  # a capture the driver refuses, or a replay that differs: eager decode still works
                logger.warning("capturing the decode step as CUDA graphs failed (%s); decoding eagerly", e)
        self._params: tuple = (None, None, False)  # (row ids, their SamplingParams, any penalties): sampling_params
        # Per-step integers (the decoded rows among a graph's, the rows' steps) reach a CUDA device through these
        # pinned buffers with non-blocking copies: from a list (pageable memory) a copy waits for the stream, i.e.
        # for the decode step just launched. A copy reads its buffer when the stream reaches it, so a buffer is
        # refilled only once its event says the last copy is made: at once after a step that read its tokens back,
        # a short wait when rows are retried one at a time (no read-back between them).
        self._pinned: dict = {}
        if self.device.type == "cuda":
            self._pinned = {name: (torch.zeros(config.max_batch_size, dtype=torch.int64, pin_memory=True),
                                   torch.cuda.Event()) for name in ("rows", "step")}

    @property
    def spread_rows_cost(self) -> bool:
        """Whether a decode over rows spread across the slots costs more than over the same rows packed at the
        front: the graphs run slots 0 up to the highest running one, and the PyTorch ops gather spread rows' caches
        (the fused CPU op reads them in place; ``decode``)."""
        return self.graphs is not None or not decode_reads_in_place(self.cache)

    @torch.inference_mode()
    def step(self, prefills: list, decodes: list):
        """Prefill ``prefills``, decode ``decodes`` (in slot order), sample every row (module doc)."""
        rows, logits, failures = [], [], []
        for group in _same_length(prefills):  # one forward per prompt length
            try:
                logits.append(self.prefill(group))
                rows.extend(group)
            except Exception:
                for seq in group:
                    out = self._isolated(self.prefill, [seq], failures)
                    if out is not None:
                        rows.append(seq)
                        logits.append(out)
        if decodes:
            try:
                logits.append(self.decode(decodes))
                rows.extend(decodes)
            except Exception:
                logger.exception("batched decode of %d rows failed; retrying them one at a time", len(decodes))
                for seq in decodes:
                    out = self._isolated(self.decode, [seq], failures)
                    if out is not None:
                        rows.append(seq)
                        logits.append(out)
        if not rows:
            return [], failures
        batch = torch.cat(logits).float()
        try:
            tokens = self.sample(rows, batch)
        except Exception:
            logger.exception("sampling a batch of %d rows failed; sampling them one at a time", len(rows))
            kept, tokens = [], []
            for i, seq in enumerate(rows):
                out = self._isolated(self.sample, [seq], failures, batch[i:i + 1])
                if out is not None:
                    kept.append(i)
                    tokens.append(out[0])
            rows, batch = [rows[i] for i in kept], batch[kept]
        return list(zip(rows, tokens, _logprobs(rows, batch, tokens))), failures

    @staticmethod
    def _isolated(fn, rows: list, failures: list, *args):
        """``fn(rows, *args)`` for one row, or None after recording its failure."""
        try:
            return fn(rows, *args)
        except Exception as e:
            logger.warning("sequence %d failed: %r", rows[0].id, e)
            # The sampling op refusing a row's parameters is the request's own input, not a server fault.
            failures.append((rows[0], f"generation failed: {e}", isinstance(e, SamplingParamError)))
            return None

    def prefill(self, group: list) -> torch.Tensor:
        """Prompts of one length, whose first ``cached`` tokens are in their slots' caches already, in one forward
        over the rest."""
        start = group[0].cached
        tokens = torch.tensor([seq.context[start:] for seq in group], device=self.device)
        slots = torch.tensor([seq.slot for seq in group], device=self.device)
        return self.model.prefill(tokens, self.cache, slots, start)

    def decode(self, decodes: list) -> torch.Tensor:
        """One token for each of ``decodes`` (in slot order). When their slots are packed (at most
        ``DECODE_SLACK`` free slots among them), the forward runs over the whole slot range and reads the caches in
        place, the free slots decoding an idle row (position -1) whose output is dropped; otherwise the rows' caches
        are gathered. With ``graphs``, slots 0..last run as one captured graph (idle rows for the free ones)."""
        first, last = decodes[0].slot, decodes[-1].slot
        if self.graphs is not None:
            token_ids, position_ids = [0] * (last + 1), [-1] * (last + 1)
            for s in decodes:
                token_ids[s.slot], position_ids[s.slot] = s.generated[-1], s.position
            out = self.graphs.run(token_ids, position_ids)
            return out if len(decodes) == last + 1 else out[self._ints("rows", [s.slot for s in decodes])]
        width = last - first + 1
        if width > len(decodes) + DECODE_SLACK:
            tokens = torch.tensor([s.generated[-1] for s in decodes], device=self.device)
            positions = torch.tensor([s.position for s in decodes], device=self.device)
            slots = torch.tensor([s.slot for s in decodes], device=self.device)
            return self.model.decode(tokens, positions, self.cache, slots)
        token_ids, position_ids = [0] * width, [-1] * width
        for s in decodes:
            token_ids[s.slot - first], position_ids[s.slot - first] = s.generated[-1], s.position
        tokens = torch.tensor(token_ids, device=self.device)
        positions = torch.tensor(position_ids, device=self.device)
        out = self.model.decode(tokens, positions, self.cache, slice(first, last + 1))
        if width == len(decodes):
            return out
        return out[torch.tensor([s.slot - first for s in decodes], device=self.device)]

    def sample(self, rows: list, logits: torch.Tensor) -> list[int]:
        params = self.sampling_params(rows, logits)
        return sample(logits, params, params_checked=True).tokens.tolist()

    def sampling_params(self, rows: list, logits: torch.Tensor) -> SamplingParams:
        """The rows' sampling parameters. What does not change while the same sequences decode (all but the step
        and the penalty counts) is built and validated once and kept until the batch changes."""
        key, vocab = tuple(s.id for s in rows), logits.shape[1]
        if self._params[0] != key:
            p = [s.params for s in rows]
            bias = None
            if any(s.bias is not None for s in rows):
                bias = torch.stack([s.bias if s.bias is not None else torch.zeros(vocab) for s in rows])
            self._params = (None, None, False)  # never kept unchecked
            built = SamplingParams.build(  # on the host, checked there (NumPy), then moved: no wait for the GPU
                len(rows), temperature=[x.temperature for x in p], top_k=[x.top_k for x in p],
                top_p=[x.top_p for x in p], min_p=[min(x.min_p, 0.99999994) for x in p],  # API min_p=1: the max
                seed=[s.seed for s in rows], repetition_penalty=[x.repetition_penalty for x in p],
                presence_penalty=[x.presence_penalty for x in p], frequency_penalty=[x.frequency_penalty for x in p],
                logit_bias=bias)
            validate(logits, built, check_nan=False)
            self._params = key, built.to(self.device, non_blocking=True), any(x.uses_penalties for x in p)
        _, base, penalties = self._params
        counts = None
        if penalties:
            counts = torch.stack([s.counts if s.counts is not None else torch.zeros(vocab, dtype=torch.int32)
                                  for s in rows])
            counts = to_device(counts, self.device, non_blocking=True)
        return replace(base, step=self._ints("step", [len(s.generated) for s in rows]), counts=counts)

    def _ints(self, buffer: str, values: list[int]) -> torch.Tensor:
        """``values`` as an int64 tensor on the device; on CUDA through the pinned buffer ``buffer``."""
        host, copied = self._pinned.get(buffer, (None, None))
        if host is None or len(values) > len(host):
            return torch.tensor(values, dtype=torch.int64, device=self.device)
        copied.synchronize()
        host[:len(values)] = torch.tensor(values, dtype=torch.int64)
        out = host[:len(values)].to(self.device, non_blocking=True)
        copied.record()
        return out

    @torch.inference_mode()
    def swap_slots(self, a: int, b: int, length: int) -> None:
        """Exchange the keys and values at positions ``0..length-1`` of cache slots ``a`` and ``b``, every layer
        (``Engine.pack_slots``). Slices, not index tensors: on CUDA, copies queued on the stream, no host sync."""
        if a == b or length <= 0:
            return
        for cache in (self.cache.k, self.cache.v):
            held = cache[:, a, :, :length].clone()
            cache[:, a, :, :length] = cache[:, b, :, :length]
            cache[:, b, :, :length] = held

    @torch.inference_mode()
    def score(self, tokens: list[int], top: int) -> list[tuple[int, Optional[float], Optional[list]]]:
        """``(token, logprob, top_logprobs)`` for each of ``tokens``: its log-probability given the tokens before it
        (None for the first), with the ``top`` most likely alternatives (None when ``top`` is 0)."""
        ids = torch.tensor([tokens], device=self.device)
        logprobs = torch.log_softmax(self.model(ids)[0, :-1].float(), -1)  # position i predicts token i + 1
        chosen = logprobs.gather(1, ids[0, 1:, None])[:, 0].tolist()
        alternatives = _top(logprobs, top)
        out = [(tokens[0], None, None)]
        for i, token in enumerate(tokens[1:]):
            out.append((token, chosen[i], alternatives[i] if alternatives else None))
        return out


def quantize_int8(model: GPT) -> GPT:
    """``model`` with int8 weights in its linear layers (dynamic quantization: activations are quantized per call),
    for CPU inference. Refused on CUDA, where PyTorch's dynamic quantization does not run."""
    if next(model.parameters()).device.type != "cpu" or next(model.parameters()).dtype != torch.float32:
        raise ValueError("quantize: int8 runs on CPU with float32 weights (PyTorch's dynamic quantization); "
                         "use quantize: none with device cuda or dtype bfloat16")
    with warnings.catch_warnings():  # torch.ao.quantization's deprecation notice (torchao is its successor)
        warnings.simplefilter("ignore")
        from torch.ao.quantization import quantize_dynamic

        return quantize_dynamic(model, {torch.nn.Linear}, dtype=torch.qint8)


def _logprobs(rows: list, logits: torch.Tensor, tokens: list[int]) -> list:
    """``(logprob, top_logprobs)`` per row: the model's own log-softmax (before bias, penalties and filters) for the
    rows that asked, ``(None, None)`` for the rest."""
    wanted = [i for i, seq in enumerate(rows) if seq.params.logprobs]
    out = [(None, None)] * len(rows)
    if not wanted:
        return out
    logprobs = torch.log_softmax(logits[wanted], -1)
    chosen = logprobs.gather(1, torch.tensor([[tokens[i]] for i in wanted], device=logits.device))[:, 0].tolist()
    top = _top(logprobs, max(rows[i].params.top_logprobs for i in wanted))
    for j, i in enumerate(wanted):
        k = rows[i].params.top_logprobs
        out[i] = (chosen[j], top[j][:k] if k else None)
    return out


def _top(logprobs: torch.Tensor, k: int) -> Optional[list[list[tuple[int, float]]]]:
    """Per row of ``logprobs`` ``[R, V]``, its ``k`` most likely ``(token, logprob)`` pairs (None when k is 0)."""
    if k <= 0:
        return None
    values, ids = logprobs.topk(min(k, logprobs.shape[-1]), dim=-1)
    return [list(zip(i, v)) for i, v in zip(ids.tolist(), values.tolist())]


def _same_length(prefills: list) -> list[list]:
    """``prefills`` grouped by prompt length and cached prefix: the rows one prefill forward takes together."""
    groups: dict[tuple[int, int], list] = {}
    for seq in prefills:
        groups.setdefault((len(seq.context), seq.cached), []).append(seq)
    return list(groups.values())


__all__ = ["DECODE_SLACK", "ModelRunner", "quantize_int8"]
