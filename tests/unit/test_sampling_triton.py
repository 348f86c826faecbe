"""The Triton sampling kernel against the reference and the CPU path.

Without a GPU the kernel runs through Triton's interpreter (TRITON_INTERPRET=1, set here before Triton compiles
anything), so these tests stay small: few rows, large blocks. On a CUDA machine the same tests run the real kernel.
"""

import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ["TRITON_INTERPRET"] = "1"
triton = pytest.importorskip("triton")

from raystack.sampling import SamplingParams, sample, to_device  # noqa: E402
from raystack.sampling.reference import filter_logits, filtered_probs  # noqa: E402
from raystack.sampling.triton_kernel import sample_triton  # noqa: E402
from tests.unit.sampling_cases import bias_case, g_test_p_value, grid_params, tie_logits  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def kernel_support(logits: torch.Tensor, params: SamplingParams, cut: torch.Tensor) -> torch.Tensor:
    """The kernel's survivors, rebuilt from its per-row key cut with the kernel's own float32 arithmetic."""
    from raystack.sampling.reference import apply_penalties

    x = apply_penalties(logits.float(), params)
    z = (x - x.max(-1, keepdim=True).values) / torch.where(params.temperature > 0, params.temperature, 1)[:, None]
    keys = (0.0 - z).view(torch.int32)
    support = keys <= cut[:, None].cpu()
    greedy = params.temperature == 0
    support[greedy] = False
    support[greedy, x[greedy].argmax(-1)] = True
    return support


def test_kernel_support_equals_reference_over_the_grid_and_ties():
    params, B = grid_params()
    rows = torch.arange(0, B, 3)  # a third of the grid keeps the interpreter quick
    sub = params.select(rows)
    for logits in (torch.randn(B, 700) * 3, tie_logits(B, 700, seed=5)):
        logits = logits[rows]
        out, cut = sample_triton(logits.to(DEVICE), sub, return_cut=True, block=256)
        expected = filter_logits(logits.double(), sub)
        got = kernel_support(logits, sub, cut)
        bad = [int(r) for r in range(len(rows)) if not torch.equal(got[r], expected[r])]
        assert not bad, f"support differs for rows {bad}"
        assert expected.gather(1, out.tokens.cpu()[:, None]).all()


def test_kernel_tokens_and_logprobs_equal_the_cpu_path_at_any_block_size():
    torch.manual_seed(6)
    B, V = 8, 3000  # several blocks per row
    logits = torch.randn(B, V) * 2.5
    counts = torch.zeros(B, V, dtype=torch.int32)
    counts[:, ::97] = 2
    params = SamplingParams.build(B, temperature=[0, 0.6, 1.0, 1.4] * 2, top_k=[0, 40, 0, 5, 300, 0, 0, 1],
                                  top_p=[1, 0.9, 0.8, 1, 1, 0.95, 1, 1], min_p=[0, 0, 0.05, 0, 0, 0, 0.2, 0],
                                  repetition_penalty=1.2, presence_penalty=0.3, frequency_penalty=0.1,
                                  counts=counts, seed=list(range(100, 108)), step=9)
    cpu = sample(logits, params, return_logprobs=True, backend="cpu")
    for block in (512, 4096):
        out = sample_triton(logits.to(DEVICE), params, return_logprobs=True, block=block)
        assert torch.equal(out.tokens.cpu(), cpu.tokens), f"block {block}"
        torch.testing.assert_close(out.logprobs.cpu(), cpu.logprobs, rtol=0, atol=1e-5)


def test_kernel_applies_the_logit_bias_as_the_cpu_path_and_reference_do():
    logits, params = bias_case()
    cpu = sample(logits, params, return_logprobs=True, backend="cpu")
    out, cut = sample_triton(logits.to(DEVICE), params, return_logprobs=True, block=256, return_cut=True)
    assert torch.equal(out.tokens.cpu(), cpu.tokens)
    torch.testing.assert_close(out.logprobs.cpu(), cpu.logprobs, rtol=0, atol=1e-5)
    assert torch.equal(kernel_support(logits, params, cut), filter_logits(logits.double(), params))


def test_kernel_row_result_does_not_depend_on_batch_or_position():
    torch.manual_seed(7)
    logits = torch.randn(6, 1024) * 2
    params = SamplingParams.build(6, temperature=0.9, top_k=50, top_p=0.9, seed=[3, 1, 4, 1, 5, 9], step=2)
    batched = sample_triton(logits.to(DEVICE), params).tokens.cpu()
    order = torch.tensor([5, 2, 0])
    subset = sample_triton(logits[order].to(DEVICE), params.select(order)).tokens.cpu()
    assert torch.equal(subset, batched[order])
    other_seeds = sample_triton(logits.to(DEVICE), SamplingParams.build(6, temperature=0.9, top_k=50, top_p=0.9,
                                                                          seed=[30, 10, 40, 10, 50, 90], step=2))
    assert not torch.equal(other_seeds.tokens.cpu(), batched)


@pytest.mark.parametrize("V, dtype", [(256, torch.float32), (32_000, torch.bfloat16), (262_144, torch.float16)])
def test_kernel_vocabularies_and_dtypes(V, dtype):
    torch.manual_seed(8)
    logits = (torch.randn(2, V) * 3).to(dtype)
    params = SamplingParams.build(2, temperature=[0.8, 1.0], top_k=[20, 0], top_p=[0.9, 1.0], min_p=[0, 0.3],
                                  seed=[1, 2], step=1)
    out = sample_triton(logits.to(DEVICE), params, return_logprobs=True, block=min(triton.next_power_of_2(V), 65536))
    cpu = sample(logits, params, return_logprobs=True, backend="cpu")
    assert torch.equal(out.tokens.cpu(), cpu.tokens)


