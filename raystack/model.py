"""A decoder-only transformer (GPT) with an incremental decode path over a slot-indexed KV cache.

Contract:
- ``GPT(config)(tokens)`` -> logits ``[B, T, vocab]`` for a full causal forward (training, scoring).
- ``GPT.forward(tokens, positions=..., cache=..., slots=...)`` -> logits for an incremental step: row ``b``'s
  tokens sit at absolute ``positions[b]`` of KV-cache slot ``slots[b]``; their keys/values are written into the
  cache and they attend to every earlier position of that slot. Prefill and decode are the same call, so logits from
  decoding token by token equal the full forward's within float tolerance (tests/unit/test_model.py proves it).
  ``slots`` is a tensor of slot ids (the rows' caches are gathered), or a ``slice`` of consecutive slots, one per
  row, whose caches are read in place (a view, no copy: the engine's decode step). A row at position -1 is idle: it
  writes into the last cache position, which no sequence reads (the engine never feeds a token there), and its
  output is garbage.
- The engine's two steps are the same computation in fewer, larger ops: ``GPT.prefill(tokens, cache, slots)`` for
  prompts from position 0 (plain causal attention over their own keys, the logits of the last position only; with
  ``start``, the rest of a prompt whose first ``start`` positions are in the cache already) and
  ``GPT.decode(tokens, positions, cache, slots)`` for one token per row (on CPU in float32 every block in one fused
  op, ``raystack.kernels``; elsewhere keys and values written with one ``index_copy_`` and attention as two batched
  matrix-vector products, over a fixed ``span`` of the cache when asked, as CUDA graphs need); both equal the
  general call above within float tolerance (tests/unit/test_model.py, test_kernels.py).
- ``pack_linears(model)`` (the engine's, for CPU float32) -> the model over the same weights with its blocks'
  larger ``nn.Linear`` layers as ``PackedLinear``: each weight also held prepacked by oneDNN, whose matrix kernel
  beats ATen's (MKL) on CPU (the small preset's decode step at batch 32 ~1.5x faster, benchmarks/decode_step.py);
  same state dict, outputs equal within float tolerance (tests/unit/test_kernels.py).

Architecture: pre-norm (RMSNorm) blocks, causal attention through ``F.scaled_dot_product_attention``, rotary
position embeddings, a GELU MLP (4x), no biases, input and output embeddings tied.

Presets (``ModelConfig.from_preset``): ``tiny`` (~0.12 M parameters, tests and the demo), ``small`` (~19 M) and
``gpt2`` (GPT-2 small's shape: 12 layers, 12 heads, 768 wide, 1024 context; 124 M parameters with GPT-2's 50 k BPE
vocabulary, ~85 M with raystack's 257-token byte vocabulary).
"""

from __future__ import annotations

import copy
import dataclasses
import logging
import math
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

from raystack.tokenizer import VOCAB_SIZE

logger = logging.getLogger(__name__)


@dataclass
class ModelConfig:
    """Shape of the transformer. Every field is saved in the model artifact's ``config.json``."""

    vocab_size: int = VOCAB_SIZE
    """Number of token ids (the byte tokenizer's 256 bytes + special tokens)."""
    max_seq_len: int = 128
    """Longest sequence (prompt + generated tokens) the model attends over, in tokens."""
    n_layer: int = 2
    n_head: int = 4
    n_embd: int = 64
    """Width of the residual stream; must divide evenly by ``n_head`` into an even head size (rotary)."""
    dropout: float = 0.0
    rope_theta: float = 10000.0

    def __post_init__(self) -> None:
        for name in ("vocab_size", "max_seq_len", "n_layer", "n_head", "n_embd"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"model.{name} must be a positive integer, got {value!r}")
        if self.n_embd % self.n_head or (self.n_embd // self.n_head) % 2:
            raise ValueError(
                f"model.n_embd ({self.n_embd}) must be n_head ({self.n_head}) times an even head size; "
                "pick n_embd divisible by 2 * n_head"
            )
        if not 0.0 <= float(self.dropout) < 1.0:
            raise ValueError(f"model.dropout must be in [0, 1), got {self.dropout!r}")

    @property
    def head_dim(self) -> int:
        return self.n_embd // self.n_head

    @classmethod
    def from_preset(cls, name: str, **overrides) -> "ModelConfig":
        if name not in PRESETS:
            raise ValueError(f"model.preset {name!r} is not one of {sorted(PRESETS)}")
        return cls(**{**PRESETS[name], **overrides})

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, values: dict) -> "ModelConfig":
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(values) - known)
        if unknown:
            raise ValueError(f"unknown model config key(s) {unknown}; known keys are {sorted(known)}")
        return cls(**values)


