// exp(x) for x <= 0, shared by raystack's CPU ops (decode.cpp's softmax, sample.cpp's weights).
#pragma once

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>

namespace raystack {

// exp(x) for x <= 0 (a softmax's shifted logits), vectorizable: Cephes' expf (range reduction to
// [-ln2/2, ln2/2], a degree-6 polynomial, scaling by 2^n through the exponent bits), within ~2 ulp of expf.
inline float exp_nonpositive(float x) {
  x = std::max(x, -87.0f);  // exp(-87) ~ 1.6e-38: smaller results are flushed to that, not to 0
  const float n = std::floor(x * 1.44269504088896341f + 0.5f);
  x = x - n * 0.693359375f + n * 2.12194440e-4f;
  float y = 1.9875691500e-4f;
  y = y * x + 1.3981999507e-3f;
  y = y * x + 8.3334519073e-3f;
  y = y * x + 4.1665795894e-2f;
  y = y * x + 1.6666665459e-1f;
  y = y * x + 5.0000001201e-1f;
  y = y * x * x + x + 1.0f;
  const int32_t bits = (static_cast<int32_t>(n) + 127) << 23;
  float scale;
  std::memcpy(&scale, &bits, sizeof scale);
  return y * scale;
}

}  // namespace raystack
