"""The Triton kernel of the sampling op: one launch for the batch, one program per row, no sort.

Each program walks its row's vocabulary in blocks of ``BLOCK`` tokens (any V from 256 to 256 k; several blocks per
row). With ``z = (penalised logits - max) / temperature <= 0``, the key ``bits(0 - z)`` (an int32) orders tokens by
``z`` (smaller key = more likely), so every filter's threshold is found *exactly* by bisection over keys, each step
one pass that counts (top-k) or sums mass (top-p) below the probe:

    (every pass)  logits + logit_bias, then the penalties, then z
    pass 1        row max and first argmax (greedy rows stop here)
    top-k         31 passes: the smallest key K with count(key <= K) >= k
    top-k mass    1 pass: Z_k = sum of exp(z) over key <= K
    top-p         31 passes: the largest key P with mass(key < P) < p * Z_k
    min-p         no pass: key <= bits(-log min_p)
    draw          2 passes: surviving mass, then the inverse CDF in token-index order with the row's Philox uniform

Mass is accumulated in float64, so the result matches the CPU path and the reference (``reference.py``) up to
float rounding at a CDF boundary. The row's uniform is ``tl.philox(seed, step, 0, 0, 0)``, bit-identical to
``raystack.sampling.philox.uniform``. Runs on the CPU through ``TRITON_INTERPRET=1`` for tests.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from raystack.sampling import SampleOutput, SamplingParams

INF_KEY = 0x7F800000  # bits of +inf: the key of z = -inf


@triton.jit
def _scaled(logits_ptr, counts_ptr, mask_ptr, bias_ptr, row, offs, V, stride, cstride, row_max, temperature, rep,
            freq, pres,
            HAS_PENALTIES: tl.constexpr, HAS_PROMPT: tl.constexpr, HAS_BIAS: tl.constexpr, SCALE: tl.constexpr):
    """Penalised logits of one block (``SCALE``: ``z = (x - max) / temperature``), -inf past the vocabulary."""
    inside = offs < V
    x = tl.load(logits_ptr + row * stride + offs, mask=inside, other=float("-inf")).to(tl.float32)
    if HAS_BIAS:
        x = x + tl.load(bias_ptr + row * V + offs, mask=inside, other=0.0)
    if HAS_PENALTIES:
        c = tl.load(counts_ptr + row * cstride + offs, mask=inside, other=0).to(tl.float32)
        seen = c > 0
        seen_rep = seen
        if HAS_PROMPT:
            seen_rep = seen | (tl.load(mask_ptr + row * cstride + offs, mask=inside, other=0) != 0)
        x = tl.where(seen_rep, tl.where(x > 0, x / rep, x * rep), x)
        x = x - freq * c
        x = x - pres * seen.to(tl.float32)
    x = tl.where(inside, x, float("-inf"))
    if SCALE:
        x = (x - row_max) / temperature
    return x


@triton.jit
def _z_key(logits_ptr, counts_ptr, mask_ptr, bias_ptr, row, offs, V, stride, cstride, row_max, temperature, rep,
           freq, pres, HAS_PENALTIES: tl.constexpr, HAS_PROMPT: tl.constexpr, HAS_BIAS: tl.constexpr):
    """``z`` of one block and its order key ``bits(0 - z)`` (an int32; smaller = more likely)."""
    z = _scaled(logits_ptr, counts_ptr, mask_ptr, bias_ptr, row, offs, V, stride, cstride, row_max, temperature, rep,
                freq, pres, HAS_PENALTIES, HAS_PROMPT, HAS_BIAS, True)
    return z, (0.0 - z).to(tl.int32, bitcast=True)


@triton.jit
def _sample_kernel(logits_ptr, counts_ptr, mask_ptr, bias_ptr, temperature_ptr, top_k_ptr, top_p_ptr, nlm_ptr, seed_ptr,
                   step_ptr, rep_ptr, pres_ptr, freq_ptr, tokens_ptr, logprobs_ptr, cut_ptr, V, stride, cstride,
                   HAS_PENALTIES: tl.constexpr, HAS_PROMPT: tl.constexpr, HAS_BIAS: tl.constexpr, BLOCK: tl.constexpr):
    row = tl.program_id(0)
    t = tl.load(temperature_ptr + row)
    rep = tl.load(rep_ptr + row)
    freq = tl.load(freq_ptr + row)
    pres = tl.load(pres_ptr + row)
    lane = tl.arange(0, BLOCK)

    # Pass 1: max and its first index.
    best = float("-inf")
    best_index = 0
    for start in range(0, V, BLOCK):
        x = _scaled(logits_ptr, counts_ptr, mask_ptr, bias_ptr, row, start + lane, V, stride, cstride, 0.0, 1.0, rep,
                    freq, pres, HAS_PENALTIES, HAS_PROMPT, HAS_BIAS, False)
        block_max = tl.max(x, 0)
        block_index = start + tl.argmax(x, 0)
        better = block_max > best
        best_index = tl.where(better, block_index, best_index)
        best = tl.maximum(best, block_max)
    if t == 0:
        tl.store(tokens_ptr + row, best_index.to(tl.int64))
        tl.store(logprobs_ptr + row, 0.0)
        tl.store(cut_ptr + row, -1)
    else:
        _draw(logits_ptr, counts_ptr, mask_ptr, bias_ptr, top_k_ptr, top_p_ptr, nlm_ptr, seed_ptr, step_ptr, tokens_ptr,
              logprobs_ptr, cut_ptr, row, V, stride, cstride, best, t, rep, freq, pres, HAS_PENALTIES, HAS_PROMPT,
                  HAS_BIAS, BLOCK)


@triton.jit
def _count_at_most(logits_ptr, counts_ptr, mask_ptr, bias_ptr, row, V, stride, cstride, best, t, rep, freq, pres, bound,
                   HAS_PENALTIES: tl.constexpr, HAS_PROMPT: tl.constexpr, HAS_BIAS: tl.constexpr, BLOCK: tl.constexpr):
    """How many tokens of the row have ``key <= bound``."""
    lane = tl.arange(0, BLOCK)
    count = 0
    for start in range(0, V, BLOCK):
        z, key = _z_key(logits_ptr, counts_ptr, mask_ptr, bias_ptr, row, start + lane, V, stride, cstride, best, t,
                        rep, freq, pres, HAS_PENALTIES, HAS_PROMPT, HAS_BIAS)
        count += tl.sum((key <= bound).to(tl.int32), 0)
    return count


@triton.jit
def _mass(logits_ptr, counts_ptr, mask_ptr, bias_ptr, row, V, stride, cstride, best, t, rep, freq, pres, bound,
          STRICT: tl.constexpr, HAS_PENALTIES: tl.constexpr, HAS_PROMPT: tl.constexpr, HAS_BIAS: tl.constexpr,
              BLOCK: tl.constexpr):
    """float64 ``sum(exp(z))`` over the tokens with ``key < bound`` (``STRICT``) or ``key <= bound``."""
    lane = tl.arange(0, BLOCK)
    mass = tl.zeros((), dtype=tl.float64)
    for start in range(0, V, BLOCK):
        z, key = _z_key(logits_ptr, counts_ptr, mask_ptr, bias_ptr, row, start + lane, V, stride, cstride, best, t,
                        rep, freq, pres, HAS_PENALTIES, HAS_PROMPT, HAS_BIAS)
        if STRICT:
            inside = key < bound
        else:
            inside = key <= bound
        mass += tl.sum(tl.where(inside, tl.exp(z), 0.0).to(tl.float64), 0)
    return mass


@triton.jit
def _draw(logits_ptr, counts_ptr, mask_ptr, bias_ptr, top_k_ptr, top_p_ptr, nlm_ptr, seed_ptr, step_ptr, tokens_ptr,
          logprobs_ptr, cut_ptr, row, V, stride, cstride, best, t, rep, freq, pres, HAS_PENALTIES: tl.constexpr,
          HAS_PROMPT: tl.constexpr, HAS_BIAS: tl.constexpr, BLOCK: tl.constexpr):
    k = tl.load(top_k_ptr + row)
    p = tl.load(top_p_ptr + row).to(tl.float64)
    min_p_key = tl.load(nlm_ptr + row).to(tl.int32, bitcast=True)

    # top-k: smallest key K with count(key <= K) >= k.
    k_key = INF_KEY
    if (k > 0) & (k < V):
        lo = 0
        hi = INF_KEY
        for _ in range(31):
            mid = lo + (hi - lo) // 2
            enough = _count_at_most(logits_ptr, counts_ptr, mask_ptr, bias_ptr, row, V, stride, cstride, best, t,
                                    rep, freq, pres, mid, HAS_PENALTIES, HAS_PROMPT, HAS_BIAS, BLOCK) >= k
            hi = tl.where(enough, mid, hi)
            lo = tl.where(enough, lo, mid + 1)
        k_key = lo

    # top-p: largest key P (<= K) with mass(key < P) < p * Z_k, Z_k the mass of the top-k set (the whole row when
    # top-k is off); the survivors are key <= P.
    p_key = k_key
    if p < 1.0:
        budget = p * _mass(logits_ptr, counts_ptr, mask_ptr, bias_ptr, row, V, stride, cstride, best, t, rep, freq,
                           pres, k_key, False, HAS_PENALTIES, HAS_PROMPT, HAS_BIAS, BLOCK)
        lo = 0
        hi = k_key
        for _ in range(31):
            mid = hi - (hi - lo) // 2
            fits = _mass(logits_ptr, counts_ptr, mask_ptr, bias_ptr, row, V, stride, cstride, best, t, rep, freq,
                         pres, mid, True, HAS_PENALTIES, HAS_PROMPT, HAS_BIAS, BLOCK) < budget
            lo = tl.where(fits, mid, lo)
            hi = tl.where(fits, hi, mid - 1)
        p_key = lo
    cut = tl.minimum(tl.minimum(k_key, p_key), min_p_key)
    tl.store(cut_ptr + row, cut)
    total = _mass(logits_ptr, counts_ptr, mask_ptr, bias_ptr, row, V, stride, cstride, best, t, rep, freq, pres, cut,
                  False, HAS_PENALTIES, HAS_PROMPT, HAS_BIAS, BLOCK)
    _inverse_cdf(logits_ptr, counts_ptr, mask_ptr, bias_ptr, seed_ptr, step_ptr, tokens_ptr, logprobs_ptr, row, V,
                 stride, cstride, best, t, rep, freq, pres, cut, total, HAS_PENALTIES, HAS_PROMPT, HAS_BIAS, BLOCK)


@triton.jit
def _inverse_cdf(logits_ptr, counts_ptr, mask_ptr, bias_ptr, seed_ptr, step_ptr, tokens_ptr, logprobs_ptr, row, V,
                 stride, cstride, best, t, rep, freq, pres, cut, total, HAS_PENALTIES: tl.constexpr,
                 HAS_PROMPT: tl.constexpr, HAS_BIAS: tl.constexpr, BLOCK: tl.constexpr):
    """Draw among the survivors (``key <= cut``, mass ``total``) by the inverse CDF in token-index order, with the
    row's Philox stream at its step; store the token and its log-probability under the filtered distribution."""
    lane = tl.arange(0, BLOCK)
    seed = tl.load(seed_ptr + row)
    step = tl.load(step_ptr + row).to(tl.uint32)
    zero = step * 0
    bits, _, _, _ = tl.philox(seed, step, zero, zero, zero)
    u = tl.uint_to_uniform_float(bits).to(tl.float64)
    target = u * total
    running = tl.zeros((), dtype=tl.float64)
    chosen = -1
    chosen_z = 0.0
    last = 0
    last_z = 0.0
    for start in range(0, V, BLOCK):
        offs = start + lane
        z, key = _z_key(logits_ptr, counts_ptr, mask_ptr, bias_ptr, row, offs, V, stride, cstride, best, t, rep,
                        freq, pres, HAS_PENALTIES, HAS_PROMPT, HAS_BIAS)
        w = tl.where((key <= cut) & (offs < V), tl.exp(z), 0.0).to(tl.float64)
        cdf = running + tl.cumsum(w, 0)
        crossing = tl.min(tl.where((cdf > target) & (w > 0), offs, 2147483647), 0)
        take = (chosen < 0) & (crossing < 2147483647)
        chosen_z = tl.where(take, tl.sum(tl.where(offs == crossing, z, 0.0), 0), chosen_z)
        chosen = tl.where(take, crossing, chosen)
        block_last = tl.max(tl.where(w > 0, offs, -1), 0)
        has = block_last >= 0
        last_z = tl.where(has, tl.sum(tl.where(offs == block_last, z, 0.0), 0), last_z)
        last = tl.where(has, block_last, last)
        running += tl.sum(w, 0)
    missing = chosen < 0  # u == 1.0 (probability 2**-24): the last survivor
    chosen_z = tl.where(missing, last_z, chosen_z)
    chosen = tl.where(missing, last, chosen)
    tl.store(tokens_ptr + row, chosen.to(tl.int64))
    tl.store(logprobs_ptr + row, (chosen_z.to(tl.float64) - tl.log(total)).to(tl.float32))


