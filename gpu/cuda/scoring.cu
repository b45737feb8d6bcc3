// Cluster scoring kernels: centroid logits with the per-group softmax sum, top-k selection, and
// the wave buffer's fused select-and-plan.
//
// ScoreClusters is two launches: a logits kernel writes scale*q.c for every (query head, cluster)
// and per-block softmax statistics (max, sum of exp) over the non-empty clusters; ScoresKernel
// folds the statistics per query head and sums the g softmax values of each cluster. With bf16
// centroids (ScoreArgs::centroids_bf16) and d = 64 or 128 the logits run on the tensor cores
// (MmaLogitsKernel: q enters as three bf16 parts, so the logits are as exact as float dots);
// otherwise, for d <= 128, 64 centroids per block are staged in shared memory
// (TiledLogitsKernel). On the H200 at 128K the tensor-core form cut the score phase 43.6 -> 39.8
// us a layer; a warp-butterfly variant was 10-12 us slower than the tiled one
// (bench/results/decode_variants_h200.txt).
//
// SelectTopK is one block per KV head: an adaptive radix select (256 bins over the candidates'
// key range, which shrinks 256-fold a pass; see RadixSelect) finds the key range holding the
// k-th (and k2-th) largest finite score and how many keys in it to take (lowest index first),
// then two coalesced walks over per-warp contiguous chunks (count, then write with ballots) emit
// the selected indices in increasing index order.
//
// ScoreSelectPlan (the wave buffer's critical path) scores, selects the top k (and the next
// k2 - k) and plans the pages (PlanHead, plan_block.cuh) in as few launches as it can:
// - bf16 centroids, d = 64 or 128, and a cluster of 8 blocks per KV head resident for every head
//   (batch 1 up to 1M tokens on the H200): one launch, FusedSelectPlanKernel (logits in shared
//   memory, statistics and histograms over distributed shared memory; 128K: 38.0 -> 33.5 us).
// - else the logits kernel, then SelectPlanKernel: one block per KV head (or a cluster of 8 from
//   24K clusters per head) that folds the statistics, scores, selects and plans.
// Profiling builds (-DKVWAVE_PROFILE_SELECT, gpu/cuda/profile_build.sh) print the SM cycles of
// each phase of the selection kernels every 512 calls.
#include <cooperative_groups.h>
#include <cuda_bf16.h>

#include <algorithm>
#include <cmath>
#include <cstdio>
#include <cstring>

#include "gpu/cuda/launch_config.h"
#include "gpu/cuda/launchers.h"
#include "gpu/cuda/plan_block.cuh"
#include "gpu/cuda/sync.cuh"

namespace kvwave::gpu::cuda {
namespace {

constexpr int kScoreThreads = 256;
constexpr int kClustersPerBlock = 64;  // 8 warps x 2 batches of kBatch
constexpr int kBatch = 4;
constexpr int kTopKThreads = 1024;

// Softmax statistics (max, sum of exp) of a set from those of its `count` parts (at(i) -> part
// i's float2), in part order; empty parts (max -inf) are skipped.
template <typename At>
__device__ __forceinline__ float2 FoldParts(int count, At at) {
  float mx = -INFINITY, zz = 0.f;
  for (int i = 0; i < count; ++i) mx = fmaxf(mx, at(i).x);
  if (mx != -INFINITY)
    for (int i = 0; i < count; ++i) {
      const float2 x = at(i);
      if (x.x != -INFINITY) zz += x.y * __expf(x.x - mx);
    }
  return make_float2(mx, zz);
}

// A lane's statistics (m, z) folded with those of the lanes kFirst, kFirst / 2, ..., 1 apart.
template <int kFirst>
__device__ __forceinline__ void ButterflyStats(float& m, float& z) {
#pragma unroll
  for (int off = kFirst; off > 0; off /= 2) {
    const float om = __shfl_xor_sync(0xffffffffu, m, off);
    const float oz = __shfl_xor_sync(0xffffffffu, z, off);
    const float mn = fmaxf(m, om);
    if (mn != -INFINITY) z = z * __expf(m - mn) + oz * __expf(om - mn);
    m = mn;
  }
}

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
    stats[(int64_t{head} * gridDim.x + blockIdx.x) * G + j] =
        FoldParts(kWarps, [&](int w) { return sm[w][j]; });
  }
}

// The same as LogitsKernel for d <= kTiledMaxD: the block first copies its 64 centroids into
// shared memory with coalesced 16-byte loads (rows padded by one float: conflict-free column
// reads), then each thread takes (cluster, query head) pairs, reading q as broadcasts.
constexpr int kTiledMaxD = 128;

// Head `head`'s centroid rows (float32, or the bf16 copy), sizes and cluster count: from its
// descriptor in a batched launch (HeadMeta), else at base + head * stride.
struct HeadCentroids {
  const void* rows;
  const int32_t* sizes;
  int64_t n;
};
template <bool kBf16>
__device__ __forceinline__ HeadCentroids CentroidsOf(const HeadMeta* meta, int head,
                                                     const void* cen, int64_t cen_stride,
                                                     const int32_t* sizes, int64_t size_stride,
                                                     int64_t n) {
  if (meta != nullptr) {
    const HeadMeta& m = meta[head];
    return {kBf16 ? static_cast<const void*>(m.centroids16) : static_cast<const void*>(m.centroids),
            m.sizes, m.n};
  }
  return {static_cast<const char*>(cen) + head * cen_stride * (kBf16 ? 2 : 4),
          sizes + head * size_stride, n};
}

