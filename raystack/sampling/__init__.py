"""The fused sampling op: penalties, temperature, top-k, top-p and min-p sampling for a batch, one call.

``sample(logits [B, V], params) -> SampleOutput(tokens [B], logprobs [B] or None)``; each row has its own parameters.
Dispatch: a Triton kernel (``triton_kernel.py``) when the logits are on a CUDA device and Triton imports, the CPU
fast path (``cpu.py``) otherwise; ``reference.py`` is the sort-based definition both are tested against.

Semantics, in this order (every implementation follows them exactly):

0. **Logit bias** (OpenAI's ``logit_bias``): ``logit_bias[b, v]`` is added to row b's logits first, before
   everything below (so a bias of -100 forbids a token and +100 forces it, greedy or not).
1. **Penalties** (vLLM / OpenAI definitions) from ``counts[b, v]``, the number of times row b generated token v:
   repetition (``r``, 1 = off): a seen token's logit ``l`` becomes ``l / r`` if ``l > 0`` else ``l * r`` (seen = generated,
   or in ``prompt_mask`` when given); then frequency ``l -= f * count`` and presence ``l -= p * (count > 0)``.
2. **Greedy**: ``temperature == 0`` returns the argmax of the penalised logits (the lowest index among equal maxima);
   its log-probability is 0 (the filtered distribution is a point mass).
3. **Temperature**: ``z = (l - max l) / temperature``.
4. **top-k** (``0 < k < V``; 0, -1 or >= V is off): keep tokens with ``z >=`` the k-th largest ``z``. Ties at the
   boundary are all kept, so more than k tokens can survive.
5. **top-p** (``p < 1``) on the renormalised top-k set: keep token i iff the probability mass of the tokens with
   *strictly* larger ``z`` is ``< p``. Tied tokens stand or fall together; the most likely token always survives.
6. **min-p** (``m > 0``): keep tokens with probability ``>= m *`` that of the most likely token, i.e. ``z >= log m``.
7. **Draw**: one uniform ``u`` per row from Philox-4x32-10 keyed by ``(seed, step)`` (``philox.py``, identical to
   Triton's ``tl.philox``); the token is the first, in token-index order, whose cumulative surviving mass exceeds
   ``u *`` the total surviving mass (inverse CDF; no sort needed). Its log-probability is taken under the final,
   renormalised distribution. A request's token therefore depends only on its logits, parameters, seed and step:
   not on the batch, its row, the device or the kernel's block size.

Every filter keeps a *top set by z*, so the survivors of all three are ``z >= tau`` for one threshold per row.
Bad parameters (negative or non-finite temperature, ``top_p`` outside (0, 1], ``top_k < -1``, ``min_p`` outside
[0, 1), non-positive repetition penalty, mismatched shapes, NaN logits) raise ``ValueError`` naming parameter and row.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, fields
from typing import Optional, Sequence, Union

import numpy as np
import torch

Number = Union[int, float]


class SamplingParamError(ValueError):
    """A row's sampling parameters are outside the op's contract (the caller's input, not the model's output)."""


@dataclass
class SamplingParams:
    """Per-row sampling parameters as ``[B]`` tensors (``counts`` / ``prompt_mask`` are ``[B, V]``)."""

    temperature: torch.Tensor
    top_k: torch.Tensor
    top_p: torch.Tensor
    min_p: torch.Tensor
    seed: torch.Tensor
    step: torch.Tensor
    repetition_penalty: torch.Tensor
    presence_penalty: torch.Tensor
    frequency_penalty: torch.Tensor
    counts: Optional[torch.Tensor] = None
    prompt_mask: Optional[torch.Tensor] = None
    logit_bias: Optional[torch.Tensor] = None
    """float32 ``[B, V]`` added to the logits before anything else (rows without a bias hold zeros)."""
    min_p_cut: Optional[torch.Tensor] = None
    """``neg_log_min_p(min_p)`` ``[B]``, computed on the host by ``build`` (None: computed when needed, ``cut``). The
    samplers take it: the engine keeps a batch's parameters across its decode steps, so the cut is computed once per
    batch, and from a CUDA ``min_p`` it would cost a copy to the host, a sync, every step. It is derived from
    ``min_p``: replacing ``min_p`` (``dataclasses.replace``) needs a new one, or None."""

    @classmethod
    def build(cls, batch: int, *, temperature: Union[Number, Sequence[Number]] = 1.0, top_k=0, top_p=1.0,
              min_p=0.0, seed=0, step=0, repetition_penalty=1.0, presence_penalty=0.0, frequency_penalty=0.0,
              counts: Optional[torch.Tensor] = None, prompt_mask: Optional[torch.Tensor] = None,
              logit_bias: Optional[torch.Tensor] = None, device=None) -> "SamplingParams":
        """Scalars broadcast to every row; sequences give one value per row."""

        def column(value, dtype):
            t = torch.as_tensor(value, dtype=dtype, device=device)
            return t.expand(batch).clone() if t.dim() == 0 else t

        host_min_p = torch.as_tensor(min_p, dtype=torch.float32)
        host_min_p = host_min_p.expand(batch) if host_min_p.dim() == 0 else host_min_p
        return cls(
            temperature=column(temperature, torch.float32), top_k=column(top_k, torch.int64),
            top_p=column(top_p, torch.float32), min_p=column(min_p, torch.float32),
            seed=column(seed, torch.int64), step=column(step, torch.int64),
            repetition_penalty=column(repetition_penalty, torch.float32),
            presence_penalty=column(presence_penalty, torch.float32),
            frequency_penalty=column(frequency_penalty, torch.float32),
            counts=counts, prompt_mask=prompt_mask, logit_bias=logit_bias,
            min_p_cut=neg_log_min_p(host_min_p.cpu()).to(device),
        )

    def to(self, device, non_blocking: bool = False) -> "SamplingParams":
        return SamplingParams(**{f.name: None if getattr(self, f.name) is None
                                 else to_device(getattr(self, f.name), device, non_blocking) for f in fields(self)})

    def select(self, rows: torch.Tensor) -> "SamplingParams":
        return SamplingParams(**{f.name: None if getattr(self, f.name) is None else getattr(self, f.name)[rows]
                                 for f in fields(self)})

    def cut(self) -> torch.Tensor:
        """Min-p's cut on ``-z`` per row (``inf`` where min-p is off), on ``min_p``'s device: ``min_p_cut``, or
        computed from ``min_p`` on the host, bit for bit the same, where it was not built."""
        if self.min_p_cut is not None:
            return self.min_p_cut
        return neg_log_min_p(self.min_p.cpu()).to(self.min_p.device)

    @property
    def has_penalties(self) -> bool:
        return self.counts is not None


@dataclass
class SampleOutput:
    tokens: torch.Tensor
    """Chosen token ids ``[B]`` (int64)."""
    logprobs: Optional[torch.Tensor]
    """Log-probability of each chosen token under the final filtered distribution ``[B]`` (float32), on request."""


def to_device(t: torch.Tensor, device, non_blocking: bool = False) -> torch.Tensor:
    """``t`` on ``device``. ``non_blocking`` from the host to CUDA: through pinned memory, so the copy is queued on
    the stream instead of waiting for the work before it (from pageable memory it would); PyTorch's pinned-block
    cache keeps the block until its copy is made."""
    if non_blocking and t.device.type == "cpu" and torch.device(device).type == "cuda":
        t = t.pin_memory()
    return t.to(device, non_blocking=non_blocking)


def _first_bad_row(bad: torch.Tensor) -> Optional[int]:
    rows = torch.nonzero(bad.reshape(-1))
    return int(rows[0]) if len(rows) else None


def validate(logits: torch.Tensor, params: SamplingParams, check_nan: bool = True, check_params: bool = True) -> None:
    """Raise ``ValueError`` naming the parameter and the row for anything outside the op's contract (``check_params``
    off: only the logits' shape and values, for parameters the caller validated before)."""
    if logits.dim() != 2:
        raise ValueError(f"logits must be [batch, vocab], got shape {tuple(logits.shape)}")
    if logits.dtype not in (torch.float32, torch.bfloat16, torch.float16, torch.float64):
        raise ValueError(f"logits must be float32, bfloat16 or float16, got {logits.dtype}")
    B, V = logits.shape
    if not check_params:
        if params.temperature.shape != (B,):
            raise ValueError(f"temperature must have shape [{B}], got {list(params.temperature.shape)}")
        if check_nan:
            _check_logits(logits)
        return
    for f in fields(params):
        value = getattr(params, f.name)
        if value is None:
            continue
        expected = (B, V) if f.name in ("counts", "prompt_mask", "logit_bias") else (B,)
        if tuple(value.shape) != expected:
            raise ValueError(f"{f.name} must have shape {list(expected)}, got {list(value.shape)}")
    if params.prompt_mask is not None and params.counts is None:
        raise ValueError("prompt_mask needs counts (pass zeros when nothing was generated yet)")
    on_cpu = params.temperature.device.type == "cpu"  # NumPy there: these few checks cost their dispatch
    xp = np if on_cpu else torch
    v = {name: getattr(params, name).numpy() if on_cpu else getattr(params, name)  # the fields checked below
         for name in ("temperature", "top_k", "top_p", "min_p", "repetition_penalty", "presence_penalty",
                      "frequency_penalty")}
    checks = [
        ("temperature", ~xp.isfinite(v["temperature"]) | (v["temperature"] < 0), "a finite number >= 0"),
        ("top_k", v["top_k"] < -1, "-1, 0 (off) or a positive integer"),
        ("top_p", ~((v["top_p"] > 0) & (v["top_p"] <= 1)), "in (0, 1]"),
        ("min_p", ~((v["min_p"] >= 0) & (v["min_p"] < 1)), "in [0, 1)"),
        ("repetition_penalty", ~xp.isfinite(v["repetition_penalty"]) | (v["repetition_penalty"] <= 0),
         "a finite number > 0"),
        ("presence_penalty", ~xp.isfinite(v["presence_penalty"]), "finite"),
        ("frequency_penalty", ~xp.isfinite(v["frequency_penalty"]), "finite"),
    ]
    if params.logit_bias is not None and not bool(torch.isfinite(params.logit_bias).all()):
        row = _first_bad_row(~torch.isfinite(params.logit_bias).all(-1))
        raise SamplingParamError(f"logit_bias must be finite; row {row} is not")
    for name, bad, rule in checks:
        if not bad.any():
            continue
        row = int(np.flatnonzero(bad)[0]) if on_cpu else _first_bad_row(bad)
        raise SamplingParamError(f"{name} must be {rule}; row {row} has {getattr(params, name)[row].item()!r}")
    if params.counts is not None and _first_bad_row((params.counts < 0).any(-1)) is not None:
        raise ValueError(f"counts must be >= 0; row {_first_bad_row((params.counts < 0).any(-1))} has a negative count")
    if check_nan:
        _check_logits(logits)


