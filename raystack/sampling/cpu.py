"""The CPU fast path of the sampling op: the semantics of ``reference.py`` without sorting the vocabulary.

Every filter keeps a top set by ``z``, so all survivors are among the C largest ``z`` for a C found by partial
selection (``torch.topk``, O(V) per row): C grows until the candidates provably hold every survivor (top-k: the
whole top-k set including boundary ties; top-p: the mass strictly above the C-th candidate already reaches
``p * total``; min-p: the C-th candidate is below ``log min_p``). The exact top-k / top-p / min-p rules then run on
those C candidates (sorted by the selection), and the draw is the inverse CDF over the survivors in token-index
order with the row's Philox uniform, as in the reference and the Triton kernel. Rows with no filter skip the
selection and draw from the cumulative sum over the whole vocabulary. Cost: a few passes over ``[B, V]`` (max,
scale, selection), the rest is on ``[B, C]``.
"""

from __future__ import annotations

import torch

from raystack.sampling import SampleOutput, SamplingParams, neg_log_min_p
from raystack.sampling.philox import uniform
from raystack.sampling.reference import apply_penalties

INITIAL_CANDIDATES = 64
GROWTH = 4


def _check_rows(row_max: torch.Tensor) -> None:
    bad = torch.nonzero(~torch.isfinite(row_max))
    if len(bad):
        raise ValueError(f"logits of row {int(bad[0])} contain NaN, +inf or no finite value")


def sample_cpu(logits: torch.Tensor, params: SamplingParams, return_logprobs: bool = False) -> SampleOutput:
    x = logits.to(torch.float32)
    if params.has_penalties:
        x = apply_penalties(x, params)
    B, V = x.shape
    row_max, tokens = x.max(dim=-1)  # the first maximum: greedy's tie rule; NaN propagates into row_max
    _check_rows(row_max)
    tokens = tokens.clone()
    logprobs = torch.zeros(B, dtype=torch.float32)
    temperature = params.temperature
    k_on = (params.top_k > 0) & (params.top_k < V)
    p_on = params.top_p < 1
    m_on = params.min_p > 0
    sampled = temperature > 0
    filtered = sampled & (k_on | p_on | m_on)
    plain = sampled & ~filtered
    if sampled.any():
        u = uniform(params.seed, params.step).to(torch.float64)
    if bool(filtered.all()):  # the usual batch: every row filtered alike, no row selection to pay for
        tokens, logprobs = _sample_filtered(x, row_max, params, u, k_on, p_on, m_on)
        return SampleOutput(tokens, logprobs if return_logprobs else None)
    if plain.any():
        rows = torch.nonzero(plain)[:, 0]
        tok, lp = _sample_unfiltered(x[rows], row_max[rows], temperature[rows], u[rows])
        tokens[rows], logprobs[rows] = tok, lp
    if filtered.any():
        rows = torch.nonzero(filtered)[:, 0]
        sub = params.select(rows)
        tok, lp = _sample_filtered(x[rows], row_max[rows], sub, u[rows], k_on[rows], p_on[rows], m_on[rows])
        tokens[rows], logprobs[rows] = tok, lp
    return SampleOutput(tokens, logprobs if return_logprobs else None)


def survivors_cpu(logits: torch.Tensor, params: SamplingParams) -> torch.Tensor:
    """Boolean ``[B, V]`` of the tokens the CPU path may draw (for tests against ``reference.filter_logits``)."""
    x = logits.to(torch.float32)
    if params.has_penalties:
        x = apply_penalties(x, params)
    B, V = x.shape
    row_max, first = x.max(dim=-1)
    _check_rows(row_max)
    mask = torch.zeros(B, V, dtype=torch.bool)
    k_on = (params.top_k > 0) & (params.top_k < V)
    p_on, m_on = params.top_p < 1, params.min_p > 0
    greedy = params.temperature == 0
    mask[greedy, first[greedy]] = True
    plain = ~greedy & ~(k_on | p_on | m_on)
    mask[plain] = x[plain] > float("-inf")
    rows = torch.nonzero(~greedy & (k_on | p_on | m_on))[:, 0]
    if len(rows):
        _, ids, alive, _ = _survivors(x[rows], row_max[rows], params.select(rows), k_on[rows], p_on[rows], m_on[rows])
        sub = torch.zeros(len(rows), V, dtype=torch.bool)
        sub.scatter_(1, ids, alive)
        mask[rows] = sub
    return mask


