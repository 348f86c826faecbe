// raystack's CPU decode ops: the engine's decode step, fused (see __init__.py).
//
// decode_attention: one layer's attention. For each row b and head h of a step (one new token per row), in one
// pass over that row's cache:
//   1. rotate q and k by the rotary angle of position p = positions[b] (rotate-half, as model.apply_rope);
//   2. write k and v into the cache at (slots[b], h, p mod S) (an idle row, p = -1, writes position S - 1,
//      which no sequence reads);
//   3. attend over positions 0..max(p, 0) of that slot: softmax(q . k_s * scale) weighted sum of v_s, the
//      softmax in float32 with its maximum subtracted.
// The PyTorch equivalent (GPT.decode's reference path) is about fourteen ops per layer, two batched matrix-vector
// products over the whole span among them; here each row's keys and values are read once, and its scores live in
// a per-thread buffer.
//
// decode_layers: every transformer block of the step in one call (GPT.decode's fused path), each block
//   x += proj(decode_attention(qkv(rms_norm(x)))); x += fc_proj(gelu(fc(rms_norm(x))))
// with the norms in place and the matrix products in ATen (MKL) or, for a weight prepacked by oneDNN
// (raystack.model.pack_linears), oneDNN's linear with the GELU fused: the ~12 operator calls per block that Python
// would make, and their dispatch, become one.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <ATen/core/dispatch/Dispatcher.h>
#include <torch/library.h>

#include "exp_nonpositive.h"

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <vector>