def default_block(V: int) -> int:
    return min(triton.next_power_of_2(V), 4096)


def sample_triton(logits: torch.Tensor, params: SamplingParams, return_logprobs: bool = False,
                  block: int | None = None, return_cut: bool = False):
    """Launch the kernel over the batch (CUDA tensors, or CPU tensors under ``TRITON_INTERPRET=1``).

    ``return_cut`` also returns each row's survivor key ``[B]`` int32 (tokens with ``bits(0 - z) <= cut`` survive;
    -1 for greedy rows), so tests can compare the kernel's support with the reference's."""
    B, V = logits.shape
    block = block or default_block(V)
    if block & (block - 1):
        raise ValueError(f"block must be a power of two, got {block}")
    device = logits.device
    logits = logits.contiguous()
    params = params.to(device)
    tokens = torch.empty(B, dtype=torch.int64, device=device)
    logprobs = torch.empty(B, dtype=torch.float32, device=device)
    cut = torch.empty(B, dtype=torch.int32, device=device)
    counts = params.counts.to(torch.int32).contiguous() if params.has_penalties else logits
    prompt = params.prompt_mask.to(torch.uint8).contiguous() if params.prompt_mask is not None else logits
    bias = params.logit_bias.to(torch.float32).contiguous() if params.logit_bias is not None else logits
    nlm = params.cut()
    _sample_kernel[(B,)](
        logits, counts, prompt, bias, params.temperature.float(), params.top_k, params.top_p.float(), nlm, params.seed,
        params.step, params.repetition_penalty.float(), params.presence_penalty.float(),
        params.frequency_penalty.float(), tokens, logprobs, cut, V, logits.stride(0),
        counts.stride(0) if params.has_penalties else 0,
        HAS_PENALTIES=params.has_penalties, HAS_PROMPT=params.prompt_mask is not None,
        HAS_BIAS=params.logit_bias is not None, BLOCK=block,
    )
    output = SampleOutput(tokens, logprobs if return_logprobs else None)
    return (output, cut) if return_cut else output