// kBf16: the centroids are bf16 (half the bytes); the tile holds them as floats.
template <int G, bool kBf16>
__global__ void __launch_bounds__(kScoreThreads)
    TiledLogitsKernel(const float* __restrict__ q, int d, float scale,
                      const void* __restrict__ cen_raw, int64_t cen_stride,
                      const int32_t* __restrict__ sizes, int64_t size_stride, int64_t n,
                      float* __restrict__ logits, float2* __restrict__ stats,
                      const HeadMeta* __restrict__ meta) {
  // A programmatic dependent (SelectPlanKernel) may be scheduled from now on; it waits for this
  // grid's completion before it reads anything (a no-op without such a dependent).
  asm volatile("griddepcontrol.launch_dependents;");
  // Rows padded by 4 floats: the 16-byte column reads of 8 consecutive clusters (one phase of a
  // warp's 128-bit shared load) hit distinct banks.
  constexpr int kPad = kTiledMaxD + 4;
  __shared__ __align__(16) float tile[kClustersPerBlock][kPad];
  __shared__ __align__(16) float qs[G][kTiledMaxD];
  __shared__ float xs[G][kClustersPerBlock];
  const int head = blockIdx.y, warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  const int64_t first = int64_t{blockIdx.x} * kClustersPerBlock;
  const HeadCentroids hc =
      CentroidsOf<kBf16>(meta, head, cen_raw, cen_stride, sizes, size_stride, n);
  const int rows = static_cast<int>(max(int64_t{0}, min(int64_t{kClustersPerBlock}, hc.n - first)));
  // All of the thread's loads (16 bytes: 4 floats or 8 bf16) are issued before the first store
  // (32 or 16 KB in flight a block).
  constexpr int kPer = kBf16 ? 8 : 4;  // elements a load
  const int dv = d / kPer;             // loads a row
  const uint4* src = reinterpret_cast<const uint4*>(static_cast<const char*>(hc.rows) +
                                                    first * d * (kBf16 ? 2 : 4));
  constexpr int kLoads = kClustersPerBlock * kTiledMaxD / kPer / kScoreThreads;
  uint4 v[kLoads];
#pragma unroll
  for (int u = 0; u < kLoads; ++u) {
    const int i = threadIdx.x + u * kScoreThreads;
    v[u] = i < rows * dv ? __ldcs(src + i) : make_uint4(0, 0, 0, 0);
  }
#pragma unroll
  for (int u = 0; u < kLoads; ++u) {
    const int i = threadIdx.x + u * kScoreThreads;
    if (i >= rows * dv) break;
    const int r = i / dv, e = (i % dv) * kPer;
    auto* to = reinterpret_cast<float4*>(&tile[r][e]);
    if constexpr (kBf16) {
      to[0] = make_float4(__uint_as_float(v[u].x << 16), __uint_as_float(v[u].x & 0xffff0000u),
                          __uint_as_float(v[u].y << 16), __uint_as_float(v[u].y & 0xffff0000u));
      to[1] = make_float4(__uint_as_float(v[u].z << 16), __uint_as_float(v[u].z & 0xffff0000u),
                          __uint_as_float(v[u].w << 16), __uint_as_float(v[u].w & 0xffff0000u));
    } else {
      to[0] = make_float4(__uint_as_float(v[u].x), __uint_as_float(v[u].y), __uint_as_float(v[u].z),
                          __uint_as_float(v[u].w));
    }
  }
  for (int i = threadIdx.x; i < G * d; i += blockDim.x)
    qs[i / d][i % d] = q[(int64_t{head} * G) * d + i];
  __shared__ bool live[kClustersPerBlock];
  if (threadIdx.x < kClustersPerBlock)
    live[threadIdx.x] = threadIdx.x < rows && hc.sizes[first + threadIdx.x] > 0;
  __syncthreads();
  for (int idx = threadIdx.x; idx < G * kClustersPerBlock; idx += blockDim.x) {
    const int c = idx % kClustersPerBlock, j = idx / kClustersPerBlock;
    float dot = 0.f;
    if (c < rows) {
      // 128-bit shared loads (q is a broadcast), four independent sums.
      const float4* tc = reinterpret_cast<const float4*>(&tile[c][0]);
      const float4* qj = reinterpret_cast<const float4*>(&qs[j][0]);
      float s0 = 0.f, s1 = 0.f, s2 = 0.f, s3 = 0.f;
#pragma unroll 4
      for (int e4 = 0; e4 < d / 4; ++e4) {
        const float4 a = tc[e4], b = qj[e4];
        s0 = fmaf(a.x, b.x, s0);
        s1 = fmaf(a.y, b.y, s1);
        s2 = fmaf(a.z, b.z, s2);
        s3 = fmaf(a.w, b.w, s3);
      }
      dot = ((s0 + s1) + (s2 + s3)) * scale;
      logits[(int64_t{head} * G + j) * n + first + c] = dot;
    }
    xs[j][c] = live[c] ? dot : -INFINITY;
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

// Logits on the tensor cores (bf16 centroids, d = 64 or 128): a warp takes 16 centroids at a time
// as the A operand of mma.m16n8k16 (bf16 in, fp32 accumulate) and the block's query heads as B.
// q is fp32: it enters as three bf16 parts (hi + lo + lo2 = q to ~24 bits), 3G columns of B, so
// that a logit is as exact as a float dot (a bf16 centroid times a bf16 part is exact in fp32).
// Since a dot product does not care in which order its terms come, the k axis is permuted so that
// each thread's A fragment is whole 16-byte loads: thread (group r, index i) loads dims
// [32u + 8i, 32u + 8i + 8) of rows r and r + 8 for u < d / 32, and k-step 2u + w takes dims
// 32u + 8i + 4w + {0, 1} into slots {2i, 2i + 1} and + {2, 3} into slots {2i + 8, 2i + 9}; B
// is laid out the same way. The centroid loads are coalesced (4 threads read 64 contiguous bytes
// of a row) and issued for all of the warp's tiles before the first mma; no shared-memory tile.
constexpr int kMmaWarps = 8;
constexpr int kMmaTiles = 2;  // 16-centroid tiles a warp
constexpr int kMmaClustersPerBlock = kMmaWarps * kMmaTiles * 16;

__device__ __forceinline__ float Bf16Part(float x, int part) {
  const float hi = __bfloat162float(__float2bfloat16_rn(x));
  if (part == 0) return hi;
  const float r = x - hi;  // exact
  const float lo = __bfloat162float(__float2bfloat16_rn(r));
  return part == 1 ? lo : __bfloat162float(__float2bfloat16_rn(r - lo));
}

__device__ __forceinline__ uint32_t PackBf16(float lo_half, float hi_half) {
  const __nv_bfloat162 v = __floats2bfloat162_rn(lo_half, hi_half);
  uint32_t u;
  memcpy(&u, &v, 4);
  return u;
}

__device__ __forceinline__ void MmaBf16(float (&c)[4], uint32_t a0, uint32_t a1, uint32_t a2,
                                        uint32_t a3, uint32_t b0, uint32_t b1) {
  asm volatile(
      "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, "
      "{%8,%9}, {%0,%1,%2,%3};"
      : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
      : "r"(a0), "r"(a1), "r"(a2), "r"(a3), "r"(b0), "r"(b1));
}

// B columns (3 bf16 parts per query head, padded to n8 tiles) for G query heads.
__host__ __device__ constexpr int MmaTilesN(int g) { return (3 * g + 7) / 8; }

// q of KV head `head` (G query heads x D) as the B fragments of every k-step. Whole warp.
template <int G, int D>
__device__ __forceinline__ void QFragments(const float* __restrict__ q, int head,
                                           uint32_t (&b)[MmaTilesN(G)][D / 16][2]) {
  constexpr int kCols = 3 * G, kNT = MmaTilesN(G), kK = D / 16;
  const int lane = threadIdx.x % 32, grp = lane / 4, tig = lane % 4;
#pragma unroll
  for (int nt = 0; nt < kNT; ++nt) {
    const int col = nt * 8 + grp, part = col / G, j = col % G;
    const float* qj = q + (int64_t{head} * G + j) * D;
#pragma unroll
    for (int ks = 0; ks < kK; ++ks) {
      const int dim = 32 * (ks / 2) + 8 * tig + 4 * (ks % 2);
      float x[4];
#pragma unroll
      for (int e = 0; e < 4; ++e) x[e] = col < kCols ? Bf16Part(qj[dim + e], part) : 0.f;
      b[nt][ks][0] = PackBf16(x[0], x[1]);
      b[nt][ks][1] = PackBf16(x[2], x[3]);
    }
  }
}

// The lane's A-fragment loads of the 16 centroids c0 .. c0 + 15 (zeros from `end` on).
template <int D>
__device__ __forceinline__ void LoadTile(const uint4* __restrict__ rows, int64_t c0, int64_t end,
                                         uint4 (&ld)[2][D / 32]) {
  const int lane = threadIdx.x % 32, grp = lane / 4, tig = lane % 4;
#pragma unroll
  for (int h = 0; h < 2; ++h) {
    const int64_t c = c0 + grp + 8 * h;
#pragma unroll
    for (int u = 0; u < D / 32; ++u)
      ld[h][u] = c < end ? __ldcs(rows + c * (D / 8) + 4 * u + tig) : make_uint4(0, 0, 0, 0);
  }
}

// A tile's dot products with every B column into the warp's cs[16][8 * MmaTilesN(G) + 1];
// LogitOf then adds the three parts of (row, query head j). Whole warp; cs is ready on return.
template <int G, int D>
__device__ __forceinline__ void TileDots(const uint4 (&ld)[2][D / 32],
                                         const uint32_t (&b)[MmaTilesN(G)][D / 16][2],
                                         float (*cs)[MmaTilesN(G) * 8 + 1]) {
  constexpr int kNT = MmaTilesN(G);
  const int lane = threadIdx.x % 32, grp = lane / 4, tig = lane % 4;
  float acc[kNT][4];
#pragma unroll
  for (int nt = 0; nt < kNT; ++nt)
#pragma unroll
    for (int e = 0; e < 4; ++e) acc[nt][e] = 0.f;
#pragma unroll
  for (int ks = 0; ks < D / 16; ++ks) {
    const uint4& r1 = ld[0][ks / 2];
    const uint4& r2 = ld[1][ks / 2];
    const bool w = ks % 2;
    const uint32_t a0 = w ? r1.z : r1.x, a1 = w ? r2.z : r2.x;
    const uint32_t a2 = w ? r1.w : r1.y, a3 = w ? r2.w : r2.y;
#pragma unroll
    for (int nt = 0; nt < kNT; ++nt) MmaBf16(acc[nt], a0, a1, a2, a3, b[nt][ks][0], b[nt][ks][1]);
  }
#pragma unroll
  for (int nt = 0; nt < kNT; ++nt)
#pragma unroll
    for (int e = 0; e < 2; ++e) {
      cs[grp][nt * 8 + 2 * tig + e] = acc[nt][e];
      cs[grp + 8][nt * 8 + 2 * tig + e] = acc[nt][2 + e];
    }
  __syncwarp();
}

template <int G>
__device__ __forceinline__ float LogitOf(const float (*cs)[MmaTilesN(G) * 8 + 1], int row, int j,
                                         float scale) {
  return (cs[row][j] + cs[row][G + j] + cs[row][2 * G + j]) * scale;
}

template <int G, int D>
__global__ void __launch_bounds__(kScoreThreads, 2)
    MmaLogitsKernel(const float* __restrict__ q, float scale, const uint16_t* __restrict__ cen,
                    int64_t cen_stride, const int32_t* __restrict__ sizes, int64_t size_stride,
                    int64_t n, float* __restrict__ logits, float2* __restrict__ stats,
                    const HeadMeta* __restrict__ meta) {
  asm volatile("griddepcontrol.launch_dependents;");  // see TiledLogitsKernel
  constexpr int kNT = MmaTilesN(G), kU = D / 32, kK = D / 16;
  constexpr int kIt = (16 * G + 31) / 32;  // (row, query head) results a lane folds, per tile
  const int head = blockIdx.y, warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  uint32_t b[kNT][kK][2];
  QFragments<G, D>(q, head, b);
  const HeadCentroids hc = CentroidsOf<true>(meta, head, cen, cen_stride, sizes, size_stride, n);
  const uint4* c_head = static_cast<const uint4*>(hc.rows);
  const int32_t* s_head = hc.sizes;
  const int64_t nh = hc.n;  // this head's clusters; n: the logits' row stride
  const int64_t first = int64_t{blockIdx.x} * kMmaClustersPerBlock;
  uint4 ld[kMmaTiles][2][kU];
#pragma unroll
  for (int t = 0; t < kMmaTiles; ++t)
    LoadTile<D>(c_head, first + (t * kMmaWarps + warp) * 16, nh, ld[t]);
  __shared__ float cs[kMmaWarps][16][kNT * 8 + 1];
  float m[kIt], z[kIt];
#pragma unroll
  for (int it = 0; it < kIt; ++it) m[it] = -INFINITY, z[it] = 0.f;
#pragma unroll
  for (int t = 0; t < kMmaTiles; ++t) {
    const int64_t c0 = first + (t * kMmaWarps + warp) * 16;
    if (c0 >= nh) break;  // warp-uniform
    TileDots<G, D>(ld[t], b, cs[warp]);
#pragma unroll
    for (int it = 0; it < kIt; ++it) {
      const int idx = lane + 32 * it, row = idx % 16, j = idx / 16;
      const int64_t c = c0 + row;
      if (j < G && c < nh) {
        const float x = LogitOf<G>(cs[warp], row, j, scale);
        logits[(int64_t{head} * G + j) * n + c] = x;
        if (s_head[c] > 0) {
          const float mn = fmaxf(m[it], x);
          z[it] = z[it] * __expf(m[it] - mn) + __expf(x - mn);
          m[it] = mn;
        }
      }
    }
    __syncwarp();
  }
  // Fold (m, z) over the 16 lanes that share a query head, then over the warps.
  __shared__ float2 sm[kMmaWarps][G];
#pragma unroll
  for (int it = 0; it < kIt; ++it) {
    ButterflyStats<8>(m[it], z[it]);
    const int j = lane / 16 + 2 * it;
    if (lane % 16 == 0 && j < G) sm[warp][j] = make_float2(m[it], z[it]);
  }
  __syncthreads();
  if (threadIdx.x < G) {
    const int j = threadIdx.x;
    stats[(int64_t{head} * gridDim.x + blockIdx.x) * G + j] =
        FoldParts(kMmaWarps, [&](int w) { return sm[w][j]; });
  }
}

// Folds the nb per-block statistics of query head j of one KV head into (max, 1 / sum of exp).
// Called by one whole warp.
template <int G>
__device__ float2 FoldStats(const float2* __restrict__ st, int nb, int j) {
  const int lane = threadIdx.x % 32;
  float mx = -INFINITY, zz = 0.f;
  for (int b = lane; b < nb; b += 32) {
    const float2 x = st[int64_t{b} * G + j];
    if (x.x == -INFINITY) continue;
    const float mn = fmaxf(mx, x.x);
    zz = zz * __expf(mx - mn) + x.y * __expf(x.x - mn);
    mx = mn;
  }
  ButterflyStats<16>(mx, zz);
  return make_float2(mx, zz > 0.f ? 1.f / zz : 0.f);
}

template <int G>
__device__ __forceinline__ float ClusterScore(const float* __restrict__ logits, int head, int64_t n,
                                              int64_t c, const float* m, const float* inv) {
  float score = 0.f;
#pragma unroll
  for (int j = 0; j < G; ++j)
    score += __expf(logits[(int64_t{head} * G + j) * n + c] - m[j]) * inv[j];
  return score;
}

template <int G>
__global__ void __launch_bounds__(kScoreThreads)
    ScoresKernel(const float* __restrict__ logits, const float2* __restrict__ stats, int nb,
                 const int32_t* __restrict__ sizes, int64_t size_stride, int64_t n,
                 float* __restrict__ scores, int64_t score_stride) {
  const int head = blockIdx.y, warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  __shared__ float sm_m[G], sm_inv[G];
  for (int j = warp; j < G; j += kScoreThreads / 32) {
    const float2 f = FoldStats<G>(stats + int64_t{head} * nb * G, nb, j);
    if (lane == 0) sm_m[j] = f.x, sm_inv[j] = f.y;
  }
  __syncthreads();
  const int64_t c = int64_t{blockIdx.x} * blockDim.x + threadIdx.x;
  if (c >= n) return;
  scores[head * score_stride + c] = sizes[head * size_stride + c] > 0
                                        ? ClusterScore<G>(logits, head, n, c, sm_m, sm_inv)
                                        : -INFINITY;
}

__device__ __forceinline__ uint32_t OrderKey(float f) {
  const uint32_t u = __float_as_uint(f);
  return (u & 0x80000000u) ? ~u : (u | 0x80000000u);
}

constexpr int kTopKWarps = kTopKThreads / 32;

// State of a selection, t = 0 the top want[0], t = 1 the top want[1]. Keys (OrderKey of the
// finite scores) in [lo[t], hi[t]) are the candidates still undecided: every key >= hi[t] is
// selected, and rem[t] of the candidates (highest keys, then lowest index).
struct SelectState {
  int want[2], rem[2];
  uint32_t lo[2];
  uint64_t hi[2];
};

// Starts the selections over `valid` finite keys in [kmin, kmax]. One thread.
__device__ void InitSelect(SelectState& st, bool* done, int kSel, int valid, uint32_t kmin,
                           uint32_t kmax, int64_t k, int64_t k2) {
  st.want[0] = static_cast<int>(min(k, int64_t{valid}));
  st.want[1] = kSel == 2 ? static_cast<int>(min(max(k2, k), int64_t{valid})) : 0;
  for (int t = 0; t < 2; ++t) {
    st.rem[t] = st.want[t];
    st.lo[t] = kmin;
    st.hi[t] = uint64_t{kmax} + 1;
  }
  for (int t = 0; t < kSel; ++t) done[t] = st.want[t] <= 0;
}

// Adaptive radix select. Pass: the candidates of selection t fall into at most 256 bins of
// 2^shift keys over [lo, hi) (bin = (key - lo) >> shift, shift the smallest that fits the span);
// the bin holding the rem-th largest becomes the new range. Keys of real scores fill the bins of
// the first pass fairly evenly (the range starts at the head's own min and max key, and keys are
// roughly logarithmic in the score), so plain shared atomics rarely collide, and the range
// shrinks 256-fold a pass: it stops when the chosen bin holds exactly rem keys (all taken) or one
// key value (ties by index), typically after two or three passes. (A division per key instead of
// the shift, or warp-aggregated atomics on fixed 8-bit digits, cost ~30 us a call at 8K clusters
// on the H200.)
__device__ __forceinline__ int BinShift(const SelectState& st, int t, uint32_t& span_m1) {
  span_m1 = static_cast<uint32_t>(st.hi[t] - st.lo[t] - 1);  // the span - 1 fits in 32 bits
  return max(0, 32 - __clz(span_m1) - 8);                    // (span_m1 >> shift) < 256
}

// Adds the histogram of s[0, n) (the undecided selections' candidates) to hist. All threads.
template <int kSel>
__device__ void HistogramPass(const float* s, int n, const SelectState& st, const bool* done,
                              int (*hist)[256]) {
  uint32_t lo[kSel], span_m1[kSel];
  int shift[kSel];
  bool on[kSel];
#pragma unroll
  for (int t = 0; t < kSel; ++t) {
    lo[t] = st.lo[t];
    shift[t] = BinShift(st, t, span_m1[t]);
    on[t] = !done[t];
  }
  for (int i = threadIdx.x; i < n; i += blockDim.x) {
    const float x = s[i];
    if (!isfinite(x)) continue;
    const uint32_t key = OrderKey(x);
#pragma unroll
    for (int t = 0; t < kSel; ++t) {
      const uint32_t off = key - lo[t];
      if (on[t] && key >= lo[t] && off <= span_m1[t]) atomicAdd(&hist[t][off >> shift[t]], 1);
    }
  }
}

// Called by all lanes of one warp for selection t, lane l holding the counts h8[j] of bins
// 255 - 8l - j: finds the bin holding the rem-th largest candidate and narrows the range to it.
__device__ void ChooseBin(SelectState& st, bool* done, int t, const int (&h8)[8]) {
  const int lane = threadIdx.x % 32;
  int mine = 0;
#pragma unroll
  for (int j = 0; j < 8; ++j) mine += h8[j];
  int cum = mine;
#pragma unroll
  for (int off = 1; off < 32; off *= 2) {
    const int o = __shfl_up_sync(0xffffffffu, cum, off);
    if (lane >= off) cum += o;
  }
  const int r = st.rem[t];
  const unsigned reach = __ballot_sync(0xffffffffu, cum >= r);
  if (lane == __ffs(reach) - 1) {
    int above = cum - mine, j = 0;
    for (; j < 7; ++j) {
      if (above + h8[j] >= r) break;
      above += h8[j];
    }
    const int b = 255 - 8 * lane - j;
    uint32_t span_m1;
    const int shift = BinShift(st, t, span_m1);
    // Bin b holds the keys lo + [b << shift, (b + 1) << shift), within the range.
    const uint64_t lo = st.lo[t];
    const uint64_t new_lo = lo + (uint64_t(b) << shift);
    const uint64_t new_hi = min(st.hi[t], lo + (uint64_t(b + 1) << shift));
    st.rem[t] = r - above;
    st.lo[t] = static_cast<uint32_t>(new_lo);
    st.hi[t] = new_hi;
    if (h8[j] == r - above || new_hi - new_lo <= 1) done[t] = true;
  }
}

// Runs the selections over s[0, n) in one block. All threads; st and done in shared memory.
template <int kSel>
__device__ void RadixSelect(const float* s, int n, SelectState& st, bool* done) {
  __shared__ int hist[kSel][256];
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  for (int pass = 0; pass < 6; ++pass) {
    for (int i = threadIdx.x; i < kSel * 256; i += blockDim.x) hist[i / 256][i % 256] = 0;
    __syncthreads();
    bool all_done = true;
#pragma unroll
    for (int t = 0; t < kSel; ++t) all_done = all_done && done[t];
    if (all_done) break;  // uniform: read after the barrier
    HistogramPass<kSel>(s, n, st, done, hist);
    __syncthreads();
    if (warp < kSel && !done[warp]) {
      int h8[8];
#pragma unroll
      for (int j = 0; j < 8; ++j) h8[j] = hist[warp][255 - 8 * lane - j];
      ChooseBin(st, done, warp, h8);
    }
    __syncthreads();
  }
}

// Where a walk over the keys in index order stands: candidates of each range seen (ties), and
// indices written to each list.
struct WalkPos {
  int tie0, tie1, o0, o1;
};

// Moves pos past a stretch of keys with counts c = (above R0, in R0, above R1, in R1).
__device__ __forceinline__ void Advance(WalkPos& pos, const int* c, const SelectState& st) {
  const bool on0 = st.want[0] > 0, on1 = st.want[1] > 0;
  const int sel0 = c[0] + max(0, min(c[1], st.rem[0] - pos.tie0));
  const int sel1 = c[2] + max(0, min(c[3], st.rem[1] - pos.tie1));
  pos.tie0 += c[1];
  pos.tie1 += c[3];
  pos.o0 += on0 ? sel0 : 0;
  pos.o1 += on1 ? sel1 - (on0 ? sel0 : 0) : 0;  // the top-k2 set contains the top-k set
}

// One warp counts the keys of s[lo, hi) above and inside the two ranges (c as in Advance).
template <int kSel>
__device__ void CountStretch(const float* s, int lo, int hi, const SelectState& st, int* c) {
  const int lane = threadIdx.x % 32;
  const bool on0 = st.want[0] > 0, on1 = kSel == 2 && st.want[1] > 0;
  const uint32_t lo0 = st.lo[0], lo1 = st.lo[1];
  const uint64_t hi0 = st.hi[0], hi1 = st.hi[1];
  for (int i0 = lo; i0 < hi; i0 += 32) {
    const int i = i0 + lane;
    const float x = i < hi ? s[i] : -INFINITY;
    const bool finite = isfinite(x);
    const uint32_t key = OrderKey(x);
    c[0] += __popc(__ballot_sync(0xffffffffu, finite && on0 && key >= hi0));
    c[1] += __popc(__ballot_sync(0xffffffffu, finite && on0 && key >= lo0 && key < hi0));
    if (kSel == 2) {
      c[2] += __popc(__ballot_sync(0xffffffffu, finite && on1 && key >= hi1));
      c[3] += __popc(__ballot_sync(0xffffffffu, finite && on1 && key >= lo1 && key < hi1));
    }
  }
}

// One warp writes the selected indices (index0 + i) of s[lo, hi), starting at pos.
template <int kSel>
__device__ void WriteStretch(const float* s, int lo, int hi, int index0, const SelectState& st,
                             WalkPos pos, int32_t* o0, int32_t* o1) {
  const int lane = threadIdx.x % 32;
  const bool on0 = st.want[0] > 0, on1 = kSel == 2 && st.want[1] > 0;
  const uint32_t lo0 = st.lo[0], lo1 = st.lo[1];
  const uint64_t hi0 = st.hi[0], hi1 = st.hi[1];
  const int rem0 = st.rem[0], rem1 = st.rem[1];
  const unsigned below = (1u << lane) - 1;
  for (int i0 = lo; i0 < hi; i0 += 32) {
    const int i = i0 + lane;
    const float x = i < hi ? s[i] : -INFINITY;
    const bool finite = isfinite(x);
    const uint32_t key = OrderKey(x);
    const bool in0 = finite && on0 && key >= lo0 && key < hi0;
    const bool in1 = finite && on1 && key >= lo1 && key < hi1;
    const unsigned m0 = __ballot_sync(0xffffffffu, in0), m1 = __ballot_sync(0xffffffffu, in1);
    const bool s0 = finite && on0 && (key >= hi0 || (in0 && pos.tie0 + __popc(m0 & below) < rem0));
    const bool s1 = finite && on1 && (key >= hi1 || (in1 && pos.tie1 + __popc(m1 & below) < rem1));
    pos.tie0 += __popc(m0);
    pos.tie1 += __popc(m1);
    const bool only1 = s1 && !s0;
    const unsigned b0 = __ballot_sync(0xffffffffu, s0), b1 = __ballot_sync(0xffffffffu, only1);
    if (s0) o0[pos.o0 + __popc(b0 & below)] = index0 + i;
    if (only1) o1[pos.o1 + __popc(b1 & below)] = index0 + i;
    pos.o0 += __popc(b0);
    pos.o1 += __popc(b1);
  }
}

// Count, finite-key min and max of s[0, n), reduced over the block into *valid, *kmin, *kmax
// (shared, initialised to 0, ~0u, 0 before a barrier). All threads.
__device__ void KeyStats(const float* s, int n, int* valid, uint32_t* kmin, uint32_t* kmax) {
  const int lane = threadIdx.x % 32;
  int local = 0;
  uint32_t mn = 0xffffffffu, mx = 0;
  for (int i = threadIdx.x; i < n; i += blockDim.x) {
    const float x = s[i];
    if (!isfinite(x)) continue;
    const uint32_t key = OrderKey(x);
    ++local;
    mn = min(mn, key);
    mx = max(mx, key);
  }
#pragma unroll
  for (int off = 16; off > 0; off /= 2) {
    local += __shfl_xor_sync(0xffffffffu, local, off);
    mn = min(mn, __shfl_xor_sync(0xffffffffu, mn, off));
    mx = max(mx, __shfl_xor_sync(0xffffffffu, mx, off));
  }
  if (lane == 0) {  // one shared atomic each per warp
    atomicAdd(valid, local);
    atomicMin(kmin, mn);
    atomicMax(kmax, mx);
  }
}

// Top-k of one head's scores s[0, n): the indices of the k largest finite scores (ties: lower
// index first) to o0 and, with kSel == 2, of the next k2 - k to o1, both in increasing index
// order; their counts to *n0 (and *n1). After the radix select, each warp takes a contiguous
// stretch: one pass counts its keys above / inside the two candidate ranges, a walk over the
// warps' counts gives every warp its tie ranks and output offsets, and a second pass writes with
// ballots. Called by all kTopKThreads threads of the block; n < 2^31.
template <int kSel>
__device__ void TopKHead(const float* s, int64_t n64, int64_t k, int64_t k2, int32_t* o0,
                         int32_t* o1, int32_t* n0, int32_t* n1) {
  __shared__ SelectState st;
  __shared__ bool done[kSel];
  __shared__ int valid;
  __shared__ uint32_t kmin, kmax;
  __shared__ int cnt[kTopKWarps][4];
  __shared__ WalkPos base[kTopKWarps];
  const int n = static_cast<int>(n64);
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  if (threadIdx.x == 0) valid = 0, kmin = 0xffffffffu, kmax = 0;
  __syncthreads();
  KeyStats(s, n, &valid, &kmin, &kmax);
  __syncthreads();
  if (threadIdx.x == 0) InitSelect(st, done, kSel, valid, kmin, kmax, k, k2);
  __syncthreads();
  RadixSelect<kSel>(s, n, st, done);
  const int chunk = ((n + kTopKWarps - 1) / kTopKWarps + 31) / 32 * 32;
  const int lo = min(n, warp * chunk), hi = min(n, lo + chunk);
  int c[4] = {0, 0, 0, 0};
  CountStretch<kSel>(s, lo, hi, st, c);
  if (lane < 4) cnt[warp][lane] = c[lane];
  __syncthreads();
  if (threadIdx.x == 0) {
    WalkPos pos{};
    for (int w = 0; w < kTopKWarps; ++w) {
      base[w] = pos;
      Advance(pos, cnt[w], st);
    }
  }
  __syncthreads();
  WriteStretch<kSel>(s, lo, hi, 0, st, base[warp], o0, o1);
  if (threadIdx.x == 0) {
    *n0 = st.want[0];
    if (n1 != nullptr) *n1 = max(0, st.want[1] - st.want[0]);
  }
}

// Copies a head's scores into shared memory (when the launch gave room: every later pass reads
// shared memory instead of L2) and returns where to read them.
__device__ const float* Stage(const float* s, int64_t n, bool stage, float* staged) {
  if (!stage) return s;
  for (int64_t i = threadIdx.x; i < n; i += blockDim.x) staged[i] = s[i];
  __syncthreads();
  return staged;
}

template <int kSel>
__global__ void __launch_bounds__(kTopKThreads)
    TopKKernel(const float* __restrict__ scores, int64_t n, int64_t stride, int64_t k, int64_t k2,
               int32_t* __restrict__ out, int32_t* __restrict__ out2, int64_t out_stride,
               int32_t* __restrict__ counts, int32_t* __restrict__ counts2, bool stage) {
  extern __shared__ float staged[];
  const int head = blockIdx.x;
  const float* s = Stage(scores + head * stride, n, stage, staged);
  TopKHead<kSel>(s, n, k, k2, out + head * out_stride,
                 out2 != nullptr ? out2 + head * out_stride : nullptr, counts + head,
                 counts2 != nullptr ? counts2 + head : nullptr);
}

// The fused selection can spread each KV head over a cluster of kC blocks (distributed shared
// memory): block r scores clusters [r * per, (r + 1) * per) of the head and keeps them in shared
// memory; the counts, key ranges and radix histograms are summed across the cluster's blocks
// (every block reads all of them and reaches the same decisions); each block then writes the
// selected indices of its slice at offsets from the lower-ranked blocks' counts, and block 0
// plans the pages. One block per head would leave the selection's per-key work on 8 SMs.
// kC = 1 (one block of 1024 threads per head) is the faster form below 24K clusters per head
// or when heads x 8 blocks would not fit the GPU at once; kC = 8 (blocks of 512) beyond: at 8K
// clusters per head (128K tokens) the cluster barriers cost more than the spread saves (score
// phase 50 vs 45 us a layer), at 64K (1M tokens) it is 169 vs 270 us; batch 8 (64 heads) at
// 128K 216 vs 141 us (bench/results/decode_variants_h200.txt). SelThreads: the fused kernel's
// block size (and the default of ClusterSelectPlan); SelectPlanKernel uses 1024 (kSelectThreads).
__host__ __device__ constexpr int SelThreads(int kC) { return kC == 1 ? 1024 : 512; }

#ifdef KVWAVE_PROFILE_SELECT
// Profiling build only: SM cycles of each phase of SelectPlanKernel (block 0), summed over calls.
__device__ unsigned long long g_select_prof[16];
#define KVWAVE_PROF(i)                                                            \
  do {                                                                            \
    if (blockIdx.x == 0 && threadIdx.x == 0) {                                    \
      const long long t_ = clock64();                                             \
      atomicAdd(&g_select_prof[i], static_cast<unsigned long long>(t_ - prof_t)); \
      prof_t = t_;                                                                \
    }                                                                             \
  } while (0)
#else
#define KVWAVE_PROF(i) \
  do {                 \
  } while (0)
#endif

__device__ __forceinline__ int4 Add4(int4 a, int4 b) {
  return make_int4(a.x + b.x, a.y + b.y, a.z + b.z, a.w + b.w);
}
__device__ __forceinline__ int4 ShflUp4(int4 v, int off) {
  return make_int4(__shfl_up_sync(0xffffffffu, v.x, off), __shfl_up_sync(0xffffffffu, v.y, off),
                   __shfl_up_sync(0xffffffffu, v.z, off), __shfl_up_sync(0xffffffffu, v.w, off));
}
__device__ __forceinline__ int4 ShflXor4(int4 v, int off) {
  return make_int4(__shfl_xor_sync(0xffffffffu, v.x, off), __shfl_xor_sync(0xffffffffu, v.y, off),
                   __shfl_xor_sync(0xffffffffu, v.z, off), __shfl_xor_sync(0xffffffffu, v.w, off));
}

// Where a walk stands after keys with counts pre = (above R0, in R0, above R1, in R1): the same
// as Advance over every stretch before (ties are taken lowest index first, so the selected ones
// among pre.y ties are the first min(pre.y, rem)).
__device__ __forceinline__ WalkPos PosFromPrefix(int4 pre, const SelectState& st) {
  const bool on0 = st.want[0] > 0, on1 = st.want[1] > 0;
  const int sel0 = on0 ? pre.x + min(pre.y, st.rem[0]) : 0;
  const int sel1 = on1 ? pre.z + min(pre.w, st.rem[1]) : 0;
  return WalkPos{pre.y, pre.w, sel0, on1 ? sel1 - sel0 : 0};
}

// What a block publishes to its cluster.
struct ClusterPart {
  int valid;
  uint32_t kmin, kmax;
  int tot[4];           // the slice's counts after the selection (as in Advance)
  int hist[2][2][256];  // radix histograms, double-buffered by pass parity
};

// The selection and plan of SelectPlanKernel after the scores, shared with the fused kernel: s is
// this block's slice of the head's scores (cluster indices s0 .. s0 + len - 1). All threads of
// every block of the cluster.
template <int kSel, int kC, int kThr = SelThreads(kC)>
__device__ void ClusterSelectPlan(const float* s, int s0, int len, int head, int64_t k, int64_t k2,
                                  int32_t* out, int32_t* out2, int32_t* counts, int32_t* counts2,
                                  int64_t out_stride, const PlanArgs& plan, int steady_pages = -1) {
  constexpr int kCluster = kC, kSelThreads = kThr, kSelWarps = kSelThreads / 32;
  namespace cg = cooperative_groups;
  cg::cluster_group cluster = cg::this_cluster();
  __shared__ ClusterPart part;
  __shared__ SelectState st;
  __shared__ bool done[kSel];
  __shared__ int cnt[kSelWarps][4];
  __shared__ WalkPos base[kSelWarps];
  // Remote reads gathered in parallel (thread r reads rank r; one DSMEM round trip, not kC).
  __shared__ int rank_valid[kCluster];
  __shared__ uint32_t rank_kmin[kCluster], rank_kmax[kCluster];
  __shared__ int4 rank_tot[kCluster];
  __shared__ int sum_hist[kSel][256];
  const int rank = static_cast<int>(cluster.block_rank());
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
#ifdef KVWAVE_PROFILE_SELECT
  long long prof_t = clock64();
#endif
  if (threadIdx.x == 0) part.valid = 0, part.kmin = 0xffffffffu, part.kmax = 0;
  __syncthreads();
  KeyStats(s, len, &part.valid, &part.kmin, &part.kmax);
  cluster.sync();
  if (threadIdx.x < kCluster) {
    const ClusterPart* p = cluster.map_shared_rank(&part, static_cast<int>(threadIdx.x));
    rank_valid[threadIdx.x] = p->valid;
    rank_kmin[threadIdx.x] = p->kmin;
    rank_kmax[threadIdx.x] = p->kmax;
  }
  __syncthreads();
  if (threadIdx.x == 0) {
    int valid = 0;
    uint32_t kmin = 0xffffffffu, kmax = 0;
    for (int r = 0; r < kCluster; ++r) {
      valid += rank_valid[r];
      kmin = min(kmin, rank_kmin[r]);
      kmax = max(kmax, rank_kmax[r]);
    }
    InitSelect(st, done, kSel, valid, kmin, kmax, k, k2);
  }
  __syncthreads();
  KVWAVE_PROF(3);
  // Radix passes. A pass zeroes the histogram buffer the other blocks last read two passes ago
  // (they have all passed the cluster barrier of the pass in between).
  for (int pass = 0; pass < 6; ++pass) {
    int(*hist)[256] = part.hist[pass & 1];
    for (int i = threadIdx.x; i < 2 * 256; i += blockDim.x) hist[i / 256][i % 256] = 0;
    __syncthreads();
    bool all_done = true;
#pragma unroll
    for (int t = 0; t < kSel; ++t) all_done = all_done && done[t];
    if (all_done) break;  // uniform over the cluster: every block holds the same state
    HistogramPass<kSel>(s, len, st, done, hist);
    cluster.sync();
    if (kCluster > 1) {  // thread i sums bin i % 256 of selection i / 256 over the ranks
      for (int i = threadIdx.x; i < kSel * 256; i += kSelThreads) {
        int sum = 0;
#pragma unroll
        for (int r = 0; r < kCluster; ++r)
          sum += cluster.map_shared_rank(&part.hist[pass & 1][i / 256][0], r)[i % 256];
        sum_hist[i / 256][i % 256] = sum;
      }
      __syncthreads();
    }
    if (warp < kSel && !done[warp]) {
      const int* h = kCluster > 1 ? &sum_hist[warp][0] : &hist[warp][0];
      int h8[8];
#pragma unroll
      for (int j = 0; j < 8; ++j) h8[j] = h[255 - 8 * lane - j];
      ChooseBin(st, done, warp, h8);
    }
    __syncthreads();
#ifdef KVWAVE_PROFILE_SELECT
    if (blockIdx.x == 0 && threadIdx.x == 0) atomicAdd(&g_select_prof[15], 1ull);
#endif
  }
  KVWAVE_PROF(4);
  // This block's counts, published; its offsets from the lower-ranked blocks' counts.
  const int chunk = ((len + kSelWarps - 1) / kSelWarps + 31) / 32 * 32;
  const int lo = min(len, warp * chunk), hi = min(len, lo + chunk);
  int c[4] = {0, 0, 0, 0};
  CountStretch<kSel>(s, lo, hi, st, c);
  if (lane < 4) cnt[warp][lane] = c[lane];
  __syncthreads();
  if (threadIdx.x < 4) {
    int sum = 0;
    for (int w = 0; w < kSelWarps; ++w) sum += cnt[w][threadIdx.x];
    part.tot[threadIdx.x] = sum;
  }
  cluster.sync();
  KVWAVE_PROF(5);
  if (threadIdx.x < rank) {
    const int* t = cluster.map_shared_rank(&part, static_cast<int>(threadIdx.x))->tot;
    rank_tot[threadIdx.x] = make_int4(t[0], t[1], t[2], t[3]);
  }
  __syncthreads();
  if (warp == 0) {  // every warp's start: prefix sums over the lower ranks and warps
    int4 mine = make_int4(0, 0, 0, 0), rk = mine;
    if (lane < kSelWarps) mine = make_int4(cnt[lane][0], cnt[lane][1], cnt[lane][2], cnt[lane][3]);
    if (lane < rank) rk = rank_tot[lane];
    int4 inc = mine;
#pragma unroll
    for (int off = 1; off < 32; off *= 2) {
      const int4 o = ShflUp4(inc, off);
      if (lane >= off) inc = Add4(inc, o);
    }
#pragma unroll
    for (int off = 16; off > 0; off /= 2) rk = Add4(rk, ShflXor4(rk, off));
    const int4 pre =
        Add4(rk, make_int4(inc.x - mine.x, inc.y - mine.y, inc.z - mine.z, inc.w - mine.w));
    if (lane < kSelWarps) base[lane] = PosFromPrefix(pre, st);
  }
  __syncthreads();
  KVWAVE_PROF(6);
  WriteStretch<kSel>(s, lo, hi, s0, st, base[warp], out + head * out_stride,
                     out2 != nullptr ? out2 + head * out_stride : nullptr);
  // Every block's lists are written (the barrier orders them at cluster scope), and no block
  // leaves while another may still read its shared memory.
  cluster.sync();
  KVWAVE_PROF(7);
  if (rank != 0) return;
  if (threadIdx.x == 0) {
    counts[head] = st.want[0];
    if (counts2 != nullptr) counts2[head] = max(0, st.want[1] - st.want[0]);
  }
  __syncthreads();
  PlanHead<kSelThreads>(plan, head, steady_pages);
  if (threadIdx.x == 0 && plan.record_counts != nullptr) plan.record_counts[head] = st.want[0];
  if (plan.pages_ready != nullptr) {  // publish the head's plan (see PlanArgs)
    __threadfence();
    __syncthreads();
    if (threadIdx.x == 0) StoreRelease(plan.pages_ready + head, plan.seq);
  }
  // The head is planned: a programmatic dependent (the wave buffer's chained attention) may be
  // scheduled once every block has got here or left. Triggering at the start instead put the
  // dependents' waiting blocks on the SMs the selection leaves free, and was slower (H200, 128K:
  // 3.64-3.83 vs 3.59-3.61 ms).
  asm volatile("griddepcontrol.launch_dependents;");
  __syncthreads();
  KVWAVE_PROF(8);
}

// The separate selection kernel: 1024 threads a block whatever its cluster size (the fused one
// keeps SelThreads: its static shared memory does not fit 1024). At 1M tokens (kC = 8) on an H200,
// one engine step took 26.18 ms with 1024 threads against 26.76 with 512 (one sample each in the
// same call, bench/results/gpu_engine_run8_h200_*; within the steps' spread): the selection of
// 65,536 clusters a head is ~0.1 ms a layer there, most of the step's time besides the misses.
constexpr int kSelectThreads = 1024;
template <int G, int kSel, int kC>
__global__ void __launch_bounds__(kSelectThreads)
    SelectPlanKernel(const float* __restrict__ logits, const float2* __restrict__ stats, int nb,
                     const int32_t* __restrict__ sizes, int64_t size_stride, int64_t n,
                     float* __restrict__ scores, int64_t score_stride, int64_t k, int64_t k2,
                     int32_t* out, int32_t* out2, int32_t* counts, int32_t* counts2,
                     int64_t out_stride, PlanArgs plan, bool stage,
                     const HeadMeta* __restrict__ meta) {
  constexpr int kCluster = kC, kSelThreads = kSelectThreads;
  namespace cg = cooperative_groups;
  cg::cluster_group cluster = cg::this_cluster();
  extern __shared__ float staged[];
  __shared__ float sm_m[G], sm_inv[G];
  const int rank = static_cast<int>(cluster.block_rank());
  const int head = blockIdx.x / kCluster;
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
#ifdef KVWAVE_PROFILE_SELECT
  long long prof_t = clock64();
#endif
  // Launched as a programmatic dependent of the logits kernel: wait for it to complete (and its
  // writes to be visible); a no-op for a plain launch.
  asm volatile("griddepcontrol.wait;" ::: "memory");
  KVWAVE_PROF(0);
  if (warp < G) {
    const float2 f = FoldStats<G>(stats + int64_t{head} * nb * G, nb, warp);
    if (lane == 0) sm_m[warp] = f.x, sm_inv[warp] = f.y;
  }
  __syncthreads();
  KVWAVE_PROF(1);
  // This head's sizes, clusters and counts (a batched launch: its descriptor); n is the logits'
  // row stride.
  const int32_t* s_head = meta != nullptr ? meta[head].sizes : sizes + head * size_stride;
  const int n32 = static_cast<int>(meta != nullptr ? meta[head].n : n);
  if (meta != nullptr) k = meta[head].k, k2 = meta[head].k2;
  const int per = (n32 + kCluster - 1) / kCluster;
  const int s0 = min(n32, rank * per), len = min(n32, s0 + per) - s0;
  float* sh = scores + head * score_stride;
  constexpr int kU = 4;  // clusters a thread loads before it computes (latency, not bandwidth)
  for (int c0 = threadIdx.x; c0 < len; c0 += kU * kSelThreads) {
    float lg[kU][G];
    bool live[kU];
#pragma unroll
    for (int u = 0; u < kU; ++u) {
      const int64_t c = s0 + c0 + u * kSelThreads;
      const bool in = c0 + u * kSelThreads < len;
      live[u] = in && s_head[c] > 0;
#pragma unroll
      for (int j = 0; j < G; ++j) lg[u][j] = in ? logits[(int64_t{head} * G + j) * n + c] : 0.f;
    }
#pragma unroll
    for (int u = 0; u < kU; ++u) {
      const int i = c0 + u * kSelThreads;
      if (i >= len) break;
      float score = 0.f;
#pragma unroll
      for (int j = 0; j < G; ++j) score += __expf(lg[u][j] - sm_m[j]) * sm_inv[j];
      score = live[u] ? score : -INFINITY;
      sh[s0 + i] = score;
      if (stage) staged[i] = score;
    }
  }
  __syncthreads();  // the block's global writes are visible to the block after the barrier
  KVWAVE_PROF(2);
  ClusterSelectPlan<kSel, kC, kSelectThreads>(stage ? staged : sh + s0, s0, len, head, k, k2, out,
                                              out2, counts, counts2, out_stride, plan);
}

// Scoring, selection and plan in one launch (bf16 centroids, d = 64 or 128): a cluster of kC
// blocks per KV head, block r taking clusters [r * per, (r + 1) * per) of the head. The block
// computes its slice's logits on the tensor cores (as MmaLogitsKernel) into shared memory, its
// per-query-head softmax statistics go to the cluster (distributed shared memory), every block
// folds them into the head's, scores its slice in place and then runs ClusterSelectPlan. No logits
// in global memory and no second launch; the per-key work of the selection is spread over kC
// SMs. Dynamic shared memory: G x per floats (per a multiple of 16).
template <int G, int kSel, int D, int kC>
__global__ void __launch_bounds__(SelThreads(kC))
    FusedSelectPlanKernel(const float* __restrict__ q, float scale,
                          const uint16_t* __restrict__ cen, int64_t cen_stride,
                          const int32_t* __restrict__ sizes, int64_t size_stride, int64_t n,
                          int per, float* __restrict__ scores, int64_t score_stride, int64_t k,
                          int64_t k2, int32_t* out, int32_t* out2, int32_t* counts,
                          int32_t* counts2, int64_t out_stride, PlanArgs plan,
                          const HeadMeta* __restrict__ meta) {
  constexpr int kThreads = SelThreads(kC), kWarps = kThreads / 32;
  constexpr int kNT = MmaTilesN(G), kU = D / 32, kK = D / 16;
  namespace cg = cooperative_groups;
  cg::cluster_group cluster = cg::this_cluster();
  extern __shared__ float lg[];  // [G][per]: logits, then row 0 the scores
  __shared__ float cs[kWarps][16][kNT * 8 + 1];
  __shared__ float2 warp_stats[kWarps][G];
  __shared__ float2 block_stats[G];  // read by the whole cluster
  __shared__ float sm_m[G], sm_inv[G];
  const int rank = static_cast<int>(cluster.block_rank());
  const int head = blockIdx.x / kC, warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  const HeadCentroids hc = CentroidsOf<true>(meta, head, cen, cen_stride, sizes, size_stride, n);
  if (meta != nullptr) k = meta[head].k, k2 = meta[head].k2;
  const int n32 = static_cast<int>(hc.n);
  const int s0 = min(n32, rank * per), len = min(n32, s0 + per) - s0;
#ifdef KVWAVE_PROFILE_SELECT
  long long prof_t = clock64();
#endif
  // Loads needed after the logits, issued first: the sizes of the thread's first two clusters
  // (liveness), and for block 0 the steady page count. The last block writes the steady pages.
  const int32_t* s_head = hc.sizes;
  int32_t pre[2];
#pragma unroll
  for (int u = 0; u < 2; ++u) {
    const int i = threadIdx.x + u * kThreads;
    pre[u] = i < len ? s_head[s0 + i] : 0;
  }
  const int steady_pages =
      rank == 0 && threadIdx.x == 0 ? static_cast<int>(SteadyZonePages(SteadyOf(plan, head))) : 0;
  if (rank == kC - 1) PlanSteady(plan, head);
  auto live = [&](int u, int i) {  // cluster s0 + i is the thread's u-th
    return (u == 0 ? pre[0] : u == 1 ? pre[1] : s_head[s0 + i]) > 0;
  };
  uint32_t b[kNT][kK][2];  // q as B fragments (see MmaLogitsKernel)
  QFragments<G, D>(q, head, b);
  const uint4* rows = static_cast<const uint4*>(hc.rows) + int64_t{s0} * (D / 8);
  constexpr int kTiles = 2;  // 16-centroid tiles a warp loads at once
  for (int t0 = warp * kTiles * 16; t0 < len; t0 += kWarps * kTiles * 16) {
    uint4 ld[kTiles][2][kU];
#pragma unroll
    for (int t = 0; t < kTiles; ++t) LoadTile<D>(rows, t0 + t * 16, len, ld[t]);
#pragma unroll
    for (int t = 0; t < kTiles; ++t) {
      const int i0 = t0 + t * 16;
      if (i0 >= len) break;  // warp-uniform
      TileDots<G, D>(ld[t], b, cs[warp]);
      for (int idx = lane; idx < 16 * G; idx += 32) {
        const int row = idx % 16, j = idx / 16;
        if (i0 + row < len) lg[j * per + i0 + row] = LogitOf<G>(cs[warp], row, j, scale);
      }
      __syncwarp();
    }
  }
  __syncthreads();
  KVWAVE_PROF(9);
  // The slice's softmax statistics per query head (live clusters only), to the cluster.
  float m[G], z[G];
#pragma unroll
  for (int j = 0; j < G; ++j) m[j] = -INFINITY, z[j] = 0.f;
  for (int i = threadIdx.x, u = 0; i < len; i += kThreads, ++u) {
    if (!live(u, i)) continue;
#pragma unroll
    for (int j = 0; j < G; ++j) {
      const float x = lg[j * per + i], mn = fmaxf(m[j], x);
      z[j] = z[j] * __expf(m[j] - mn) + __expf(x - mn);
      m[j] = mn;
    }
  }
#pragma unroll
  for (int j = 0; j < G; ++j) {
    ButterflyStats<16>(m[j], z[j]);
    if (lane == 0) warp_stats[warp][j] = make_float2(m[j], z[j]);
  }
  __syncthreads();
  if (threadIdx.x < G) {
    const int j = threadIdx.x;
    block_stats[j] = FoldParts(kWarps, [&](int w) { return warp_stats[w][j]; });
  }
  KVWAVE_PROF(10);
  cluster.sync();
  KVWAVE_PROF(11);
  if (threadIdx.x < G) {  // the head's statistics, folded in rank order by every block alike
    const int j = threadIdx.x;
    const float2 f =
        FoldParts(kC, [&](int r) { return cluster.map_shared_rank(block_stats, r)[j]; });
    sm_m[j] = f.x;
    sm_inv[j] = f.y > 0.f ? 1.f / f.y : 0.f;
  }
  __syncthreads();
  float* sh = scores + head * score_stride;
  for (int i = threadIdx.x, u = 0; i < len; i += kThreads, ++u) {
    float score = 0.f;
#pragma unroll
    for (int j = 0; j < G; ++j) score += __expf(lg[j * per + i] - sm_m[j]) * sm_inv[j];
    score = live(u, i) ? score : -INFINITY;
    sh[s0 + i] = score;
    lg[i] = score;  // row 0, in place: this thread read it above
  }
  __syncthreads();
  KVWAVE_PROF(12);
  ClusterSelectPlan<kSel, kC>(lg, s0, len, head, k, k2, out, out2, counts, counts2, out_stride,
                              plan, steady_pages);
}

int64_t Blocks(int64_t n) { return (n + kClustersPerBlock - 1) / kClustersPerBlock; }

// Launches the logits kernel of ScoreClusters into the workspace; returns its block count per
// head (the statistics' count) through nb.
template <int G>
cudaError_t LaunchLogits(const ScoreArgs& a, float* ws, cudaStream_t stream, int64_t& nb) {
  float* logits = ws;
  const int64_t logit_count = (int64_t{a.heads} * G * a.n + 1) / 2 * 2;  // keeps stats 8-aligned
  float2* stats = reinterpret_cast<float2*>(ws + logit_count);
  if (a.centroids_bf16 != nullptr && (a.d == 128 || a.d == 64)) {
    nb = (a.n + kMmaClustersPerBlock - 1) / kMmaClustersPerBlock;
    const dim3 grid(nb, a.heads);
    if (a.d == 128)
      MmaLogitsKernel<G, 128><<<grid, kScoreThreads, 0, stream>>>(
          a.q, a.scale, a.centroids_bf16, a.centroid_stride, a.sizes, a.size_stride, a.n, logits,
          stats, a.heads_meta);
    else
      MmaLogitsKernel<G, 64><<<grid, kScoreThreads, 0, stream>>>(
          a.q, a.scale, a.centroids_bf16, a.centroid_stride, a.sizes, a.size_stride, a.n, logits,
          stats, a.heads_meta);
  } else if (a.d <= kTiledMaxD && a.centroids_bf16 != nullptr) {
    nb = Blocks(a.n);
    TiledLogitsKernel<G, true><<<dim3(nb, a.heads), kScoreThreads, 0, stream>>>(
        a.q, a.d, a.scale, a.centroids_bf16, a.centroid_stride, a.sizes, a.size_stride, a.n, logits,
        stats, a.heads_meta);
  } else if (a.d <= kTiledMaxD) {
    nb = Blocks(a.n);
    TiledLogitsKernel<G, false><<<dim3(nb, a.heads), kScoreThreads, 0, stream>>>(
        a.q, a.d, a.scale, a.centroids, a.centroid_stride, a.sizes, a.size_stride, a.n, logits,
        stats, a.heads_meta);
  } else {
    if (a.heads_meta != nullptr) return cudaErrorInvalidValue;  // batched launches: d <= 128
    nb = Blocks(a.n);
    LogitsKernel<G><<<dim3(nb, a.heads), kScoreThreads, 0, stream>>>(
        a.q, a.d, a.scale, a.centroids, a.centroid_stride, a.sizes, a.size_stride, a.n, logits,
        stats);
  }
  return cudaGetLastError();
}

template <int G>
cudaError_t LaunchScoreTyped(const ScoreArgs& a, float* ws, cudaStream_t stream) {
  int64_t nb = 0;
  if (const cudaError_t err = LaunchLogits<G>(a, ws, stream, nb); err != cudaSuccess) return err;
  const int64_t logit_count = (int64_t{a.heads} * G * a.n + 1) / 2 * 2;
  const auto* stats = reinterpret_cast<const float2*>(ws + logit_count);
  const int64_t sb = (a.n + kScoreThreads - 1) / kScoreThreads;
  ScoresKernel<G><<<dim3(sb, a.heads), kScoreThreads, 0, stream>>>(
      ws, stats, static_cast<int>(nb), a.sizes, a.size_stride, a.n, a.scores, a.score_stride);
  return cudaGetLastError();
}

// Dynamic shared memory for staging a head's scores, when they fit (up to 40K clusters).
constexpr int64_t kMaxStaged = 160 << 10;

template <typename Kernel>
bool AllowStaging(Kernel kernel) {
  if (cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize,
                           static_cast<int>(kMaxStaged)) == cudaSuccess)
    return true;
  cudaGetLastError();
  return false;
}

#ifdef KVWAVE_PROFILE_SELECT
// Every 512 calls: the average cycles of phases [first, last) of g_select_prof, then zeroes it.
void MaybePrintSelectProfile(const char* what, int64_t n, int kC, const char* const* names,
                             int first, int last) {
  static int calls = 0;
  if (++calls % 512 != 0) return;
  unsigned long long h[16];
  cudaDeviceSynchronize();
  cudaMemcpyFromSymbol(h, g_select_prof, sizeof(h));
  fprintf(stderr, "%s profile n=%lld kC=%d (cycles/call, 512 calls): ", what, (long long)n, kC);
  for (int i = first; i < last; ++i) fprintf(stderr, "%s %llu ", names[i], h[i] / 512);
  fprintf(stderr, "passes %.2f\n", h[15] / 512.0);
  const unsigned long long zero[16] = {};
  cudaMemcpyToSymbol(g_select_prof, zero, sizeof(zero));
}
#endif

template <int G, int kSel, int kC>
cudaError_t LaunchSelectPlanTyped(const ScoreArgs& a, const TopKArgs& t, const PlanArgs& p,
                                  float* ws, bool dependent_launch, cudaEvent_t wait,
                                  cudaStream_t stream) {
  int64_t nb = 0;
  if (const cudaError_t err = LaunchLogits<G>(a, ws, stream, nb); err != cudaSuccess) return err;
  if (wait != nullptr) {  // the logits overlap what the event marks; the plan waits for it
    if (const cudaError_t err = cudaStreamWaitEvent(stream, wait, 0); err != cudaSuccess)
      return err;
    dependent_launch = false;
  }
  const int64_t logit_count = (int64_t{a.heads} * G * a.n + 1) / 2 * 2;
  const auto* stats = reinterpret_cast<const float2*>(ws + logit_count);
  static const bool staging_ok = AllowStaging(SelectPlanKernel<G, kSel, kC>);
  const int64_t bytes = sizeof(float) * ((a.n + kC - 1) / kC);
  const bool stage = staging_ok && bytes <= kMaxStaged;
  LaunchConfig l(dim3(a.heads * kC), kSelectThreads, stage ? bytes : 0, stream, kC,
                 dependent_launch);
  const cudaError_t err = cudaLaunchKernelEx(
      &l.config, SelectPlanKernel<G, kSel, kC>, static_cast<const float*>(ws), stats,
      static_cast<int>(nb), a.sizes, a.size_stride, a.n, a.scores, a.score_stride, t.k, t.k2, t.out,
      t.out2, t.counts, t.counts2, t.out_stride, p, stage, a.heads_meta);
#ifdef KVWAVE_PROFILE_SELECT
  const char* names[] = {"wait",  "fold", "scores", "keystats", "radix",
                         "count", "walk", "write",  "plan"};
  MaybePrintSelectProfile("select", a.n, kC, names, 0, 9);
#endif
  return err;
}

// The fused kernel's blocks per KV head, and its slice per block (a multiple of the 16-centroid
// tile).
constexpr int kFusedCluster = 8;

template <int kC>
int FusedPer(int64_t n) {
  return static_cast<int>(((n + kC - 1) / kC + 15) / 16 * 16);
}

template <int G, int kSel, int D, int kC>
cudaError_t LaunchFusedTyped(const ScoreArgs& a, const TopKArgs& t, const PlanArgs& p,
                             cudaStream_t stream) {
  const int per = FusedPer<kC>(a.n);
  LaunchConfig l(dim3(a.heads * kC), SelThreads(kC), sizeof(float) * G * per, stream, kC, false);
  const cudaError_t err = cudaLaunchKernelEx(
      &l.config, FusedSelectPlanKernel<G, kSel, D, kC>, a.q, a.scale, a.centroids_bf16,
      a.centroid_stride, a.sizes, a.size_stride, a.n, per, a.scores, a.score_stride, t.k, t.k2,
      t.out, t.out2, t.counts, t.counts2, t.out_stride, p, a.heads_meta);
#ifdef KVWAVE_PROFILE_SELECT
  const char* names[] = {"",      "",     "",         "keystats", "radix", "count", "walk",
                         "write", "plan", "q+logits", "stats",    "csync", "scores"};
  MaybePrintSelectProfile("fused", a.n, kC, names, 3, 13);
#endif
  return err;
}

// Whether FusedSelectPlanKernel<..., kC> can run `heads` clusters at once with this shared memory
// (its limit raised on first use; cached per size).
template <typename Kernel>
bool FusedFits(Kernel kernel, int kC, int heads, size_t smem) {
  static const bool attrs = AllowStaging(kernel);
  if (!attrs || smem > static_cast<size_t>(kMaxStaged)) return false;
  static thread_local size_t last_smem = 0;
  static thread_local int last_clusters = 0;
  if (smem != last_smem) {
    LaunchConfig l(dim3(heads * kC), SelThreads(kC), smem, nullptr, kC, false);
    int clusters = 0;
    if (cudaOccupancyMaxActiveClusters(&clusters, kernel, &l.config) != cudaSuccess) {
      cudaGetLastError();
      clusters = 0;
    }
    last_smem = smem;
    last_clusters = clusters;
  }
  return last_clusters >= heads;
}

// The fused kernel when it applies (bf16 centroids, d 64 or 128, every head's cluster of 8 blocks
// resident at once); sets *launched. (Clusters of 12 or 16 blocks would spread the logits' loads
// over more SMs, but 8 of them do not fit the H200's GPCs at once.)
template <int G, int kSel, int D>
cudaError_t MaybeLaunchFused(const ScoreArgs& a, const TopKArgs& t, const PlanArgs& p,
                             cudaStream_t stream, bool* launched) {
  *launched = FusedFits(FusedSelectPlanKernel<G, kSel, D, kFusedCluster>, kFusedCluster, a.heads,
                        sizeof(float) * G * FusedPer<kFusedCluster>(a.n));
  return *launched ? LaunchFusedTyped<G, kSel, D, kFusedCluster>(a, t, p, stream) : cudaSuccess;
}

template <int G>
cudaError_t LaunchSelectPlanG(const ScoreArgs& a, const TopKArgs& t, const PlanArgs& p, float* ws,
                              bool dependent_launch, int sm_count, cudaEvent_t wait,
                              cudaStream_t stream) {
  if (a.centroids_bf16 != nullptr && (a.d == 128 || a.d == 64)) {
    if (wait != nullptr) {  // one fused kernel: it waits whole
      if (const cudaError_t err = cudaStreamWaitEvent(stream, wait, 0); err != cudaSuccess)
        return err;
      wait = nullptr;
    }
    bool launched = false;
    const bool two = t.out2 != nullptr;
    const cudaError_t err = a.d == 128
                                ? (two ? MaybeLaunchFused<G, 2, 128>(a, t, p, stream, &launched)
                                       : MaybeLaunchFused<G, 1, 128>(a, t, p, stream, &launched))
                                : (two ? MaybeLaunchFused<G, 2, 64>(a, t, p, stream, &launched)
                                       : MaybeLaunchFused<G, 1, 64>(a, t, p, stream, &launched));
    if (launched || err != cudaSuccess) return err;
  }
  const bool spread = a.n >= 24576 && a.heads * 8 <= sm_count;  // see SelThreads
  const bool two = t.out2 != nullptr;
  if (spread)
    return two ? LaunchSelectPlanTyped<G, 2, 8>(a, t, p, ws, dependent_launch, wait, stream)
               : LaunchSelectPlanTyped<G, 1, 8>(a, t, p, ws, dependent_launch, wait, stream);
  return two ? LaunchSelectPlanTyped<G, 2, 1>(a, t, p, ws, dependent_launch, wait, stream)
             : LaunchSelectPlanTyped<G, 1, 1>(a, t, p, ws, dependent_launch, wait, stream);
}

}  // namespace