namespace {

using raystack::exp_nonpositive;

at::Tensor decode_attention(const at::Tensor& qkv, const at::Tensor& cos, const at::Tensor& sin,
                            const at::Tensor& positions, const at::Tensor& slots, const at::Tensor& k_cache,
                            const at::Tensor& v_cache, double scale) {
  TORCH_CHECK(k_cache.dim() == 4 && v_cache.dim() == 4 && k_cache.sizes() == v_cache.sizes(),
              "decode_attention: caches must be [slots, heads, positions, head_dim] alike");
  TORCH_CHECK(k_cache.is_contiguous() && v_cache.is_contiguous(), "decode_attention: caches must be contiguous");
  for (const auto* t : {&qkv, &cos, &sin, &k_cache, &v_cache}) {
    TORCH_CHECK(t->device().is_cpu() && t->scalar_type() == at::kFloat, "decode_attention: float32 CPU tensors only");
  }
  const int64_t n_slots = k_cache.size(0), H = k_cache.size(1), S = k_cache.size(2), D = k_cache.size(3);
  const int64_t half = D / 2, B = qkv.size(0);
  TORCH_CHECK(D % 2 == 0 && qkv.dim() == 2 && qkv.size(1) == 3 * H * D, "decode_attention: qkv must be [B, 3 * H * D]");
  TORCH_CHECK(cos.dim() == 2 && cos.size(0) >= S && cos.size(1) == half && sin.sizes() == cos.sizes(),
              "decode_attention: rotary tables must be [>= positions, head_dim / 2]");
  TORCH_CHECK(positions.numel() == B && slots.numel() == B, "decode_attention: one position and slot per row");
  const auto x = qkv.contiguous();
  const auto c = cos.contiguous(), s = sin.contiguous();
  const auto pos = positions.to(at::kLong).contiguous(), slot = slots.to(at::kLong).contiguous();
  const int64_t* P = pos.data_ptr<int64_t>();
  const int64_t* SL = slot.data_ptr<int64_t>();
  for (int64_t b = 0; b < B; ++b) {
    TORCH_CHECK(SL[b] >= 0 && SL[b] < n_slots, "decode_attention: slot ", SL[b], " out of range");
    TORCH_CHECK(P[b] >= -1 && P[b] < S, "decode_attention: position ", P[b], " out of range");
  }
  auto out = at::empty({B, H * D}, x.options());
  const float* X = x.data_ptr<float>();
  const float* C = c.data_ptr<float>();
  const float* SN = s.data_ptr<float>();
  float* K = k_cache.data_ptr<float>();
  float* V = v_cache.data_ptr<float>();
  float* O = out.data_ptr<float>();
  const float sc = static_cast<float>(scale);

  at::parallel_for(0, B * H, 1, [&](int64_t begin, int64_t end) {
    std::vector<float> q(D), weights(S), acc(D);
    for (int64_t i = begin; i < end; ++i) {
      const int64_t b = i / H, h = i % H;
      const int64_t p = P[b], written = (p + S) % S, last = std::max<int64_t>(p, 0);
      const float* row = X + b * 3 * H * D;
      const float* q_in = row + h * D;
      const float* k_in = row + (H + h) * D;
      const float* v_in = row + (2 * H + h) * D;
      const float* cs = C + written * half;
      const float* sn = SN + written * half;
      float* k_slot = K + (SL[b] * H + h) * S * D;
      float* v_slot = V + (SL[b] * H + h) * S * D;
      float* k_out = k_slot + written * D;
      for (int64_t j = 0; j < half; ++j) {
        q[j] = q_in[j] * cs[j] - q_in[j + half] * sn[j];
        q[j + half] = q_in[j + half] * cs[j] + q_in[j] * sn[j];
        k_out[j] = k_in[j] * cs[j] - k_in[j + half] * sn[j];
        k_out[j + half] = k_in[j + half] * cs[j] + k_in[j] * sn[j];
      }
      std::copy(v_in, v_in + D, v_slot + written * D);

      // Scores, four positions at a time: four independent dot products share each load of q and keep the
      // vector units busy while each one's horizontal sum completes.
      float top = -INFINITY;
      const int64_t n = last + 1;
      int64_t t = 0;
      for (; t + 4 <= n; t += 4) {
        const float *k0 = k_slot + t * D, *k1 = k0 + D, *k2 = k1 + D, *k3 = k2 + D;
        float d0 = 0.f, d1 = 0.f, d2 = 0.f, d3 = 0.f;
#pragma omp simd reduction(+ : d0, d1, d2, d3)
        for (int64_t d = 0; d < D; ++d) {
          d0 += q[d] * k0[d];
          d1 += q[d] * k1[d];
          d2 += q[d] * k2[d];
          d3 += q[d] * k3[d];
        }
        weights[t] = d0 * sc;
        weights[t + 1] = d1 * sc;
        weights[t + 2] = d2 * sc;
        weights[t + 3] = d3 * sc;
        top = std::max(top, std::max(std::max(weights[t], weights[t + 1]), std::max(weights[t + 2], weights[t + 3])));
      }
      for (; t < n; ++t) {
        const float* k_t = k_slot + t * D;
        float dot = 0.f;
#pragma omp simd reduction(+ : dot)
        for (int64_t d = 0; d < D; ++d) dot += q[d] * k_t[d];
        weights[t] = dot * sc;
        top = std::max(top, weights[t]);
      }
      float total = 0.f;
      float* w_ = weights.data();
#pragma omp simd reduction(+ : total)
      for (int64_t j = 0; j < n; ++j) {
        w_[j] = exp_nonpositive(w_[j] - top);
        total += w_[j];
      }
      std::fill(acc.begin(), acc.end(), 0.f);
      float* a = acc.data();
      t = 0;
      for (; t + 4 <= n; t += 4) {  // four positions per pass over the accumulator
        const float *v0 = v_slot + t * D, *v1 = v0 + D, *v2 = v1 + D, *v3 = v2 + D;
        const float w0 = w_[t], w1 = w_[t + 1], w2 = w_[t + 2], w3 = w_[t + 3];
#pragma omp simd
        for (int64_t d = 0; d < D; ++d) a[d] += w0 * v0[d] + w1 * v1[d] + w2 * v2[d] + w3 * v3[d];
      }
      for (; t < n; ++t) {
        const float* v_t = v_slot + t * D;
        const float w = w_[t];
#pragma omp simd
        for (int64_t d = 0; d < D; ++d) a[d] += w * v_t[d];
      }
      float* o = O + b * H * D + h * D;
      const float inv = 1.f / total;
      for (int64_t d = 0; d < D; ++d) o[d] = acc[d] * inv;
    }
  });
  return out;
}

// out[b] = x[b] / sqrt(mean(x[b]^2) + eps) * weight, for rows of x [B, C] (as F.rms_norm over the last dimension).
at::Tensor rms_norm(const at::Tensor& x, const at::Tensor& weight, float eps) {
  const int64_t B = x.size(0), C = x.size(1);
  auto out = at::empty_like(x);
  const float* X = x.data_ptr<float>();
  const float* W = weight.data_ptr<float>();
  float* O = out.data_ptr<float>();
  for (int64_t b = 0; b < B; ++b) {
    const float* row = X + b * C;
    float squares = 0.f;
#pragma omp simd reduction(+ : squares)
    for (int64_t c = 0; c < C; ++c) squares += row[c] * row[c];
    const float inv = 1.f / std::sqrt(squares / static_cast<float>(C) + eps);
    float* o = O + b * C;
#pragma omp simd
    for (int64_t c = 0; c < C; ++c) o[c] = row[c] * inv * W[c];
  }
  return out;
}

// x @ w.T for a float32 [N, K] weight w: ATen's mm for a plain one, oneDNN's linear for one prepacked by
// mkldnn::_reorder_linear_weight (what torch.ops.mkldnn._linear_pointwise runs; `attr` "gelu" fuses the erf GELU).
at::Tensor linear(const at::Tensor& x, const at::Tensor& w, bool gelu) {
  if (!w.is_mkldnn()) {
    auto y = at::mm(x, w.t());
    return gelu ? at::gelu_(y) : y;
  }
  static const auto op = c10::Dispatcher::singleton()
                             .findSchemaOrThrow("mkldnn::_linear_pointwise", "")
                             .typed<at::Tensor(const at::Tensor&, const at::Tensor&, const std::optional<at::Tensor>&,
                                               c10::string_view, c10::List<std::optional<at::Scalar>>,
                                               std::optional<c10::string_view>)>();
  return op.call(x, w, std::nullopt, gelu ? "gelu" : "none", c10::List<std::optional<at::Scalar>>(),
                 gelu ? std::optional<c10::string_view>("none") : std::nullopt);
}

// x + y @ w.T, the residual add after a block's projection: one addmm for a plain weight, oneDNN's linear and an
// add for a prepacked one.
at::Tensor add_linear(const at::Tensor& x, const at::Tensor& y, const at::Tensor& w) {
  return w.is_mkldnn() ? x + linear(y, w, false) : at::addmm(x, y, w.t());
}

at::Tensor decode_layers(const at::Tensor& x_in, at::TensorList weights, const at::Tensor& cos, const at::Tensor& sin,
                         const at::Tensor& positions, const at::Tensor& slots, const at::Tensor& k_cache,
                         const at::Tensor& v_cache, double scale, double eps) {
  TORCH_CHECK(k_cache.dim() == 5 && v_cache.sizes() == k_cache.sizes(),
              "decode_layers: caches must be [layers, slots, heads, positions, head_dim] alike");
  const int64_t L = k_cache.size(0), C = k_cache.size(2) * k_cache.size(4);
  TORCH_CHECK(static_cast<int64_t>(weights.size()) == 6 * L,
              "decode_layers: 6 weights per layer (attn_norm, qkv, proj, mlp_norm, fc, fc_proj), got ",
              weights.size(), " for ", L, " layers");
  TORCH_CHECK(x_in.dim() == 2 && x_in.size(1) == C && x_in.device().is_cpu() && x_in.scalar_type() == at::kFloat,
              "decode_layers: x must be float32 [B, ", C, "] on CPU");
  for (const auto& w : weights) {
    TORCH_CHECK(w.device().is_cpu() && w.scalar_type() == at::kFloat && (w.is_mkldnn() || w.is_contiguous()),
                "decode_layers: weights must be contiguous float32 CPU tensors (or oneDNN-prepacked ones)");
  }
  const float e = static_cast<float>(eps);
  auto x = x_in.contiguous();
  for (int64_t l = 0; l < L; ++l) {
    const at::Tensor* w = weights.data() + 6 * l;
    TORCH_CHECK(w[0].numel() == C && w[3].numel() == C && w[1].dim() == 2 && w[1].size(0) == 3 * C &&
                w[1].size(1) == C && w[2].sizes() == at::IntArrayRef({C, C}) && w[4].dim() == 2 &&
                w[4].size(1) == C && w[5].dim() == 2 && w[5].size(0) == C && w[5].size(1) == w[4].size(0),
                "decode_layers: layer ", l, "'s weights do not fit a ", C, "-wide block");
    const auto qkv = linear(rms_norm(x, w[0], e), w[1], false);
    const auto y = decode_attention(qkv, cos, sin, positions, slots, k_cache.select(0, l), v_cache.select(0, l),
                                    scale);
    x = add_linear(x, y, w[2]);
    x = add_linear(x, linear(rms_norm(x, w[3], e), w[4], true), w[5]);
  }
  return x;
}

}  // namespace

TORCH_LIBRARY(raystack, m) {
  m.def("decode_attention(Tensor qkv, Tensor cos, Tensor sin, Tensor positions, Tensor slots, Tensor(a!) k_cache, "
        "Tensor(b!) v_cache, float scale) -> Tensor");
  m.impl("decode_attention", c10::DispatchKey::CPU, &decode_attention);
  m.def("decode_layers(Tensor x, Tensor[] weights, Tensor cos, Tensor sin, Tensor positions, Tensor slots, "
        "Tensor(a!) k_cache, Tensor(b!) v_cache, float scale, float eps) -> Tensor");
  m.impl("decode_layers", c10::DispatchKey::CPU, &decode_layers);
  m.impl("decode_layers", c10::DispatchKey::MkldnnCPU, &decode_layers);  // prepacked weights among the Tensor[]
}
