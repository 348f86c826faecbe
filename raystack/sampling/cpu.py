"""The CPU fast path of the sampling op: the semantics of ``reference.py`` without sorting the vocabulary.

Every filter keeps a top set by ``z``, so all survivors are among the C largest ``z`` for a C found by partial
selection (``np.argpartition``, O(V) per row): C grows until the candidates provably hold every survivor (top-k: the
whole top-k set including boundary ties; top-p: the mass strictly above the C-th candidate already reaches
``p * total``; min-p: the C-th candidate is below ``log min_p``). The exact top-k / top-p / min-p rules then run on
those C candidates (sorted by the selection), and the draw is the inverse CDF over the survivors in token-index
order with the row's Philox uniform, as in the reference and the Triton kernel. Rows with no filter skip the
selection and draw from the cumulative sum over the whole vocabulary. Cost: a few passes over ``[B, V]`` (max,
scale, selection), the rest is on ``[B, C]``.

It runs in NumPy: at serving sizes (tens of rows, a few hundred to a few thousand tokens) the op is ~60 element-wise
steps whose cost is their dispatch, cheaper per step in NumPy than in torch (benchmarks/sampling.py, B=1 V=32k:
2.1x the sort-based sampler in torch, 6.8x in NumPy; README "Measured"). Penalties (when a row has counts)
and the logit bias are applied in torch first (the reference's own function).

Vocabularies up to ``SAMPLE_ROWS_MAX_VOCAB`` (raystack's own is 257 bytes) go to a C++ op instead
(``raystack.kernels.sample_rows``, ``raystack/kernels/sample.cpp``): the same rules and the same Philox uniforms, each
row's z sorted and scanned once, rows in parallel (benchmarks/sampling.py prints it against this NumPy path). Where it
cannot be built, the NumPy path runs; tests/unit/test_sampling.py holds both to the reference.
"""

from __future__ import annotations

import numpy as np
import torch

from raystack.sampling import SampleOutput, SamplingParams
from raystack.sampling.philox import uniform_cached
from raystack.sampling.reference import apply_penalties

INITIAL_CANDIDATES = 64
GROWTH = 4


class _Rows:
    """The parameters the filters use, as NumPy arrays (one entry per row)."""

    def __init__(self, params: SamplingParams, V: int, rows=None):
        pick = (lambda t: t.numpy()) if rows is None else (lambda t: t.numpy()[rows])
        self.temperature, self.top_k = pick(params.temperature), pick(params.top_k)
        self.top_p, self.min_p = pick(params.top_p), pick(params.min_p)
        self.min_p_cut = pick(params.cut())  # the kernel's and the reference's cut, bit for bit
        self.seed, self.step = pick(params.seed), pick(params.step)
        self.k_on = (self.top_k > 0) & (self.top_k < V)
        self.p_on, self.m_on = self.top_p < 1, self.min_p > 0

    def subset(self, rows: np.ndarray) -> "_Rows":
        sub = object.__new__(_Rows)
        for name, value in vars(self).items():
            setattr(sub, name, value[rows])
        return sub


SAMPLE_ROWS_MAX_VOCAB = 4096
"""Vocabularies up to this size are sampled by the C++ op (``raystack.kernels.sample_rows``: a sort of each row);
larger ones by the NumPy path below, whose partial selection then costs less than a sort."""
_ops: dict = {}


def _sample_rows_op(V: int):
    """The C++ sampling op for a vocabulary of ``V`` tokens, or None (too large, or the op cannot be built)."""
    if V > SAMPLE_ROWS_MAX_VOCAB:
        return None
    if "sample_rows" not in _ops:  # looked up once per process
        from raystack import kernels

        _ops["sample_rows"] = kernels.sample_rows()
    return _ops["sample_rows"]


def _logits(logits: torch.Tensor, params: SamplingParams) -> np.ndarray:
    x = logits.to(torch.float32)
    if params.has_penalties or params.logit_bias is not None:
        x = apply_penalties(x, params)
    return np.ascontiguousarray(x.numpy())