PRESETS: dict[str, dict] = {
    "tiny": dict(n_layer=2, n_head=4, n_embd=64, max_seq_len=128),
    "small": dict(n_layer=6, n_head=8, n_embd=512, max_seq_len=512),
    "gpt2": dict(n_layer=12, n_head=12, n_embd=768, max_seq_len=1024),
}


class KVCache:
    """Preallocated keys and values, ``[n_layer, slots, n_head, max_seq_len, head_dim]`` each.

    Memory is fixed up front: ``2 * n_layer * slots * max_seq_len * n_embd * element_size`` bytes, written through
    at allocation (``torch.zeros`` on CPU maps zero pages lazily, so each slot's first prefill would fault its pages in
    one by one). A request owns a slot from admission to finish; nothing is freed or moved in between.
    """

    def __init__(self, config: ModelConfig, slots: int, device=None, dtype=torch.float32):
        shape = (config.n_layer, slots, config.n_head, config.max_seq_len, config.head_dim)
        self.k = torch.empty(shape, device=device, dtype=dtype).zero_()
        self.v = torch.empty(shape, device=device, dtype=dtype).zero_()

    @property
    def slots(self) -> int:
        return self.k.shape[1]

    @property
    def nbytes(self) -> int:
        return self.k.nbytes + self.v.nbytes


def rope_tables(config: ModelConfig, device=None) -> tuple[torch.Tensor, torch.Tensor]:
    """cos and sin tables ``[max_seq_len, head_dim / 2]`` in float32."""
    half = config.head_dim // 2
    inv_freq = 1.0 / (config.rope_theta ** (torch.arange(0, half, device=device, dtype=torch.float32) / half))
    angles = torch.outer(torch.arange(config.max_seq_len, device=device, dtype=torch.float32), inv_freq)
    return angles.cos(), angles.sin()


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate ``x`` ``[..., T, D]`` by angle tables broadcasting to ``[..., T, D/2]`` (rotate-half convention)."""
    x1, x2 = _as(x, torch.float32).chunk(2, dim=-1)
    rotated = torch.cat((torch.addcmul(x1 * cos, x2, sin, value=-1), torch.addcmul(x2 * cos, x1, sin)), dim=-1)
    return _as(rotated, x.dtype)


class Attention(nn.Module):
    def __init__(self, config: ModelConfig, layer: int):
        super().__init__()
        self.layer = layer
        self.n_head = config.n_head
        self.head_dim = config.head_dim
        self.qkv = nn.Linear(config.n_embd, 3 * config.n_embd, bias=False)
        self.proj = nn.Linear(config.n_embd, config.n_embd, bias=False)
        self.dropout = config.dropout

    def forward(self, x, cos, sin, positions=None, cache: KVCache | None = None, slots=None, visible=None):
        B, T, C = x.shape
        qkv = self.qkv(x).view(B, T, 3, self.n_head, self.head_dim).transpose(1, 3)  # [B, H, 3, T, D]
        qk = apply_rope(qkv[:, :, :2], cos[:, :, None], sin[:, :, None])  # q and k rotated in one pass
        q, k, v = qk[:, :, 0], qk[:, :, 1], qkv[:, :, 2]
        dropout = self.dropout if self.training else 0.0
        if cache is None:
            y = F.scaled_dot_product_attention(q, k, v, is_causal=True, dropout_p=dropout)
        elif visible is None:  # a prefill from position 0 (``GPT.prefill``): its own keys are all it sees
            self._write(k, v, positions, cache, slots)
            y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        else:
            y = self._cached_attention(q, k, v, positions, cache, slots, visible)
        y = self.proj(y.transpose(1, 2).contiguous().view(B, T, C))
        return F.dropout(y, dropout, self.training) if dropout else y

    def _write(self, k, v, positions, cache: KVCache, slots) -> None:
        """Keys and values ``[B, H, T, D]`` into this layer's cache at (slot, position)."""
        k_cache, v_cache = cache.k[self.layer], cache.v[self.layer]
        if isinstance(slots, slice):  # consecutive slots: the cache rows are views, nothing is gathered
            k_cache, v_cache = k_cache[slots], v_cache[slots]
            rows = torch.arange(k.shape[0], device=k.device)[:, None]
        else:
            rows = slots[:, None]
        # [B, T] index pairs broadcast over heads.
        k_cache[rows, :, positions] = _as(k.transpose(1, 2), k_cache.dtype)
        v_cache[rows, :, positions] = _as(v.transpose(1, 2), v_cache.dtype)

    def _cached_attention(self, q, k, v, positions, cache: KVCache, slots, visible):
        """Write this step's keys/values at (slot, position) and attend over each row's first ``span`` positions
        where ``visible`` ``[B, 1, T, span]`` (each row's past, not its future nor other rows' lengths)."""
        span = visible.shape[-1]
        self._write(k, v, positions, cache, slots)
        k_cache, v_cache = cache.k[self.layer], cache.v[self.layer]
        keys, values = k_cache[slots, :, :span], v_cache[slots, :, :span]  # a slice: views; slot ids: gathered
        return F.scaled_dot_product_attention(q, _as(keys, q.dtype), _as(values, q.dtype), attn_mask=visible)


