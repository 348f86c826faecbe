"""The GPT: presets, shapes, and the KV-cache decode path against the full forward."""

import pytest
import torch

from raystack.model import GPT, PRESETS, KVCache, ModelConfig


def test_presets_have_the_documented_sizes():
    sizes = {name: GPT(ModelConfig.from_preset(name)).num_parameters() for name in PRESETS}
    assert sizes["tiny"] < 1_000_000
    assert 15_000_000 < sizes["small"] < 25_000_000
    assert 80_000_000 < sizes["gpt2"] < 130_000_000


def test_forward_shapes_and_tied_embeddings():
    model = GPT(ModelConfig.from_preset("tiny"))
    logits = model(torch.randint(0, 257, (3, 17)))
    assert logits.shape == (3, 17, 257)
    assert "embed.weight" in model.state_dict() and not any("lm_head" in k for k in model.state_dict())


def test_sequence_longer_than_max_seq_len_is_refused():
    model = GPT(ModelConfig.from_preset("tiny", max_seq_len=16))
    with pytest.raises(ValueError, match="max_seq_len"):
        model(torch.zeros(1, 17, dtype=torch.long))


@pytest.mark.parametrize("bad", [dict(n_embd=65), dict(n_head=0), dict(dropout=1.5), dict(n_embd=12, n_head=4)])
def test_bad_shapes_are_refused(bad):
    with pytest.raises(ValueError, match="model\\."):
        ModelConfig.from_preset("tiny", **bad)


def test_unknown_preset_is_refused():
    with pytest.raises(ValueError, match="preset"):
        ModelConfig.from_preset("huge")


@torch.no_grad()
def test_token_by_token_decode_with_cache_equals_full_forward():
    torch.manual_seed(0)
    config = ModelConfig.from_preset("tiny", max_seq_len=32)
    model = GPT(config).eval()
    tokens = torch.randint(0, 257, (2, 24))
    full = model(tokens)
    cache = KVCache(config, slots=4)
    slots = torch.tensor([3, 1])  # arbitrary slots: rows must not see each other's cache
    steps = []
    for t in range(tokens.shape[1]):
        positions = torch.full((2, 1), t)
        steps.append(model(tokens[:, t:t + 1], positions=positions, cache=cache, slots=slots))
    torch.testing.assert_close(torch.cat(steps, dim=1), full, rtol=1e-4, atol=1e-4)


@torch.no_grad()
def test_prefill_then_decode_with_rows_at_different_positions():
    torch.manual_seed(1)
    config = ModelConfig.from_preset("tiny", max_seq_len=32)
    model = GPT(config).eval()
    a, b = torch.randint(0, 257, (1, 10)), torch.randint(0, 257, (1, 6))
    cache = KVCache(config, slots=2)
    model(a[:, :9], positions=torch.arange(9)[None], cache=cache, slots=torch.tensor([0]))
    model(b[:, :5], positions=torch.arange(5)[None], cache=cache, slots=torch.tensor([1]))
    # One batched decode step with rows at positions 9 and 5.
    step = model(torch.cat([a[:, 9:], b[:, 5:]]), positions=torch.tensor([[9], [5]]), cache=cache,
                 slots=torch.tensor([0, 1]))
    torch.testing.assert_close(step[0, 0], model(a)[0, -1], rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(step[1, 0], model(b)[0, -1], rtol=1e-4, atol=1e-4)
    # A prefill from position 0 gives the full forward's last logits and fills the cache as the general path does.
    fresh = KVCache(config, slots=2)
    torch.testing.assert_close(model.prefill(a[:, :9], fresh, torch.tensor([0])), model(a[:, :9])[:, -1],
                               rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(fresh.k[:, 0, :, :9], cache.k[:, 0, :, :9])
    torch.testing.assert_close(fresh.v[:, 0, :, :9], cache.v[:, 0, :, :9])


@torch.no_grad()
@pytest.mark.parametrize("fused,span", [(True, None), (False, None), (False, 32)],
                         ids=["fused-op", "pytorch-ops", "pytorch-ops-fixed-span"])
@pytest.mark.parametrize("in_place", [True, False])
def test_decode_step_equals_the_general_forward_and_idle_rows_touch_nothing_read(in_place, fused, span):
    """``GPT.decode`` (the engine's decode step) gives the general forward's logits and writes the same keys and
    values, over consecutive slots read in place (with an idle row at position -1) or gathered slots; with the
    fused CPU op (raystack.kernels, tests/unit/test_kernels.py checks it is built), with PyTorch ops alone, and with
    PyTorch ops over the cache's whole length (the fixed shape CUDA graphs capture, raystack.decode_graphs)."""
    torch.manual_seed(2)
    config = ModelConfig.from_preset("tiny", max_seq_len=32)
    model = GPT(config).eval()
    general, fast = KVCache(config, slots=5), KVCache(config, slots=5)
    lengths = [7, 12, 3, 20, 9]
    for slot, length in enumerate(lengths):
        prompt = torch.randint(0, 257, (1, length))
        for cache in (general, fast):
            model(prompt, positions=torch.arange(length)[None], cache=cache, slots=torch.tensor([slot]))
    if in_place:
        slots, positions = slice(1, 5), torch.tensor([12, -1, 20, 9])  # slot 2 idle this step
    else:
        slots, positions = torch.tensor([4, 0, 3]), torch.tensor([9, 7, 20])
    tokens = torch.randint(0, 257, (len(positions),))
    expected = model(tokens[:, None], positions=positions[:, None], cache=general, slots=slots)[:, -1]
    got = model.decode(tokens, positions, fast, slots, fused=fused, span=span)
    live = positions >= 0
    torch.testing.assert_close(got[live], expected[live], rtol=1e-5, atol=1e-5)
    assert torch.isfinite(got).all()  # an idle row's output is dropped, but never NaN
    last = config.max_seq_len - 1  # the position an idle row writes, never read
    torch.testing.assert_close(fast.k[:, :, :, :last], general.k[:, :, :, :last])
    torch.testing.assert_close(fast.v[:, :, :, :last], general.v[:, :, :, :last])


def test_kv_cache_memory_is_known_up_front():
    config = ModelConfig.from_preset("tiny")
    cache = KVCache(config, slots=8)
    expected = 2 * config.n_layer * 8 * config.max_seq_len * config.n_embd * 4
    assert cache.nbytes == expected
