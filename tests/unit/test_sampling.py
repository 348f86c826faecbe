"""The sampling op's semantics (reference), its CPU fast path, and parameter validation."""

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from raystack.sampling import SamplingParams, cpu, sample
from raystack.sampling.cpu import survivors_cpu
from raystack.sampling.philox import philox4x32, uniform
from raystack.sampling.reference import filter_logits, filtered_probs, sample_reference
from tests.unit.sampling_cases import bias_case, g_test_p_value, grid_params, tie_logits


def test_philox_matches_the_published_known_answer():
    # Random123's kat_vectors for philox4x32_10: counter and key all 0xffffffff.
    ones = torch.tensor([0xFFFFFFFF], dtype=torch.int64)
    out = philox4x32(ones | (ones << 32), ones, ones, ones, ones)
    assert [int(c) for c in out] == [0x408F276D, 0x41C83B0E, 0xA20BC7C6, 0x6D5451FD]
    u = uniform(torch.arange(1000), torch.zeros(1000, dtype=torch.int64))
    assert 0 <= float(u.min()) and float(u.max()) <= 1 and abs(float(u.mean()) - 0.5) < 0.05


def test_numpy_uniforms_equal_the_torch_philox_bit_for_bit():
    """The CPU path draws through NumPy; the torch form (the one Triton's tl.philox is tested against) must agree."""
    from raystack.sampling.philox import uniform_numpy

    g = torch.Generator().manual_seed(0)
    seed = torch.cat([torch.randint(-2**63, 2**63 - 1, (2000,), generator=g, dtype=torch.int64),
                      torch.tensor([0, -1, 2**63 - 1, -2**63, 2**32, 2**32 - 1])])
    step = torch.randint(0, 2**31, (len(seed),), generator=g)
    bits = philox4x32(seed, step)[0]
    signed = torch.where(bits >= 2**31, bits - 2**32, bits)
    signed = torch.where(signed < 0, -signed - 1, signed)
    expected = signed.to(torch.float32) * torch.tensor(4.6566127342e-10, dtype=torch.float32)
    got = torch.from_numpy(uniform_numpy(seed.numpy(), step.numpy()))
    assert torch.equal(got, expected)
    few = [torch.from_numpy(uniform_numpy(seed[i:i + 3].numpy(), step[i:i + 3].numpy())) for i in (0, 2003)]
    assert torch.equal(torch.cat(few), torch.cat([expected[0:3], expected[2003:2006]]))  # the row-by-row form
    assert torch.equal(uniform(seed, step), expected)


def test_uniforms_drawn_ahead_equal_those_drawn_as_asked():
    """The CPU path draws a decoding sequence's next steps ahead (philox.uniform_cached); whatever the order of the
    calls (step after step, the same step again, steps skipped, seeds joining and leaving), every value equals the
    direct draw bit for bit."""
    import numpy as np

    from raystack.sampling import philox

    g = np.random.default_rng(0)
    seeds = g.integers(-2**63, 2**63 - 1, 12, dtype=np.int64)
    steps = np.zeros(12, dtype=np.int64)
    for call in range(120):
        rows = np.sort(g.choice(12, size=int(g.integers(1, 13)), replace=False))
        move = g.integers(0, 10, len(rows))
        steps[rows] += np.where(move < 7, 1, np.where(move < 9, 0, 5))  # mostly the next step; again; a jump
        got = philox.uniform_cached(seeds[rows], steps[rows])
        assert np.array_equal(got, philox.uniform_numpy(seeds[rows], steps[rows])), f"call {call}"
    assert philox._ahead, "step-after-step draws were never drawn ahead"


def test_checked_parameters_still_refuse_bad_logits():
    """``params_checked`` skips the parameter checks the engine ran once for its batch, not the logits' own."""
    params = SamplingParams.build(2, top_p=0.9, seed=[1, 2])
    logits = torch.randn(2, 257)
    logits[1, 3] = float("nan")
    with pytest.raises(ValueError, match="row 1"):
        sample(logits, params, params_checked=True)
    with pytest.raises(ValueError, match="shape"):
        sample(torch.randn(3, 257), params, params_checked=True)


@pytest.mark.parametrize("V", [1000, 257], ids=["selection", "whole-sort"])  # 257: raystack's byte vocabulary
@pytest.mark.parametrize("make_logits", [lambda B, V: torch.randn(B, V) * 3, lambda B, V: tie_logits(B, V),
                                         lambda B, V: torch.randn(B, V) * 0.05], ids=["random", "ties", "flat"])
