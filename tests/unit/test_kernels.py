"""raystack.kernels: the fused decode ops are built where a compiler is, equal the PyTorch path, refuse bad inputs
with an error (never read out of bounds), and their absence only switches decode to PyTorch ops."""

import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from raystack import kernels
from raystack.model import GPT, KVCache, ModelConfig, PackedLinear, pack_linears

ROOT = Path(__file__).resolve().parents[2]


def op():
    found = kernels.decode_attention()
    if found is None and shutil.which(os.environ.get("CXX", "c++")) and kernels.enabled():
        pytest.fail("a C++ compiler is here but raystack's CPU kernels did not build (see the warning logged)")
    if found is None:
        pytest.skip("no C++ compiler: decode runs on PyTorch ops")
    return found


@torch.no_grad()
@pytest.mark.parametrize("fused", ["layers", "attention"])
@pytest.mark.parametrize("preset,overrides", [("tiny", dict(max_seq_len=64)),
                                              ("tiny", dict(n_head=2, n_embd=48, max_seq_len=40))])
def test_decode_steps_equal_the_pytorch_path_token_by_token(preset, overrides, fused):
    """Many decode steps over rows at different positions (one idle, one at the cache's last position, gathered
    and in-place slots): the fused ops and PyTorch ops give the same logits and leave the same caches; every block
    in one op (``decode_layers``), and each layer's attention alone (what int8 linear layers run)."""
    op()
    torch.manual_seed(5)
    config = ModelConfig.from_preset(preset, **overrides)
    model = GPT(config).eval()
    if fused == "attention":
        model._block_weights = lambda: None
    fused, plain = KVCache(config, slots=6), KVCache(config, slots=6)
    keys, values = torch.randn_like(fused.k), torch.randn_like(fused.v)  # what earlier steps left there
    for cache in (fused, plain):
        cache.k.copy_(keys)
        cache.v.copy_(values)
    S = config.max_seq_len
    positions = torch.tensor([0, 5, -1, 17, S - 9, 30])
    for step in range(8):
        tokens = torch.randint(0, 257, (6,))
        slots = slice(0, 6) if step % 2 == 0 else torch.tensor([5, 1, 2, 4, 3, 0])
        got = model.decode(tokens, positions, fused, slots, fused=True)
        expected = model.decode(tokens, positions, plain, slots, fused=False)
        live = positions >= 0
        torch.testing.assert_close(got[live], expected[live], rtol=1e-5, atol=1e-5)
        assert torch.isfinite(got).all()
        torch.testing.assert_close(fused.k[:, :, :, :S - 1], plain.k[:, :, :, :S - 1])
        torch.testing.assert_close(fused.v[:, :, :, :S - 1], plain.v[:, :, :, :S - 1])
        positions = torch.where(positions >= 0, positions + 1, positions)
    assert int(positions.max()) == S - 1  # the last step attended over the whole cache


def packed_layers(model) -> int:
    return sum(type(m) is PackedLinear for m in model.modules())


