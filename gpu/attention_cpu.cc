// Exact attention, estimation-zone attention and the log-sum-exp merge of the CPU backend.
//
// Both attention functions feed blocks of up to kBlockRows (key, value) rows to one online
// softmax: per head a running maximum m, a running sum l of exp(s - m) and an unnormalised output
// accumulated in place in `out`. A block of bf16/f16 rows is converted to float32 once, into
// thread-local scratch, and then serves all g heads of the GQA group.
#include "gpu/attention_cpu.h"

#include <immintrin.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <vector>

#include "absl/status/status.h"
#include "absl/strings/str_cat.h"
#include "config/status_macros.h"
#include "gpu/simd_avx2.h"

namespace kvwave::gpu::cpu {
namespace {

// Rows per block: 32 rows of K and V at d = 128 are 32 KiB of float32, resident in L1/L2 while
// the g heads of the group use them.
constexpr int kBlockRows = 32;

// Up to kBlockRows rows for the online softmax. Row i counts as exp(bias[i]) keys equal to k[i]
// whose values sum to exp(bias[i]) * vscale[i] * v[i]; plain attention has bias 0 and vscale 1.
struct Block {
  int n = 0;
  bool weighted = false;  // bias and vscale are used only when set
  const float* k[kBlockRows];
  const float* v[kBlockRows];
  float bias[kBlockRows];
  float vscale[kBlockRows];
  // Spread correction (EstimateAttention with spreads): head h's score of row i gains
  // head_factor[h] * spread[i]. Null: none.
  const float* head_factor = nullptr;
  float spread[kBlockRows];
};

// Running state of g heads: acc is the caller's `out` [g x d], m and l are [g].
struct OnlineState {
  int g = 0;
  int d = 0;
  float scale = 1.0f;
  const float* q = nullptr;
  float* acc = nullptr;
  float* m = nullptr;
  float* l = nullptr;
};

// Per-thread scratch reused across calls; it grows to the largest d seen and never shrinks.
struct Scratch {
  std::vector<float> k;
  std::vector<float> v;
  std::vector<float> ml;

