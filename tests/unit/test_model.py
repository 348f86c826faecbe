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


def test_kv_cache_memory_is_known_up_front():
    config = ModelConfig.from_preset("tiny")
    cache = KVCache(config, slots=8)
    expected = 2 * config.n_layer * 8 * config.max_seq_len * config.n_embd * 4
    assert cache.nbytes == expected