def test_cpu_support_equals_reference_over_a_parameter_grid(make_logits, V):
    params, B = grid_params()
    torch.manual_seed(0)
    logits = make_logits(B, V)
    expected = filter_logits(logits.double(), params)
    got = survivors_cpu(logits, params)
    mismatched = [row for row in range(B) if not torch.equal(got[row], expected[row])]
    assert not mismatched, f"support differs for rows {mismatched[:5]}"


def test_tie_rules_keep_whole_groups():
    logits = torch.tensor([[3.0, 1.0, 3.0, 1.0, 1.0, 0.0] + [-10.0] * 250])
    # top_k=2: both 3.0 survive; top_k=3: the 1.0 group ties at the boundary, all three kept
    for k, expected in [(1, [0, 2]), (2, [0, 2]), (3, [0, 1, 2, 3, 4])]:
        params = SamplingParams.build(1, top_k=k)
        for mask in (filter_logits(logits.double(), params), survivors_cpu(logits, params)):
            assert torch.nonzero(mask[0])[:, 0].tolist() == expected
    # top_p: the mass strictly above a 1.0 token is that of both 3.0 tokens; it decides for the whole group
    above = 2 * math.exp(3) / (2 * math.exp(3) + 3 * math.exp(1) + 1 + 250 * math.exp(-10))
    for p, expected in [(above - 1e-3, [0, 2]), (above + 1e-3, [0, 1, 2, 3, 4])]:
        params = SamplingParams.build(1, top_p=p)
        for mask in (filter_logits(logits.double(), params), survivors_cpu(logits, params)):
            assert torch.nonzero(mask[0])[:, 0].tolist() == expected


def test_greedy_is_the_first_argmax_and_has_logprob_zero():
    logits = torch.tensor([[0.5, 2.0, 2.0, -1.0] + [0.0] * 252, [1.0] * 256])
    out = sample(logits, SamplingParams.build(2, temperature=0.0, top_k=5, seed=[1, 2]), return_logprobs=True)
    assert out.tokens.tolist() == [1, 0]
    assert out.logprobs.tolist() == [0.0, 0.0]


@pytest.fixture(params=["op", "numpy"])
def cpu_path(request, monkeypatch):
    """Each CPU path in turn: the C++ op (``raystack.kernels.sample_rows``, vocabularies up to 4096) and NumPy."""
    if request.param == "numpy":
        monkeypatch.setattr(cpu, "SAMPLE_ROWS_MAX_VOCAB", 0)
    else:
        from tests.unit.test_kernels import op

        op()  # fails where a compiler is but the ops did not build; skips where there is none
        assert cpu._sample_rows_op(257) is not None
    return request.param


@pytest.mark.parametrize("V,make_logits", [(2048, lambda B, V: torch.randn(B, V) * 2.5),
                                           (257, lambda B, V: torch.randn(B, V) * 2.5),
                                           (257, lambda B, V: tie_logits(B, V)),
                                           (257, lambda B, V: torch.randn(B, V) * 0.05)],
                         ids=["selection", "whole-vocabulary", "whole-vocabulary-ties", "whole-vocabulary-flat"])
def test_cpu_path_draws_the_reference_tokens_and_logprobs(V, make_logits, cpu_path):
    """2048: survivors found by partial selection; 257 (the byte vocabulary): the whole row sorted and the draw made
    over the rows as they are, above one threshold per row (ties and near-uniform rows included); by the C++ op and
    by NumPy."""
    params, B = grid_params(B_per=2)
    torch.manual_seed(1)
    logits = make_logits(B, V)
    tokens, logprobs = sample_reference(logits.double(), params)
    out = sample(logits, params, return_logprobs=True, backend="cpu")
    assert (out.tokens == tokens).float().mean() == 1.0
    torch.testing.assert_close(out.logprobs.double(), logprobs, rtol=0, atol=1e-5)