def _sample_unfiltered(x, row_max, temperature, u):
    z = (x - row_max[:, None]) / temperature[:, None]
    weights = torch.exp(z).to(torch.float64)
    cdf = torch.cumsum(weights, dim=-1)
    total = cdf[:, -1]
    index = torch.searchsorted(cdf, (u * total)[:, None].contiguous(), right=True)
    last = torch.searchsorted(cdf, total[:, None].contiguous(), right=False)  # the last token with mass
    index = torch.minimum(index, last)[:, 0]
    logprob = torch.log(weights.gather(1, index[:, None])[:, 0] / total)
    return index, logprob.to(torch.float32)


def _candidates(z, params, k_on, p_on, m_on, total, nlm):
    """The C largest z per row (values, token ids), C grown until every row's survivors are provably inside."""
    V = z.shape[1]
    k = params.top_k
    size = max(INITIAL_CANDIDATES, int(torch.where(k_on, k, 0).max()) + 1)
    while True:
        size = min(size, V)
        values, ids = torch.topk(z, size, dim=-1, sorted=True)
        if size == V:
            return values, ids
        last = values[:, -1]
        kth = values.gather(1, (k - 1).clamp(0, size - 1)[:, None])[:, 0]
        covers_k = (k < size) & (last < kth)
        above = torch.where(values > last[:, None], torch.exp(values).to(torch.float64), 0).sum(-1)
        covers_p = above >= params.top_p.to(torch.float64) * total
        covers_m = (0 - last) > nlm
        covers = torch.where(k_on, covers_k, (p_on & covers_p) | (m_on & covers_m))
        if bool(covers.all()):
            return values, ids
        size *= GROWTH


def _survivors(x, row_max, params, k_on, p_on, m_on):
    """Candidates ``(values, ids)`` ``[R, C]`` sorted by z, which of them survive, and their weights exp(z)."""
    z = (x - row_max[:, None]) / params.temperature[:, None]
    needs_total = p_on & ~k_on  # top-p over the whole vocabulary needs its total mass
    total = torch.zeros(len(z), dtype=torch.float64)
    if needs_total.any():
        rows = torch.nonzero(needs_total)[:, 0]
        total[rows] = torch.exp(z[rows]).sum(-1, dtype=torch.float64)
    nlm = neg_log_min_p(params.min_p)
    values, ids = _candidates(z, params, k_on, p_on, m_on, total, nlm)
    C = values.shape[1]

    alive = values > float("-inf")
    kth = values.gather(1, (params.top_k - 1).clamp(0, C - 1)[:, None])
    alive &= torch.where(k_on[:, None], values >= kth, True)
    weights = torch.where(alive, torch.exp(values).to(torch.float64), 0)
    total = torch.where(k_on, weights.sum(-1), total)
    # top-p: mass strictly above each candidate; tied candidates share their group's first exclusive sum
    exclusive = torch.cumsum(weights, -1) - weights
    group_start = torch.ones_like(alive)
    group_start[:, 1:] = values[:, 1:] != values[:, :-1]
    positions = torch.arange(C).expand_as(values)
    first = torch.cummax(torch.where(group_start, positions, 0), dim=-1).values
    keep_p = exclusive.gather(1, first) < params.top_p.to(torch.float64)[:, None] * total[:, None]
    alive &= torch.where(p_on[:, None], keep_p, True)
    alive &= torch.where(m_on[:, None], (0 - values) <= nlm[:, None], True)
    return values, ids, alive, weights


def _sample_filtered(x, row_max, params, u, k_on, p_on, m_on):
    values, ids, alive, weights = _survivors(x, row_max, params, k_on, p_on, m_on)
    # Inverse CDF over the survivors in token-index order.
    V = x.shape[1]
    keys = torch.where(alive, ids, V)
    order = torch.argsort(keys, dim=-1)
    sorted_ids = keys.gather(1, order)
    w = torch.where(alive, weights, 0).gather(1, order)
    cdf = torch.cumsum(w, -1)
    surviving_total = cdf[:, -1]
    pos = torch.searchsorted(cdf, (u * surviving_total)[:, None].contiguous(), right=True)
    pos = torch.minimum(pos, alive.sum(-1, keepdim=True) - 1)
    tokens = sorted_ids.gather(1, pos)[:, 0]
    logprobs = torch.log(w.gather(1, pos)[:, 0] / surviving_total)
    return tokens, logprobs.to(torch.float32)
