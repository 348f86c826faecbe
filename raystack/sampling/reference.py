"""The reference sampler: plain, sort-based PyTorch that *defines* raystack's sampling semantics.

Everything else (the CPU fast path, the Triton kernel) is tested against ``filter_logits`` and ``sample_reference``
here; see ``raystack/sampling/__init__.py`` for the rules in words. Works in any float dtype (tests use float64).
"""

from __future__ import annotations

import torch

from raystack.sampling import neg_log_min_p
from raystack.sampling.philox import uniform


def apply_penalties(logits: torch.Tensor, params) -> torch.Tensor:
    """The logit bias, then repetition (divide positive / multiply negative logits of seen tokens), then frequency
    and presence."""
    if params.logit_bias is not None:
        logits = logits + params.logit_bias.to(logits.dtype)
    if params.counts is None:
        return logits
    counts = params.counts.to(logits.dtype)
    seen = params.counts > 0
    if params.prompt_mask is not None:
        seen_rep = seen | params.prompt_mask
    else:
        seen_rep = seen
    rep = params.repetition_penalty.to(logits.dtype)[:, None]
    penalised = torch.where(logits > 0, logits / rep, logits * rep)
    logits = torch.where(seen_rep, penalised, logits)
    logits = logits - params.frequency_penalty.to(logits.dtype)[:, None] * counts
    return logits - params.presence_penalty.to(logits.dtype)[:, None] * seen.to(logits.dtype)


def scaled_logits(logits: torch.Tensor, params) -> torch.Tensor:
    """``z = (penalised - max) / temperature`` per row (rows with temperature 0 are left unscaled)."""
    penalised = apply_penalties(logits, params)
    t = params.temperature.to(penalised.dtype)[:, None]
    shifted = penalised - penalised.max(dim=-1, keepdim=True).values
    return torch.where(t > 0, shifted / torch.where(t > 0, t, 1), shifted)


def filter_logits(logits: torch.Tensor, params) -> torch.Tensor:
    """Boolean ``[B, V]``: the tokens that survive penalties, temperature, top-k, top-p and min-p."""
    z = scaled_logits(logits, params)
    B, V = z.shape
    keep = torch.ones_like(z, dtype=torch.bool)
    values, order = torch.sort(z, dim=-1, descending=True, stable=True)
    for row in range(B):
        if params.temperature[row] == 0:  # greedy: the first maximum only
            keep[row] = False
            keep[row, int(torch.argmax(z[row]))] = True
            continue
        v = values[row]
        k = int(params.top_k[row])
        alive = torch.ones(V, dtype=torch.bool)
        if 0 < k < V:
            alive &= v >= v[k - 1]
        p = float(params.top_p[row])
        if p < 1.0:
            e = torch.exp(v) * alive
            total = e.sum()
            exclusive = torch.cumsum(e, 0) - e
            # mass strictly above a token: tied tokens share the exclusive sum of their group's first member
            group_start = torch.ones(V, dtype=torch.bool)
            group_start[1:] = v[1:] != v[:-1]
            first = torch.cummax(torch.where(group_start, torch.arange(V), 0), 0).values
            alive &= exclusive[first] < p * total
        if params.min_p[row] > 0:  # z >= log(min_p), with the float32 cut every implementation shares
            alive &= -v <= float(neg_log_min_p(params.min_p[row:row + 1])[0])
        keep[row, order[row]] = alive
    return keep


def filtered_probs(logits: torch.Tensor, params) -> torch.Tensor:
    """The final distribution: softmax of ``z`` over the surviving tokens (zero elsewhere)."""
    z = scaled_logits(logits, params)
    keep = filter_logits(logits, params)
    e = torch.where(keep, torch.exp(z), 0)
    return e / e.sum(-1, keepdim=True)


def sample_reference(logits: torch.Tensor, params):
    """Tokens and their log-probabilities: inverse CDF in token-index order with one Philox uniform per row."""
    logits = logits.to(torch.float64)
    probs = filtered_probs(logits, params)
    u = uniform(params.seed, params.step).to(torch.float64)
    cdf = torch.cumsum(probs, -1)
    index = torch.searchsorted(cdf, (u * cdf[:, -1])[:, None], right=True)[:, 0]
    last = probs.shape[1] - 1 - torch.argmax((probs > 0).flip(-1).to(torch.int8), -1)
    tokens = torch.minimum(index, last)  # u == 1.0 (probability 2**-24) picks the last survivor
    greedy = params.temperature == 0
    tokens = torch.where(greedy, torch.argmax(apply_penalties(logits, params), -1), tokens)
    logprobs = torch.log(probs.gather(1, tokens[:, None]))[:, 0]
    return tokens, logprobs
