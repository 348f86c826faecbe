"""Shared cases for the sampling tests: a parameter grid, tie-heavy logits, and a G-test."""

import itertools

import torch

from raystack.sampling import SamplingParams

GRID = list(itertools.product([0.5, 1.0, 1.7], [0, 1, 7, 60], [1.0, 0.9, 0.4], [0.0, 0.05]))


def grid_params(B_per: int = 1, seed0: int = 0) -> tuple[SamplingParams, int]:
    rows = [(t, k, p, m) for t, k, p, m in GRID for _ in range(B_per)]
    B = len(rows)
    params = SamplingParams.build(
        B, temperature=[r[0] for r in rows], top_k=[r[1] for r in rows], top_p=[r[2] for r in rows],
        min_p=[r[3] for r in rows], seed=list(range(seed0, seed0 + B)), step=3)
    return params, B


def tie_logits(B: int, V: int, seed: int = 0) -> torch.Tensor:
    """Logits drawn from a few exact values, so the top-k and top-p boundaries fall inside groups of ties."""
    g = torch.Generator().manual_seed(seed)
    levels = torch.tensor([4.0, 2.0, 2.0, 1.0, 0.0, -1.0, -3.0])
    return levels[torch.randint(0, len(levels), (B, V), generator=g)]


def g_test_p_value(observed: torch.Tensor, expected_probs: torch.Tensor) -> float:
    """p-value of the G-test of ``observed`` counts against ``expected_probs`` (cells with zero probability must be
    empty: a draw outside the support fails the test outright)."""
    n = observed.sum()
    support = expected_probs > 0
    if (observed[~support] > 0).any():
        return 0.0
    obs, exp = observed[support].double(), expected_probs[support].double() * n
    g = 2 * torch.sum(torch.where(obs > 0, obs * torch.log(obs / exp), 0.0))
    df = int(support.sum()) - 1
    return float(torch.special.gammaincc(torch.tensor(df / 2, dtype=torch.float64), g / 2)) if df > 0 else 1.0


def bias_case(B: int = 6, V: int = 600, seed: int = 8) -> tuple[torch.Tensor, SamplingParams]:
    """Logits and parameters where the logit bias decides: rows that force a token (+100), rows that forbid the
    argmax (-100, greedy and sampled), a mild bias under top-k/top-p, penalties on top, and a row with no bias."""
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(B, V, generator=g) * 2
    bias = torch.zeros(B, V)
    bias[0, 17] = 100.0  # forced, sampled
    bias[1, logits[1].argmax()] = -100.0  # the argmax forbidden, greedy
    bias[2, 5] = 100.0  # forced, greedy
    bias[3, :50] = torch.linspace(-3, 3, 50)  # a mild bias under the filters
    bias[4, logits[4].topk(3).indices] = -100.0  # the top three forbidden, top-k 5
    counts = torch.zeros(B, V, dtype=torch.int32)
    counts[:, 40:60] = 1
    params = SamplingParams.build(B, temperature=[1.0, 0.0, 0.0, 0.8, 1.1, 0.9], top_k=[0, 0, 0, 20, 5, 0],
                                  top_p=[1.0, 1.0, 1.0, 0.9, 1.0, 0.95], repetition_penalty=1.1,
                                  counts=counts, logit_bias=bias, seed=list(range(30, 30 + B)), step=2)
    return logits, params