size_t ScoreWorkspaceBytes(int heads, int g, int64_t n) {
  // logits, then float2 stats (8-byte aligned: the logit count is rounded up to even); Blocks(n)
  // bounds the block count of every logits kernel.
  const int64_t logits = (int64_t{heads} * g * n + 1) / 2 * 2;
  return sizeof(float) * (logits + 2 * int64_t{heads} * Blocks(n) * g);
}

cudaError_t LaunchScoreClusters(const ScoreArgs& a, float* workspace, cudaStream_t stream) {
  if (a.n <= 0 || a.heads <= 0) return cudaSuccess;
  if (a.d % 4 != 0) return cudaErrorInvalidValue;
  switch (a.g) {
    case 1:
      return LaunchScoreTyped<1>(a, workspace, stream);
    case 2:
      return LaunchScoreTyped<2>(a, workspace, stream);
    case 4:
      return LaunchScoreTyped<4>(a, workspace, stream);
    case 8:
      return LaunchScoreTyped<8>(a, workspace, stream);
    default:
      return cudaErrorInvalidValue;
  }
}

cudaError_t LaunchSelectTopK(const TopKArgs& a, cudaStream_t stream) {
  if (a.heads <= 0) return cudaSuccess;
  static const bool staging1 = AllowStaging(TopKKernel<1>);
  static const bool staging2 = AllowStaging(TopKKernel<2>);
  const bool two = a.out2 != nullptr;
  const int64_t bytes = sizeof(float) * a.n;
  const bool stage = (two ? staging2 : staging1) && bytes <= kMaxStaged;
  if (two) {
    TopKKernel<2><<<a.heads, kTopKThreads, stage ? bytes : 0, stream>>>(
        a.scores, a.n, a.score_stride, a.k, a.k2, a.out, a.out2, a.out_stride, a.counts, a.counts2,
        stage);
  } else {
    TopKKernel<1><<<a.heads, kTopKThreads, stage ? bytes : 0, stream>>>(
        a.scores, a.n, a.score_stride, a.k, a.k2, a.out, a.out2, a.out_stride, a.counts, a.counts2,
        stage);
  }
  return cudaGetLastError();
}

cudaError_t LaunchScoreSelectPlan(const ScoreArgs& a, const TopKArgs& t, const PlanArgs& p,
                                  float* workspace, bool dependent_launch, int sm_count,
                                  cudaEvent_t wait, cudaStream_t stream) {
  if (a.heads <= 0) return cudaSuccess;
  if (a.d % 4 != 0 || a.n <= 0) return cudaErrorInvalidValue;
  switch (a.g) {
    case 1:
      return LaunchSelectPlanG<1>(a, t, p, workspace, dependent_launch, sm_count, wait, stream);
    case 2:
      return LaunchSelectPlanG<2>(a, t, p, workspace, dependent_launch, sm_count, wait, stream);
    case 4:
      return LaunchSelectPlanG<4>(a, t, p, workspace, dependent_launch, sm_count, wait, stream);
    case 8:
      return LaunchSelectPlanG<8>(a, t, p, workspace, dependent_launch, sm_count, wait, stream);
    default:
      return cudaErrorInvalidValue;
  }
}

}  // namespace kvwave::gpu::cuda