def test_kernel_draws_follow_the_filtered_distribution():
    """G-test at alpha = 1e-3 over 1 500 draws (min-p keeps the interpreter's work per draw small)."""
    torch.manual_seed(9)
    V, N = 256, 1500
    row = torch.randn(1, V) * 2
    case = dict(temperature=1.0, min_p=0.15)
    params = SamplingParams.build(N, seed=5, step=torch.arange(N), **case)
    tokens = sample_triton(row.expand(N, V).contiguous().to(DEVICE), params, block=256).tokens.cpu()
    expected = filtered_probs(row.double(), SamplingParams.build(1, **case))[0]
    assert 5 <= int((expected > 0).sum()) <= 40
    assert g_test_p_value(torch.bincount(tokens, minlength=V), expected) > 1e-3


@pytest.mark.gpu
def test_auto_dispatch_uses_the_kernel_for_cuda_logits():
    logits = torch.randn(4, 5000, device="cuda")
    params = SamplingParams.build(4, temperature=0.8, top_k=10, seed=[1, 2, 3, 4])
    assert torch.equal(sample(logits, params).tokens.cpu(), sample(logits.cpu(), params, backend="cpu").tokens)


def test_to_device_leaves_a_host_tensor_for_the_host_as_it_is():
    t = torch.arange(10, dtype=torch.int32)
    assert to_device(t, "cpu", non_blocking=True) is t and to_device(t, torch.device("cpu")) is t
    params = SamplingParams.build(2, temperature=[0.5, 1.0], min_p=0.1, logit_bias=torch.zeros(2, 7))
    assert params.to("cpu", non_blocking=True).temperature is params.temperature


@pytest.mark.gpu
def test_to_device_queues_host_tensors_for_cuda_through_pinned_memory():
    """What the engine's runner does with a batch's parameters (built and checked on the host) and penalty counts:
    every field arrives, equal, and the host tensor itself is left pageable and untouched."""
    from dataclasses import fields

    params = SamplingParams.build(2, temperature=[0.5, 1.0], top_k=[3, 0], min_p=[0.0, 0.2], seed=[7, 8],
                                  counts=torch.tensor([[0, 2, 1], [1, 0, 0]], dtype=torch.int32),
                                  logit_bias=torch.tensor([[0.0, 1.5, -2.0], [0.0, 0.0, 0.0]]))
    moved = params.to("cuda", non_blocking=True)
    for f in fields(params):
        host, device = getattr(params, f.name), getattr(moved, f.name)
        if host is None:
            assert device is None, f.name
            continue
        assert device.is_cuda and torch.equal(device.cpu(), host), f.name
        assert not host.is_pinned(), f.name


@pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning")  # the interpreter's NumPy on NaN rows
def test_bad_logits_are_refused_by_row_after_the_launch():
    """The kernel's path checks the logits after launching (on CUDA one host sync then covers the decode step and the
    kernel): a NaN, +inf or all -inf row still raises, naming its row, and nothing is returned."""
    params = SamplingParams.build(3, temperature=0.8, top_p=0.9, min_p=0.1, seed=[1, 2, 3])
    for row, value in ((1, float("nan")), (2, float("inf"))):
        logits = torch.randn(3, 300)
        logits[row, 7] = value
        with pytest.raises(ValueError, match=f"logits of row {row} contain NaN"):
            sample(logits.to(DEVICE), params, backend="triton")
    logits = torch.randn(3, 300)
    logits[0] = float("-inf")
    with pytest.raises(ValueError, match="logits of row 0"):
        sample(logits.to(DEVICE), params, backend="triton")


def test_min_p_cut_is_built_on_the_host_and_gives_the_kernel_what_min_p_gives():
    """``build`` computes min-p's cut once (the kernel would otherwise copy ``min_p`` to the host every step); the
    kernel's tokens are the same with it and without it (None: computed from ``min_p``), and it follows select."""
    from dataclasses import replace

    from raystack.sampling import neg_log_min_p

    min_p = [0.0, 0.05, 0.3, 0.99999994]
    params = SamplingParams.build(4, temperature=1.0, min_p=min_p, seed=[5, 6, 7, 8], step=3)
    assert torch.equal(params.min_p_cut, neg_log_min_p(torch.tensor(min_p)))
    assert torch.isinf(params.min_p_cut[0]) and params.min_p_cut.dtype == torch.float32
    logits = (torch.randn(4, 700) * 3).to(DEVICE)
    built = sample_triton(logits, params, return_logprobs=True, block=256)
    derived = sample_triton(logits, replace(params, min_p_cut=None), return_logprobs=True, block=256)
    assert torch.equal(built.tokens, derived.tokens) and torch.equal(built.logprobs, derived.logprobs)
    rows = torch.tensor([2, 0])
    assert torch.equal(params.select(rows).min_p_cut, params.min_p_cut[rows])
    assert SamplingParams.build(3, min_p=0.2).min_p_cut.tolist() == neg_log_min_p(torch.full((3,), 0.2)).tolist()