_fused_ops: dict = {}


def _fused_op(cache: KVCache, name: str):
    """The fused CPU op ``name`` (``raystack.kernels``) for ``cache`` (a float32 CPU cache), or None."""
    if cache.k.device.type != "cpu" or cache.k.dtype != torch.float32:
        return None
    if name not in _fused_ops:  # looked up once per process: the decode step asks every call
        from raystack import kernels

        _fused_ops[name] = getattr(kernels, name)()
    return _fused_ops[name]


def decode_reads_in_place(cache: KVCache) -> bool:
    """Whether ``GPT.decode`` over rows given by slot ids reads each row's keys and values in place, wherever its slot
    is (the fused CPU op), rather than gathering them (PyTorch ops)."""
    return _fused_op(cache, "decode_attention") is not None


def _slot_ids(slots, device) -> torch.Tensor:
    """The slot id of each row: ``slots`` itself, or the ids of a ``slice`` of consecutive slots."""
    return torch.arange(slots.start, slots.stop, device=device) if isinstance(slots, slice) else slots


def _as(x: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """``x`` in ``dtype``; no dispatch when it already is (the decode step runs tens of these per token)."""
    return x if x.dtype == dtype else x.to(dtype)


PACK_MIN_WEIGHT = 1 << 17
"""``pack_linears`` packs a linear layer whose weight has at least this many elements: below it (issue 13's
128-wide shape) oneDNN's fixed cost per call outweighs its faster kernel below batch 64; from the 256-wide layers up
it was faster from batch 4 (1.3-4x at 2 threads), about even at batch 1 on 2 threads and up to ~20 us a call slower
on 1 (timed per layer shape, batch 1 to 64, 2026-12-02)."""


class PackedLinear(nn.Module):
    """An ``nn.Linear`` without bias, for float32 inference on CPU: ``weight`` is the layer's own parameter (state
    dict, ``parameters()`` and checks unchanged) and ``packed`` the same values in oneDNN's blocked layout, made once
    (``mkldnn::_reorder_linear_weight``), so a call runs oneDNN's matrix kernel without reordering the weight
    (``mkldnn::_linear_pointwise``, what ``torch.compile``'s CPU freezing emits); ``decode_layers`` takes ``packed``
    directly. For inference: where autograd records (the packed op has no gradient), a call runs ``F.linear`` over
    ``weight``; ``packed`` must be rebuilt if ``weight`` changes."""

    def __init__(self, linear: nn.Linear):
        super().__init__()
        if linear.bias is not None:
            raise ValueError("PackedLinear packs linear layers without bias")
        self.in_features, self.out_features = linear.in_features, linear.out_features
        self.weight = linear.weight
        self.packed = torch.ops.mkldnn._reorder_linear_weight(linear.weight.detach(), None)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if torch.is_grad_enabled() and (x.requires_grad or self.weight.requires_grad):
            return F.linear(x, self.weight)
        return torch.ops.mkldnn._linear_pointwise(x, self.packed, None, "none", [], "")


def pack_linears(model: "GPT") -> "GPT":
    """``model`` with its block linear layers of at least ``PACK_MIN_WEIGHT`` elements as ``PackedLinear``, where
    that can run (float32 weights on CPU, PyTorch built with oneDNN): a new module tree over the same parameter
    tensors (no weight is copied but the packed ones), so ``model`` itself is unchanged and stays trainable. For a
    model that is only run: the engine's. Anything but a ``GPT`` is returned as it is."""
    if not isinstance(model, GPT) or not torch.backends.mkldnn.is_available():
        return model
    packed = _module_tree(model)
    for block in packed.blocks:
        for parent, name in ((block.attn, "qkv"), (block.attn, "proj"), (block, "fc"), (block, "fc_proj")):
            layer = parent._modules[name]
            if (type(layer) is nn.Linear and layer.bias is None and layer.weight.device.type == "cpu"
                    and layer.weight.dtype == torch.float32 and layer.weight.numel() >= PACK_MIN_WEIGHT):
                try:
                    parent._modules[name] = PackedLinear(layer)
                except RuntimeError as e:  # a oneDNN that refuses this CPU: ATen's products still work
                    logger.warning("oneDNN cannot prepack the linear weights (%s); using ATen's matrix products", e)
                    return model
    return packed


def _module_tree(module: nn.Module) -> nn.Module:
    """A copy of ``module``'s tree of modules whose parameters and buffers are ``module``'s own tensors."""
    tree = copy.copy(module)
    tree._parameters, tree._buffers = dict(module._parameters), dict(module._buffers)
    tree._modules = {name: None if child is None else _module_tree(child) for name, child in module._modules.items()}
    return tree


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float = 1e-6):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x):
        return F.rms_norm(x, (x.shape[-1],), self.weight, self.eps)