def test_penalties_follow_the_vllm_definitions(cpu_path):
    torch.manual_seed(2)
    B, V = 4, 300
    logits = torch.randn(B, V) * 2
    counts = torch.zeros(B, V, dtype=torch.int32)
    counts[:, :20] = torch.randint(0, 4, (B, 20), dtype=torch.int32)
    prompt = torch.zeros(B, V, dtype=torch.bool)
    prompt[:, 20:25] = True
    params = SamplingParams.build(B, temperature=0.8, top_p=0.9, repetition_penalty=[1.0, 1.3, 0.7, 1.3],
                                  presence_penalty=[0.5, 0.0, -0.5, 1.0], frequency_penalty=[0.2, 0.0, 0.3, -0.1],
                                  counts=counts, prompt_mask=prompt, seed=[4, 5, 6, 7])
    from raystack.sampling.reference import apply_penalties

    x, c = logits[1], counts[1].float()
    seen = (c > 0) | prompt[1]
    manual = torch.where(seen, torch.where(x > 0, x / 1.3, x * 1.3), x)
    torch.testing.assert_close(apply_penalties(logits, params)[1], manual)
    assert torch.equal(survivors_cpu(logits, params), filter_logits(logits.double(), params))
    assert torch.equal(sample(logits, params, backend="cpu").tokens, sample_reference(logits.double(), params)[0])


def test_logit_bias_forces_and_forbids_tokens_before_everything_else(cpu_path):
    logits, params = bias_case()
    out = sample(logits, params, return_logprobs=True, backend="cpu")
    tokens, logprobs = sample_reference(logits.double(), params)
    assert torch.equal(out.tokens, tokens)
    torch.testing.assert_close(out.logprobs.double(), logprobs, rtol=0, atol=1e-5)
    assert torch.equal(survivors_cpu(logits, params), filter_logits(logits.double(), params))
    assert out.tokens[0] == 17 and out.tokens[2] == 5  # +100 forces, sampled or greedy
    assert out.tokens[1] != logits[1].argmax()  # -100 forbids the greedy choice
    assert out.tokens[4] not in logits[4].topk(3).indices
    bad = params.logit_bias.clone()
    bad[3, 0] = float("nan")
    with pytest.raises(ValueError, match="logit_bias must be finite; row 3"):
        sample(logits, SamplingParams(**{**vars(params), "logit_bias": bad}), backend="cpu")


@pytest.mark.parametrize("case", [
    dict(temperature=0.9),
    dict(temperature=0.7, top_k=6),
    dict(temperature=1.2, top_p=0.7),
    dict(temperature=1.0, min_p=0.1),
    dict(temperature=0.8, top_k=12, top_p=0.85, min_p=0.02),
])
def test_cpu_draws_follow_the_filtered_distribution(case, cpu_path):
    """G-test at alpha = 1e-3: 20 000 draws of one row (steps 0..19 999) against the reference probabilities."""
    torch.manual_seed(3)
    V, N = 256, 20_000
    row = torch.randn(1, V) * 2
    params = SamplingParams.build(N, seed=11, step=torch.arange(N), **case)
    tokens = sample(row.expand(N, V), params, backend="cpu").tokens
    expected = filtered_probs(row.double(), SamplingParams.build(1, **case))[0]
    assert g_test_p_value(torch.bincount(tokens, minlength=V), expected) > 1e-3


def test_same_seed_and_step_give_the_same_token_whatever_the_batch(cpu_path):
    torch.manual_seed(4)
    logits = torch.randn(32, 4096) * 3
    params = SamplingParams.build(32, temperature=0.9, top_k=[0, 40] * 16, top_p=0.92, seed=list(range(32)), step=5)
    batched = sample(logits, params, backend="cpu").tokens
    for row in (0, 7, 31):
        alone = sample(logits[row:row + 1], params.select(torch.tensor([row])), backend="cpu").tokens
        assert alone.item() == batched[row].item()
    shuffled = torch.randperm(32)
    assert torch.equal(sample(logits[shuffled], params.select(shuffled), backend="cpu").tokens, batched[shuffled])
    # different seeds give different draws of the same distribution
    same_row = sample(logits[:1].expand(64, -1), SamplingParams.build(64, seed=torch.arange(64)), backend="cpu")
    assert len(set(same_row.tokens.tolist())) > 20


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_input_dtypes(dtype):
    logits = (torch.randn(4, 512) * 2).to(dtype)
    params = SamplingParams.build(4, temperature=0.7, top_k=30, top_p=0.9, seed=[1, 2, 3, 4])
    expected, _ = sample_reference(logits.double(), params)
    assert torch.equal(sample(logits, params, backend="cpu").tokens, expected)