def _check_rows(row_max: np.ndarray) -> None:
    bad = np.nonzero(~np.isfinite(row_max))[0]
    if len(bad):
        raise ValueError(f"logits of row {int(bad[0])} contain NaN, +inf or no finite value")


def sample_cpu(logits: torch.Tensor, params: SamplingParams, return_logprobs: bool = False) -> SampleOutput:
    op = _sample_rows_op(logits.shape[1])
    if op is not None:  # every row in one C++ call (raystack/kernels/sample.cpp): the same rules and uniforms
        x = logits.to(torch.float32)
        if params.has_penalties or params.logit_bias is not None:
            x = apply_penalties(x, params)
        u = uniform_cached(params.seed.numpy(), params.step.numpy()).astype(np.float64)
        tokens, logprobs = op(x.contiguous(), params.temperature, params.top_k, params.top_p, params.cut(),
                              torch.from_numpy(u))
        return SampleOutput(tokens, logprobs if return_logprobs else None)
    x = _logits(logits, params)
    B, V = x.shape
    row_max, tokens = x.max(axis=1), x.argmax(axis=1)  # the first maximum: greedy's tie rule; NaN propagates
    _check_rows(row_max)
    logprobs = np.zeros(B, dtype=np.float32)
    p = _Rows(params, V)
    sampled = p.temperature > 0
    filtered = sampled & (p.k_on | p.p_on | p.m_on)
    plain = sampled & ~filtered
    if sampled.any():
        u = uniform_cached(p.seed, p.step).astype(np.float64)
    if filtered.all():  # the usual batch: every row filtered alike, no row selection to pay for
        tokens, logprobs = _sample_filtered(x, row_max, p, u)
    else:
        if plain.any():
            rows = np.nonzero(plain)[0]
            tokens[rows], logprobs[rows] = _sample_unfiltered(x[rows], row_max[rows], p.temperature[rows], u[rows])
        if filtered.any():
            rows = np.nonzero(filtered)[0]
            tokens[rows], logprobs[rows] = _sample_filtered(x[rows], row_max[rows], p.subset(rows), u[rows])
    return SampleOutput(torch.from_numpy(tokens.astype(np.int64)),
                        torch.from_numpy(logprobs) if return_logprobs else None)


def survivors_cpu(logits: torch.Tensor, params: SamplingParams) -> torch.Tensor:
    """Boolean ``[B, V]`` of the tokens the CPU path may draw (for tests against ``reference.filter_logits``)."""
    x = _logits(logits, params)
    B, V = x.shape
    row_max, first = x.max(axis=1), x.argmax(axis=1)
    _check_rows(row_max)
    p = _Rows(params, V)
    mask = np.zeros((B, V), dtype=bool)
    greedy = p.temperature == 0
    mask[np.nonzero(greedy)[0], first[greedy]] = True
    plain = ~greedy & ~(p.k_on | p.p_on | p.m_on)
    mask[plain] = x[plain] > -np.inf
    rows = np.nonzero(~greedy & (p.k_on | p.p_on | p.m_on))[0]
    if len(rows):
        _, ids, alive, _, _ = _survivors(x[rows], row_max[rows], p.subset(rows))
        sub = np.zeros((len(rows), V), dtype=bool)
        np.put_along_axis(sub, ids, alive, axis=1)
        mask[rows] = sub
    return torch.from_numpy(mask)


def _along(a: np.ndarray, index: np.ndarray) -> np.ndarray:
    """``np.take_along_axis(a, index, axis=1)`` for 2-D arrays, without its per-call checks."""
    return a[np.arange(len(a))[:, None], index]


def _searchsorted_right(cdf: np.ndarray, target: np.ndarray) -> np.ndarray:
    """Per row, the number of ``cdf`` entries ``<= target`` (``torch.searchsorted(..., right=True)``)."""
    return (cdf <= target[:, None]).sum(axis=1)


