// Cluster scoring of the CPU backend: centroid logits, the per-KV-head sum of per-query-head
// softmaxes, and top-k selection.
#include <algorithm>
#include <cmath>
#include <cstdint>
#include <vector>

#include "gpu/attention_cpu.h"
#include "gpu/simd_avx2.h"

namespace kvwave::gpu::cpu {

void CentroidLogits(const float* q, int g, int d, float scale, const float* centroids, int64_t n,
                    float* logits) {
  for (int h = 0; h < g; ++h) {
    const float* q_h = q + static_cast<int64_t>(h) * d;
    float* row = logits + static_cast<int64_t>(h) * n;
    int64_t j = 0;
    for (; j + 4 <= n; j += 4) {
      const float* c = centroids + j * d;
      simd::Dot4(q_h, c, c + d, c + 2 * d, c + 3 * d, d, row + j);
    }
    for (; j < n; ++j) row[j] = simd::Dot(q_h, centroids + j * d, d);
    simd::Scale(row, scale, n);
  }
}

void GroupSoftmaxSum(const float* logits, int g, int64_t n, const int32_t* sizes, float* scores) {
  for (int64_t j = 0; j < n; ++j) scores[j] = sizes[j] > 0 ? 0.0f : -INFINITY;
  for (int h = 0; h < g; ++h) {
    const float* row = logits + static_cast<int64_t>(h) * n;
    float m = -INFINITY;
    for (int64_t j = 0; j < n; ++j) {
      if (sizes[j] > 0) m = std::max(m, row[j]);
    }
    if (m == -INFINITY) continue;  // no non-empty cluster with a finite logit
    double sum = 0.0;
    for (int64_t j = 0; j < n; ++j) {
      if (sizes[j] > 0) sum += std::exp(row[j] - m);
    }
    const float inv = static_cast<float>(1.0 / sum);
    for (int64_t j = 0; j < n; ++j) {
      if (sizes[j] > 0) scores[j] += std::exp(row[j] - m) * inv;
    }
  }
}

int64_t TopK(const float* scores, int64_t n, int64_t k, int32_t* out) {
  if (k <= 0 || n <= 0) return 0;
  thread_local std::vector<int32_t> candidates;
  candidates.clear();
  for (int64_t j = 0; j < n; ++j) {
    if (std::isfinite(scores[j])) candidates.push_back(static_cast<int32_t>(j));
  }
  // Strict total order: higher score first, then lower index.
  auto before = [scores](int32_t a, int32_t b) {
    return scores[a] > scores[b] || (scores[a] == scores[b] && a < b);
  };
  const int64_t count = std::min<int64_t>(k, static_cast<int64_t>(candidates.size()));
  if (count < static_cast<int64_t>(candidates.size())) {
    std::nth_element(candidates.begin(), candidates.begin() + count, candidates.end(), before);
  }
  std::sort(candidates.begin(), candidates.begin() + count, before);
  std::copy(candidates.begin(), candidates.begin() + count, out);
  return count;
}

}  // namespace kvwave::gpu::cpu
