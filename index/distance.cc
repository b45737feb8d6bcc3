#include "index/distance.h"

#include <immintrin.h>

namespace kvwave::index {
namespace {

inline float HorizontalSum(__m256 v) {
  __m128 lo = _mm256_castps256_ps128(v);
  __m128 hi = _mm256_extractf128_ps(v, 1);
  lo = _mm_add_ps(lo, hi);
  lo = _mm_hadd_ps(lo, lo);
  lo = _mm_hadd_ps(lo, lo);
  return _mm_cvtss_f32(lo);
}

}  // namespace

float Dot(const float* a, const float* b, int d) {
  __m256 acc0 = _mm256_setzero_ps(), acc1 = _mm256_setzero_ps();
  int i = 0;
  for (; i + 16 <= d; i += 16) {
    acc0 = _mm256_fmadd_ps(_mm256_loadu_ps(a + i), _mm256_loadu_ps(b + i), acc0);
    acc1 = _mm256_fmadd_ps(_mm256_loadu_ps(a + i + 8), _mm256_loadu_ps(b + i + 8), acc1);
  }
  for (; i + 8 <= d; i += 8) {
    acc0 = _mm256_fmadd_ps(_mm256_loadu_ps(a + i), _mm256_loadu_ps(b + i), acc0);
  }
  float sum = HorizontalSum(_mm256_add_ps(acc0, acc1));
  for (; i < d; ++i) sum += a[i] * b[i];
  return sum;
}

void DotGather(const float* q, const float* rows, const int32_t* ids, int count, int d,
               float* out) {
  int c = 0;
  for (; c + 4 <= count; c += 4) {
    const float* r[4];
    for (int k = 0; k < 4; ++k) r[k] = rows + int64_t{ids[c + k]} * d;
    // Per row exactly Dot's order: acc0 takes the first 8 of each 16, acc1 the second 8, then
    // the 8-float tail into acc0, their sum reduced, then the scalar tail.
    __m256 acc0[4], acc1[4];
    for (int k = 0; k < 4; ++k) acc0[k] = acc1[k] = _mm256_setzero_ps();
    int i = 0;
    for (; i + 16 <= d; i += 16) {
      const __m256 q0 = _mm256_loadu_ps(q + i), q1 = _mm256_loadu_ps(q + i + 8);
      for (int k = 0; k < 4; ++k) {
        acc0[k] = _mm256_fmadd_ps(q0, _mm256_loadu_ps(r[k] + i), acc0[k]);
        acc1[k] = _mm256_fmadd_ps(q1, _mm256_loadu_ps(r[k] + i + 8), acc1[k]);
      }
    }
    for (; i + 8 <= d; i += 8) {
      const __m256 q0 = _mm256_loadu_ps(q + i);
      for (int k = 0; k < 4; ++k) acc0[k] = _mm256_fmadd_ps(q0, _mm256_loadu_ps(r[k] + i), acc0[k]);
    }
    for (int k = 0; k < 4; ++k) {
      float sum = HorizontalSum(_mm256_add_ps(acc0[k], acc1[k]));
      for (int j = i; j < d; ++j) sum += q[j] * r[k][j];
      out[c + k] = sum;
    }
  }
  for (; c < count; ++c) out[c] = Dot(q, rows + int64_t{ids[c]} * d, d);
}

void DotRows(const float* q, const float* rows, int64_t n, int d, float* out) {
  for (int64_t i = 0; i < n; ++i) out[i] = Dot(q, rows + i * d, d);
}

void DotRowsMulti(const float* qs, int m, const float* rows, int64_t n, int d, float* out) {
  // Rows stay in L1 across the m queries; queries (m*d floats) stay in L1/L2 across rows.
  for (int64_t i = 0; i < n; ++i) {
    const float* row = rows + i * d;
    for (int h = 0; h < m; ++h) out[h * n + i] = Dot(qs + int64_t{h} * d, row, d);
  }
}

}  // namespace kvwave::index
