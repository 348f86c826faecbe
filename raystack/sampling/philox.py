"""Counter-based randomness: Philox-4x32-10 exactly as Triton's ``tl.philox`` / ``tl.rand`` compute it.

One uniform per (seed, step): ``uniform(seed, step)`` on the CPU equals ``uint_to_uniform_float(philox(seed, step, 0, 0,
0)[0])`` inside the Triton kernel bit for bit, so a request's draw depends only on its own seed and step — not on
the batch, the row's position, the device or the kernel's block size.
"""

from __future__ import annotations

import numpy as np
import torch

_MASK = 0xFFFFFFFF
KEY_A, KEY_B = 0x9E3779B9, 0xBB67AE85
ROUND_A, ROUND_B = 0xD2511F53, 0xCD9E8D57


def _mulhi_lo(a: int, b: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """High and low 32 bits of the 64-bit product of constant ``a`` and uint32 values ``b`` (held in int64)."""
    product = b * a  # wraps modulo 2**64 in int64; both halves stay exact
    return (product >> 32) & _MASK, product & _MASK


def philox4x32(seed: torch.Tensor, c0: torch.Tensor, c1=None, c2=None, c3=None, rounds: int = 10):
    """Philox-4x32 over int64 tensors holding uint32 values; the key is the 64-bit seed (lo, hi words)."""
    seed = seed.to(torch.int64)
    k0, k1 = seed & _MASK, (seed >> 32) & _MASK
    zero = torch.zeros_like(c0, dtype=torch.int64)
    c0 = c0.to(torch.int64) & _MASK
    c1 = zero if c1 is None else c1.to(torch.int64) & _MASK
    c2 = zero if c2 is None else c2.to(torch.int64) & _MASK
    c3 = zero if c3 is None else c3.to(torch.int64) & _MASK
    for _ in range(rounds):
        hi_b, lo_b = _mulhi_lo(ROUND_B, c2)
        hi_a, lo_a = _mulhi_lo(ROUND_A, c0)
        c0, c1, c2, c3 = hi_b ^ c1 ^ k0, lo_b, hi_a ^ c3 ^ k1, lo_a
        k0, k1 = (k0 + KEY_A) & _MASK, (k1 + KEY_B) & _MASK
    return c0, c1, c2, c3


def uniform(seed: torch.Tensor, step: torch.Tensor) -> torch.Tensor:
    """float32 uniforms in [0, 1], one per (seed, step) pair, equal to Triton's ``tl.rand``-style conversion."""
    if seed.device.type == "cpu" and step.device.type == "cpu":
        return torch.from_numpy(uniform_numpy(seed.numpy(), step.numpy()))
    bits = philox4x32(seed, step)[0]
    signed = torch.where(bits >= 2**31, bits - 2**32, bits)  # bitcast to int32
    signed = torch.where(signed < 0, -signed - 1, signed)
    return signed.to(torch.float32) * torch.tensor(4.6566127342e-10, dtype=torch.float32)


def _uniform_python(seed: int, step: int) -> int:
    """One row's Philox word folded to a non-negative int32 (what ``uniform`` scales to [0, 1]), in plain Python
    integers: for a handful of rows, cheaper than any array's dispatch."""
    k0, k1 = seed & _MASK, (seed >> 32) & _MASK
    c0, c1, c2, c3 = step & _MASK, 0, 0, 0
    for _ in range(10):
        product_b, product_a = c2 * ROUND_B, c0 * ROUND_A
        c0, c1, c2, c3 = (product_b >> 32) ^ c1 ^ k0, product_b & _MASK, (product_a >> 32) ^ c3 ^ k1, product_a & _MASK
        k0, k1 = (k0 + KEY_A) & _MASK, (k1 + KEY_B) & _MASK
    signed = c0 - 2**32 if c0 >= 2**31 else c0  # bitcast to int32
    return -signed - 1 if signed < 0 else signed


SMALL_BATCH = 8
"""Up to this many rows, ``uniform_numpy`` computes row by row in Python integers."""


def uniform_numpy(seed: np.ndarray, step: np.ndarray) -> np.ndarray:
    """``uniform`` in NumPy's uint64 arithmetic, bit for bit: the same ~120 element-wise operations cost a few
    microseconds each in NumPy against tens in torch on a small batch (the engine draws once per decode step)."""
    if len(seed) <= SMALL_BATCH:
        ints = [_uniform_python(int(s), int(t)) for s, t in zip(seed.tolist(), step.tolist())]
        return np.array(ints, dtype=np.int64).astype(np.float32) * np.float32(4.6566127342e-10)
    with np.errstate(over="ignore"):
        mask, shift = np.uint64(_MASK), np.uint64(32)
        key = seed.astype(np.int64).astype(np.uint64)  # two's complement, as torch's int64 & 0xFFFFFFFF
        # The round keys of every round at once, [2 (k0, k1), rounds, B]; the state as pairs (c0, c2) and (c1, c3).
        keys = np.stack([key & mask, (key >> shift) & mask])[:, None, :]
        bumps = np.array([KEY_A, KEY_B], dtype=np.uint64)[:, None, None] * np.arange(10, dtype=np.uint64)[:, None]
        keys = (keys + bumps) & mask
        even = np.stack([step.astype(np.int64).astype(np.uint64) & mask, np.zeros(len(seed), dtype=np.uint64)])
        odd = np.zeros_like(even)
        multipliers = np.array([ROUND_A, ROUND_B], dtype=np.uint64)[:, None]
        for r in range(10):
            product = even * multipliers  # (c0 * A, c2 * B) < 2**64: exact
            # c0' = hi(c2 * B) ^ c1 ^ k0, c2' = hi(c0 * A) ^ c3 ^ k1, c1' = lo(c2 * B), c3' = lo(c0 * A)
            even, odd = (product >> shift)[::-1] ^ odd ^ keys[:, r], (product & mask)[::-1]
        signed = even[0].astype(np.uint32).view(np.int32).astype(np.int64)  # bitcast to int32
        signed = np.where(signed < 0, -signed - 1, signed)
        return signed.astype(np.float32) * np.float32(4.6566127342e-10)


AHEAD = 16
"""Steps ``uniform_cached`` draws at once for a seed that is being drawn step after step."""
TABLE_LIMIT = 1 << 16
"""Entries a table may hold before it is emptied (what sequences that ended early left behind)."""
_ahead: dict[tuple[int, int], float] = {}
_last: dict[int, int] = {}


def uniform_cached(seed: np.ndarray, step: np.ndarray) -> np.ndarray:
    """``uniform_numpy(seed, step)``, with the next steps of a decoding sequence drawn ahead: when a seed's last
    draw was the step before, its next ``AHEAD`` steps are computed in the same vectorised Philox and kept, so one
    call serves that many decode steps (the ~60 array operations of a draw cost more than the rest of sampling a
    small vocabulary). A value is taken out of the table when used; anything else is computed as asked, bit for
    bit the same."""
    keys = list(zip(seed.tolist(), step.tolist()))
    out = [_ahead.pop(key, None) for key in keys]
    missing = [i for i, value in enumerate(out) if value is None]
    if missing:
        if len(_ahead) > TABLE_LIMIT or len(_last) > TABLE_LIMIT:
            _ahead.clear()
            _last.clear()
        counts = np.array([AHEAD if _last.get(keys[i][0]) == keys[i][1] - 1 else 1 for i in missing])
        starts = np.cumsum(counts) - counts
        offsets = np.arange(int(counts.sum())) - np.repeat(starts, counts)
        values = uniform_numpy(np.repeat(seed[missing].astype(np.int64), counts),
                               np.repeat(step[missing].astype(np.int64), counts) + offsets).tolist()
        for i, start, count in zip(missing, starts.tolist(), counts.tolist()):
            out[i] = values[start]
            s, t = keys[i]
            for k in range(1, count):
                _ahead[(s, t + k)] = values[start + k]
    for s, t in keys:
        _last[s] = t
    return np.array(out, dtype=np.float32)