  void Reserve(int g, int d) {
    const size_t rows = static_cast<size_t>(kBlockRows) * d;
    if (k.size() < rows) {
      k.resize(rows);
      v.resize(rows);
    }
    if (ml.size() < 2 * static_cast<size_t>(g)) ml.resize(2 * static_cast<size_t>(g));
  }
};

Scratch& ThreadScratch() {
  thread_local Scratch scratch;
  return scratch;
}

bool ValidDType(DType t) { return t == DType::kF32 || t == DType::kF16 || t == DType::kBF16; }

absl::Status CheckShape(const float* q, int g, int d, const float* out, const float* lse) {
  if (g < 1) return absl::InvalidArgumentError(absl::StrCat("group size g=", g, " < 1"));
  if (d < 1 || d % 8 != 0) {
    return absl::InvalidArgumentError(
        absl::StrCat("head dim d=", d, " must be a positive multiple of 8"));
  }
  if (q == nullptr || out == nullptr || lse == nullptr) {
    return absl::InvalidArgumentError("q, out and lse must not be null");
  }
  return absl::OkStatus();
}

// s[i] = scale * q_h . k_i + bias_i for the rows of the block.
void ScoreBlock(const float* q_h, int d, float scale, const Block& b, float* s) {
  int i = 0;
  for (; i + 4 <= b.n; i += 4) {
    simd::Dot4(q_h, b.k[i], b.k[i + 1], b.k[i + 2], b.k[i + 3], d, s + i);
  }
  for (; i < b.n; ++i) s[i] = simd::Dot(q_h, b.k[i], d);
  for (i = 0; i < b.n; ++i) s[i] *= scale;
  if (b.weighted) {
    for (i = 0; i < b.n; ++i) s[i] += b.bias[i];
  }
}

// acc_h = alpha * acc_h + sum_i w[i] v_i, 32 (then 8) columns at a time kept in registers.
// REQUIRES: d % 8 == 0.
void AccumulateRows(const Block& b, const float* w, float alpha, int d, float* acc_h) {
  const __m256 va = _mm256_set1_ps(alpha);
  int c = 0;
  for (; c + 32 <= d; c += 32) {
    __m256 a0 = _mm256_mul_ps(_mm256_loadu_ps(acc_h + c), va);
    __m256 a1 = _mm256_mul_ps(_mm256_loadu_ps(acc_h + c + 8), va);
    __m256 a2 = _mm256_mul_ps(_mm256_loadu_ps(acc_h + c + 16), va);
    __m256 a3 = _mm256_mul_ps(_mm256_loadu_ps(acc_h + c + 24), va);
    for (int i = 0; i < b.n; ++i) {
      const __m256 p = _mm256_set1_ps(w[i]);
      const float* v = b.v[i] + c;
      a0 = _mm256_fmadd_ps(p, _mm256_loadu_ps(v), a0);
      a1 = _mm256_fmadd_ps(p, _mm256_loadu_ps(v + 8), a1);
      a2 = _mm256_fmadd_ps(p, _mm256_loadu_ps(v + 16), a2);
      a3 = _mm256_fmadd_ps(p, _mm256_loadu_ps(v + 24), a3);
    }
    _mm256_storeu_ps(acc_h + c, a0);
    _mm256_storeu_ps(acc_h + c + 8, a1);
    _mm256_storeu_ps(acc_h + c + 16, a2);
    _mm256_storeu_ps(acc_h + c + 24, a3);
  }
  for (; c < d; c += 8) {
    __m256 a0 = _mm256_mul_ps(_mm256_loadu_ps(acc_h + c), va);
    for (int i = 0; i < b.n; ++i) {
      a0 = _mm256_fmadd_ps(_mm256_set1_ps(w[i]), _mm256_loadu_ps(b.v[i] + c), a0);
    }
    _mm256_storeu_ps(acc_h + c, a0);
  }
}

// Folds one block into the running state of every head.
void AccumulateBlock(const Block& b, OnlineState& st) {
  if (b.n == 0) return;
  float s[kBlockRows];
  float w[kBlockRows];
  for (int h = 0; h < st.g; ++h) {
    float* acc_h = st.acc + static_cast<int64_t>(h) * st.d;
    ScoreBlock(st.q + static_cast<int64_t>(h) * st.d, st.d, st.scale, b, s);
    if (b.head_factor != nullptr) {  // the estimation's spread correction
      for (int i = 0; i < b.n; ++i) s[i] += b.head_factor[h] * b.spread[i];
    }
    const float m_new = std::max(st.m[h], simd::Max(s, b.n));
    if (m_new == -INFINITY) continue;  // every weight so far is exp(-inf) = 0
    const float alpha = st.m[h] == -INFINITY ? 0.0f : std::exp(st.m[h] - m_new);
    const float block_sum = simd::ExpShiftedSum(s, m_new, b.n, w);
    st.l[h] = st.l[h] * alpha + block_sum;
    st.m[h] = m_new;
    if (b.weighted) {
      for (int i = 0; i < b.n; ++i) w[i] *= b.vscale[i];
    }
    AccumulateRows(b, w, alpha, st.d, acc_h);
  }
}

OnlineState StartState(const float* q, int g, int d, float scale, float* out) {
  Scratch& scratch = ThreadScratch();
  scratch.Reserve(g, d);
  OnlineState st{g, d, scale, q, out, scratch.ml.data(), scratch.ml.data() + g};
  std::fill(out, out + static_cast<int64_t>(g) * d, 0.0f);
  std::fill(st.m, st.m + g, -INFINITY);
  std::fill(st.l, st.l + g, 0.0f);
  return st;
}

// out_h /= l_h and lse_h = m_h + log(l_h); a head that saw no finite score gets 0 and -inf.
void FinishState(const OnlineState& st, float* lse) {
  for (int h = 0; h < st.g; ++h) {
    float* out_h = st.acc + static_cast<int64_t>(h) * st.d;
    if (st.l[h] > 0.0f && st.m[h] != -INFINITY) {
      simd::Scale(out_h, 1.0f / st.l[h], st.d);
      lse[h] = st.m[h] + std::log(st.l[h]);
    } else {
      std::fill(out_h, out_h + st.d, 0.0f);
      lse[h] = -INFINITY;
    }
  }
}

absl::Status CheckSpans(std::span<const KvSpan> spans) {
  for (size_t i = 0; i < spans.size(); ++i) {
    const KvSpan& s = spans[i];
    if (s.rows < 0) {
      return absl::InvalidArgumentError(absl::StrCat("span ", i, " has ", s.rows, " rows"));
    }
    if (s.rows > 0 && (s.k == nullptr || s.v == nullptr)) {
      return absl::InvalidArgumentError(absl::StrCat("span ", i, " has null K or V"));
    }
  }
  return absl::OkStatus();
}

// Feeds one span to the online softmax, block by block.
void AccumulateSpan(const KvSpan& span, DType kv_type, OnlineState& st) {
  Scratch& scratch = ThreadScratch();
  const int64_t d = st.d;
  const size_t row_bytes = ElementSize(kv_type) * static_cast<size_t>(d);
  const auto* k_bytes = static_cast<const uint8_t*>(span.k);
  const auto* v_bytes = static_cast<const uint8_t*>(span.v);
  Block b;
  for (int64_t r0 = 0; r0 < span.rows; r0 += kBlockRows) {
    b.n = static_cast<int>(std::min<int64_t>(kBlockRows, span.rows - r0));
    const float* k_rows;
    const float* v_rows;
    if (kv_type == DType::kF32) {
      k_rows = reinterpret_cast<const float*>(k_bytes + r0 * row_bytes);
      v_rows = reinterpret_cast<const float*>(v_bytes + r0 * row_bytes);
    } else {
      ToFloat(k_bytes + r0 * row_bytes, kv_type, scratch.k.data(), b.n * d);
      ToFloat(v_bytes + r0 * row_bytes, kv_type, scratch.v.data(), b.n * d);
      k_rows = scratch.k.data();
      v_rows = scratch.v.data();
    }
    for (int i = 0; i < b.n; ++i) {
      b.k[i] = k_rows + i * d;
      b.v[i] = v_rows + i * d;
    }
    AccumulateBlock(b, st);
  }
}

absl::Status CheckClusters(const float* centroids, const float* value_sums, const int32_t* sizes,
                           int64_t num_clusters, std::span<const int32_t> clusters) {
  if (clusters.empty()) return absl::OkStatus();
  if (centroids == nullptr || value_sums == nullptr || sizes == nullptr) {
    return absl::InvalidArgumentError("centroids, value_sums and sizes must not be null");
  }
  for (size_t i = 0; i < clusters.size(); ++i) {
    const int32_t j = clusters[i];
    if (j < 0 || j >= num_clusters) {
      return absl::InvalidArgumentError(
          absl::StrCat("cluster index ", j, " out of range [0, ", num_clusters, ")"));
    }
    if (sizes[j] < 0) {
      return absl::InvalidArgumentError(absl::StrCat("cluster ", j, " has size ", sizes[j]));
    }
  }
  return absl::OkStatus();
}

}  // namespace

absl::Status ExactAttention(const float* q, int g, int d, float scale, DType kv_type,
                            std::span<const KvSpan> spans, float* out, float* lse) {
  KVWAVE_RETURN_IF_ERROR(CheckShape(q, g, d, out, lse));
  if (!ValidDType(kv_type)) return absl::InvalidArgumentError("unknown K/V dtype");
  KVWAVE_RETURN_IF_ERROR(CheckSpans(spans));
  OnlineState st = StartState(q, g, d, scale, out);
  for (const KvSpan& span : spans) AccumulateSpan(span, kv_type, st);
  FinishState(st, lse);
  return absl::OkStatus();
}

absl::Status EstimateAttention(const float* q, int g, int d, float scale, const float* centroids,
                               const float* value_sums, const int32_t* sizes, int64_t num_clusters,
                               std::span<const int32_t> clusters, float* out, float* lse,
                               const float* spreads) {
  KVWAVE_RETURN_IF_ERROR(CheckShape(q, g, d, out, lse));
  KVWAVE_RETURN_IF_ERROR(CheckClusters(centroids, value_sums, sizes, num_clusters, clusters));
  OnlineState st = StartState(q, g, d, scale, out);
  Block b;
  b.weighted = true;
  thread_local std::vector<float> factor;  // [g], reused
  if (spreads != nullptr) {
    // Under a normal model of a cluster's scores, E[e^s] = e^{mean + var / 2}; over members whose
    // keys vary by spreads[j] per dimension, scale * q_h . k varies by ~scale^2 |q_h|^2 spreads[j].
    factor.resize(g);
    for (int h = 0; h < g; ++h) {
      const float* q_h = q + static_cast<int64_t>(h) * d;
      factor[h] = 0.5f * scale * scale * simd::Dot(q_h, q_h, d);
    }
    b.head_factor = factor.data();
  }
  for (const int32_t j : clusters) {
    const int32_t size = sizes[j];
    if (size == 0) continue;
    b.k[b.n] = centroids + static_cast<int64_t>(j) * d;
    b.v[b.n] = value_sums + static_cast<int64_t>(j) * d;
    b.bias[b.n] = std::log(static_cast<float>(size));
    b.vscale[b.n] = 1.0f / static_cast<float>(size);
    if (spreads != nullptr) b.spread[b.n] = spreads[j];
    if (++b.n == kBlockRows) {
      AccumulateBlock(b, st);
      b.n = 0;
    }
  }
  AccumulateBlock(b, st);
  FinishState(st, lse);
  return absl::OkStatus();
}

void MergeLse(float* out_a, float* lse_a, const float* out_b, const float* lse_b, int g, int d) {
  for (int h = 0; h < g; ++h) {
    float* oa = out_a + static_cast<int64_t>(h) * d;
    const float* ob = out_b + static_cast<int64_t>(h) * d;
    const float la = lse_a[h];
    const float lb = lse_b[h];
    if (lb == -INFINITY) continue;  // b is empty: identity
    if (la == -INFINITY) {          // a is empty: take b
      std::copy(ob, ob + d, oa);
      lse_a[h] = lb;
      continue;
    }
    const float m = std::max(la, lb);
    const float wa = std::exp(la - m);
    const float wb = std::exp(lb - m);
    const float total = wa + wb;
    const float ca = wa / total;
    const float cb = wb / total;
    for (int c = 0; c < d; ++c) oa[c] = ca * oa[c] + cb * ob[c];
    lse_a[h] = m + std::log(total);
  }
}

}  // namespace kvwave::gpu::cpu