@pytest.mark.parametrize("field, value, message", [
    ("temperature", -0.1, "temperature must be a finite number >= 0; row 1"),
    ("temperature", math.inf, "temperature must be a finite number >= 0; row 1"),
    ("temperature", math.nan, "temperature must be a finite number >= 0; row 1"),
    ("top_p", 0.0, r"top_p must be in \(0, 1\]; row 1"),
    ("top_p", 1.5, r"top_p must be in \(0, 1\]; row 1"),
    ("top_k", -2, "top_k must be -1, 0 \\(off\\) or a positive integer; row 1"),
    ("min_p", 1.0, r"min_p must be in \[0, 1\); row 1"),
    ("min_p", -0.1, r"min_p must be in \[0, 1\); row 1"),
    ("repetition_penalty", 0.0, "repetition_penalty must be a finite number > 0; row 1"),
])
def test_bad_parameters_name_the_parameter_and_row(field, value, message):
    values = {field: [SamplingParams.build(1).__dict__[field].item(), value, 0.5 if field != "top_k" else 3]}
    params = SamplingParams.build(3, **values)
    for backend in ("cpu", "reference"):
        with pytest.raises(ValueError, match=message):
            sample(torch.randn(3, 300), params, backend=backend)


def test_bad_logits_and_shapes_are_refused():
    params = SamplingParams.build(2)
    logits = torch.randn(2, 300)
    logits[1, 7] = math.nan
    for backend in ("cpu", "reference"):
        with pytest.raises(ValueError, match="logits of row 1 contain NaN"):
            sample(logits, params, backend=backend)
    with pytest.raises(ValueError, match="logits of row 0"):
        sample(torch.full((2, 300), -math.inf), params)
    with pytest.raises(ValueError, match=r"temperature must have shape \[3\], got \[2\]"):
        sample(torch.randn(3, 300), params)
    with pytest.raises(ValueError, match=r"logits must be \[batch, vocab\]"):
        sample(torch.randn(300), params)
    with pytest.raises(ValueError, match=r"counts must have shape \[2, 300\]"):
        sample(torch.randn(2, 300), SamplingParams.build(2, counts=torch.zeros(2, 10, dtype=torch.int32)))


@given(st.lists(st.lists(st.sampled_from([-math.inf, -3.5, -1.0, -0.0, 0.0, 1e-30, 2.0, 7.25, 3e38]), min_size=1,
                         max_size=40), min_size=1, max_size=5).filter(lambda rows: len({len(r) for r in rows}) == 1))
@settings(max_examples=200, deadline=None)
def test_packed_sort_orders_like_a_stable_descending_argsort(rows):
    """The CPU path's one-``np.sort`` ordering of (value, id) pairs: values descending, equal values by id."""
    import numpy as np

    from raystack.sampling.cpu import _sort_descending

    values = np.array(rows, dtype=np.float32)
    ids = np.broadcast_to(np.arange(values.shape[1], dtype=np.uint32), values.shape)
    got_values, got_ids = _sort_descending(values, ids)
    order = np.argsort(-values, axis=1, kind="stable")
    assert np.array_equal(got_values, np.take_along_axis(values, order, 1))  # -0.0 == 0.0: equal values
    assert np.array_equal(np.take_along_axis(values, got_ids, 1), got_values)  # each id carries its own value
    no_signed_zero = ~((values == 0) & np.signbit(values)).any(axis=1)
    assert np.array_equal(got_ids[no_signed_zero], order[no_signed_zero])


@pytest.mark.parametrize("V", [257, 5000])  # the C++ op's vocabularies, and the NumPy path's
def test_the_cpu_path_takes_min_p_cut_from_build_and_gives_what_min_p_gives(V):
    """The CPU path reads min-p's cut from the parameters (built once per batch, not per step); without it (None) the
    cut is computed from ``min_p``, and the tokens and log-probabilities are the same."""
    from dataclasses import replace

    torch.manual_seed(11)
    logits = torch.randn(6, V) * 3
    params = SamplingParams.build(6, temperature=[1.0, 0.7, 1.3, 1.0, 0.9, 1.0], min_p=[0, 0.05, 0.2, 0.5, 0, 0.01],
                                  top_p=[1, 0.9, 1, 1, 0.8, 1], seed=list(range(6)), step=4)
    built = sample(logits, params, return_logprobs=True, backend="cpu")
    derived = sample(logits, replace(params, min_p_cut=None), return_logprobs=True, backend="cpu")
    reference = sample(logits, params, return_logprobs=True, backend="reference")
    assert torch.equal(built.tokens, derived.tokens) and torch.equal(built.logprobs, derived.logprobs)
    assert torch.equal(built.tokens, reference.tokens)