class Block(nn.Module):
    def __init__(self, config: ModelConfig, layer: int):
        super().__init__()
        self.attn_norm = RMSNorm(config.n_embd)
        self.attn = Attention(config, layer)
        self.mlp_norm = RMSNorm(config.n_embd)
        self.fc = nn.Linear(config.n_embd, 4 * config.n_embd, bias=False)
        self.fc_proj = nn.Linear(4 * config.n_embd, config.n_embd, bias=False)
        self.dropout = config.dropout

    def forward(self, x, cos, sin, positions=None, cache=None, slots=None, visible=None):
        x = x + self.attn(self.attn_norm(x), cos, sin, positions, cache, slots, visible)
        mlp = self.fc_proj(F.gelu(self.fc(self.mlp_norm(x))))
        return x + (F.dropout(mlp, self.dropout, self.training) if self.training and self.dropout else mlp)


class GPT(nn.Module):
    def __init__(self, config: ModelConfig):
        super().__init__()
        self.config = config
        self.embed = nn.Embedding(config.vocab_size, config.n_embd)
        self.blocks = nn.ModuleList(Block(config, i) for i in range(config.n_layer))
        self.norm = RMSNorm(config.n_embd)
        cos, sin = rope_tables(config)
        self.register_buffer("rope_cos", cos, persistent=False)
        self.register_buffer("rope_sin", sin, persistent=False)
        self.apply(self._init_weights)
        # GPT-2's scaled init for the projections that write into the residual stream.
        for name, param in self.named_parameters():
            if name.endswith("proj.weight"):
                nn.init.normal_(param, mean=0.0, std=0.02 / math.sqrt(2 * config.n_layer))

    @staticmethod
    def _init_weights(module):
        if isinstance(module, (nn.Linear, nn.Embedding)):
            nn.init.normal_(module.weight, mean=0.0, std=0.02)

    def num_parameters(self) -> int:
        return sum(p.numel() for p in self.parameters())

    def flops_per_token(self, seq_len: int) -> float:
        """Training FLOPs per token (forward + backward), PaLM appendix B: 6N + 12 * L * d * T."""
        c = self.config
        return 6 * self.num_parameters() + 12 * c.n_layer * c.n_embd * seq_len

    def forward(self, tokens, positions=None, cache: KVCache | None = None, slots=None):
        B, T = tokens.shape
        if cache is None:
            if T > self.config.max_seq_len:
                raise ValueError(f"sequence of {T} tokens exceeds max_seq_len {self.config.max_seq_len}")
            cos, sin = self.rope_cos[None, None, :T], self.rope_sin[None, None, :T]
        else:
            if positions is None or slots is None:
                raise ValueError("an incremental forward needs positions [B, T] and slots [B]")
            cos, sin = self.rope_cos[positions][:, None], self.rope_sin[positions][:, None]
        visible = None
        if cache is not None:  # the attention mask, once per forward (one host sync for its width), not per layer
            span = int(positions.max()) + 1
            visible = (torch.arange(span, device=tokens.device)[None, None, :] <= positions[:, :, None])[:, None]
        x = self.embed(tokens)
        for block in self.blocks:
            x = block(x, cos, sin, positions, cache, slots, visible)
        return F.linear(self.norm(x), self.embed.weight)  # tied output embedding

    def prefill(self, tokens: torch.Tensor, cache: KVCache, slots, start: int = 0) -> torch.Tensor:
        """Logits ``[B, vocab]`` of the last position of ``tokens`` ``[B, T]``, sequences that continue at position
        ``start`` of cache ``slots``; their keys and values are written to positions start..start+T-1. Equal to
        ``forward(tokens, arange(start, start + T), cache, slots)[:, -1]`` within float tolerance, without the output
        layer over earlier positions. From position 0 (``start`` 0) each row sees only its own tokens, so attention is
        plain causal attention and the cache is not read back; from ``start`` > 0 (a prefix already in the slots'
        caches: the engine's prefix caching) the rows attend over the cache's first start + T positions."""
        B, T = tokens.shape
        if start < 0 or start + T > cache.k.shape[3]:
            raise ValueError(f"a prefill of {T} tokens from position {start} exceeds the cache's "
                             f"{cache.k.shape[3]} positions")
        positions = torch.arange(start, start + T, device=tokens.device).expand(B, T)
        cos, sin = self.rope_cos[None, None, start:start + T], self.rope_sin[None, None, start:start + T]
        visible = None  # from position 0: ``Attention.forward``'s plain causal path
        if start:  # [1, 1, T, start + T]: query i sees cache positions 0..start+i
            visible = (torch.arange(start + T, device=tokens.device)[None, :] <= positions[0][:, None])[None, None]
        x = self.embed(tokens)
        for block in self.blocks:
            x = block(x, cos, sin, positions, cache, slots, visible)
        return F.linear(self.norm(x[:, -1]), self.embed.weight)

    def decode(self, tokens: torch.Tensor, positions: torch.Tensor, cache: KVCache, slots,
               fused: bool = True, span: int | None = None) -> torch.Tensor:
        """One token per row: logits ``[B, vocab]`` for ``tokens`` ``[B]`` at ``positions`` ``[B]`` of cache
        ``slots`` (a ``slice`` of consecutive slots, read in place, or a tensor of slot ids, gathered); equal to
        ``forward(tokens[:, None], positions[:, None], cache, slots)[:, -1]`` within float tolerance, and the
        same rule for idle rows (position -1). The engine's decode step, written as few, large ops per layer.
        On CPU in float32 (and ``fused``), each layer's rotary, cache write and attention are one fused op
        (``raystack.kernels``: each row's keys and values read once, in place); elsewhere, or where that op cannot be
        built, PyTorch ops: keys and values written with one ``index_copy_`` each, and attention as two batched
        matrix-vector products around an additive mask, built once per call (``scaled_dot_product_attention``
        costs ~2x that for a single query row on CPU). ``span``: the cache positions the PyTorch ops attend over
        (masked per row); None reads up to the largest position, which costs one host sync for its value; a fixed
        span (at most the cache's length) gives every call the same shapes and no host sync, as a CUDA graph needs
        (``raystack.decode_graphs``)."""
        op = _fused_op(cache, "decode_attention") if fused else None
        if op is None:
            return self._decode_reference(tokens, positions, cache, slots, span)
        ids = _slot_ids(slots, tokens.device)
        scale = 1.0 / math.sqrt(self.config.head_dim)
        x = self.embed(tokens)  # [B, C]
        layers, weights = _fused_op(cache, "decode_layers"), self._block_weights()
        if layers is not None and weights is not None:  # every block in one call
            x = layers(x, weights, self.rope_cos, self.rope_sin, positions, ids, cache.k, cache.v, scale,
                       self.blocks[0].attn_norm.eps)
            return F.linear(self.norm(x), self.embed.weight)
        for block in self.blocks:  # int8 linear layers (``raystack.runner.quantize_int8``): the attention op alone
            attn = block.attn
            y = op(attn.qkv(block.attn_norm(x)), self.rope_cos, self.rope_sin, positions, ids,
                   cache.k[attn.layer], cache.v[attn.layer], scale)
            x = x + attn.proj(y)
            x = x + block.fc_proj(F.gelu(block.fc(block.mlp_norm(x))))
        return F.linear(self.norm(x), self.embed.weight)

    def _block_weights(self) -> list[torch.Tensor] | None:
        """The blocks' weights as ``decode_layers`` takes them (6 per block; a ``PackedLinear``'s prepacked one),
        or None when a block is not float32 ``nn.Linear``/``PackedLinear`` and ``RMSNorm`` layers of one ``eps``
        (int8 weights, say)."""
        weights, eps = [], self.blocks[0].attn_norm.eps
        for block in self.blocks:  # through _modules and _parameters: this runs on every decode step
            mods, attn = block._modules, block._modules["attn"]._modules
            for m in (mods["attn_norm"], attn["qkv"], attn["proj"], mods["mlp_norm"], mods["fc"], mods["fc_proj"]):
                kind = type(m)
                if kind is PackedLinear:
                    weights.append(m.packed)
                    continue
                if kind is not nn.Linear and (kind is not RMSNorm or m.eps != eps):
                    return None
                weight = m._parameters["weight"]
                if weight.dtype != torch.float32:
                    return None
                weights.append(weight)
        return weights

    def _decode_reference(self, tokens, positions, cache: KVCache, slots, span: int | None = None) -> torch.Tensor:
        """``decode`` in PyTorch ops (any device and dtype)."""
        B = tokens.shape[0]
        H, D, S = self.config.n_head, self.config.head_dim, cache.k.shape[3]
        if span is None:
            span = int(positions.max()) + 1
        elif not 0 < span <= S:
            raise ValueError(f"span must be in 1..{S} (the cache's positions), got {span}")
        written = positions.remainder(S)  # an idle row (-1) writes the last position, which nothing reads
        cos, sin = self.rope_cos[positions], self.rope_sin[positions]  # [B, D/2]
        cos = torch.cat((cos, cos), -1)[:, None, None]  # [B, 1, 1, D]: rotate-half as x * cos + swap(x) * sin
        sin = torch.cat((-sin, sin), -1)[:, None, None]
        # Row b sees positions 0..positions[b] (an idle row position 0: garbage, but finite).
        hidden = torch.arange(span, device=tokens.device)[None, :] > positions.clamp(min=0)[:, None]
        mask = torch.zeros(B, H, 1, span, device=tokens.device, dtype=cache.k.dtype)
        mask.masked_fill_(hidden[:, None, None, :], float("-inf"))
        mask = mask.view(B * H, 1, span)
        ids = _slot_ids(slots, tokens.device)
        rows = ((ids[:, None] * H + torch.arange(H, device=tokens.device)) * S + written[:, None]).view(-1)
        scale = 1.0 / math.sqrt(D)
        x = self.embed(tokens)  # [B, C]
        for block in self.blocks:
            attn = block.attn
            k_cache, v_cache = cache.k[attn.layer], cache.v[attn.layer]
            qkv = attn.qkv(block.attn_norm(x)).view(B, 3, H, D)
            qk = _as(qkv[:, :2], torch.float32)
            swapped = qk.view(B, 2, H, 2, D // 2).flip(3).view(B, 2, H, D)
            qk = torch.addcmul(qk * cos, swapped, sin)  # [B, 2 (q, k), H, D]
            k_cache.view(-1, D).index_copy_(0, rows, _as(qk[:, 1].reshape(B * H, D), k_cache.dtype))
            v_cache.view(-1, D).index_copy_(0, rows, _as(qkv[:, 2].reshape(B * H, D), v_cache.dtype))
            keys, values = k_cache[slots, :, :span], v_cache[slots, :, :span]  # [B, H, span, D]
            q = _as(qk[:, 0], keys.dtype).reshape(B * H, 1, D)
            scores = torch.bmm(q, keys.flatten(0, 1).transpose(1, 2)).mul_(scale).add_(mask)
            weights = _as(torch.softmax(_as(scores, torch.float32), -1), values.dtype)  # float32 softmax
            y = torch.bmm(weights, values.flatten(0, 1)).view(B, H * D)
            x = x + attn.proj(_as(y, x.dtype))
            x = x + block.fc_proj(F.gelu(block.fc(block.mlp_norm(x))))
        return F.linear(self.norm(x), self.embed.weight)

    def loss(self, tokens: torch.Tensor) -> torch.Tensor:
        return causal_lm_loss(self, tokens)


def causal_lm_loss(model, tokens: torch.Tensor, reduction: str = "mean") -> torch.Tensor:
    """Next-token cross-entropy of ``tokens`` ``[B, T + 1]`` (inputs ``[:, :-1]``, targets ``[:, 1:]``).

    ``model`` is any callable returning logits: a ``GPT`` or its DDP wrapper (so DDP's gradient hooks fire).
    """
    logits = model(tokens[:, :-1])
    return F.cross_entropy(logits.float().reshape(-1, logits.size(-1)), tokens[:, 1:].reshape(-1), reduction=reduction)
