// AVX2 + FMA building blocks of the CPU reference backend (internal to gpu/): dot products, a
// vectorised exp, and in-place row updates. The build targets x86-64-v3, so AVX2, FMA and F16C are
// always available. Stateless inline functions; thread-safe.
#ifndef KVWAVE_GPU_SIMD_AVX2_H_
#define KVWAVE_GPU_SIMD_AVX2_H_

#include <immintrin.h>

#include <cmath>
#include <cstdint>

namespace kvwave::gpu::cpu::simd {

// Sum of the 8 lanes of v.
inline float HorizontalSum(__m256 v) {
  __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  s = _mm_add_ps(s, _mm_movehl_ps(s, s));
  s = _mm_add_ss(s, _mm_movehdup_ps(s));
  return _mm_cvtss_f32(s);
}

// Maximum of the 8 lanes of v.
inline float HorizontalMax(__m256 v) {
  __m128 s = _mm_max_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  s = _mm_max_ps(s, _mm_movehl_ps(s, s));
  s = _mm_max_ss(s, _mm_movehdup_ps(s));
  return _mm_cvtss_f32(s);
}

// a . b over n floats (any n; two accumulators hide the FMA latency).
inline float Dot(const float* a, const float* b, int64_t n) {
  __m256 acc0 = _mm256_setzero_ps();
  __m256 acc1 = _mm256_setzero_ps();
  int64_t i = 0;
  for (; i + 16 <= n; i += 16) {
    acc0 = _mm256_fmadd_ps(_mm256_loadu_ps(a + i), _mm256_loadu_ps(b + i), acc0);
    acc1 = _mm256_fmadd_ps(_mm256_loadu_ps(a + i + 8), _mm256_loadu_ps(b + i + 8), acc1);
  }
  for (; i + 8 <= n; i += 8) {
    acc0 = _mm256_fmadd_ps(_mm256_loadu_ps(a + i), _mm256_loadu_ps(b + i), acc0);
  }
  float sum = HorizontalSum(_mm256_add_ps(acc0, acc1));
  for (; i < n; ++i) sum += a[i] * b[i];
  return sum;
}

// q . r0, q . r1, q . r2, q . r3 over n floats, written to out[0..3]; each load of q serves four
// rows.
inline void Dot4(const float* q, const float* r0, const float* r1, const float* r2, const float* r3,
                 int64_t n, float* out) {
  __m256 a0 = _mm256_setzero_ps();
  __m256 a1 = _mm256_setzero_ps();
  __m256 a2 = _mm256_setzero_ps();
  __m256 a3 = _mm256_setzero_ps();
  int64_t i = 0;
  for (; i + 8 <= n; i += 8) {
    const __m256 x = _mm256_loadu_ps(q + i);
    a0 = _mm256_fmadd_ps(x, _mm256_loadu_ps(r0 + i), a0);
    a1 = _mm256_fmadd_ps(x, _mm256_loadu_ps(r1 + i), a1);
    a2 = _mm256_fmadd_ps(x, _mm256_loadu_ps(r2 + i), a2);
    a3 = _mm256_fmadd_ps(x, _mm256_loadu_ps(r3 + i), a3);
  }
  // Reduce the four accumulators at once: lane k of the result is the sum of a_k.
  const __m256 h01 = _mm256_hadd_ps(a0, a1);
  const __m256 h23 = _mm256_hadd_ps(a2, a3);
  const __m256 h = _mm256_hadd_ps(h01, h23);
  __m128 s = _mm_add_ps(_mm256_castps256_ps128(h), _mm256_extractf128_ps(h, 1));
  _mm_storeu_ps(out, s);
  for (; i < n; ++i) {
    out[0] += q[i] * r0[i];
    out[1] += q[i] * r1[i];
    out[2] += q[i] * r2[i];
    out[3] += q[i] * r3[i];
  }
}

// exp(x) lane-wise, relative error ~2 ulp for x in [-87, 88]; 0 below -87.3 (and for -inf),
// clamped to exp(88.7) above. Range reduction x = n ln2 + r with |r| <= ln2/2 and a degree-7
// Taylor polynomial (truncation error below 1e-8 relative), then 2^n through the exponent bits.
inline __m256 Exp(__m256 x) {
  const __m256 kLog2e = _mm256_set1_ps(1.44269504088896341f);
  const __m256 kLn2Hi = _mm256_set1_ps(0.693359375f);
  const __m256 kLn2Lo = _mm256_set1_ps(-2.12194440e-4f);
  const __m256 kMin = _mm256_set1_ps(-87.3f);
  const __m256 kMax = _mm256_set1_ps(88.7f);
  const __m256 underflow = _mm256_cmp_ps(x, kMin, _CMP_LT_OQ);
  x = _mm256_min_ps(_mm256_max_ps(x, kMin), kMax);
  const __m256 n =
      _mm256_round_ps(_mm256_mul_ps(x, kLog2e), _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  __m256 r = _mm256_fnmadd_ps(n, kLn2Hi, x);
  r = _mm256_fnmadd_ps(n, kLn2Lo, r);
  __m256 p = _mm256_set1_ps(1.0f / 5040.0f);
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.0f / 720.0f));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.0f / 120.0f));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.0f / 24.0f));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.0f / 6.0f));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(0.5f));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.0f));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.0f));
  // n is in [-126, 128]; 2^128 is not representable, so scale by 2^(n-1) twice when n = 128.
  const __m256i ni = _mm256_cvtps_epi32(n);
  const __m256i half = _mm256_srai_epi32(ni, 1);
  const __m256 s1 =
      _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_add_epi32(half, _mm256_set1_epi32(127)), 23));
  const __m256 s2 = _mm256_castsi256_ps(
      _mm256_slli_epi32(_mm256_add_epi32(_mm256_sub_epi32(ni, half), _mm256_set1_epi32(127)), 23));
  const __m256 result = _mm256_mul_ps(_mm256_mul_ps(p, s1), s2);
  return _mm256_andnot_ps(underflow, result);
}