def _sample_unfiltered(x, row_max, temperature, u):
    z = (x - row_max[:, None]) / temperature[:, None]
    weights = np.exp(z).astype(np.float64)
    cdf = np.cumsum(weights, axis=1)
    total = cdf[:, -1]
    index = _searchsorted_right(cdf, u * total)
    last = (cdf < total[:, None]).sum(axis=1)  # the last token with mass
    index = np.minimum(index, last)
    logprob = np.log(_along(weights, index[:, None])[:, 0] / total)
    return index, logprob.astype(np.float32)


def _top(z: np.ndarray, size: int, want_ids: bool = True) -> tuple[np.ndarray, np.ndarray | None]:
    """The ``size`` largest z per row, sorted descending (values, token ids): partial selection, then a sort of
    the selection only. The whole row without ``want_ids`` is its values alone (ids None), one float sort."""
    if size < z.shape[1]:
        ids = np.argpartition(-z, size - 1, axis=1)[:, :size]
        return _sort_descending(_along(z, ids), ids)
    if not want_ids:
        return -np.sort(-z, axis=1), None
    return _sort_descending(z, np.broadcast_to(np.arange(z.shape[1], dtype=np.uint32), z.shape))


def _sort_descending(values: np.ndarray, ids: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Each row's float32 ``(value, id)`` pairs sorted by value descending, ties by id ascending: one ``np.sort``
    of 64-bit keys (the value's bits made to order as the float does, then the id), ~5x cheaper at serving sizes
    than ``argsort`` and the gathers it needs. No NaN here (rows with one fail before)."""
    bits = np.ascontiguousarray(values, dtype=np.float32).view(np.uint32)
    ascending = np.where(bits >> 31, ~bits, bits | np.uint32(0x80000000))  # unsigned order == float order
    keys = ((~ascending).astype(np.uint64) << np.uint64(32)) | ids.astype(np.uint64)
    keys.sort(axis=1)
    ascending = ~(keys >> np.uint64(32)).astype(np.uint32)
    bits = np.where(ascending >> 31, ascending & np.uint32(0x7FFFFFFF), ~ascending)
    return bits.view(np.float32), (keys & np.uint64(0xFFFFFFFF)).astype(np.int64)


def _candidates(z, p: _Rows, total, nlm, want_ids: bool = True):
    """The C largest z per row (values, token ids), C grown until every row's survivors are provably inside.
    Without ``want_ids`` the ids of a whole-vocabulary selection (C == V) are not made (None)."""
    V = z.shape[1]
    k = p.top_k
    size = max(INITIAL_CANDIDATES, int(np.where(p.k_on, k, 0).max()) + 1)
    while True:
        size = V if size >= V // 4 else size  # a quarter of the vocabulary or more: sorting it all costs no more
        values, ids = _top(z, size, want_ids)
        if size == V:
            return values, ids
        last = values[:, -1]
        kth = _along(values, np.minimum(np.maximum(k - 1, 0), size - 1)[:, None])[:, 0]
        covers_k = (k < size) & (last < kth)
        above = np.where(values > last[:, None], np.exp(values).astype(np.float64), 0).sum(axis=1)
        covers_p = above >= p.top_p.astype(np.float64) * total
        covers_m = (0 - last) > nlm
        covers = np.where(p.k_on, covers_k, (p.p_on & covers_p) | (p.m_on & covers_m))
        if covers.all():
            return values, ids
        size *= GROWTH


def _survivors(x, row_max, p: _Rows, want_ids: bool = True):
    """Candidates ``(values, ids)`` ``[R, C]`` sorted by z, which of them survive, their weights exp(z), and z
    itself ``[R, V]`` (ids None when the candidates are the whole vocabulary and ``want_ids`` is off)."""
    z = (x - row_max[:, None]) / p.temperature[:, None]
    needs_total = p.p_on & ~p.k_on  # top-p over the whole vocabulary needs its total mass
    if needs_total.all():  # the usual batch: no boolean row selection to pay for
        total = np.exp(z).astype(np.float64).sum(axis=1)
    else:
        total = np.zeros(len(z), dtype=np.float64)
        if needs_total.any():
            total[needs_total] = np.exp(z[needs_total]).astype(np.float64).sum(axis=1)
    nlm = p.min_p_cut
    values, ids = _candidates(z, p, total, nlm, want_ids)
    C = values.shape[1]

    # Each filter's arrays are built only when some row uses it.
    alive = values > -np.inf
    top_k = p.k_on.any()
    if top_k:
        kth = _along(values, np.minimum(np.maximum(p.top_k - 1, 0), C - 1)[:, None])
        alive &= np.where(p.k_on[:, None], values >= kth, True)
    weights = np.where(alive, np.exp(values).astype(np.float64), 0)
    if top_k:
        total = np.where(p.k_on, weights.sum(axis=1), total)
    if p.p_on.any():
        # top-p: mass strictly above each candidate; tied candidates share their group's first exclusive sum
        exclusive = np.cumsum(weights, axis=1) - weights
        group_start = np.ones_like(alive)
        group_start[:, 1:] = values[:, 1:] != values[:, :-1]
        first = np.maximum.accumulate(np.where(group_start, np.arange(C), 0), axis=1)
        keep_p = _along(exclusive, first) < (p.top_p.astype(np.float64) * total)[:, None]
        alive &= np.where(p.p_on[:, None], keep_p, True)
    if p.m_on.any():
        alive &= np.where(p.m_on[:, None], (0 - values) <= nlm[:, None], True)
    return values, ids, alive, weights, z


def _sample_filtered(x, row_max, p: _Rows, u):
    values, ids, alive, weights, z = _survivors(x, row_max, p, want_ids=False)
    if ids is None:
        return _draw_above(z, values, alive, u)
    # Inverse CDF over the survivors in token-index order: the candidates ordered by (id, dead last) with one np.sort
    # of packed keys (id, then the candidate's position, so equal keys keep their order as a stable sort would).
    C = ids.shape[1]
    keys = (np.where(alive, ids, x.shape[1]).astype(np.uint64) << np.uint64(32)) | np.arange(C, dtype=np.uint64)
    keys.sort(axis=1)
    order = (keys & np.uint64(0xFFFFFFFF)).astype(np.intp)
    sorted_ids = (keys >> np.uint64(32)).astype(np.int64)
    w = _along(np.where(alive, weights, 0), order)
    cdf = np.cumsum(w, axis=1)
    surviving_total = cdf[:, -1]
    pos = _searchsorted_right(cdf, u * surviving_total)
    pos = np.minimum(pos, alive.sum(axis=1) - 1)
    tokens = _along(sorted_ids, pos[:, None])[:, 0]
    logprobs = np.log(_along(w, pos[:, None])[:, 0] / surviving_total)
    return tokens, logprobs.astype(np.float32)


def _draw_above(z, values, alive, u):
    """The draw when the candidates are the whole vocabulary (small vocabularies): every filter keeps a prefix of
    the candidates sorted by z, ties together, so the survivors are ``z >= tau`` with tau the last survivor's z, and
    the inverse CDF runs over the rows in token order as they are (dead tokens add exact zeros to the sums): no
    second sort, no gathers."""
    tau = _along(values, (alive.sum(axis=1) - 1)[:, None])
    keep = z >= tau
    w = np.where(keep, np.exp(z).astype(np.float64), 0)
    cdf = np.cumsum(w, axis=1)
    surviving_total = cdf[:, -1]
    index = _searchsorted_right(cdf, u * surviving_total)
    last = z.shape[1] - 1 - np.argmax(keep[:, ::-1], axis=1)  # the last survivor in token order
    tokens = np.minimum(index, last)
    logprobs = np.log(_along(w, tokens[:, None])[:, 0] / surviving_total)
    return tokens, logprobs.astype(np.float32)
