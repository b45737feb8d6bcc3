// Cluster scoring kernels: centroid logits with the per-group softmax sum, and top-k selection.
//
// ScoreClusters is two launches: LogitsKernel (TiledLogitsKernel for d <= 128, staging 64
// centroids per block in shared memory) writes scale*q.c for every (query head, cluster)
// and per-block softmax statistics (max, sum of exp) over the non-empty clusters; ScoresKernel
// folds the statistics per query head and sums the g softmax values of each cluster.
//
// SelectTopK is one block per KV head: a 4-pass 8-bit radix select (warp-aggregated histograms)
// finds the key of the k-th (and k2-th) largest finite score and how many of the keys equal to
// it to take (lowest index first), then two coalesced walks over per-warp contiguous chunks
// (count, then write with ballots) emit the selected indices in increasing index order.
#include <algorithm>
#include <cmath>

#include "gpu/cuda/launchers.h"

namespace kvwave::gpu::cuda {
namespace {

constexpr int kScoreThreads = 256;
constexpr int kClustersPerBlock = 64;  // 8 warps x 2 batches of kBatch
constexpr int kBatch = 4;
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
  // A warp takes kBatch clusters at a time: their centroid loads are issued together.
  for (int64_t c0 = first + warp * kBatch; c0 < last; c0 += kWarps * kBatch) {
    float dot[kBatch][G];
#pragma unroll
    for (int b = 0; b < kBatch; ++b)
#pragma unroll
      for (int j = 0; j < G; ++j) dot[b][j] = 0.f;
    for (int i = lane; i < d4; i += 32) {
      float4 cv[kBatch];
#pragma unroll
      for (int b = 0; b < kBatch; ++b)
        cv[b] = c0 + b < last ? reinterpret_cast<const float4*>(c_head + (c0 + b) * d)[i]
                              : make_float4(0.f, 0.f, 0.f, 0.f);
#pragma unroll
      for (int j = 0; j < G; ++j) {
        const float4 qv = reinterpret_cast<const float4*>(q + (int64_t{head} * G + j) * d)[i];
#pragma unroll
        for (int b = 0; b < kBatch; ++b)
          dot[b][j] += qv.x * cv[b].x + qv.y * cv[b].y + qv.z * cv[b].z + qv.w * cv[b].w;
      }
    }
#pragma unroll
    for (int off = 16; off > 0; off /= 2)
#pragma unroll
      for (int b = 0; b < kBatch; ++b)
#pragma unroll
        for (int j = 0; j < G; ++j) dot[b][j] += __shfl_xor_sync(0xffffffffu, dot[b][j], off);
#pragma unroll
    for (int b = 0; b < kBatch; ++b) {
      const int64_t c = c0 + b;
      if (c >= last) break;
      const bool live = s_head[c] > 0;
#pragma unroll
      for (int j = 0; j < G; ++j) {
        const float x = dot[b][j] * scale;
        if (lane == 0) logits[(int64_t{head} * G + j) * n + c] = x;
        if (!live) continue;
        const float mn = fmaxf(m[j], x);
        z[j] = z[j] * __expf(m[j] - mn) + __expf(x - mn);
        m[j] = mn;
      }
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

// The same as LogitsKernel for d <= kTiledMaxD: the block first copies its 64 centroids into
// shared memory with coalesced 16-byte loads (rows padded by one float: conflict-free column
// reads), then each thread takes (cluster, query head) pairs, reading q as broadcasts.
constexpr int kTiledMaxD = 128;

template <int G>
__global__ void __launch_bounds__(kScoreThreads)
    TiledLogitsKernel(const float* __restrict__ q, int d, float scale,
                      const float* __restrict__ cen, int64_t cen_stride,
                      const int32_t* __restrict__ sizes, int64_t size_stride, int64_t n,
                      float* __restrict__ logits, float2* __restrict__ stats) {
  constexpr int kPad = kTiledMaxD + 1;
  __shared__ float tile[kClustersPerBlock][kPad];
  __shared__ float qs[G][kTiledMaxD];
  __shared__ float xs[G][kClustersPerBlock];
  const int head = blockIdx.y, warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  const int64_t first = int64_t{blockIdx.x} * kClustersPerBlock;
  const int rows = static_cast<int>(min(int64_t{kClustersPerBlock}, n - first));
  const int d4 = d / 4;
  const float4* src = reinterpret_cast<const float4*>(cen + head * cen_stride + first * d);
  for (int i = threadIdx.x; i < rows * d4; i += blockDim.x) {
    const float4 v = src[i];
    const int r = i / d4, e = (i % d4) * 4;
    tile[r][e] = v.x;
    tile[r][e + 1] = v.y;
    tile[r][e + 2] = v.z;
    tile[r][e + 3] = v.w;
  }
  for (int i = threadIdx.x; i < G * d; i += blockDim.x)
    qs[i / d][i % d] = q[(int64_t{head} * G) * d + i];
  __syncthreads();
  for (int idx = threadIdx.x; idx < G * kClustersPerBlock; idx += blockDim.x) {
    const int c = idx % kClustersPerBlock, j = idx / kClustersPerBlock;
    float dot = 0.f;
    if (c < rows) {
#pragma unroll 8
      for (int e = 0; e < d; ++e) dot = fmaf(tile[c][e], qs[j][e], dot);
      dot *= scale;
      logits[(int64_t{head} * G + j) * n + first + c] = dot;
    }
    xs[j][c] = c < rows && sizes[head * size_stride + first + c] > 0 ? dot : -INFINITY;
  }
  __syncthreads();
  if (warp < G) {  // warp j: max and sum of exp of its query head's live logits
    const int j = warp;
    float mx = -INFINITY;
    for (int c = lane; c < kClustersPerBlock; c += 32) mx = fmaxf(mx, xs[j][c]);
#pragma unroll
    for (int off = 16; off > 0; off /= 2) mx = fmaxf(mx, __shfl_xor_sync(0xffffffffu, mx, off));
    float z = 0.f;
    if (mx != -INFINITY)
      for (int c = lane; c < kClustersPerBlock; c += 32)
        if (xs[j][c] != -INFINITY) z += __expf(xs[j][c] - mx);
#pragma unroll
    for (int off = 16; off > 0; off /= 2) z += __shfl_xor_sync(0xffffffffu, z, off);
    if (lane == 0) stats[(int64_t{head} * gridDim.x + blockIdx.x) * G + j] = make_float2(mx, z);
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

constexpr int kTopKWarps = kTopKThreads / 32;

// Radix-selects, for want[t] >= 1, the key prefix[t] of the want[t]-th largest finite score and
// the number rem[t] of keys equal to it to take. Called by all threads of the block. Histogram
// updates are aggregated per warp (__match_any_sync): scores share their top bits, and plain
// shared atomics on one bin would serialise.
__device__ void RadixSelect(const float* s, int64_t n, const int64_t* want, uint32_t* prefix,
                            int64_t* rem) {
  __shared__ int hist[2][256];
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  uint32_t mask = 0;
  for (int shift = 24; shift >= 0; shift -= 8) {
    for (int i = threadIdx.x; i < 512; i += blockDim.x) hist[i / 256][i % 256] = 0;
    __syncthreads();
    const uint32_t p0 = prefix[0], p1 = prefix[1];
    const bool on0 = want[0] > 0, on1 = want[1] > 0;
    for (int64_t i0 = 0; i0 < n; i0 += blockDim.x) {  // every lane runs every round
      const int64_t i = i0 + threadIdx.x;
      const float x = i < n ? s[i] : -INFINITY;
      const bool finite = isfinite(x);
      const uint32_t key = OrderKey(x);
      const int digit = static_cast<int>((key >> shift) & 255);
#pragma unroll
      for (int t = 0; t < 2; ++t) {
        const bool in = finite && (t == 0 ? on0 : on1) && (key & mask) == (t == 0 ? p0 : p1);
        const int bin = in ? digit : 256;
        const unsigned peers = __match_any_sync(0xffffffffu, bin);
        if (in && lane == __ffs(peers) - 1) atomicAdd(&hist[t][bin], __popc(peers));
      }
    }
    __syncthreads();
    // Warp t finds the bin holding the rem[t]-th largest: lane l owns bins 255-8l .. 248-8l.
    if (warp < 2 && want[warp] > 0) {
      const int t = warp;
      int mine = 0;
#pragma unroll
      for (int j = 0; j < 8; ++j) mine += hist[t][255 - 8 * lane - j];
      int cum = mine;
#pragma unroll
      for (int off = 1; off < 32; off *= 2) {
        const int o = __shfl_up_sync(0xffffffffu, cum, off);
        if (lane >= off) cum += o;
      }
      const int64_t r = rem[t];
      const unsigned reach = __ballot_sync(0xffffffffu, cum >= r);
      if (lane == __ffs(reach) - 1) {
        int64_t above = cum - mine;
        int b = 255 - 8 * lane;
        for (int j = 0; j < 8; ++j, --b) {
          if (above + hist[t][b] >= r) break;
          above += hist[t][b];
        }
        rem[t] = r - above;
        prefix[t] |= uint32_t(b) << shift;
      }
    }
    __syncthreads();
    mask |= 0xFFu << shift;
  }
}

// Per KV head: the indices of the want0 largest finite scores (ties: lower index first) to out,
// and of the next want1 - want0 to out2, both in increasing index order. After the radix
// select, each warp takes a contiguous chunk: one pass counts its keys above / equal to the two
// thresholds, a scan over the warps gives every warp its tie ranks and output offsets, and a
// second pass writes with ballots.
__global__ void __launch_bounds__(kTopKThreads)
    TopKKernel(const float* __restrict__ scores, int64_t n, int64_t stride, int64_t k, int64_t k2,
               int32_t* __restrict__ out, int32_t* __restrict__ out2, int64_t out_stride,
               int32_t* __restrict__ counts, int32_t* __restrict__ counts2, bool stage) {
  __shared__ int64_t want[2], rem[2];
  __shared__ uint32_t prefix[2];
  __shared__ int valid_sh;
  __shared__ int cnt[kTopKWarps][4];   // per warp: > T0, == T0, > T1, == T1
  __shared__ int base[kTopKWarps][4];  // per warp: ties of T0 before, ties of T1 before,
                                       // out offset, out2 offset
  extern __shared__ float staged[];    // the head's scores, when the launch gave room for them
  const int head = blockIdx.x, warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  const float* s = scores + head * stride;
  if (stage) {  // every later pass reads shared memory instead of L2
    for (int64_t i = threadIdx.x; i < n; i += blockDim.x) staged[i] = s[i];
    s = staged;
  }
  if (threadIdx.x == 0) valid_sh = 0;
  __syncthreads();
  int local = 0;
  for (int64_t i = threadIdx.x; i < n; i += blockDim.x) local += isfinite(s[i]) ? 1 : 0;
#pragma unroll
  for (int off = 16; off > 0; off /= 2) local += __shfl_xor_sync(0xffffffffu, local, off);
  if (lane == 0) atomicAdd(&valid_sh, local);  // one shared atomic per warp
  __syncthreads();
  if (threadIdx.x == 0) {
    const int64_t valid = static_cast<int64_t>(valid_sh);
    want[0] = min(k, valid);
    want[1] = out2 != nullptr ? min(max(k2, k), valid) : 0;
    for (int t = 0; t < 2; ++t) prefix[t] = 0, rem[t] = want[t];
  }
  __syncthreads();
  RadixSelect(s, n, want, prefix, rem);
  const bool on0 = want[0] > 0, on1 = want[1] > 0;
  const uint32_t t0 = prefix[0], t1 = prefix[1];
  const int64_t chunk = ((n + kTopKWarps - 1) / kTopKWarps + 31) / 32 * 32;
  const int64_t lo = min(n, warp * chunk), hi = min(n, lo + chunk);
  int c[4] = {0, 0, 0, 0};
  for (int64_t i0 = lo; i0 < hi; i0 += 32) {
    const int64_t i = i0 + lane;
    const float x = i < hi ? s[i] : -INFINITY;
    const bool finite = isfinite(x);
    const uint32_t key = OrderKey(x);
    c[0] += __popc(__ballot_sync(0xffffffffu, finite && on0 && key > t0));
    c[1] += __popc(__ballot_sync(0xffffffffu, finite && on0 && key == t0));
    c[2] += __popc(__ballot_sync(0xffffffffu, finite && on1 && key > t1));
    c[3] += __popc(__ballot_sync(0xffffffffu, finite && on1 && key == t1));
  }
  if (lane < 4) cnt[warp][lane] = c[lane];
  __syncthreads();
  if (threadIdx.x == 0) {
    int64_t tie0 = 0, tie1 = 0, o0 = 0, o1 = 0;
    for (int w = 0; w < kTopKWarps; ++w) {
      base[w][0] = static_cast<int>(tie0);
      base[w][1] = static_cast<int>(tie1);
      base[w][2] = static_cast<int>(o0);
      base[w][3] = static_cast<int>(o1);
      // Selected by this warp: keys above the threshold plus its share of the ties.
      const int64_t sel0 = cnt[w][0] + max(int64_t{0}, min(int64_t{cnt[w][1]}, rem[0] - tie0));
      const int64_t sel1 = cnt[w][2] + max(int64_t{0}, min(int64_t{cnt[w][3]}, rem[1] - tie1));
      tie0 += cnt[w][1];
      tie1 += cnt[w][3];
      o0 += on0 ? sel0 : 0;
      o1 += on1 ? sel1 - (on0 ? sel0 : 0) : 0;  // the top-k2 set contains the top-k set
    }
  }
  __syncthreads();
  int64_t tie0 = base[warp][0], tie1 = base[warp][1], p0 = base[warp][2], p1 = base[warp][3];
  int32_t* o0 = out + head * out_stride;
  int32_t* o1 = out2 != nullptr ? out2 + head * out_stride : nullptr;
  const unsigned below = (1u << lane) - 1;
  for (int64_t i0 = lo; i0 < hi; i0 += 32) {
    const int64_t i = i0 + lane;
    const float x = i < hi ? s[i] : -INFINITY;
    const bool finite = isfinite(x);
    const uint32_t key = OrderKey(x);
    const bool eq0 = finite && on0 && key == t0, eq1 = finite && on1 && key == t1;
    const unsigned m0 = __ballot_sync(0xffffffffu, eq0), m1 = __ballot_sync(0xffffffffu, eq1);
    const bool s0 = finite && on0 && (key > t0 || (eq0 && tie0 + __popc(m0 & below) < rem[0]));
    const bool s1 = finite && on1 && (key > t1 || (eq1 && tie1 + __popc(m1 & below) < rem[1]));
    tie0 += __popc(m0);
    tie1 += __popc(m1);
    const bool only1 = s1 && !s0;
    const unsigned b0 = __ballot_sync(0xffffffffu, s0), b1 = __ballot_sync(0xffffffffu, only1);
    if (s0) o0[p0 + __popc(b0 & below)] = static_cast<int32_t>(i);
    if (only1) o1[p1 + __popc(b1 & below)] = static_cast<int32_t>(i);
    p0 += __popc(b0);
    p1 += __popc(b1);
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
  if (a.d <= kTiledMaxD) {
    TiledLogitsKernel<G><<<dim3(nb, a.heads), kScoreThreads, 0, stream>>>(
        a.q, a.d, a.scale, a.centroids, a.centroid_stride, a.sizes, a.size_stride, a.n, logits,
        stats);
  } else {
    LogitsKernel<G><<<dim3(nb, a.heads), kScoreThreads, 0, stream>>>(
        a.q, a.d, a.scale, a.centroids, a.centroid_stride, a.sizes, a.size_stride, a.n, logits,
        stats);
  }
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
  // Stage each head's scores in shared memory when they fit (up to 40K clusters per head).
  constexpr int64_t kMaxStaged = 160 << 10;
  static const bool staging_ok =
      cudaFuncSetAttribute(TopKKernel, cudaFuncAttributeMaxDynamicSharedMemorySize,
                           static_cast<int>(kMaxStaged)) == cudaSuccess;
  if (!staging_ok) cudaGetLastError();
  const int64_t bytes = sizeof(float) * a.n;
  const bool stage = staging_ok && bytes <= kMaxStaged;
  TopKKernel<<<a.heads, kTopKThreads, stage ? bytes : 0, stream>>>(
      a.scores, a.n, a.score_stride, a.k, a.k2, a.out, a.out2, a.out_stride, a.counts, a.counts2,
      stage);
  return cudaGetLastError();
}

}  // namespace kvwave::gpu::cuda