@torch.no_grad()
def test_prepacked_weights_give_the_plain_weights_logits_and_caches():
    """``pack_linears`` (what the engine does on CPU in float32) packs a 256-wide model's larger linear layers, not
    its 256 x 256 projections, so ``decode_layers`` gets prepacked and plain weights in one list. Every path gives
    the plain model's logits and caches: prefill, the decode step (every block in one op, then the attention op
    alone with ``PackedLinear`` around it, in place and gathered slots), and the general forward."""
    op()
    torch.manual_seed(7)
    config = ModelConfig(n_layer=2, n_head=4, n_embd=256, max_seq_len=48)
    plain = GPT(config).eval()
    packed = pack_linears(plain)
    assert packed_layers(packed) == 6 and type(packed.blocks[1].fc) is PackedLinear
    assert packed_layers(plain) == 0 and type(plain.blocks[1].fc) is torch.nn.Linear  # the model given is unchanged
    assert {k: v.data_ptr() for k, v in packed.state_dict().items()} == {
        k: v.data_ptr() for k, v in plain.state_dict().items()}  # the same tensors, not copies
    assert [w.is_mkldnn for w in packed._block_weights()] == [False, True, False, False, True, True] * 2
    caches = {name: KVCache(config, slots=4) for name in ("plain", "packed")}
    models = {"plain": plain, "packed": packed}
    prompts = torch.randint(0, 257, (4, 9))
    logits = {name: models[name].prefill(prompts, caches[name], torch.arange(4)) for name in models}
    torch.testing.assert_close(logits["packed"], logits["plain"], rtol=1e-5, atol=1e-5)
    positions = torch.tensor([9, 9, -1, 9])
    for step in range(6):
        tokens = torch.randint(0, 257, (4,))
        slots = slice(0, 4) if step % 2 == 0 else torch.tensor([3, 1, 2, 0])
        if step == 4:
            packed._block_weights = lambda: None  # the attention op alone, PackedLinear.forward around it
        got = packed.decode(tokens, positions, caches["packed"], slots)
        expected = plain.decode(tokens, positions, caches["plain"], slots, fused=False)
        live = positions >= 0
        torch.testing.assert_close(got[live], expected[live], rtol=1e-5, atol=1e-5)
        positions = torch.where(positions >= 0, positions + 1, positions)
    last = config.max_seq_len - 1
    for kind in ("k", "v"):
        torch.testing.assert_close(getattr(caches["packed"], kind)[..., :last, :],
                                   getattr(caches["plain"], kind)[..., :last, :], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(packed(prompts), plain(prompts), rtol=1e-5, atol=1e-5)


def test_a_packed_model_still_gives_gradients_where_autograd_records():
    """The packed op has no gradient: with autograd on, ``PackedLinear`` runs ``F.linear`` over its weight, so a
    backward pass through a packed model gives the plain model's gradients (not silently none)."""
    torch.manual_seed(3)
    plain = GPT(ModelConfig(n_layer=1, n_head=4, n_embd=256, max_seq_len=16))
    packed = pack_linears(plain)
    tokens = torch.randint(0, 257, (2, 9))
    packed.loss(tokens).backward()
    grads = {name: p.grad.clone() for name, p in plain.named_parameters()}  # the same tensors: their gradients
    plain.zero_grad()
    plain.loss(tokens).backward()
    assert grads.keys() == {name for name, _ in plain.named_parameters()}
    for name, p in plain.named_parameters():
        torch.testing.assert_close(grads[name], p.grad, msg=name)


def test_only_linear_layers_large_enough_to_gain_are_packed():
    """Issue 13's 128-wide shape and the tiny preset keep ATen's products (oneDNN's fixed cost per call is
    slower there); from ``PACK_MIN_WEIGHT`` elements up they are packed: at 256 wide three layers a block (not the
    256 x 256 projection), from 512 wide (the small preset) all four."""
    assert packed_layers(pack_linears(GPT(ModelConfig.from_preset("tiny")))) == 0
    assert packed_layers(pack_linears(GPT(ModelConfig(n_layer=4, n_head=4, n_embd=128)))) == 0
    model = pack_linears(GPT(ModelConfig(n_layer=3, n_head=4, n_embd=256, max_seq_len=32)))
    assert packed_layers(model) == 9
    assert packed_layers(pack_linears(model)) == 9  # packing twice changes nothing
    assert packed_layers(pack_linears(GPT(ModelConfig(n_layer=1, n_head=8, n_embd=512, max_seq_len=32)))) == 4
    with pytest.raises(ValueError, match="without bias"):
        PackedLinear(torch.nn.Linear(512, 512))


def test_bad_inputs_are_errors_not_out_of_bounds_reads():
    decode_attention = op()
    H, S, D = 2, 8, 4
    k, v = torch.zeros(3, H, S, D), torch.zeros(3, H, S, D)
    cos, sin = torch.ones(S, D // 2), torch.zeros(S, D // 2)
    qkv = torch.randn(2, 3 * H * D)
    ok = decode_attention(qkv, cos, sin, torch.tensor([1, 2]), torch.tensor([0, 2]), k, v, 0.5)
    assert ok.shape == (2, H * D)
    cases = {"slot": (torch.tensor([1, 2]), torch.tensor([0, 3])),
             "position": (torch.tensor([1, S]), torch.tensor([0, 1])),
             "position ": (torch.tensor([-2, 1]), torch.tensor([0, 1]))}
    for what, (positions, slots) in cases.items():
        with pytest.raises(RuntimeError, match=what.strip()):
            decode_attention(qkv, cos, sin, positions, slots, k, v, 0.5)
    with pytest.raises(RuntimeError, match="float32"):
        decode_attention(qkv.double(), cos, sin, torch.tensor([1, 2]), torch.tensor([0, 1]), k, v, 0.5)
    with pytest.raises(RuntimeError, match="qkv"):
        decode_attention(qkv[:, :-1], cos, sin, torch.tensor([1, 2]), torch.tensor([0, 1]), k, v, 0.5)


def test_the_layers_op_refuses_weights_that_do_not_fit_its_caches():
    op()
    decode_layers = kernels.decode_layers()
    config = ModelConfig.from_preset("tiny", max_seq_len=16)
    model = GPT(config).eval()
    cache = KVCache(config, 2)
    weights = model._block_weights()
    x, positions, slots = torch.randn(2, config.n_embd), torch.tensor([3, 0]), torch.tensor([0, 1])
    args = (model.rope_cos, model.rope_sin, positions, slots, cache.k, cache.v, 0.5, 1e-6)
    assert decode_layers(x, weights, *args).shape == x.shape
    with pytest.raises(RuntimeError, match="6 weights per layer"):
        decode_layers(x, weights[:-1], *args)
    swapped = list(weights)
    swapped[1], swapped[4] = weights[4], weights[1]  # qkv and fc exchanged: shapes that do not fit
    with pytest.raises(RuntimeError, match="layer 0's weights do not fit"):
        decode_layers(x, swapped, *args)
    with pytest.raises(RuntimeError, match="float32"):
        decode_layers(x, [w.double() for w in weights], *args)
    with pytest.raises(RuntimeError, match="x must be float32"):
        decode_layers(x[:, :-1], weights, *args)


def test_the_sampling_op_never_draws_a_masked_token_even_at_the_top_of_the_uniform():
    """A uniform of exactly 1.0 lands past every survivor's mass: the draw is the last survivor in token order (the
    reference's rule), never a -inf (masked) token after it, with and without filters, and rows are independent."""
    op()
    sample_rows = kernels.sample_rows()
    inf = float("inf")
    logits = torch.tensor([[1.0, 2.0, -inf, 0.5, -inf], [-inf, 3.0, 3.0, -inf, -inf], [0.0, -inf, -inf, -inf, 1.0]])
    B = len(logits)
    for top_k, top_p in ((0, 1.0), (2, 1.0), (0, 0.99)):
        tokens, logprobs = sample_rows(logits, torch.ones(B), torch.full((B,), top_k), torch.full((B,), top_p),
                                       torch.full((B,), inf), torch.ones(B, dtype=torch.float64))
        assert torch.isfinite(logprobs).all(), (top_k, top_p, logprobs)
        assert torch.isfinite(logits[torch.arange(B), tokens]).all(), (top_k, top_p, tokens)
    assert tokens.tolist() == [3, 2, 4]
    with pytest.raises(ValueError, match="row 1 contain NaN"):
        sample_rows(torch.tensor([[0.0, 1.0], [float("nan"), 0.0]]), torch.ones(2), torch.zeros(2), torch.ones(2),
                    torch.full((2,), inf), torch.ones(2, dtype=torch.float64))


def _run(code: str, **env) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", textwrap.dedent(code)], cwd=ROOT, capture_output=True, text=True,
                          timeout=300, env={**os.environ, "PYTHONPATH": str(ROOT), **env})


CHECK = """
    import torch
    from raystack import kernels
    from raystack.model import GPT, KVCache, ModelConfig, PackedLinear, pack_linears
    config = ModelConfig.from_preset("tiny", max_seq_len=16)
    model = GPT(config).eval()
    with torch.no_grad():
        out = model.decode(torch.tensor([1, 2]), torch.tensor([3, 0]), KVCache(config, 2), slice(0, 2))
    print("op", kernels.decode_attention() is not None, "finite", bool(torch.isfinite(out).all()))
"""


def test_switched_off_decode_runs_on_pytorch_ops():
    done = _run(CHECK, RAYSTACK_CPU_KERNELS="0")
    assert done.returncode == 0, done.stderr
    assert "op False finite True" in done.stdout


def test_a_failed_build_warns_once_and_decode_still_runs(tmp_path):
    """No working compiler (CXX is a program that fails) and an empty kernel directory: one warning naming the
    fallback, and decode gives finite logits through PyTorch ops."""
    done = _run(CHECK, CXX="/bin/false", RAYSTACK_KERNEL_DIR=str(tmp_path), RAYSTACK_CPU_KERNELS="1")
    assert done.returncode == 0, done.stderr
    assert "op False finite True" in done.stdout
    assert done.stderr.count("CPU kernels are not available") == 1, done.stderr
    assert "decode runs on PyTorch ops" in done.stderr


@pytest.fixture(scope="module")
def killed_build(tmp_path_factory):
    """A real build from source into an empty kernel directory holding a lock file left by a killed build (older
    than ``STALE_LOCK_S``): the root, the key's directory, and the finished process."""
    op()
    root = tmp_path_factory.mktemp("kernels")
    directory = root / kernels.build_key()
    directory.mkdir()
    (directory / "lock").touch()
    old = (directory / "lock").stat().st_mtime - kernels.STALE_LOCK_S - 60
    os.utime(directory / "lock", (old, old))
    return root, directory, _run(CHECK, RAYSTACK_KERNEL_DIR=str(root))


def test_a_killed_builds_lock_does_not_block_a_new_build(killed_build):
    """A build killed half-way leaves PyTorch's lock file behind, which would make every later process wait forever;
    one older than ``STALE_LOCK_S`` is removed and the op builds."""
    _, directory, done = killed_build
    assert done.returncode == 0, done.stderr
    assert "op True finite True" in done.stdout
    assert list(directory.glob("*.so")) and (directory / "built").exists()


def test_raystack_imported_from_another_path_loads_the_build_without_rebuilding(killed_build, tmp_path):
    """A Ray job imports raystack from its unpacked working_dir: the same sources at another path. It loads the
    library built from the first path as it is (no new build, no build lock taken), where a build naming the
    sources' own paths had ninja rebuild for every path in turn, and a request waited out each ~30 s rebuild."""
    root, directory, first = killed_build
    assert first.returncode == 0, first.stderr
    library = directory / "raystack_kernels.so"
    before = library.stat().st_mtime_ns, (directory / ".ninja_log").read_text()
    shutil.copytree(ROOT / "raystack", tmp_path / "working_dir" / "raystack",
                    ignore=shutil.ignore_patterns("__pycache__"))
    (directory / "lock").touch()  # a lock held right now: a process that took the build path would wait on it
    done = subprocess.run([sys.executable, "-c", textwrap.dedent(CHECK + "    print('from', kernels.__file__)\n")],
                          cwd=tmp_path, capture_output=True, text=True, timeout=60,
                          env={**os.environ, "PYTHONPATH": str(tmp_path / "working_dir"),
                               "RAYSTACK_KERNEL_DIR": str(root)})
    (directory / "lock").unlink()
    assert done.returncode == 0, done.stderr
    assert "op True finite True" in done.stdout
    assert f"from {tmp_path / 'working_dir'}" in done.stdout  # the copy, not the checkout, was imported
    assert (library.stat().st_mtime_ns, (directory / ".ninja_log").read_text()) == before