// y[i] = exp(x[i] - shift) for i < n; returns the sum of the y[i].
inline float ExpShiftedSum(const float* x, float shift, int64_t n, float* y) {
  const __m256 m = _mm256_set1_ps(shift);
  __m256 acc = _mm256_setzero_ps();
  int64_t i = 0;
  for (; i + 8 <= n; i += 8) {
    const __m256 e = Exp(_mm256_sub_ps(_mm256_loadu_ps(x + i), m));
    _mm256_storeu_ps(y + i, e);
    acc = _mm256_add_ps(acc, e);
  }
  if (i < n) {
    alignas(32) float tail[8];
    for (int t = 0; t < 8; ++t) tail[t] = i + t < n ? x[i + t] - shift : -INFINITY;
    const __m256 e = Exp(_mm256_load_ps(tail));
    _mm256_store_ps(tail, e);
    acc = _mm256_add_ps(acc, e);
    for (int t = 0; i + t < n; ++t) y[i + t] = tail[t];
  }
  return HorizontalSum(acc);
}

// Maximum of x[0..n), -inf when n == 0.
inline float Max(const float* x, int64_t n) {
  __m256 acc = _mm256_set1_ps(-INFINITY);
  int64_t i = 0;
  for (; i + 8 <= n; i += 8) acc = _mm256_max_ps(acc, _mm256_loadu_ps(x + i));
  float m = HorizontalMax(acc);
  for (; i < n; ++i) m = x[i] > m ? x[i] : m;
  return m;
}

// y[i] *= a for i < n.
inline void Scale(float* y, float a, int64_t n) {
  const __m256 va = _mm256_set1_ps(a);
  int64_t i = 0;
  for (; i + 8 <= n; i += 8) _mm256_storeu_ps(y + i, _mm256_mul_ps(_mm256_loadu_ps(y + i), va));
  for (; i < n; ++i) y[i] *= a;
}

}  // namespace kvwave::gpu::cpu::simd

#endif  // KVWAVE_GPU_SIMD_AVX2_H_