def _check_logits(logits: torch.Tensor) -> None:
    bad = torch.isnan(logits).any(-1) | torch.isposinf(logits).any(-1) | ~torch.isfinite(logits).any(-1)
    row = _first_bad_row(bad)
    if row is not None:
        raise ValueError(f"logits of row {row} contain NaN, +inf or no finite value")


def triton_available() -> bool:
    try:
        import triton  # noqa: F401
    except ImportError:
        return False
    return True


def sample(logits: torch.Tensor, params: SamplingParams, return_logprobs: bool = False,
           backend: str = "auto", params_checked: bool = False) -> SampleOutput:
    """Sample one token per row. ``backend``: ``auto`` (Triton on CUDA, else CPU path), ``triton``, ``cpu``,
    ``reference``. ``params_checked``: the caller ran ``validate`` on these parameters already (all but ``step``
    and ``counts``, which it built itself): the engine checks a batch's parameters once, not every decode step."""
    if backend == "auto":
        backend = "triton" if logits.is_cuda and triton_available() else "cpu"
    if backend == "cpu":
        from raystack.sampling.cpu import sample_cpu

        # the CPU path finds NaN rows in its own max pass
        validate(logits, params, check_nan=False, check_params=not params_checked)
        return sample_cpu(logits, params, return_logprobs)
    if backend == "triton":
        from raystack.sampling.triton_kernel import sample_triton

        # The logits' check after the launch: on CUDA it reads its result back, a host sync, which then waits for the
        # decode step and the kernel together rather than stalling the launch (a NaN row still raises, naming it).
        validate(logits, params, check_nan=False, check_params=not params_checked)
        out = sample_triton(logits, params, return_logprobs)
        _check_logits(logits)
        return out
    validate(logits, params, check_params=not params_checked)
    if backend == "reference":
        from raystack.sampling.reference import sample_reference

        tokens, logprobs = sample_reference(logits, params.to(logits.device))
        return SampleOutput(tokens, logprobs.float() if return_logprobs else None)
    raise ValueError(f"backend must be auto, triton, cpu or reference, got {backend!r}")


def neg_log_min_p(min_p: torch.Tensor) -> torch.Tensor:
    """float32 ``-log(min_p)`` (``inf`` where min-p is off): the min-p cut on ``-z`` shared by CPU path and kernel."""
    safe = torch.where(min_p > 0, min_p.double(), 1.0)
    return torch.where(min_p > 0, -torch.log(safe), math.inf).to(torch.float32)


__all__ = ["SamplingParams", "SampleOutput", "SamplingParamError", "sample", "validate", "neg_log_min_p", "to_device"]
