// Cluster scoring kernels: centroid logits with the per-group softmax sum, and top-k selection.
//
// ScoreClusters is two launches: LogitsKernel writes scale*q.c for every (query head, cluster)
// and per-block softmax statistics (max, sum of exp) over the non-empty clusters; ScoresKernel
// folds the statistics per query head and sums the g softmax values of each cluster.
//
// SelectTopK is one block per KV head: a 4-pass 8-bit radix select finds the key of the k-th
// (and k2-th) largest finite score and how many of the keys equal to it to take (lowest index
// first), then three walks over per-thread contiguous ranges (count ties, count selected, write)
// with block scans emit the selected indices in increasing index order.
#include <algorithm>
#include <cmath>
#include <cub/block/block_scan.cuh>

#include "gpu/cuda/launchers.h"

namespace kvwave::gpu::cuda {
namespace {

constexpr int kScoreThreads = 256;
constexpr int kClustersPerBlock = 256;
constexpr int kTopKThreads = 1024;

template <int G>
__global__ void __launch_bounds__(kScoreThreads)
    LogitsKernel(const float* __restrict__ q, int d, float scale, const float* __restrict__ cen,
                 int64_t cen_stride, const int32_t* __restrict__ sizes, int64_t size_stride,
                 int64_t n, float* __restrict__ logits, float2* __restrict__ stats) {
  const int head = blockIdx.y, warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  constexpr int kWarps = kScoreThreads / 32;
  const float* c_head = cen + head * cen_stride;
  const int32_t* s_head = sizes + head * size_stride;
  const int d4 = d / 4;
  float m[G], z[G];
#pragma unroll
  for (int j = 0; j < G; ++j) m[j] = -INFINITY, z[j] = 0.f;
  const int64_t first = int64_t{blockIdx.x} * kClustersPerBlock;
  const int64_t last = min(n, first + kClustersPerBlock);
  for (int64_t c = first + warp; c < last; c += kWarps) {
    float dot[G];
#pragma unroll
    for (int j = 0; j < G; ++j) dot[j] = 0.f;
    for (int i = lane; i < d4; i += 32) {
      const float4 cv = reinterpret_cast<const float4*>(c_head + c * d)[i];
#pragma unroll
      for (int j = 0; j < G; ++j) {
        const float4 qv = reinterpret_cast<const float4*>(q + (int64_t{head} * G + j) * d)[i];
        dot[j] += qv.x * cv.x + qv.y * cv.y + qv.z * cv.z + qv.w * cv.w;
      }
    }
#pragma unroll
    for (int off = 16; off > 0; off /= 2)
#pragma unroll
      for (int j = 0; j < G; ++j) dot[j] += __shfl_xor_sync(0xffffffffu, dot[j], off);
    const bool live = s_head[c] > 0;
#pragma unroll
    for (int j = 0; j < G; ++j) {
      const float x = dot[j] * scale;
      if (lane == 0) logits[(int64_t{head} * G + j) * n + c] = x;
      if (!live) continue;
      const float mn = fmaxf(m[j], x);
      z[j] = z[j] * __expf(m[j] - mn) + __expf(x - mn);
      m[j] = mn;
    }
  }
  __shared__ float2 sm[kWarps][G];
  if (lane == 0)
#pragma unroll
    for (int j = 0; j < G; ++j) sm[warp][j] = make_float2(m[j], z[j]);
  __syncthreads();
  if (threadIdx.x < G) {
    const int j = threadIdx.x;
    float mx = -INFINITY, zz = 0.f;
    for (int w = 0; w < kWarps; ++w) mx = fmaxf(mx, sm[w][j].x);
    if (mx != -INFINITY)
      for (int w = 0; w < kWarps; ++w)
        if (sm[w][j].x != -INFINITY) zz += sm[w][j].y * __expf(sm[w][j].x - mx);
    stats[(int64_t{head} * gridDim.x + blockIdx.x) * G + j] = make_float2(mx, zz);
  }
}

template <int G>
__global__ void __launch_bounds__(kScoreThreads)
    ScoresKernel(const float* __restrict__ logits, const float2* __restrict__ stats, int nb,
                 const int32_t* __restrict__ sizes, int64_t size_stride, int64_t n,
                 float* __restrict__ scores, int64_t score_stride) {
  const int head = blockIdx.y, lane = threadIdx.x % 32;
  __shared__ float sm_m[G], sm_inv[G];
  if (threadIdx.x < 32) {
#pragma unroll
    for (int j = 0; j < G; ++j) {
      float mx = -INFINITY, zz = 0.f;
      for (int b = lane; b < nb; b += 32) {
        const float2 st = stats[(int64_t{head} * nb + b) * G + j];
        if (st.x == -INFINITY) continue;
        const float mn = fmaxf(mx, st.x);
        zz = zz * __expf(mx - mn) + st.y * __expf(st.x - mn);
        mx = mn;
      }
#pragma unroll
      for (int off = 16; off > 0; off /= 2) {
        const float om = __shfl_xor_sync(0xffffffffu, mx, off);
        const float oz = __shfl_xor_sync(0xffffffffu, zz, off);
        const float mn = fmaxf(mx, om);
        if (mn != -INFINITY) zz = zz * __expf(mx - mn) + oz * __expf(om - mn);
        mx = mn;
      }
      if (lane == 0) {
        sm_m[j] = mx;
        sm_inv[j] = zz > 0.f ? 1.f / zz : 0.f;
      }
    }
  }
  __syncthreads();
  const int64_t c = int64_t{blockIdx.x} * blockDim.x + threadIdx.x;
  if (c >= n) return;
  float score = -INFINITY;
  if (sizes[head * size_stride + c] > 0) {
    score = 0.f;
#pragma unroll
    for (int j = 0; j < G; ++j)
      score += __expf(logits[(int64_t{head} * G + j) * n + c] - sm_m[j]) * sm_inv[j];
  }
  scores[head * score_stride + c] = score;
}

__device__ __forceinline__ uint32_t OrderKey(float f) {
  const uint32_t u = __float_as_uint(f);
  return (u & 0x80000000u) ? ~u : (u | 0x80000000u);
}

// Radix-selects, for want[t] >= 1, the key T[t] of the want[t]-th largest finite score and the
// number rem[t] of keys equal to T[t] to take. Called by all threads of the block.
__device__ void RadixSelect(const float* s, int64_t n, const int64_t* want, uint32_t* prefix,
                            int64_t* rem) {
  __shared__ int hist[2][256];
  uint32_t mask = 0;
  for (int shift = 24; shift >= 0; shift -= 8) {
    for (int i = threadIdx.x; i < 512; i += blockDim.x) hist[i / 256][i % 256] = 0;
    __syncthreads();
    for (int64_t i = threadIdx.x; i < n; i += blockDim.x) {
      const float x = s[i];
      if (!isfinite(x)) continue;
      const uint32_t key = OrderKey(x);
#pragma unroll
      for (int t = 0; t < 2; ++t)
        if (want[t] > 0 && (key & mask) == prefix[t]) atomicAdd(&hist[t][(key >> shift) & 255], 1);
    }
    __syncthreads();
    if (threadIdx.x < 2 && want[threadIdx.x] > 0) {
      const int t = threadIdx.x;
      int64_t above = 0;
      int b = 255;
      for (; b > 0; --b) {
        if (above + hist[t][b] >= rem[t]) break;
        above += hist[t][b];
      }
      rem[t] -= above;
      prefix[t] |= uint32_t(b) << shift;
    }
    __syncthreads();
    mask |= 0xFFu << shift;
  }
}

__global__ void __launch_bounds__(kTopKThreads)
    TopKKernel(const float* __restrict__ scores, int64_t n, int64_t stride, int64_t k, int64_t k2,
               int32_t* __restrict__ out, int32_t* __restrict__ out2, int64_t out_stride,
               int32_t* __restrict__ counts, int32_t* __restrict__ counts2) {
  using Scan = cub::BlockScan<long long, kTopKThreads>;
  __shared__ typename Scan::TempStorage scan_tmp;
  __shared__ int64_t want[2], rem[2];
  __shared__ uint32_t prefix[2];
  __shared__ int64_t valid_sh;
  const int head = blockIdx.x;
  const float* s = scores + head * stride;
  if (threadIdx.x == 0) valid_sh = 0;
  __syncthreads();
  int64_t local = 0;
  for (int64_t i = threadIdx.x; i < n; i += blockDim.x) local += isfinite(s[i]) ? 1 : 0;
  atomicAdd(reinterpret_cast<unsigned long long*>(&valid_sh),
            static_cast<unsigned long long>(local));
  __syncthreads();
  if (threadIdx.x == 0) {
    want[0] = min(k, valid_sh);
    want[1] = out2 != nullptr ? min(max(k2, k), valid_sh) : 0;
    for (int t = 0; t < 2; ++t) prefix[t] = 0, rem[t] = want[t];
  }
  __syncthreads();
  RadixSelect(s, n, want, prefix, rem);
  // Per-thread contiguous range, so that ties are taken in index order.
  const int64_t per = (n + blockDim.x - 1) / blockDim.x;
  const int64_t lo = min(n, threadIdx.x * per), hi = min(n, lo + per);
  const uint32_t t0 = prefix[0], t1 = prefix[1];
  const bool on0 = want[0] > 0, on1 = want[1] > 0;
  long long eq = 0;
  for (int64_t i = lo; i < hi; ++i) {
    const float x = s[i];
    if (!isfinite(x)) continue;
    const uint32_t key = OrderKey(x);
    eq += (on0 && key == t0 ? 1LL : 0LL) + (on1 && key == t1 ? (1LL << 32) : 0LL);
  }
  long long eq_base;
  Scan(scan_tmp).ExclusiveSum(eq, eq_base);
  __syncthreads();
  int64_t e0 = eq_base & 0xffffffffLL, e1 = eq_base >> 32;
  long long sel = 0;
  auto classify = [&](float x, int64_t& r0, int64_t& r1, bool& s0, bool& s1) {
    s0 = s1 = false;
    if (!isfinite(x)) return;
    const uint32_t key = OrderKey(x);
    if (on0) s0 = key > t0 || (key == t0 && r0++ < rem[0]);
    if (on1) s1 = key > t1 || (key == t1 && r1++ < rem[1]);
  };
  {
    int64_t r0 = e0, r1 = e1;
    for (int64_t i = lo; i < hi; ++i) {
      bool s0, s1;
      classify(s[i], r0, r1, s0, s1);
      sel += (s0 ? 1LL : 0LL) + (s1 && !s0 ? (1LL << 32) : 0LL);
    }
  }
  long long pos;
  Scan(scan_tmp).ExclusiveSum(sel, pos);
  int64_t p0 = pos & 0xffffffffLL, p1 = pos >> 32;
  int32_t* o0 = out + head * out_stride;
  int32_t* o1 = out2 != nullptr ? out2 + head * out_stride : nullptr;
  for (int64_t i = lo; i < hi; ++i) {
    bool s0, s1;
    classify(s[i], e0, e1, s0, s1);
    if (s0)
      o0[p0++] = static_cast<int32_t>(i);
    else if (s1)
      o1[p1++] = static_cast<int32_t>(i);
  }
  if (threadIdx.x == 0) {
    counts[head] = static_cast<int32_t>(want[0]);
    if (counts2 != nullptr)
      counts2[head] = static_cast<int32_t>(max(int64_t{0}, want[1] - want[0]));
  }
}

int64_t Blocks(int64_t n) { return (n + kClustersPerBlock - 1) / kClustersPerBlock; }

template <int G>
cudaError_t LaunchScoreTyped(const ScoreArgs& a, float* ws, cudaStream_t stream) {
  const int64_t nb = Blocks(a.n);
  float* logits = ws;
  const int64_t logit_count = (int64_t{a.heads} * G * a.n + 1) / 2 * 2;  // keeps stats 8-aligned
  float2* stats = reinterpret_cast<float2*>(ws + logit_count);
  LogitsKernel<G><<<dim3(nb, a.heads), kScoreThreads, 0, stream>>>(
      a.q, a.d, a.scale, a.centroids, a.centroid_stride, a.sizes, a.size_stride, a.n, logits,
      stats);
  const int64_t sb = (a.n + kScoreThreads - 1) / kScoreThreads;
  ScoresKernel<G><<<dim3(sb, a.heads), kScoreThreads, 0, stream>>>(
      logits, stats, static_cast<int>(nb), a.sizes, a.size_stride, a.n, a.scores, a.score_stride);
  return cudaGetLastError();
}

}  // namespace

size_t ScoreWorkspaceBytes(int heads, int g, int64_t n) {
  // logits, then float2 stats (8-byte aligned: the logit count is rounded up to even).
  const int64_t logits = (int64_t{heads} * g * n + 1) / 2 * 2;
  return sizeof(float) * (logits + 2 * int64_t{heads} * Blocks(n) * g);
}

cudaError_t LaunchScoreClusters(const ScoreArgs& a, float* workspace, cudaStream_t stream) {
  if (a.n <= 0 || a.heads <= 0) return cudaSuccess;
  if (a.d % 4 != 0) return cudaErrorInvalidValue;
  const ScoreArgs& b = a;
  switch (a.g) {
    case 1:
      return LaunchScoreTyped<1>(b, workspace, stream);
    case 2:
      return LaunchScoreTyped<2>(b, workspace, stream);
    case 4:
      return LaunchScoreTyped<4>(b, workspace, stream);
    case 8:
      return LaunchScoreTyped<8>(b, workspace, stream);
    default:
      return cudaErrorInvalidValue;
  }
}

cudaError_t LaunchSelectTopK(const TopKArgs& a, cudaStream_t stream) {
  if (a.heads <= 0) return cudaSuccess;
  TopKKernel<<<a.heads, kTopKThreads, 0, stream>>>(a.scores, a.n, a.score_stride, a.k, a.k2, a.out,
                                                   a.out2, a.out_stride, a.counts, a.counts2);
  return cudaGetLastError();
}

}  // namespace kvwave::gpu::cuda
