// raystack's CPU sampling op for small vocabularies: the CPU path's draw (raystack/sampling/cpu.py, whose
// semantics raystack/sampling/reference.py defines) for every row of a batch in one call, rows in parallel.
//
// Per row, with logits x already penalised and biased (the caller does that, as the NumPy path does; a row with a NaN
// or +inf, or with no finite logit, is a ValueError naming the first such row):
//   temperature 0: the first maximum, log-probability 0 (greedy);
//   else z = (x - max(x)) / temperature in float32, and the survivors are a prefix of z sorted descending, ties
//   together: top-k keeps z >= the k-th largest; top-p keeps a token while the mass strictly above its group of ties
//   (float64 sums of float32 exp(z)) is below top_p times the mass left by top-k; min-p keeps -z <= nlm (the
//   float32 -log(min_p) every implementation shares). With tau the last survivor's z, the draw is the inverse CDF
//   over the tokens with z >= tau in token-index order, cumulated in float64, at the row's uniform u (Philox, made
//   by the caller): the first token whose cumulative mass exceeds u times the total, at most the last token with
//   mass. Its log-probability is log(exp(z) / total).
// The NumPy path makes ~40 array calls per batch for this; here it is one pass per row, plus a sort of the row's z
// when it has top-k or top-p.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include "exp_nonpositive.h"

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <functional>
#include <tuple>
#include <vector>

namespace {

using raystack::exp_nonpositive;  // z is at most 0

inline double weight(float z) { return z == -INFINITY ? 0.0 : static_cast<double>(exp_nonpositive(z)); }

std::tuple<at::Tensor, at::Tensor> sample_rows(const at::Tensor& logits, const at::Tensor& temperature,
                                               const at::Tensor& top_k, const at::Tensor& top_p,
                                               const at::Tensor& neg_log_min_p, const at::Tensor& uniform) {
  TORCH_CHECK(logits.dim() == 2 && logits.device().is_cpu() && logits.scalar_type() == at::kFloat,
              "sample_rows: logits must be float32 [B, V] on CPU");
  const int64_t B = logits.size(0), V = logits.size(1);
  TORCH_CHECK(V > 0, "sample_rows: an empty vocabulary");
  for (const auto* t : {&temperature, &top_k, &top_p, &neg_log_min_p, &uniform}) {
    TORCH_CHECK(t->dim() == 1 && t->size(0) == B && t->device().is_cpu(), "sample_rows: one parameter per row");
  }
  const auto x = logits.contiguous();
  const auto temp = temperature.to(at::kFloat).contiguous(), k = top_k.to(at::kLong).contiguous();
  const auto p = top_p.to(at::kFloat).contiguous(), nlm = neg_log_min_p.to(at::kFloat).contiguous();
  const auto u = uniform.to(at::kDouble).contiguous();
  auto tokens = at::empty({B}, at::kLong);
  auto logprobs = at::empty({B}, at::kFloat);
  const float* X = x.data_ptr<float>();
  const float* T = temp.data_ptr<float>();
  const int64_t* K = k.data_ptr<int64_t>();
  const float* P = p.data_ptr<float>();
  const float* N = nlm.data_ptr<float>();
  const double* U = u.data_ptr<double>();
  int64_t* out_tokens = tokens.data_ptr<int64_t>();
  float* out_logprobs = logprobs.data_ptr<float>();
  for (int64_t r = 0; r < B; ++r) {  // first, in row order: the first bad row is the one named (a ValueError)
    const float* row = X + r * V;
    bool finite = false, bad = false;
    for (int64_t i = 0; i < V; ++i) {
      bad |= std::isnan(row[i]) || row[i] == INFINITY;
      finite |= std::isfinite(row[i]);
    }
    TORCH_CHECK_VALUE(finite && !bad, "logits of row ", r, " contain NaN, +inf or no finite value");
  }

  at::parallel_for(0, B, 1, [&](int64_t begin, int64_t end) {
    std::vector<float> z(V), sorted(V);
    std::vector<double> mass(V);
    for (int64_t r = begin; r < end; ++r) {
      const float* row = X + r * V;
      const float* top = std::max_element(row, row + V);  // the first maximum
      if (!(T[r] > 0.f)) {
        out_tokens[r] = top - row;
        out_logprobs[r] = 0.f;
        continue;
      }
      const float mx = *top, t = T[r];
      for (int64_t i = 0; i < V; ++i) z[i] = (row[i] - mx) / t;
      // Min-p is a cut on z itself (survivors have -z <= nlm; every finite z when there is no min-p); only top-k
      // and top-p need z in order, so a row without them is not sorted (a row with only a temperature is the common
      // case of a batch job's rows). With them, the survivors are a prefix of z sorted descending and tau is the
      // larger of the two cuts.
      const bool ordered = (K[r] > 0 && K[r] < V) || P[r] < 1.f;
      float tau = N[r] < INFINITY ? -N[r] : std::nextafter(-INFINITY, 0.f);
      if (ordered) {
        std::copy(z.begin(), z.end(), sorted.begin());
        std::sort(sorted.begin(), sorted.end(), std::greater<float>());
        // n: how many of ``sorted`` survive (a prefix); never a -inf logit (a masked token)
        int64_t n = std::lower_bound(sorted.begin(), sorted.end(), -INFINITY, std::greater<float>()) - sorted.begin();
        if (K[r] > 0 && K[r] < V) {
          const float kth = sorted[K[r] - 1];
          n = std::min<int64_t>(n, std::upper_bound(sorted.begin(), sorted.end(), kth, std::greater<float>()) -
                                       sorted.begin());
        }
        if (P[r] < 1.f) {
          double total = 0.0;
          for (int64_t j = 0; j < n; ++j) total += weight(sorted[j]);
          const double limit = static_cast<double>(P[r]) * total;
          double running = 0.0, group_above = 0.0;
          int64_t kept = n;
          for (int64_t j = 0; j < n; ++j) {
            const double w = weight(sorted[j]);
            running += w;
            if (j == 0 || sorted[j] != sorted[j - 1]) {
              group_above = running - w;  // the mass strictly above this group (cumsum - w, as the NumPy path)
              if (!(group_above < limit)) {
                kept = j;
                break;
              }
            }
          }
          n = kept;
        }
        tau = std::max(tau, sorted[std::max<int64_t>(n, 1) - 1]);  // min-p's cut too: the prefix's z >= -nlm
      }
      double cumulative = 0.0;
      int64_t last = 0;  // the last survivor in token order
      for (int64_t i = 0; i < V; ++i) {
        double w = 0.0;
        if (z[i] >= tau) {
          w = weight(z[i]);
          last = i;
        }
        cumulative += w;
        mass[i] = cumulative;
      }
      const double target = U[r] * cumulative;
      const int64_t index = std::upper_bound(mass.begin(), mass.end(), target) - mass.begin();
      const int64_t token = std::min(index, last);
      out_tokens[r] = token;
      out_logprobs[r] = static_cast<float>(std::log(weight(z[token]) / cumulative));
    }
  });
  return {tokens, logprobs};
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(raystack, m) {
  m.def("sample_rows(Tensor logits, Tensor temperature, Tensor top_k, Tensor top_p, Tensor neg_log_min_p, "
        "Tensor uniform) -> (Tensor, Tensor)");
  m.impl("sample_rows", c10::DispatchKey::CPU, &sample_rows);
}
